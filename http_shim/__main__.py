"""`python -m http_shim`: the HTTP API under gunicorn (threaded workers), configured by flags or env."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

from gunicorn.app.base import BaseApplication
from service.flags import check_environment

from .config import Config, build_parser, config_from_args
from .metrics import MULTIPROCESS_DIR, mark_worker_dead


class Server(BaseApplication):
    """Gunicorn, with its settings from our flags rather than its own command line."""

    def __init__(self, config: Config, log_level: str = "info"):
        self.config_obj = config
        self.log_level = log_level
        super().__init__()

    def load_config(self) -> None:
        c = self.config_obj
        host = f"[{c.host}]" if ":" in c.host and not c.host.startswith("[") else c.host
        settings = {
            "bind": [f"{host}:{c.port}"],
            "workers": c.workers,
            "worker_class": "gthread",
            "threads": c.threads,
            # Requests run long (a transcription) in worker threads; the worker's heartbeat is separate.
            "timeout": 120,
            "graceful_timeout": 30,
            "keepalive": 5,
            "loglevel": self.log_level,
            "accesslog": "-",
            "errorlog": "-",
            "proc_name": "dragoman-http",
            "control_socket_disable": True,
            "child_exit": lambda server, worker: mark_worker_dead(worker.pid),
        }
        for key, value in settings.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        # Runs in each worker after the fork, so every worker has its own gRPC channel.
        from .app import create_app

        logging.basicConfig(level=self.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return create_app(self.config_obj)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_environment(parser, args)
    config = config_from_args(args)
    # Every worker counts its requests in files here, and /metrics sums them (http_shim/metrics.py).
    # Set before the workers fork and first import prometheus_client; a fresh directory each run,
    # as multiprocess mode needs.
    master, os.environ[MULTIPROCESS_DIR] = os.getpid(), tempfile.mkdtemp(prefix="dragoman-http-metrics-")
    try:
        Server(config, args.log_level).run()
    finally:
        if os.getpid() == master:  # a worker leaves through here too, when it exits
            shutil.rmtree(os.environ[MULTIPROCESS_DIR], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
