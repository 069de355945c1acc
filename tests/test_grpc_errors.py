"""Every error of the contract: its status code, its google.rpc details, and a server that
keeps serving afterwards."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from dragoman.v1 import speech_pb2 as pb
from grpc_support import (call, config, encode, error_details, pcm, requests, seconds, start_server, stub, tone,
                          violated_fields)

S16 = pb.AUDIO_ENCODING_S16LE


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = start_server(tiny_engine)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tight(tiny_engine):
    """A server with small limits: one call at a time, 2 s of audio, 40 kB per call."""
    srv = start_server(tiny_engine, max_concurrent_streams=1, max_audio_seconds=2.0, max_upload_bytes=40_000)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def impatient(tiny_engine):
    """A server that waits 1 s for a client's next message, one call at a time."""
    srv = start_server(tiny_engine, max_concurrent_streams=1, receive_timeout=1.0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def wav():
    return encode(tone(1.0), 16000, "wav", "pcm_s16le")


def fails(client, messages, task: str = "translate", timeout: float = 60) -> grpc.RpcError:
    method = client.Translate if task == "translate" else client.Transcribe
    with pytest.raises(grpc.RpcError) as info:
        for _ in method(iter(list(messages)), timeout=timeout):
            pass
    return info.value


def invalid(err: grpc.RpcError, field: str) -> str:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert violated_fields(err) == [field]
    description = error_details(err)["bad_request"].field_violations[0].description
    assert description and field in err.details()
    return description


def wait_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.servicer.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.servicer.active == 0


@pytest.mark.parametrize("language", ["klingon", "xx", "english (us)"])
def test_unknown_language(server, wav, language):
    err = fails(stub(server.port), requests("translate", config(language=language), wav))
    assert repr(language) in invalid(err, "config.language")


@pytest.mark.parametrize("temperature", [-0.1, 1.5, float("nan")])
def test_temperature_out_of_range(server, wav, temperature):
    invalid(fails(stub(server.port), requests("transcribe", config(temperature=temperature), wav), "transcribe"),
            "config.temperature")


@pytest.mark.parametrize("field,value", [("repetition_penalty", 0.0), ("repetition_penalty", 11.0),
                                         ("max_new_tokens", 0), ("max_new_tokens", 449)])
def test_option_out_of_range(server, wav, field, value):
    invalid(fails(stub(server.port), requests("translate", config(**{field: value}), wav)), f"config.{field}")


@pytest.mark.parametrize("options,field", [
    (dict(beam_size=0), "beam_size"), (dict(beam_size=11), "beam_size"), (dict(best_of=0), "best_of"),
    (dict(best_of=11), "best_of"), (dict(patience=1.0), "patience"), (dict(beam_size=2, patience=0.0), "patience"),
    (dict(beam_size=2, patience=11.0), "patience"), (dict(beam_size=2, patience=float("nan")), "patience"),
    (dict(length_penalty=2.0), "length_penalty"), (dict(length_penalty=-0.5), "length_penalty"),
    (dict(compression_ratio_threshold=-1.0), "compression_ratio_threshold"),
    (dict(compression_ratio_threshold=float("inf")), "compression_ratio_threshold"),
    (dict(logprob_threshold=0.5), "logprob_threshold"), (dict(logprob_threshold=-101.0), "logprob_threshold"),
    (dict(no_speech_threshold=1.5), "no_speech_threshold"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=2.0), "min_p"),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v)
def test_decoding_option_out_of_range(server, wav, options, field):
    description = invalid(fails(stub(server.port), requests("transcribe", config(**options), wav), "transcribe"),
                          f"config.{field}")
    assert field in description


@pytest.mark.parametrize("field", ["beam_size", "best_of"])
def test_more_candidates_than_the_batch(server, wav, tiny_engine, field):
    n = tiny_engine.max_batch + 1
    assert n <= 10, "the batch of the test engine is below the range of the field"
    description = invalid(fails(stub(server.port), requests("translate", config(**{field: n}), wav)), f"config.{field}")
    assert str(tiny_engine.max_batch) in description


def test_unknown_model(server, wav):
    description = invalid(fails(stub(server.port), requests("translate", config(model="whisper-2"), wav)),
                          "config.model")
    assert "whisper-2" in description and "whisper-1" in description
    assert repr(server.servicer.model_id.rsplit("/", 1)[-1]) in description


def test_audio_before_config(server, wav):
    messages = [pb.TranslateRequest(audio=wav[:1000]), pb.TranslateRequest(config=config())]
    invalid(fails(stub(server.port), messages), "config")


def test_no_messages(server):
    invalid(fails(stub(server.port), []), "config")


def test_an_empty_first_message(server):
    assert "neither config nor audio" in invalid(fails(stub(server.port), [pb.TranslateRequest()]), "config")


@pytest.mark.parametrize("pcm_input", [False, True])
def test_second_config(server, wav, pcm_input):
    cfg = config(encoding=S16, sample_rate_hertz=16000) if pcm_input else config()
    messages = [pb.TranslateRequest(config=cfg), pb.TranslateRequest(audio=wav[:4000]),
                pb.TranslateRequest(config=cfg), pb.TranslateRequest(audio=wav[4000:])]
    invalid(fails(stub(server.port), messages), "config")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_samples_that_are_not_finite(server, bad):
    audio = tone(2.0)
    audio[8000] = bad
    f32 = config(encoding=pb.AUDIO_ENCODING_F32LE, sample_rate_hertz=16000)
    for cfg, data in ((f32, pcm(audio, "f32le")), (config(), encode(audio, 16000, "wav", "pcm_f32le"))):
        assert "NaN or infinite samples" in invalid(fails(stub(server.port), requests("transcribe", cfg, data),
                                                          "transcribe"), "audio")


@pytest.mark.parametrize("pcm_input", [False, True])
def test_a_message_with_no_payload(server, wav, pcm_input):
    cfg = config(encoding=S16, sample_rate_hertz=16000) if pcm_input else config()
    messages = [pb.TranslateRequest(config=cfg), pb.TranslateRequest(audio=wav[:4000]), pb.TranslateRequest()]
    assert "neither config nor audio" in invalid(fails(stub(server.port), messages), "audio")


@pytest.mark.parametrize("pcm_input", [False, True])
def test_empty_audio(server, pcm_input):
    cfg = config(encoding=S16, sample_rate_hertz=16000) if pcm_input else config()
    invalid(fails(stub(server.port), [pb.TranscribeRequest(config=cfg)], "transcribe"), "audio")
    invalid(fails(stub(server.port), [pb.TranscribeRequest(config=cfg), pb.TranscribeRequest(audio=b"")],
                  "transcribe"), "audio")


@pytest.mark.parametrize("data", [b"not audio at all" * 100, bytes(range(256)) * 64, b"RIFF\x00\x00\x00\x00WAVEfmt "])
def test_undecodable_audio(server, data):
    invalid(fails(stub(server.port), requests("translate", config(), data)), "audio")


def test_pcm_config(server):
    s = stub(server.port)
    invalid(fails(s, requests("translate", config(encoding=S16), b"\0\0" * 100)), "config.sample_rate_hertz")
    invalid(fails(s, requests("translate", config(encoding=S16, sample_rate_hertz=1000), b"\0\0" * 100)),
            "config.sample_rate_hertz")
    invalid(fails(s, requests("translate", config(encoding=S16, sample_rate_hertz=16000, channels=9), b"\0\0" * 100)),
            "config.channels")
    invalid(fails(s, requests("translate", config(encoding=99, sample_rate_hertz=16000), b"\0\0" * 100)),
            "config.encoding")
    assert "[8000, 192000]" in invalid(fails(s, requests("translate", config(encoding=S16, sample_rate_hertz=192001),
                                                          b"\0\0" * 100)), "config.sample_rate_hertz")


def test_enum_values_the_contract_does_not_know(server, wav):
    """A client built from a newer contract may send values this server has no meaning for."""
    s = stub(server.port)
    assert "unknown long-form mode 7" in invalid(fails(s, requests("translate", config(long_form_mode=7), wav)),
                                                 "config.long_form_mode")
    assert "unknown timestamp granularity 5" in invalid(
        fails(s, requests("translate", config(timestamp_granularities=[pb.TIMESTAMP_GRANULARITY_SEGMENT, 5]), wav)),
        "config.timestamp_granularities")


def test_pcm_cut_inside_a_frame(server):
    data = pcm(tone(1.0, channels=2), "s16le")[:-1]
    description = invalid(fails(stub(server.port), requests("translate", config(encoding=S16, sample_rate_hertz=16000,
                                                                                channels=2), data)), "audio")
    assert "4-byte frames" in description


def test_upload_larger_than_allowed(tight):
    """INVALID_ARGUMENT on the audio, told apart from other bad audio by its ErrorInfo reason."""
    data = encode(tone(1.5), 16000, "wav", "pcm_s16le")  # 48 kB
    err = fails(stub(tight.port), requests("translate", config(), data))
    assert "40000 bytes" in invalid(err, "audio")
    assert (error_details(err)["info"].reason, error_details(err)["info"].domain) == ("AUDIO_TOO_LARGE", "dragoman.v1")
    pcm_data = pcm(tone(1.5), "s16le")
    err = fails(stub(tight.port), requests("translate", config(encoding=S16, sample_rate_hertz=16000), pcm_data))
    invalid(err, "audio")
    assert error_details(err)["info"].reason == "AUDIO_TOO_LARGE"
    garbage = b"not audio " * 100  # bad audio, but not too large
    assert "info" not in error_details(fails(stub(tight.port), requests("translate", config(), garbage)))
    wait_idle(tight)


def stalled(messages: list, release: threading.Event):
    """The messages, then nothing until `release` (a client that stopped sending), then a half-close."""
    yield from messages
    release.wait(30)


@pytest.mark.parametrize("where", ["before_config", "after_config", "mid_file", "mid_pcm"])
def test_a_stalled_call_times_out_and_frees_its_stream(impatient, wav, where):
    """A call that sends nothing for the receive timeout fails with DEADLINE_EXCEEDED (AUDIO_TIMEOUT),
    and its stream is free again: at one stream, the next call is served."""
    TR = pb.TranslateRequest
    pcm_config = config(encoding=S16, sample_rate_hertz=16000)
    messages = {"before_config": [], "after_config": [TR(config=config())],
                "mid_file": [TR(config=config()), TR(audio=wav[:4000])],
                "mid_pcm": [TR(config=pcm_config), TR(audio=pcm(tone(0.5), "s16le"))]}[where]
    release = threading.Event()
    t0 = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(stub(impatient.port).Translate(stalled(messages, release), timeout=60))
    finally:
        release.set()
    err = info.value
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.details()
    assert error_details(err)["info"].reason == "AUDIO_TIMEOUT" and "nothing for 1 s" in err.details()
    assert 0.9 < time.monotonic() - t0 < 20
    wait_idle(impatient)
    assert call(stub(impatient.port), "translate", config(), wav).summary is not None


def test_a_slow_but_steady_upload_is_served(impatient):
    """The timeout is between messages, not on the whole upload: a PCM stream that takes longer
    than it in all, a message at a time, is served."""
    data = pcm(tone(1.0), "s16le")

    def slow():
        yield pb.TranslateRequest(config=config(encoding=S16, sample_rate_hertz=16000))
        for i in range(0, len(data), 8000):
            time.sleep(0.3)
            yield pb.TranslateRequest(audio=data[i : i + 8000])

    t0 = time.monotonic()
    responses = list(stub(impatient.port).Translate(slow(), timeout=120))
    assert time.monotonic() - t0 > 1.0 and responses[-1].WhichOneof("event") == "summary"
    wait_idle(impatient)


def test_audio_longer_than_allowed(tight):
    data = encode(tone(3.0), 16000, "mp3", "libmp3lame", bit_rate=32000)  # 3 s in a small file
    assert len(data) < 40_000
    assert "2 s" in invalid(fails(stub(tight.port), requests("translate", config(), data)), "audio")
    pcm_data = pcm(tone(2.2, sample_rate=8000), "s16le")  # 2.2 s in 35 kB
    assert "2 s" in invalid(fails(stub(tight.port), requests("translate", config(encoding=S16, sample_rate_hertz=8000),
                                                              pcm_data)), "audio")
    wait_idle(tight)


def test_a_client_may_wait_for_results_longer_than_the_timeout(tiny_engine):
    """The receive timeout counts only while the call waits on its client: a PCM client that holds
    back the rest of its audio until the first window's segments come is served, however long
    their decoding takes (here longer than the timeout)."""
    srv = start_server(tiny_engine, receive_timeout=0.5)
    try:
        data = pcm(tone(40.0, seed=3), "s16le")
        first = threading.Event()
        times = {}

        def upload():
            yield pb.TranslateRequest(config=config(encoding=S16, sample_rate_hertz=16000, temperature=1.0,
                                                    max_new_tokens=200))  # slow enough to outlast the timeout
            half = 2 * 16000 * 35  # one window is complete, the next is not
            for i in range(0, half, 64 * 1024):
                yield pb.TranslateRequest(audio=data[i : min(i + 64 * 1024, half)])
            times["sent"] = time.monotonic()
            first.wait(60)
            times["segment"] = time.monotonic()
            yield pb.TranslateRequest(audio=data[half:])

        responses = []
        for r in stub(srv.port).Translate(upload(), timeout=120):
            responses.append(r)
            if r.WhichOneof("event") == "segment":
                first.set()
        assert responses[-1].WhichOneof("event") == "summary"
        assert times["segment"] - times["sent"] > 0.6, "decoding was quicker than the timeout: nothing tested"
    finally:
        srv.stop()


def test_no_receive_timeout(tiny_engine, wav):
    """receive_timeout=0: a call may wait on its client for as long as it likes."""
    srv = start_server(tiny_engine, receive_timeout=0)
    try:
        def upload():
            yield pb.TranslateRequest(config=config())
            time.sleep(1.5)
            yield pb.TranslateRequest(audio=wav)

        responses = list(stub(srv.port).Translate(upload(), timeout=60))
        assert responses[-1].WhichOneof("event") == "summary"
    finally:
        srv.stop()


def test_too_many_streams(tight, wav):
    """The limit of concurrent calls gives RESOURCE_EXHAUSTED with a retry delay; the held call
    still completes."""
    s = stub(tight.port)
    release = threading.Event()

    def held():
        yield pb.TranslateRequest(config=config())
        release.wait(30)
        yield pb.TranslateRequest(audio=wav)

    first = s.Translate(held(), timeout=120)
    deadline = time.monotonic() + 10
    while tight.servicer.active == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        err = fails(s, requests("translate", config(), wav))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert seconds(error_details(err)["retry"].retry_delay) > 0
    finally:
        release.set()
    assert list(first)[-1].WhichOneof("event") == "summary"
    wait_idle(tight)
    assert call(s, "translate", config(), wav).summary is not None


def test_decoding_queue_full(server, wav, tiny_engine):
    scheduler = tiny_engine.scheduler
    saved = scheduler.max_queue
    scheduler.max_queue = 0
    try:
        err = fails(stub(server.port), requests("translate", config(), wav))
    finally:
        scheduler.max_queue = saved
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert seconds(error_details(err)["retry"].retry_delay) > 0


def test_still_serving_after_errors(server, wav):
    wait_idle(server)
    r = call(stub(server.port), "translate", config(), wav)
    assert r.summary is not None and r.segments
    assert stub(server.port).ListModels(pb.ListModelsRequest(), timeout=10).models
