"""The names a served model answers to, besides its id: one module that the gRPC service and the
HTTP shim both read (it imports nothing heavy)."""
from __future__ import annotations

WHISPER_ALIAS = "whisper-1"  # the model name OpenAI's clients send


def short_name(model_id: str) -> str:
    """What a model is also called by: the last part of its hub id or path ("whisper-large-v3")."""
    return model_id.rstrip("/").rsplit("/", 1)[-1]
