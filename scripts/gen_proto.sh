#!/usr/bin/env bash
# Regenerate the Python stubs of the gRPC contract (proto/) into the `dragoman` package:
# dragoman/v1/speech_pb2.py (messages), speech_pb2.pyi (types), speech_pb2_grpc.py (service).
# Uses protoc as grpcio-tools bundles it, so it needs nothing but the virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -f dragoman/v1/*_pb2.py dragoman/v1/*_pb2.pyi dragoman/v1/*_pb2_grpc.py
"$PY" -m grpc_tools.protoc -Iproto \
    --python_out=. --pyi_out=. --grpc_python_out=. \
    $(cd proto && find dragoman -name '*.proto' | LC_ALL=C sort)
