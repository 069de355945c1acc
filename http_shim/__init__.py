"""Dragoman's OpenAI-compatible HTTP API: a Flask application in front of the gRPC SpeechService.

    gunicorn -k gthread --threads 32 -b 127.0.0.1:8000 "http_shim:create_app()"
    python -m http_shim --port 8000 --grpc-target localhost:50051
"""
from .app import create_app
from .config import Config

__all__ = ["create_app", "Config"]
