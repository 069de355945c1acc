"""On CPU, the encoder and the decoder each run on a pool of threads of their own.

XLA's CPU client runs every program on one pool of threads, a thread per core. The encoder is
compute-bound and a decode step is bound by memory bandwidth, so the two overlap well, but on
one pool the many tasks of an encoder program queue ahead of a step's and each waits on the
other (measured on 2 cores, base model: a batch-1 step 9 -> 17 ms and the encoder 0.39 -> 0.61 s
a window when both run at once). A client created by a thread restricted to some cores gets a
pool of that many threads, pinned to them. So on CPU the engine uses three clients (lanes),
each with its own pool:

- `wide`: JAX's own client, every core: for the encoder, beside the decoder's programs on
  `decode` (the operating system gives the encoder whatever the decoder leaves: the time
  between its steps, and all of it while the batch waits for the encoder), and for the
  decoder's programs while the encoder has nothing to do (a batch-8 step takes 20 ms there,
  29 ms on one core);
- `decode`: a quarter of the cores (at least one), for the decoder's programs while the
  encoder runs;
- `encode`: the other cores, for the encoder while the decoder encodes another window beside
  it (a batch with room for several windows not yet encoded): two windows side by side, each
  on its own cores, take as long as one after the other on every core (base, 8 windows:
  3.9-4.0 s either way), while the encoder on every core beside the decoder's encoding made
  each wait on the other (8 windows at batch 8: 6.96 s against 6.4-6.7).

Measured on 2 cores, base, 64 tokens a window: the encoder on `wide` rather than `encode`
beside the steps decodes 8 windows one at a time at 0.97-1.0 windows/s rather than 0.88-0.96,
and 24 windows 8 at a time at 1.31-1.35 rather than 1.24.

Parameters and caches are shared, not copied: a CPU array put on another CPU client aliases its
memory. Set DRAGOMAN_CPU_LANES=off to run everything on JAX's own client.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass

import jax
from jaxlib import xla_client

log = logging.getLogger(__name__)

SWITCH = "DRAGOMAN_CPU_LANES"


@dataclass(frozen=True)
class Lanes:
    encode: jax.Device
    decode: jax.Device
    wide: jax.Device


def split_cores(cores: set[int]) -> tuple[frozenset[int], frozenset[int]]:
    """(encoder's, decoder's): a quarter of the cores (at least one) for the decoder, whose
    steps are bound by memory bandwidth that few cores already draw; the rest for the encoder."""
    ordered = sorted(cores)
    n_decode = max(1, len(ordered) // 4)
    return frozenset(ordered[n_decode:]), frozenset(ordered[:n_decode])


def client_on(cores: frozenset[int]) -> jax.Device:
    """The device of a new CPU client whose pool has a thread per core in `cores`, pinned to
    them: a pool is sized by, and its threads inherit, the affinity of the thread that creates
    the client, so it is made on a short-lived thread restricted to those cores."""
    made: dict = {}

    def make() -> None:
        try:
            os.sched_setaffinity(0, cores)  # 0: this thread only
            made["client"] = xla_client.make_cpu_client()
        except BaseException as e:  # re-raised on the caller's thread
            made["error"] = e

    thread = threading.Thread(target=make, name="cpu-client")
    thread.start()
    thread.join()
    if "error" in made:
        raise made["error"]
    return made["client"].local_devices()[0]


@functools.cache
def _lanes(encode_cores: frozenset[int], decode_cores: frozenset[int]) -> Lanes | None:
    # Once per process: every engine in it shares the pools.
    try:
        return Lanes(client_on(encode_cores), client_on(decode_cores), jax.local_devices()[0])
    except OSError as e:  # the cores cannot be pinned here (a restricted container): one pool
        log.warning("CPU lanes unavailable (%s): the encoder and the decoder share every core", e)
        return None


def lanes_wanted() -> bool:
    """DRAGOMAN_CPU_LANES: on (the default) or off; anything else is a ValueError naming both."""
    switch = os.environ.get(SWITCH, "on")
    if switch.strip().lower() not in ("on", "off"):
        raise ValueError(f"{SWITCH}={switch!r} is not one of on, off")
    return switch.strip().lower() == "on"


def cpu_lanes() -> Lanes | None:
    """The process's lanes, or None where they do not apply: another backend, several local
    devices (the batch is split over them instead), a single core, or DRAGOMAN_CPU_LANES=off."""
    if not lanes_wanted():
        return None
    if jax.default_backend() != "cpu" or len(jax.local_devices()) != 1 or not hasattr(os, "sched_getaffinity"):
        return None
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        return None
    return _lanes(*split_cores(cores))
