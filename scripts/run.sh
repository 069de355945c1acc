#!/usr/bin/env bash
# Start Dragoman on this machine: the gRPC SpeechService and, in front of it, the OpenAI-compatible
# HTTP API under gunicorn on localhost:8000. Both run in the foreground process group; Ctrl-C or
# SIGTERM stops both, and so does either one exiting.
#
#   MODEL=openai/whisper-large-v3 scripts/run.sh
#
# Environment: MODEL (hub id, model directory or .pt checkpoint; default DRAGOMAN_MODEL, else
# openai/whisper-large-v3),
# DRAGOMAN_PORT (gRPC port, default 50051), DRAGOMAN_HTTP_HOST / DRAGOMAN_HTTP_PORT (HTTP address,
# default 127.0.0.1:8000), DRAGOMAN_API_KEY, and the other DRAGOMAN_* variables of
# `python -m service serve --help` and `python -m http_shim --help`.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "error: $PY not found; run 'make run' (or create .venv and pip install -e .) first" >&2
    exit 1
fi
MODEL="${MODEL:-${DRAGOMAN_MODEL:-openai/whisper-large-v3}}"
GRPC_PORT="${DRAGOMAN_PORT:-50051}"
export DRAGOMAN_GRPC_TARGET="${DRAGOMAN_GRPC_TARGET:-127.0.0.1:$GRPC_PORT}"

pids=()
stopping=0
stop() {
    [[ $stopping == 1 ]] && return
    stopping=1
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    wait "${pids[@]}" 2>/dev/null
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM

"$PY" -m service serve --model "$MODEL" --port "$GRPC_PORT" &
pids+=($!)
"$PY" -m http_shim &
pids+=($!)

echo "dragoman: gRPC on port $GRPC_PORT (model $MODEL), HTTP on ${DRAGOMAN_HTTP_HOST:-127.0.0.1}:${DRAGOMAN_HTTP_PORT:-8000}; Ctrl-C stops both" >&2
wait -n "${pids[@]}"
status=$?
stop
exit $status
