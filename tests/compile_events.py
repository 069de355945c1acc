"""How tests tell that JAX compiled one of the engine's programs."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import jax

# Recorded (with the program's name) for every program compiled, or read from the disk cache.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# The engine's programs (service/engine/programs.py), as JAX names them.
PROGRAMS = {"jit(_encode_impl)", "jit(_detect_impl)", "jit(_admit_impl)", "jit(_step_impl)", "jit(_move_impl)",
            "jit(_reorder_impl)"}


@contextmanager
def compiles() -> Iterator[list[str]]:
    """The names of the programs compiled (or read from the disk cache) while the block runs."""
    names: list[str] = []

    def on_event(event: str, _seconds: float, fun_name: str = "", **_) -> None:
        if event == COMPILE_EVENT:
            names.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
