"""Prometheus metrics of the HTTP API, served at GET /metrics on its own port: requests by
endpoint and status code (what the gRPC service's metrics cannot see: uploads refused for their
form, size, API key or stalling), their durations to the last byte of the answer (an event
stream's too), and those in progress.

Under `python -m http_shim` the counts live in files of a directory made for the run
(prometheus_client's multiprocess mode), so that /metrics, whichever gunicorn worker answers
it, sums every worker's. A single process (an own WSGI server, the tests) counts in memory.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from flask import Response
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map
from werkzeug.wsgi import ClosingIterator

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's switch to multiprocess mode
METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS"})  # any other counts as "other": one series, not one each
# Seconds: a model list takes milliseconds, a transcription of a long file minutes.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))


class HttpMetrics:
    def __init__(self):
        # Imported here, not at the top: prometheus_client picks in-memory or multiprocess counts
        # when first imported, by the environment, which the command line sets before it forks.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

        shared = MULTIPROCESS_DIR in os.environ  # as prometheus_client decides
        if shared and not os.environ[MULTIPROCESS_DIR]:
            raise RuntimeError(f"{MULTIPROCESS_DIR} is set but empty: set it to an empty directory, or unset it")
        if shared and values.ValueClass is values.MutexValue:
            raise RuntimeError(f"prometheus_client was imported before {MULTIPROCESS_DIR} was set: "
                               "its counts would not be shared between gunicorn's workers")
        self.registry = CollectorRegistry()
        own = None if shared else self.registry  # multiprocess: read back from the files
        self.requests = Counter("dragoman_http_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "method", "code"], registry=own)
        self.duration = Histogram("dragoman_http_request_duration_seconds",
                                  "Seconds from a request's arrival to the end of its answer, by endpoint",
                                  ["endpoint"], buckets=BUCKETS, registry=own)
        self.in_progress = Gauge("dragoman_http_requests_in_progress", "HTTP requests being answered, by endpoint",
                                 ["endpoint"], registry=own, multiprocess_mode="livesum")
        if shared:
            multiprocess.MultiProcessCollector(self.registry)

    def wrap(self, wsgi_app: Callable, url_map: Map) -> Callable:
        """The WSGI application `wsgi_app`, counted: a request from its arrival until its answer's
        last byte is out (an event stream's too), with the status actually sent. Around the whole
        application, so no answer escapes the count: one that fails in Flask's last steps is
        replaced by a 500, and that is what is counted."""

        def counted(environ: dict, start_response: Callable):
            r = _Request(_endpoint(url_map, environ), environ.get("REQUEST_METHOD", ""))
            self.in_progress.labels(r.endpoint).inc()
            status = ["500"]  # unless the application answers

            def respond(status_line: str, headers, exc_info=None):
                status[0] = status_line.split(" ", 1)[0]
                return start_response(status_line, headers, exc_info)

            try:
                body = wsgi_app(environ, respond)
            except BaseException:
                self._finished(r, status[0])
                raise
            return ClosingIterator(body, lambda: self._finished(r, status[0]))

        return counted

    def _finished(self, r: _Request, code: str) -> None:
        if r.finished:  # a server that closes an answer twice
            return
        r.finished = True
        self.requests.labels(r.endpoint, r.method, code).inc()
        self.duration.labels(r.endpoint).observe(time.perf_counter() - r.since)
        self.in_progress.labels(r.endpoint).dec()

    def exposition(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), mimetype=CONTENT_TYPE_LATEST)


class _Request:
    """A request being answered: its labels, since when, and whether it is counted yet."""

    def __init__(self, endpoint: str, method: str):
        self.endpoint, self.method = endpoint, method if method in METHODS else "other"
        self.since = time.perf_counter()
        self.finished = False


def _endpoint(url_map: Map, environ: dict) -> str:
    """The route's name; 'unknown' where no route takes the request (a path of no route, each of
    which would be a series of its own; a method the route does not take; a redirect)."""
    try:
        return url_map.bind_to_environ(environ).match()[0]
    except HTTPException:  # NotFound, MethodNotAllowed, RequestRedirect
        return "unknown"


def mark_worker_dead(pid: int) -> None:
    """gunicorn's child_exit hook: a worker's in-progress gauge leaves the sum once it is gone."""
    if os.environ.get(MULTIPROCESS_DIR):  # unset or empty: nothing to mark
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
