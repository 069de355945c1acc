"""SpeechService's RPCs end to end on an in-process server with a random-weight tiny Whisper:
the shape and order of what comes back, PCM streaming, long audio, concurrent calls."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from dragoman.v1 import speech_pb2 as pb
from grpc_support import call, config, encode, pcm, seconds, start_server, stub, tone, violated_fields, wait_for
from service.languages import LANGUAGES


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = start_server(tiny_engine, max_concurrent_streams=16)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return stub(server.port)


@pytest.fixture(scope="module")
def wav():
    return encode(tone(3.0), 16000, "wav", "pcm_s16le")


def check_result(r, duration: float, *, deltas: bool = False):
    """What every successful call gives: segments in order, then one summary, last."""
    assert r.summary is not None and r.events[-1] == "summary" and r.events.count("summary") == 1
    assert r.segments, "random weights still give text"
    assert [s.id for s in r.segments] == list(range(len(r.segments)))
    seeks = [s.seek for s in r.segments]
    assert seeks == sorted(seeks) and seeks[0] == 0
    for s in r.segments:
        assert seconds(s.start_offset) >= s.seek / 100 - 1e-6
        assert s.tokens and 0.0 <= s.temperature <= 1.0
    assert r.summary.text == "".join(s.text for s in r.segments)
    assert seconds(r.summary.duration) == pytest.approx(duration, abs=0.05)
    assert r.summary.usage.audio_seconds == pytest.approx(duration, abs=0.05)
    assert r.summary.usage.prompt_tokens > 0 and r.summary.usage.completion_tokens > 0
    assert r.summary.language in LANGUAGES and 0.0 < r.summary.language_probability <= 1.0
    if deltas:
        assert r.events[:-1] == ["delta", "segment"] * len(r.segments)
        assert [d.text for d in r.deltas] == [s.text for s in r.segments]
        # What the call had used by each: growing, all of it by the last, and where each text ends.
        used = [(d.usage.prompt_tokens, d.usage.completion_tokens) for d in r.deltas]
        assert used == sorted(used) and used[-1] == (r.summary.usage.prompt_tokens, r.summary.usage.completion_tokens)
        assert [d.usage.audio_seconds for d in r.deltas] == pytest.approx([seconds(s.end_offset) for s in r.segments])
    else:
        assert not r.deltas and set(r.events[:-1]) == {"segment"}


def test_translate_wav(client, wav):
    check_result(call(client, "translate", config(), wav), 3.0)


def test_transcribe_with_deltas(client, wav):
    r = call(client, "transcribe", config(stream_deltas=True), wav)
    check_result(r, 3.0, deltas=True)
    assert r.summary.truncated  # random weights never end a text: cut at max_new_tokens


def test_translate_with_deltas_and_options(client, wav, tiny_engine):
    r = call(client, "translate", config(stream_deltas=True, model="whisper-1", language="Italian", prompt="Dragoman",
                                         temperature=0.4, seed=7, repetition_penalty=1.1,
                                         long_form_mode=pb.LONG_FORM_MODE_SEQUENTIAL,
                                         timestamp_granularities=[pb.TIMESTAMP_GRANULARITY_SEGMENT]), wav)
    check_result(r, 3.0, deltas=True)
    assert r.summary.language == "it" and r.summary.language_probability == 1.0
    assert all(s.temperature >= 0.4 for s in r.segments)


def test_model_names(client, wav, server, tiny_engine):
    """The served id, its last part (as the HTTP API also takes it), the alias, or nothing."""
    short = server.servicer.model_id.rsplit("/", 1)[-1]
    assert short != server.servicer.model_id
    for name in ("", "whisper-1", server.servicer.model_id, short, tiny_engine.name):
        check_result(call(client, "translate", config(model=name), wav), 3.0)


def test_list_models(client, server, tiny_engine):
    models = client.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert len(models) == 1
    m = models[0]
    assert m.id == server.servicer.model_id == tiny_engine.name
    assert list(m.aliases) == [m.id.rsplit("/", 1)[-1], "whisper-1"]  # every name Config.model takes
    assert m.multilingual is True
    assert [lang.code for lang in m.languages] == list(tiny_engine.languages)
    assert {lang.code: lang.name for lang in m.languages}["it"] == "italian"


def test_an_english_only_model_lists_english_and_refuses_other_languages(en_engine, wav):
    server = start_server(en_engine)
    try:
        client = stub(server.port)
        m, = client.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert m.multilingual is False
        assert [(lang.code, lang.name) for lang in m.languages] == [("en", "english")]
        r = call(client, "translate", config(temperature=0), wav)
        assert r.segments and r.summary.language == "en"
        with pytest.raises(grpc.RpcError) as e:
            call(client, "transcribe", config(language="it"), wav)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(e.value) == ["config.language"]
        assert "accepted: en" in e.value.details()
    finally:
        server.stop()


@pytest.mark.parametrize("encoding", ["s16le", "f32le"])
def test_pcm_16k_mono_matches_the_same_samples_in_wav(client, encoding):
    audio = np.round(tone(3.0, seed=3) * 32768) / 32768  # exact in 16 bits, however it is converted
    data = pcm(audio, encoding)
    kind = pb.AUDIO_ENCODING_S16LE if encoding == "s16le" else pb.AUDIO_ENCODING_F32LE
    streamed = call(client, "transcribe", config(encoding=kind, sample_rate_hertz=16000, temperature=0), data,
                    chunk=3001)  # chunks cut sample frames in two
    check_result(streamed, 3.0)
    wav = encode(audio, 16000, "wav", "pcm_s16le" if encoding == "s16le" else "pcm_f32le")
    whole = call(client, "transcribe", config(temperature=0), wav)
    assert streamed.summary == whole.summary
    assert streamed.segments == whole.segments


@pytest.mark.parametrize("encoding,rate,channels", [("s16le", 48000, 2), ("f32le", 44100, 2), ("s16le", 8000, 1)])
def test_pcm_resampled_and_mixed(client, encoding, rate, channels):
    kind = pb.AUDIO_ENCODING_S16LE if encoding == "s16le" else pb.AUDIO_ENCODING_F32LE
    data = pcm(tone(2.5, rate, channels), encoding)
    r = call(client, "translate", config(encoding=kind, sample_rate_hertz=rate, channels=channels), data, chunk=10007)
    check_result(r, 2.5)


def test_70_seconds_in_time_order(client):
    r = call(client, "translate", config(encoding=pb.AUDIO_ENCODING_F32LE, sample_rate_hertz=16000, temperature=1.0),
             pcm(tone(70.0, seed=5), "f32le"), chunk=64 * 1024)
    check_result(r, 70.0)
    # Windows of at most 30 s, cut at pauses, cover the audio from its start to its end, in order.
    starts = sorted({s.seek for s in r.segments})
    assert len(starts) >= 3 and starts[0] == 0
    assert all(0 < b - a <= 3000 for a, b in zip(starts, starts[1:]))
    assert 7000 - starts[-1] <= 3000
    for a, b in zip(r.segments, r.segments[1:]):
        if a.seek == b.seek:  # within a window, segments follow each other
            assert seconds(b.start_offset) >= seconds(a.start_offset)


def test_eight_concurrent_calls_equal_eight_in_turn(client):
    clips = [encode(tone(2.0 + 0.25 * i, seed=10 + i), 16000, "wav", "pcm_s16le") for i in range(8)]
    cfg = config(temperature=0, seed=1234)

    def run(i):
        return call(client, "translate" if i % 2 else "transcribe", cfg, clips[i])

    in_turn = [run(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, range(8)))
    for a, b, i in zip(in_turn, together, range(8)):
        check_result(b, 2.0 + 0.25 * i)
        assert [s.tokens for s in a.segments] == [s.tokens for s in b.segments]
        assert [(s.text, s.start_offset, s.end_offset, s.temperature) for s in a.segments] == \
               [(s.text, s.start_offset, s.end_offset, s.temperature) for s in b.segments]
        assert a.summary.text == b.summary.text and a.summary.language == b.summary.language
        np.testing.assert_allclose([s.avg_logprob for s in a.segments], [s.avg_logprob for s in b.segments], atol=1e-3)


def test_word_timestamps_are_returned_for_word_granularity(client, wav):
    cfg = config(timestamp_granularities=[pb.TIMESTAMP_GRANULARITY_SEGMENT, pb.TIMESTAMP_GRANULARITY_WORD])
    r = call(client, "translate", cfg, wav)
    check_result(r, 3.0)
    words = [w for s in r.segments for w in s.words]
    assert words and all(w.word for w in words)
    for s in r.segments:
        for w in s.words:
            assert s.seek / 100 <= seconds(w.start_offset) <= seconds(w.end_offset) <= 3.0 + 1e-6
            assert 0.0 <= w.probability <= 1.0
    plain = call(client, "translate", config(), wav)
    assert not any(s.words for s in plain.segments)


def test_long_form_mode_defaults_to_the_servers(tiny_engine, wav, monkeypatch):
    modes = []
    transcribe = tiny_engine.transcribe

    def spy(audio, options, **kw):
        modes.append(options.mode)
        return transcribe(audio, options, **kw)

    monkeypatch.setattr(tiny_engine, "transcribe", spy)
    srv = start_server(tiny_engine, default_mode="sequential")
    try:
        s = stub(srv.port)
        check_result(call(s, "transcribe", config(language="en"), wav), 3.0)
        check_result(call(s, "transcribe", config(long_form_mode=pb.LONG_FORM_MODE_BATCHED), wav), 3.0)
    finally:
        srv.stop()
    assert modes == ["sequential", "batched"]


def test_pcm_results_start_before_the_upload_ends(client):
    """The first window is decoded once its 30 s have arrived: the client holds back the rest of
    its audio until the first segment comes, which only works if decoding starts early."""
    import threading

    data = pcm(tone(70.0, seed=7), "f32le")
    first_segment = threading.Event()
    held_back = []

    def upload():
        yield pb.TranslateRequest(config=config(encoding=pb.AUDIO_ENCODING_F32LE, sample_rate_hertz=16000,
                                                temperature=1.0))
        half = 4 * 16000 * 45  # 45 s of float32 samples: one window is complete, the next is not
        for i in range(0, half, 64 * 1024):
            yield pb.TranslateRequest(audio=data[i : min(i + 64 * 1024, half)])
        held_back.append(first_segment.wait(timeout=120))
        for i in range(half, len(data), 64 * 1024):
            yield pb.TranslateRequest(audio=data[i : i + 64 * 1024])

    segments, summary = [], None
    for response in client.Translate(upload(), timeout=300):
        if response.WhichOneof("event") == "segment":
            segments.append(response.segment)
            first_segment.set()
        elif response.WhichOneof("event") == "summary":
            summary = response.summary
    assert held_back == [True], "no segment came before the rest of the audio was sent"
    assert summary is not None and abs(summary.duration.seconds + summary.duration.nanos / 1e9 - 70.0) < 0.1
    assert max(s.seek for s in segments) >= 4000  # the held-back audio was decoded too


def test_a_pcm_client_sending_faster_than_decoding_is_held_back(tiny_engine, monkeypatch):
    """While the engine takes no more of the audio, the server reads at most PCM_BACKLOG_SECONDS
    past what it took, and HTTP/2 flow control holds the client back, instead of the server
    holding a long recording whole; the rest is read once decoding goes on."""
    import threading
    import time

    from service import servicer

    monkeypatch.setattr(servicer, "PCM_BACKLOG_SECONDS", 10)
    submit, go_on = tiny_engine.scheduler.submit, threading.Event()

    def held(job):  # the first window waits: the engine takes no more audio meanwhile
        go_on.wait(60)
        return submit(job)

    monkeypatch.setattr(tiny_engine.scheduler, "submit", held)
    srv = start_server(tiny_engine)
    rate, step = 48000, 4 * 48000  # float32 at 48 kHz: a second is 192 kB, so transport buffers hold little of it
    data = pcm(tone(150.0, sample_rate=rate, seed=3), "f32le")
    sent, seen = [0.0], []

    def upload():
        yield pb.TranslateRequest(config=config(encoding=pb.AUDIO_ENCODING_F32LE, sample_rate_hertz=rate,
                                                language="en", max_new_tokens=8))
        for i in range(0, len(data), step):
            yield pb.TranslateRequest(audio=data[i : i + step])
            sent[0] = (i + step) / step

    def look_then_go_on():
        time.sleep(3.0)
        seen.append(sent[0])
        go_on.set()

    threading.Thread(target=look_then_go_on, daemon=True).start()
    try:
        responses = list(stub(srv.port).Translate(upload(), timeout=300))
    finally:
        go_on.set()
        srv.stop()
    # Taken by the engine: the first window and the audio it looked past to cut it (at most 30 s
    # and 100 ms); then 10 s read beyond that, and what the transport buffers.
    assert seen[0] < 100, f"{seen[0]:.0f} s of 150 s were sent while the engine took none"
    summary = responses[-1].summary
    assert summary.duration.seconds == 150


def test_a_large_container_upload_is_kept_in_a_temporary_file_until_the_call_ends(client, monkeypatch, tmp_path):
    """Past UPLOAD_MEMORY, a container's bytes go to a temporary file rather than memory; the call
    gives what it gives from memory, and the file is gone once the call ends."""
    import tempfile

    from service import servicer

    data = encode(tone(8.0, seed=11), 16000, "wav", "pcm_s16le")  # 256 kB
    options = config(language="en", temperature=0.0, max_new_tokens=8)
    in_memory = call(client, "translate", options, data)
    monkeypatch.setattr(servicer, "UPLOAD_MEMORY", 64 * 1024)
    made = []
    named = tempfile.NamedTemporaryFile

    def spy(*args, **kw):
        made.append(named(*args, **{**kw, "dir": tmp_path}))
        return made[-1]

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", spy)
    spooled = call(client, "translate", options, data)
    assert [s.tokens for s in spooled.segments] == [s.tokens for s in in_memory.segments]
    assert spooled.summary.text == in_memory.summary.text
    assert len(made) == 1 and made[0].name.startswith(str(tmp_path / "dragoman-upload-"))
    wait_for(lambda: not list(tmp_path.iterdir()))  # removed as the call ends
