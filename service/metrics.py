"""Prometheus metrics of the gRPC service: its calls, and its engine's batch, read when scraped.

Every Translate/Transcribe call is counted here, the HTTP API's included: they reach the model
through this service. `--metrics-port` serves them as Prometheus text (GET /metrics), beside the
process's own (memory, CPU time, file descriptors, garbage collection). Each server has a
registry of its own, so that several servers in one process (tests, embedding) count their calls
apart; the engine's totals are its own, whichever server reads them.
"""
from __future__ import annotations

import grpc
import prometheus_client
from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge,
                               Histogram, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

# A `_created` series beside each counter and histogram doubles what is scraped and says nothing
# that the process's start time does not.
prometheus_client.disable_created_metrics()

METHODS = ("translate", "transcribe")
# Every status a call can end with (servicer.py): each series exists from the start, so that the
# first failure after a restart is an increase, not a new series that increase() cannot see.
CODES = tuple(grpc.StatusCode[name] for name in ("OK", "CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                                 "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL"))
# Whole calls: a few seconds of speech to hours of audio (--max-audio-seconds: 4 h by default).
CALL_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800, 14400)
# The first segment: a window's decoding behind the windows ahead of it; audio streamed as PCM
# in real time has its first 30 s window a little after 30 s.
FIRST_SEGMENT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 35, 40, 45, 60, 120)


class ServiceMetrics:
    def __init__(self, servicer):
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # stateless readers of the process
            r.register(collector)
        self.calls = Counter("dragoman_calls", "Translate and Transcribe calls ended, by gRPC status code",
                             ["method", "code"], registry=r)
        self.call_seconds = Histogram("dragoman_call_duration_seconds",
                                      "Seconds from a successful call's start to its summary", ["method"],
                                      buckets=CALL_BUCKETS, registry=r)
        self.first_segment_seconds = Histogram("dragoman_first_segment_seconds",
                                               "Seconds from a call's start to its first segment", ["method"],
                                               buckets=FIRST_SEGMENT_BUCKETS, registry=r)
        self.audio_seconds = Counter("dragoman_audio_seconds", "Seconds of audio of successful calls", ["method"],
                                     registry=r)
        self.tokens = Counter("dragoman_tokens", "Tokens of successful calls: prompt (fed to the decoder, every "
                              "attempt counted) and completion (sampled)", ["method", "kind"], registry=r)
        Gauge("dragoman_calls_active", "Translate and Transcribe calls in progress",
              registry=r).set_function(lambda: servicer.active)
        Gauge("dragoman_ready", "1 while the service is SERVING (model loaded and compiled, not shutting down)",
              registry=r).set_function(lambda: float(servicer.engine is not None and not servicer.draining))
        for method in METHODS:
            for code in CODES:
                self.calls.labels(method, code.name)
            for metric in (self.call_seconds, self.first_segment_seconds, self.audio_seconds):
                metric.labels(method)
            for kind in ("prompt", "completion"):
                self.tokens.labels(method, kind)
        r.register(_EngineCollector(servicer))

    def call_ended(self, method: str, code: grpc.StatusCode) -> None:
        self.calls.labels(method, code.name).inc()

    def call_succeeded(self, method: str, seconds: float, result) -> None:
        """`result`: the call's engine Transcription."""
        self.call_seconds.labels(method).observe(seconds)
        self.audio_seconds.labels(method).inc(result.duration)
        self.tokens.labels(method, "prompt").inc(result.prompt_tokens)
        self.tokens.labels(method, "completion").inc(result.completion_tokens)

    def first_segment(self, method: str, seconds: float) -> None:
        self.first_segment_seconds.labels(method).observe(seconds)

    def serve(self, host: str, port: int):
        """Serves GET /metrics on host:port (0: a free port) from a daemon thread; returns the
        HTTP server (`server_port`, `shutdown()`)."""
        server, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return server


class _EngineCollector(Collector):
    """The engine's batch and totals, read at each scrape (nothing while the model loads)."""

    def __init__(self, servicer):
        self.servicer = servicer

    def collect(self):
        engine = self.servicer.engine
        if engine is None:
            return
        scheduler, programs = engine.scheduler, engine.programs
        stats = scheduler.stats
        yield InfoMetricFamily("dragoman_model", "The served model", value={
            "model": self.servicer.model_id, "dtype": str(programs.dtype), "max_batch": str(programs.n_slots)})
        yield GaugeMetricFamily("dragoman_batch_slots", "Batch slots: windows decoded together at most",
                                value=programs.n_slots)
        yield GaugeMetricFamily("dragoman_batch_slots_busy", "Batch slots in use (a beam search or best-of window "
                                "takes several)", value=scheduler.busy_slots)
        yield GaugeMetricFamily("dragoman_window_decodes_waiting", "Decodings of 30 s windows waiting for a batch "
                                "slot (a temperature fallback is another)", value=scheduler.queued)
        yield CounterMetricFamily("dragoman_window_decodes", "Decodings of 30 s windows admitted to the batch (a "
                                  "temperature fallback is another)", value=stats.windows)
        yield CounterMetricFamily("dragoman_temperature_fallbacks", "Window decodings at a higher temperature after "
                                  "the text failed the compression ratio or log probability threshold",
                                  value=stats.fallbacks)
        yield CounterMetricFamily("dragoman_decode_steps", "Decoder steps run", value=stats.steps)
        yield CounterMetricFamily("dragoman_decode_rows", "Batch rows decoded, summed over the steps (over "
                                  "dragoman_decode_steps_total: rows per step)", value=stats.rows)
