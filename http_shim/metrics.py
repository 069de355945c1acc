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

from flask import Response, g, request

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's switch to multiprocess mode
# Seconds: a model list takes milliseconds, a transcription of a long file minutes.
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, float("inf"))


class HttpMetrics:
    def __init__(self):
        # Imported here, not at the top: prometheus_client picks in-memory or multiprocess counts
        # when first imported, by the environment, which the command line sets before it forks.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values

        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        if self.multiprocess and values.ValueClass is values.MutexValue:
            raise RuntimeError(f"prometheus_client was imported before {MULTIPROCESS_DIR} was set: "
                               "its counts would not be shared between gunicorn's workers")
        self.registry = CollectorRegistry()
        own = None if self.multiprocess else self.registry  # multiprocess: read back from the files
        self.requests = Counter("dragoman_http_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "method", "code"], registry=own)
        self.duration = Histogram("dragoman_http_request_duration_seconds",
                                  "Seconds from a request's arrival to the end of its answer, by endpoint",
                                  ["endpoint"], buckets=BUCKETS, registry=own)
        self.in_progress = Gauge("dragoman_http_requests_in_progress", "HTTP requests being answered, by endpoint",
                                 ["endpoint"], registry=own, multiprocess_mode="livesum")
        if self.multiprocess:
            multiprocess.MultiProcessCollector(self.registry)

    def started(self) -> None:
        """At a request's arrival (before anything may refuse it)."""
        g.metrics_since = time.perf_counter()
        g.metrics_endpoint = _endpoint()
        self.in_progress.labels(g.metrics_endpoint).inc()

    def answered(self, response: Response) -> None:
        """Once the answer is made: counted when its last byte is out (an event stream's too)."""
        endpoint = getattr(g, "metrics_endpoint", None)
        if endpoint is None:  # refused before `started` (cannot happen, but never count it twice)
            return
        since, method, code = g.metrics_since, request.method, str(response.status_code)
        g.metrics_endpoint = None

        def done() -> None:
            self.requests.labels(endpoint, method, code).inc()
            self.duration.labels(endpoint).observe(time.perf_counter() - since)
            self.in_progress.labels(endpoint).dec()

        response.call_on_close(done)

    def exposition(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), mimetype=CONTENT_TYPE_LATEST)


def _endpoint() -> str:
    """The route's name; 'unknown' for a path no route takes (each would be a series of its own)."""
    rule = request.url_rule
    return rule.endpoint if rule is not None else "unknown"


def mark_worker_dead(pid: int) -> None:
    """gunicorn's child_exit hook: a worker's in-progress gauge leaves the sum once it is gone."""
    if os.environ.get(MULTIPROCESS_DIR):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
