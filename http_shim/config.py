"""The shim's settings: command-line flags, each with an environment twin."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from service.flags import check_environment, env_flag, port, positive_integer, positive_number, seconds, size
from service.model_names import WHISPER_ALIAS

DEFAULT_MAX_UPLOAD = 25 * 1024 * 1024  # OpenAI's limit on audio files


@dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_target: str = "localhost:50051"
    api_key: str | None = None  # None: no authentication
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    request_timeout: float = 600.0  # seconds a request may take in the service (gRPC deadline)
    upload_timeout: float = 60.0  # seconds the request body may send nothing (then 408); 0: no limit
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers
    workers: int = 1
    threads: int = 32
    served_aliases: tuple[str, ...] = (WHISPER_ALIAS,)  # names every served model also answers to
    models_cache_seconds: float = 10.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Config":
        return parse_args([], env)

    def replace(self, **changes) -> "Config":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Config(**values)


def parse_origins(text: str) -> list[str]:
    return [o.strip().rstrip("/") for o in str(text).split(",") if o.strip()]


FLAGS = [
    # flag, attribute, environment variable, type, help
    ("--host", "host", "DRAGOMAN_HTTP_HOST", str, "address to listen on"),
    ("--port", "port", "DRAGOMAN_HTTP_PORT", port, "port to listen on; 0 picks a free one"),
    ("--grpc-target", "grpc_target", "DRAGOMAN_GRPC_TARGET", str, "the gRPC SpeechService (host:port)"),
    ("--api-key", "api_key", "DRAGOMAN_API_KEY", str,
     "require 'Authorization: Bearer KEY' on /v1/ requests"),
    ("--max-upload-bytes", "max_upload_bytes", "DRAGOMAN_HTTP_MAX_UPLOAD_BYTES", size,
     "largest audio file accepted, in bytes or with a unit (25MB)"),
    ("--request-timeout", "request_timeout", "DRAGOMAN_HTTP_REQUEST_TIMEOUT", positive_number,
     "seconds a request may take in the service before it answers 504"),
    ("--upload-timeout", "upload_timeout", "DRAGOMAN_HTTP_UPLOAD_TIMEOUT", seconds,
     "seconds an upload may send nothing before it answers 408 (0: no limit)"),
    ("--cors-origins", "cors_origins", "DRAGOMAN_HTTP_CORS_ORIGINS", parse_origins,
     "comma-separated origins allowed by CORS, or '*'"),
    ("--workers", "workers", "DRAGOMAN_HTTP_WORKERS", positive_integer, "gunicorn worker processes"),
    ("--threads", "threads", "DRAGOMAN_HTTP_THREADS", positive_integer, "threads per worker (concurrent requests)"),
]
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    defaults = Config()
    p = argparse.ArgumentParser(
        prog="python -m http_shim",
        description="Dragoman's OpenAI-compatible HTTP API (/v1/audio/translations, /v1/audio/transcriptions, "
                    "/v1/models, /health) in front of the gRPC SpeechService, served by gunicorn.")
    for flag, attr, var, kind, help_text in FLAGS:
        env_flag(p, flag, var, dest=attr, type=kind, default=getattr(defaults, attr), help=help_text, env=env,
                 secret=attr == "api_key")
    env_flag(p, "--log-level", "DRAGOMAN_HTTP_LOG_LEVEL", type=str.lower, choices=LOG_LEVELS, default="info",
             help="how much gunicorn and the shim log", env=env)
    return p


def parse_args(argv: list[str] | None, env: dict[str, str] | None = None) -> Config:
    parser = build_parser(env)
    args = parser.parse_args(argv)
    check_environment(parser, args)
    return config_from_args(args)


def config_from_args(args: argparse.Namespace) -> Config:
    values = {attr: getattr(args, attr) for _, attr, *_ in FLAGS}
    if not values["api_key"]:
        values["api_key"] = None
    return Config(**values)
