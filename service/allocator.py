"""Run the engine's processes on gperftools' tcmalloc where it is installed.

XLA on CPU allocates each run's buffers with malloc, tens of megabytes of them per decode step.
glibc's malloc serves blocks that large with fresh mappings and hands them back to the kernel when
they are freed, so every step pays for page faults again; tcmalloc keeps freed memory for the next
run (on 2 cores, `base`: about 15% more windows/s at batch 8, 3-5% at batch 1). A process picks its
allocator when it starts, so the command line executes itself again, once, with LD_PRELOAD set.

DRAGOMAN_MALLOC=system keeps glibc's malloc; an LD_PRELOAD set by the user is left as it is.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Callable, Mapping

VARIABLE = "DRAGOMAN_MALLOC"
CHOICES = ("tcmalloc", "system")
LIBRARY = "tcmalloc_minimal"  # Debian/Ubuntu: libtcmalloc-minimal4; Fedora: gperftools-libs


def tcmalloc_library() -> str | None:
    """The tcmalloc the loader would preload (by its soname, as the loader finds it), where it is installed."""
    return ctypes.util.find_library(LIBRARY)


def preload_environment(environ: Mapping[str, str],
                        find: Callable[[], str | None] = tcmalloc_library) -> dict[str, str] | None:
    """The environment to execute this command again with, or None to go on as it is."""
    choice = environ.get(VARIABLE, "tcmalloc")
    if choice not in CHOICES:
        raise ValueError(f"{VARIABLE}={choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "system" or not sys.platform.startswith("linux") or environ.get("LD_PRELOAD"):
        return None
    library = find()
    if library is None:
        return None
    # tcmalloc reports each allocation over 1 GiB on stderr (a large model's weights make some): not news.
    return {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40), **environ, "LD_PRELOAD": library}


def use_tcmalloc() -> None:
    """Execute this process's command line again on tcmalloc, where it is installed and not yet in use.
    Only a program started from a file, a module or -c can be started again: not an interactive
    session or a script read from stdin."""
    if sys.argv[0] in ("", "-"):
        return
    try:
        environment = preload_environment(os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None  # a usage error, as the command line reports its own
    if environment is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def in_use() -> str:
    """The malloc this process runs on, in words: the tcmalloc file mapped, or what LD_PRELOAD names, or
    the C library's."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = next((line.split()[-1] for line in maps if "libtcmalloc" in line), None)
    except OSError:
        mapped = None
    return mapped or os.environ.get("LD_PRELOAD") or "the C library's"
