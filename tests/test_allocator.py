"""The command line starts itself again on tcmalloc where it is installed (service/allocator.py)."""
from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.allocator import LIBRARY, preload_environment

ROOT = Path(__file__).resolve().parent.parent
REPORT = "import os; from service.allocator import use_tcmalloc, in_use; use_tcmalloc(); print(os.getpid(), in_use(), sep='|')"


def found() -> str:
    return f"/lib/lib{LIBRARY}.so.4"


def test_tcmalloc_is_preloaded_by_default_and_other_settings_kept():
    env = preload_environment({"PATH": "/bin", "DRAGOMAN_MODEL": "m"}, found)
    assert env["LD_PRELOAD"] == found()
    assert env["PATH"] == "/bin" and env["DRAGOMAN_MODEL"] == "m"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no report per large weight array
    kept = preload_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1000"}, found)
    assert kept["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "1000"


@pytest.mark.parametrize("environ", [{"DRAGOMAN_MALLOC": "system"}, {"LD_PRELOAD": "/lib/libjemalloc.so.2"}])
def test_the_system_allocator_or_the_users_preload_is_kept(environ):
    assert preload_environment(environ, found) is None


def test_without_tcmalloc_the_process_goes_on_as_it_is():
    assert preload_environment({}, lambda: None) is None


def test_an_unknown_allocator_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"DRAGOMAN_MALLOC='jemalloc' is not one of tcmalloc, system"):
        preload_environment({"DRAGOMAN_MALLOC": "jemalloc"}, found)


def report(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DRAGOMAN_MALLOC")}
    proc = subprocess.Popen([sys.executable, "-c", REPORT], cwd=ROOT, env={**environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    pid, library = out.strip().split("|")
    assert int(pid) == proc.pid  # executed again in place: a supervisor's signals still reach it
    return library


def test_a_command_runs_again_on_tcmalloc_once_and_in_place():
    assert ctypes.util.find_library(LIBRARY), \
        "gperftools' tcmalloc is needed for this test: apt-get install libtcmalloc-minimal4 (.ci/run does)"
    library = report()
    assert "libtcmalloc_minimal" in library and Path(library).exists()
    library = report(DRAGOMAN_MALLOC="system")
    assert library == "the C library's"
    library = report(LD_PRELOAD="libc.so.6")  # the user's choice, named
    assert library == "libc.so.6"
