"""How tests tell that JAX compiled one of the engine's programs."""
# Recorded (with the program's name) for every program compiled, or read from the disk cache.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# The engine's programs (service/engine/programs.py), as JAX names them.
PROGRAMS = {"jit(encode)", "jit(_detect_impl)", "jit(_admit_impl)", "jit(_step_impl)", "jit(_move_impl)"}
