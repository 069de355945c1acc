"""The service's Prometheus metrics, scraped over HTTP from an in-process server: calls by status
code, the audio and tokens of successful ones, and the engine's batch and totals."""
from __future__ import annotations

import threading

import grpc
import pytest

from grpc_support import call, config, encode, held_pcm, scrape, start_server, stub, tone, wait_for
from service.settings import ServerConfig


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = start_server(tiny_engine, metrics_port=0)
    yield srv
    srv.stop()


def test_calls_audio_tokens_and_the_batch_are_counted(server, tiny_engine):
    before = scrape(server.server.metrics_port)
    stats = tiny_engine.scheduler.stats
    steps, rows = stats.steps, stats.rows
    r = call(stub(server.port), "translate", config(), encode(tone(3.0), 16000, "wav", "pcm_s16le"))
    with pytest.raises(grpc.RpcError) as info:
        call(stub(server.port), "transcribe", config(temperature=2.0), encode(tone(1.0), 16000, "wav", "pcm_s16le"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(server.server.metrics_port)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("dragoman_calls_total", method="translate", code="OK") == 1
    assert grew("dragoman_calls_total", method="transcribe", code="INVALID_ARGUMENT") == 1
    assert grew("dragoman_calls_total", method="transcribe", code="OK") == 0
    usage = r.summary.usage
    assert grew("dragoman_audio_seconds_total", method="translate") == pytest.approx(usage.audio_seconds)
    assert grew("dragoman_tokens_total", method="translate", kind="prompt") == usage.prompt_tokens
    assert grew("dragoman_tokens_total", method="translate", kind="completion") == usage.completion_tokens
    assert grew("dragoman_call_duration_seconds_count", method="translate") == 1
    assert grew("dragoman_first_segment_seconds_count", method="translate") == 1
    assert 0 < grew("dragoman_first_segment_seconds_sum", method="translate") <= grew(
        "dragoman_call_duration_seconds_sum", method="translate")
    # Random weights fail the fallback thresholds: the one window is decoded at all six temperatures.
    assert {s.temperature for s in r.segments} == {1.0}
    assert grew("dragoman_window_decodes_total") == 6
    assert grew("dragoman_temperature_fallbacks_total") == 5
    assert value(after, "dragoman_decode_steps_total") == stats.steps and stats.steps > steps
    assert value(after, "dragoman_decode_rows_total") == stats.rows and stats.rows - rows >= stats.steps - steps
    assert value(after, "dragoman_batch_slots") == tiny_engine.max_batch
    assert value(after, "dragoman_batch_slots_busy") == 0 and value(after, "dragoman_window_decodes_waiting") == 0
    assert value(after, "dragoman_calls_active") == 0 and value(after, "dragoman_ready") == 1
    assert value(after, "dragoman_model_info", model=server.servicer.model_id, dtype="float32",
                 max_batch=str(tiny_engine.max_batch)) == 1
    assert value(after, "process_resident_memory_bytes") > 0
    # Every status code's series is there before its first call.
    assert ("dragoman_calls_total", (("code", "INTERNAL"), ("method", "transcribe"))) in before


def test_a_call_in_flight_holds_its_slot_and_the_client_ending_it_is_counted(server, tiny_engine):
    release = threading.Event()
    try:
        before = scrape(server.server.metrics_port)
        # 31 s: the first window is complete and decoding (224 tokens at each temperature: long).
        in_flight = stub(server.port).Translate(held_pcm(31.0, release, temperature=0), timeout=120)
        # The slot is free for a moment between two temperatures: wait for a scrape that sees it held.
        wait_for(lambda: value(scrape(server.server.metrics_port), "dragoman_batch_slots_busy") == 1, timeout=30)
        assert value(scrape(server.server.metrics_port), "dragoman_calls_active") == 1
        in_flight.cancel()
        wait_for(lambda: server.servicer.active == 0, timeout=5)
        with pytest.raises(grpc.RpcError) as info:  # and one whose deadline passes
            list(stub(server.port).Translate(held_pcm(31.0, release, temperature=0), timeout=1.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: server.servicer.active == 0, timeout=5)
        after = scrape(server.server.metrics_port)
    finally:
        release.set()
    for code in ("CANCELLED", "DEADLINE_EXCEEDED"):
        assert value(after, "dragoman_calls_total", method="translate", code=code) - value(
            before, "dragoman_calls_total", method="translate", code=code) == 1, code
    assert value(after, "dragoman_calls_active") == 0


def test_servers_count_apart_and_metrics_are_off_unless_asked(tiny_engine):
    with start_server(tiny_engine) as plain, start_server(tiny_engine, metrics_port=0) as other:
        assert plain.server.metrics_port is None
        call(stub(plain.port), "translate", config(), encode(tone(1.0), 16000, "wav", "pcm_s16le"))
        samples = scrape(other.server.metrics_port)
        assert value(samples, "dragoman_calls_total", method="translate", code="OK") == 0
        assert plain.servicer.metrics.registry.get_sample_value(
            "dragoman_calls_total", {"method": "translate", "code": "OK"}) == 1


class FailingEngine:
    """The tiny engine, whose transcribe() fails as a bug would."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def transcribe(self, *args, **kwargs):
        raise RuntimeError("a bug")


def test_refusals_and_failures_are_counted(tiny_engine):
    wav = encode(tone(1.0), 16000, "wav", "pcm_s16le")
    with start_server(None, metrics_port=0) as loading:
        port = loading.server.metrics_port
        with pytest.raises(grpc.RpcError) as info:
            call(stub(loading.port), "translate", config(), wav)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        samples = scrape(port)
        assert value(samples, "dragoman_calls_total", method="translate", code="UNAVAILABLE") == 1
        assert value(samples, "dragoman_ready") == 0
        assert not any(name.startswith("dragoman_batch") for name, _ in samples)  # no engine yet
        loading.set_engine(FailingEngine(tiny_engine))
        with pytest.raises(grpc.RpcError) as info:
            call(stub(loading.port), "transcribe", config(), wav)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        samples = scrape(port)
        assert value(samples, "dragoman_calls_total", method="transcribe", code="INTERNAL") == 1
        assert value(samples, "dragoman_ready") == 1 and value(samples, "dragoman_calls_active") == 0
    with pytest.raises(OSError):  # stopped with its server
        scrape(port)


def test_a_metrics_port_in_use_stops_the_server_from_starting(server):
    with pytest.raises(RuntimeError, match="cannot serve metrics on 127.0.0.1:"):
        start_server(metrics_port=server.server.metrics_port)


def test_the_metrics_port_is_checked():
    with pytest.raises(ValueError, match="metrics_port must be in"):
        ServerConfig(metrics_port=70000)
