"""A Node.js client (@grpc/grpc-js, @grpc/proto-loader, loading proto/) against the Python server."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from grpc_support import start_server

ROOT = Path(__file__).resolve().parent.parent


def test_node_client(tiny_engine):
    node = shutil.which("node")
    assert node, "Node.js (node) is needed for this test"
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        assert (ROOT / "node_modules" / package / "package.json").exists(), \
            f"{package} is not installed: run `npm ci` (`make test` does)"
    srv = start_server(tiny_engine)
    try:
        env = {**os.environ, "DRAGOMAN_GRPC_ADDRESS": f"127.0.0.1:{srv.port}"}
        proc = subprocess.run([node, "--test", "tests/node/"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# fail 0" in proc.stdout and re.search(r"^# pass [1-9]", proc.stdout, re.M), proc.stdout
