"""The gRPC server's settings: flags of `python -m service serve`, each with an environment twin."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .engine import MODES
from .flags import env_flag, port, positive_integer, positive_number, seconds, size
from .model_names import WHISPER_ALIAS


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    max_concurrent_streams: int = 16  # Translate/Transcribe calls at once; more get RESOURCE_EXHAUSTED
    max_audio_seconds: float = 4 * 3600.0  # decoded audio per call
    max_upload_bytes: int = 512 * 1024 * 1024  # audio bytes per call
    default_mode: str = "batched"  # long-form mode when the request leaves it unspecified
    grace_period: float = 30.0  # seconds in-flight calls get to finish on SIGTERM/SIGINT
    # Seconds a call may wait on its client for a request message (0: no limit): a stalled client
    # would otherwise hold one of the concurrent streams for as long as its connection stays
    # open. Time the engine spends on the audio received so far does not count.
    receive_timeout: float = 60.0
    # HTTP/2 keepalive: a connection quiet for keepalive_time seconds is pinged, and closed (its
    # calls cancelled, their streams freed) when no answer comes within keepalive_timeout: a
    # client whose machine or network vanished is found even while the engine works for it.
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    model_id: str | None = None  # the served model's id; None: the engine's name
    metrics_port: int | None = None  # Prometheus metrics over HTTP on this port (0: any free one); None: off
    aliases: tuple[str, ...] = (WHISPER_ALIAS,)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.max_concurrent_streams < 1:
            raise ValueError(f"max_concurrent_streams must be at least 1, got {self.max_concurrent_streams}")
        if not 0 < self.max_audio_seconds < math.inf:
            raise ValueError(f"max_audio_seconds must be a positive number of seconds, got {self.max_audio_seconds}")
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be at least 1, got {self.max_upload_bytes}")
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {', '.join(MODES)}, got {self.default_mode!r}")
        if self.grace_period < 0:
            raise ValueError(f"grace_period must not be negative, got {self.grace_period}")
        if not (self.keepalive_time > 0 and self.keepalive_timeout > 0):
            raise ValueError(f"keepalive_time and keepalive_timeout must be positive, got {self.keepalive_time} and "
                             f"{self.keepalive_timeout}")
        if not self.receive_timeout >= 0:  # NaN fails too
            raise ValueError(f"receive_timeout must be 0 (no limit) or positive, got {self.receive_timeout}")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    env_flag(p, "--host", "DRAGOMAN_HOST", default=d.host,
             help="address to listen on; 0.0.0.0 or [::] for every interface")
    env_flag(p, "--port", "DRAGOMAN_PORT", type=port, default=d.port, help="port to listen on; 0 picks a free one")
    env_flag(p, "--metrics-port", "DRAGOMAN_METRICS_PORT", type=port, default=d.metrics_port,
             help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST: --host); 0 picks a free one")
    env_flag(p, "--max-concurrent-streams", "DRAGOMAN_MAX_CONCURRENT_STREAMS", type=positive_integer,
             default=d.max_concurrent_streams,
             help="Translate and Transcribe calls served at once; further calls get RESOURCE_EXHAUSTED with a retry delay")
    env_flag(p, "--max-audio-seconds", "DRAGOMAN_MAX_AUDIO_SECONDS", type=positive_number, default=d.max_audio_seconds,
             shown="%(default)g", help="longest audio accepted per call, in seconds")
    env_flag(p, "--max-upload-bytes", "DRAGOMAN_MAX_UPLOAD_BYTES", type=size, default=d.max_upload_bytes,
             shown="512MiB", help="most audio bytes accepted per call, in bytes or with a unit (1GB)")
    env_flag(p, "--default-mode", "DRAGOMAN_DEFAULT_MODE", choices=MODES, default=d.default_mode,
             help="long-form mode for requests that leave it unspecified: batched (30 s windows cut at pauses, "
                  "decoded at once) or sequential (openai-whisper's loop)")
    env_flag(p, "--grace-period", "DRAGOMAN_GRACE_PERIOD", type=seconds, default=d.grace_period, shown="%(default)g",
             help="on SIGTERM or SIGINT, seconds that calls in flight get to finish before they are cancelled")
    env_flag(p, "--receive-timeout", "DRAGOMAN_RECEIVE_TIMEOUT", type=seconds, default=d.receive_timeout,
             shown="%(default)g",
             help="seconds a call may wait on its client for the next message (time spent decoding the audio "
                  "received so far does not count); it then fails with DEADLINE_EXCEEDED, freeing its stream. "
                  "0: no limit")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(host=args.host, port=args.port, max_concurrent_streams=args.max_concurrent_streams,
                        max_audio_seconds=args.max_audio_seconds, max_upload_bytes=args.max_upload_bytes,
                        default_mode=args.default_mode, grace_period=args.grace_period, receive_timeout=args.receive_timeout,
                        model_id=args.model, metrics_port=args.metrics_port)
