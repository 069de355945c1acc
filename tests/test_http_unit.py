"""The HTTP API without the speech service: form reading, checks, formats, SSE, errors, auth, CORS.

A fake backend stands in for the gRPC service; tests/test_http_api.py runs the real processes.
"""
from __future__ import annotations

import io
import json
import math
import uuid

import grpc
import pytest
import srt
import webvtt
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from flask import request
from http_shim import Config, create_app
from http_shim.backend import Delta, ModelInfo, SegmentEvent, Summary
from http_shim.errors import APIError
from http_shim.forms import CHUNK_SIZE, FileData, FileEnd, Params, read_multipart
from http_shim.render import EventStream, Result, Segment, Word, render, to_srt, to_vtt

SEGMENTS = [
    Segment(0, 0, 0.0, 1.5, " Ciao a tutti.", [50364, 1, 2], 0.0, -0.25, 1.1, 0.01,
            [Word(" Ciao", 0.0, 0.5, 0.9), Word(" a", 0.5, 0.7, 0.8), Word(" tutti.", 0.7, 1.5, 0.7)]),
    Segment(1, 0, 1.5, 1.5, "", [], 0.0, -0.5, 1.0, 0.2),
    Segment(2, 0, 1.5, 3.25, " Come state?", [3, 4], 0.2, -0.4, 1.2, float("nan"),
            [Word(" Come", 1.5, 2.0, 0.6), Word(" state?", 2.0, 3.25, 0.5)]),
]
TEXT = "".join(s.text for s in SEGMENTS)


class FakeCall:
    def __init__(self, backend, request):
        self.backend = backend
        self.request = request
        self.audio = bytearray()
        self.closed = False
        self.cancelled = False

    def send(self, data):
        if self.backend.fail_send is not None:
            raise self.backend.fail_send
        self.audio.extend(data)

    def close_send(self):
        self.closed = True

    def events(self):
        if self.backend.fail_events is not None:
            raise self.backend.fail_events
        for i, s in enumerate(SEGMENTS):
            if self.request.stream_deltas:
                yield Delta(s.text, prompt_tokens=5, completion_tokens=2 * i + 1)
            yield SegmentEvent(s)
        yield Summary(Result(text=TEXT, language=self.request.language or "it", duration=3.25,
                             language_probability=0.9, prompt_tokens=5, completion_tokens=7))

    def cancel(self):
        self.cancelled = True


class FakeBackend:
    def __init__(self):
        self.calls: list[FakeCall] = []
        self.status = "SERVING"
        self.fail_send = None
        self.fail_events = None
        self.down = False

    def health(self):
        return self.status

    def models(self):
        if self.down:
            raise APIError(503, "down", code="service_unavailable")
        return [ModelInfo("/models/whisper-large-v3", aliases=["whisper-1"])]

    def start(self, request, timeout):
        if self.down:
            raise APIError(503, "down", code="service_unavailable")
        call = FakeCall(self, request)
        self.calls.append(call)
        return call

    def close(self):
        pass


def multipart(parts: list[tuple[str, str | tuple[str, bytes]]]) -> tuple[bytes, str]:
    """A multipart/form-data body with the parts in the order given; (filename, bytes) for a file."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in parts:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data = value
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                      f"Content-Type: application/octet-stream\r\n\r\n".encode())
            out.write(data)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            out.write(value.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


AUDIO = bytes(range(256)) * 4000  # ~1 MB: several chunks on the way to the service


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def make_client(backend):
    def make(**config):
        app = create_app(Config(**config), backend=backend)
        app.testing = True
        return app.test_client()
    return make


@pytest.fixture
def client(make_client):
    return make_client()


def post(client, path, parts, headers=None):
    body, ctype = multipart(parts)
    return client.post(path, data=body, headers={"Content-Type": ctype, **(headers or {})})


def error_of(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


# ---- rendering ------------------------------------------------------------------------------------------


def test_srt_and_vtt_parse_and_skip_empty_segments():
    subs = list(srt.parse(to_srt(SEGMENTS)))
    assert [s.content for s in subs] == ["Ciao a tutti.", "Come state?"]
    assert [s.index for s in subs] == [1, 2]
    assert subs[1].start.total_seconds() == 1.5 and subs[1].end.total_seconds() == 3.25
    captions = webvtt.from_string(to_vtt(SEGMENTS))
    assert [c.text for c in captions] == ["Ciao a tutti.", "Come state?"]
    assert captions[1].start == "00:00:01.500" and captions[1].end == "00:00:03.250"
    assert to_srt([]) == "" and to_vtt([]).startswith("WEBVTT")


def test_a_timing_arrow_in_the_text_does_not_reach_a_cue():
    """A cue line holding '-->' would read as a timing line to SRT and WebVTT parsers alike."""
    seg = Segment(0, 0, 0.0, 1.0, " a --> b")
    assert [s.content for s in srt.parse(to_srt([seg]))] == ["a -> b"]
    assert [c.text for c in webvtt.from_string(to_vtt([seg]))] == ["a -> b"]


def test_long_timestamps():
    seg = Segment(0, 0, 3725.5, 3727.0049, " x")
    assert "01:02:05,500 --> 01:02:07,005" in to_srt([seg])
    assert "01:02:05.500 --> 01:02:07.005" in to_vtt([seg])


def test_verbose_json_shape():
    result = Result(text=TEXT, language="it", duration=3.25, segments=SEGMENTS)
    body = json.loads(render(result, "verbose_json", "translate", []))
    assert body["task"] == "translate" and body["language"] == "italian" and body["duration"] == 3.25
    assert body["text"] == TEXT.strip()
    assert "words" not in body and "usage" not in body
    seg = body["segments"][2]
    assert set(seg) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                        "compression_ratio", "no_speech_prob"}
    assert seg["no_speech_prob"] is None  # NaN is not JSON
    body = json.loads(render(result, "verbose_json", "transcribe", ["word"]))
    assert [w["word"] for w in body["words"]] == ["Ciao", "a", "tutti.", "Come", "state?"]
    assert "segments" not in body and body["usage"] == {"type": "duration", "seconds": 4}
    body = json.loads(render(result, "verbose_json", "transcribe", ["word", "segment"]))
    assert len(body["segments"]) == 3 and len(body["words"]) == 5


def test_event_stream_joins_to_the_text():
    for pieces in (["  Hello", " world ", " ", "again.  "], [" a"], ["", " "], [" x ", "", " y"]):
        out = EventStream("transcribe", "m", include_usage=True)
        events = [e for p in pieces if (e := out.delta(p)) is not None]
        deltas = [json.loads(e[len("data: "):]) for e in events]
        assert all(e.endswith("\n\n") and e.startswith("data: ") for e in events)
        assert "".join(d["delta"] for d in deltas) == "".join(pieces).strip() == out.text
        assert all(d["choices"][0]["delta"]["content"] == d["delta"] for d in deltas)
        assert all(d["object"] == "transcription.chunk" and d["type"] == "transcript.text.delta" for d in deltas)
        done = json.loads(out.done(3, 4)[len("data: "):])
        assert done["type"] == "transcript.text.done" and done["text"] == out.text
        assert done["choices"][0]["finish_reason"] == "stop" and done["usage"]["total_tokens"] == 7
        cut = json.loads(out.done(3, 4, truncated=True)[len("data: "):])
        assert cut["choices"][0]["finish_reason"] == "length"  # as vLLM says of a text cut at its token limit
    continuous = EventStream("transcribe", "m", include_usage=True, continuous_usage=True)
    assert "usage" not in json.loads(continuous.delta(" a")[len("data: "):])  # no count came with this text
    assert json.loads(continuous.delta(" b", (3, 4))[len("data: "):])["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_params_checks():
    p = Params("transcribe")
    for name, value in [("temperature", "3"), ("temperature", "hot"), ("language", "xx"), ("seed", "1.5"),
                        ("response_format", "docx"), ("stream", "maybe"), ("repetition_penalty", "0"),
                        ("max_completion_tokens", "0"), ("timestamp_granularities[]", "sentence")]:
        with pytest.raises(APIError) as e:
            p.set_field(name, value)
        assert e.value.status == 400 and e.value.param.rstrip("[]") == name.rstrip("[]")
    for given, code in [("jv", "jw"), ("nb-NO", "no"), ("iw", "he"), ("pt_BR", "pt"), ("Castilian", "es")]:
        p.set_field("language", given)
        assert p.language == code
    p.set_field("language", "Italian")
    p.set_field("temperature", "0.2")
    p.set_field("timestamp_granularities[]", "word")
    assert p.language == "it" and p.temperature == 0.2 and not p.word_timestamps
    p.set_field("response_format", "verbose_json")
    assert p.word_timestamps
    for name, value, taken in [("max_completion_tokens", "448", 448), ("max_tokens", "1024", 448),
                               ("max_new_tokens", "1", 1), ("max_completion_tokens", "9" * 18, 448)]:
        p.set_field(name, value)  # above a window's 448 tokens: capped, as vLLM caps it at the model's length
        assert p.max_completion_tokens == taken
    assert p.set_field("chunking_strategy", "auto") is False
    t = Params("translate")
    t.set_field("to_language", "en")
    with pytest.raises(APIError):
        t.set_field("to_language", "fr")


@pytest.mark.parametrize("name,value", [
    ("temperature", "0_5"), ("temperature", "٠.٥"), ("temperature", "infinity"), ("temperature", "0x1"),
    ("seed", "1_000"), ("seed", "１２"), ("seed", "٣"), ("max_completion_tokens", "1e2"), ("beam_size", "0b11"),
])
def test_numbers_are_plain_ascii_decimals(name, value):
    """What Python's float() and int() also read, but no client means to send, is refused."""
    with pytest.raises(APIError) as e:
        Params("translate").set_field(name, value)
    assert (e.value.status, e.value.code) == (400, "invalid_type") and value in e.value.message


@pytest.mark.parametrize("name,value,expected", [
    ("temperature", " .5 ", 0.5), ("temperature", "2e-1", 0.2), ("temperature", "+0", 0.0), ("seed", "-7", -7),
    ("temperature", "1e-50", 1e-50),  # sent as 0, which temperature takes
    ("repetition_penalty", "1e-44", 1e-44),  # a 32-bit float still, though subnormal
])
def test_numbers_clients_send(name, value, expected):
    p = Params("translate")
    p.set_field(name, value)
    assert getattr(p, name) == expected


@pytest.mark.parametrize("name", ["repetition_penalty", "patience"])
def test_a_positive_number_that_rounds_to_zero_is_named(name):
    with pytest.raises(APIError) as e:
        Params("translate").set_field(name, "1e-50")
    assert e.value.param == name and "1e-50 rounds to 0 as the 32-bit float" in e.value.message


def test_a_slow_upload_goes_on_every_second(monkeypatch):
    """The file's bytes go on to the service once a second even when far less than a chunk has
    come, so that a slow upload does not leave the call without a message for long."""
    import http_shim.forms as forms

    clock = [0.0]
    monkeypatch.setattr(forms, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    audio = AUDIO[:50_000]
    body, ctype = multipart([("file", ("a.wav", audio))])
    boundary = ctype.split("boundary=")[1].encode()

    class Trickle(io.BytesIO):  # 1000 bytes a read, each 0.4 s after the last
        def read(self, size=-1):
            clock[0] += 0.4
            return super().read(1000)

    events = list(read_multipart(Trickle(body), boundary))
    chunks = [e.data for e in events if isinstance(e, FileData)]
    assert b"".join(chunks) == audio and isinstance(events[-1], FileEnd)
    assert len(audio) < CHUNK_SIZE and len(chunks) >= len(audio) // 3000  # every 3 reads, not once at the end


def test_too_many_form_parts(client):
    resp = post(client, "/v1/audio/transcriptions", [(f"x{i}", "1") for i in range(300)] + [("file", ("a.wav", AUDIO))])
    error = error_of(resp, 413)
    assert error["code"] == "too_many_parts" and "200 parts" in error["message"]
    assert post(client, "/v1/audio/transcriptions", [("file", ("a.wav", AUDIO))]).status_code == 200


BEAM_REQUESTS = [  # form fields -> (beam_size, the form field it came from) as the service gets them
    ({}, (None, "beam_size")),
    ({"beam_size": "4"}, (4, "beam_size")),
    ({"use_beam_search": "true"}, (5, "use_beam_search")),
    ({"use_beam_search": "true", "n": "3"}, (3, "n")),
    ({"use_beam_search": "true", "n": "4", "beam_size": "4"}, (4, "beam_size")),
    ({"use_beam_search": "true", "beam_size": "2"}, (2, "beam_size")),
    ({"use_beam_search": "false", "n": "3"}, (None, "beam_size")),
    ({"n": "42"}, (None, "beam_size")),  # n alone means nothing here: ignored, as before
    ({"use_beam_search": "", "beam_size": "3"}, (3, "beam_size")),  # empty: not given
]


@pytest.mark.parametrize("fields,beam", BEAM_REQUESTS, ids=[str(f) for f, _ in BEAM_REQUESTS])
def test_beam_width_from_beam_size_or_vllms_fields(client, backend, fields, beam):
    resp = post(client, "/v1/audio/transcriptions", list(fields.items()) + [("file", ("a.wav", AUDIO))])
    assert resp.status_code == 200, resp.get_data(as_text=True)
    r = backend.calls[-1].request
    assert (r.beam_size, r.beam_field) == beam


@pytest.mark.parametrize("fields, sent", [
    ({"use_beam_search": "true", "length_penalty": "1"}, None),  # vLLM's score / length: openai-whisper's default
    ({"use_beam_search": "true", "length_penalty": "0"}, 0.0),  # no length normalisation in either
    ({"beam_size": "3", "length_penalty": "1"}, 1.0),  # openai-whisper's ((5 + length) / 6) ** 1
])
def test_length_penalty_of_vllms_beam_search_is_ranked_as_vllm_ranks(client, backend, fields, sent):
    resp = post(client, "/v1/audio/transcriptions", list(fields.items()) + [("file", ("a.wav", AUDIO))])
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert backend.calls[-1].request.length_penalty == sent


def test_decoding_fields_reach_the_service(client, backend):
    fields = [("beam_size", "3"), ("best_of", "2"), ("patience", "1.5"), ("length_penalty", "0.25"),
              ("temperature_fallback", "false"), ("compression_ratio_threshold", "3.5"),
              ("logprob_threshold", "off"), ("no_speech_threshold", "0.5"), ("top_k", "40"), ("top_p", "0.95"),
              ("min_p", "0.05")]
    assert post(client, "/v1/audio/translations", fields + [("file", ("a.wav", AUDIO))]).status_code == 200
    r = backend.calls[-1].request
    assert (r.beam_size, r.best_of, r.patience, r.length_penalty, r.temperature_fallback,
            r.compression_ratio_threshold, r.no_speech_threshold) == (3, 2, 1.5, 0.25, False, 3.5, 0.5)
    assert (r.top_k, r.top_p, r.min_p) == (40, 0.95, 0.05)
    assert math.isnan(r.logprob_threshold)  # turned off
    assert post(client, "/v1/audio/translations", [("file", ("a.wav", AUDIO))]).status_code == 200
    r = backend.calls[-1].request  # none given: the service's defaults
    assert (r.beam_size, r.best_of, r.patience, r.length_penalty, r.temperature_fallback,
            r.compression_ratio_threshold, r.logprob_threshold, r.no_speech_threshold, r.top_k, r.top_p,
            r.min_p) == (None,) * 11
    for value in ("-1", "0"):  # vLLM's "any token"
        post(client, "/v1/audio/translations", [("top_k", value), ("file", ("a.wav", AUDIO))])
        assert backend.calls[-1].request.top_k is None
    for value, expected in (("true", True), ("1", True), ("off", False), ("", None)):
        post(client, "/v1/audio/translations", [("temperature_fallback", value), ("file", ("a.wav", AUDIO))])
        assert backend.calls[-1].request.temperature_fallback is expected


def test_decoding_fields_in_the_grpc_config():
    from dragoman.v1 import speech_pb2 as pb
    from http_shim.backend import Request
    from http_shim.grpc_backend import _config

    cfg = _config(Request(task="transcribe", model="m", beam_size=5, best_of=3, patience=2.0, length_penalty=0.5,
                          temperature_fallback=False, compression_ratio_threshold=3.0, logprob_threshold=math.nan,
                          no_speech_threshold=0.25, top_k=7, top_p=0.5, min_p=0.25))
    assert (cfg.top_k, cfg.top_p, cfg.min_p) == (7, 0.5, 0.25)
    assert (cfg.beam_size, cfg.best_of, cfg.patience, cfg.length_penalty, cfg.temperature_fallback,
            cfg.compression_ratio_threshold, cfg.no_speech_threshold) == (5, 3, 2.0, 0.5, False, 3.0, 0.25)
    assert cfg.HasField("logprob_threshold") and math.isnan(cfg.logprob_threshold)
    unset = _config(Request(task="transcribe", model="m"))
    assert not any(unset.HasField(f) for f in ("beam_size", "best_of", "patience", "length_penalty",
                                               "temperature_fallback", "compression_ratio_threshold",
                                               "logprob_threshold", "no_speech_threshold", "top_k", "top_p", "min_p"))
    assert _config(Request(task="transcribe", model="m", temperature_fallback=True)).HasField("temperature_fallback")
    cfg = _config(Request(task="translate", model="m", language="it", prompt="Roma", temperature=0.25, seed=9,
                          repetition_penalty=1.25, max_new_tokens=3, word_timestamps=True, stream_deltas=True))
    assert (cfg.model, cfg.language, cfg.prompt, cfg.temperature, cfg.seed, cfg.repetition_penalty,
            cfg.max_new_tokens, cfg.stream_deltas) == ("m", "it", "Roma", 0.25, 9, 1.25, 3, True)
    assert list(cfg.timestamp_granularities) == [pb.TIMESTAMP_GRANULARITY_SEGMENT, pb.TIMESTAMP_GRANULARITY_WORD]
    assert not any(unset.HasField(f) for f in ("temperature", "repetition_penalty", "max_new_tokens"))
    assert list(unset.timestamp_granularities) == [pb.TIMESTAMP_GRANULARITY_SEGMENT] and not unset.stream_deltas


@pytest.mark.parametrize("seed, folded", [(None, 0), (4419, 4419), (-1, -1), (2**63 - 1, 2**63 - 1),
                                          (2**63, -2**63), (2**64 - 1, -1)])
def test_unsigned_64_bit_seeds_are_folded_into_the_config(seed, folded):
    from http_shim.backend import Request
    from http_shim.grpc_backend import _config

    assert _config(Request(task="transcribe", model="m", seed=seed)).seed == folded


def test_patience_before_the_file_waits_for_a_beam_size_after_it(client, backend):
    parts = [("patience", "2"), ("file", ("a.wav", AUDIO)), ("beam_size", "3")]
    assert post(client, "/v1/audio/transcriptions", parts).status_code == 200
    assert len(backend.calls) == 1  # started once, when the form ended: not before with patience alone
    r = backend.calls[0].request
    assert (r.patience, r.beam_size) == (2.0, 3) and bytes(backend.calls[0].audio) == AUDIO


BAD_DECODING = [
    ({"beam_size": "0"}, "beam_size"), ({"beam_size": "11"}, "beam_size"), ({"beam_size": "five"}, "beam_size"),
    ({"beam_size": "2.5"}, "beam_size"), ({"best_of": "0"}, "best_of"), ({"best_of": "11"}, "best_of"),
    ({"patience": "0"}, "patience"), ({"patience": "11"}, "patience"), ({"patience": "nan"}, "patience"),
    ({"length_penalty": "2"}, "length_penalty"), ({"length_penalty": "-0.1"}, "length_penalty"),
    ({"temperature_fallback": "maybe"}, "temperature_fallback"), ({"use_beam_search": "maybe"}, "use_beam_search"),
    ({"compression_ratio_threshold": "-1"}, "compression_ratio_threshold"),
    ({"logprob_threshold": "1"}, "logprob_threshold"), ({"logprob_threshold": "low"}, "logprob_threshold"),
    ({"no_speech_threshold": "1.5"}, "no_speech_threshold"),
    ({"top_k": "-2"}, "top_k"), ({"top_k": "2.5"}, "top_k"), ({"top_k": str(2**31)}, "top_k"),
    ({"top_p": "0"}, "top_p"), ({"top_p": "1.01"}, "top_p"), ({"min_p": "-0.5"}, "min_p"), ({"min_p": "2"}, "min_p"),
    ({"use_beam_search": "true", "n": "11"}, "n"), ({"use_beam_search": "true", "n": "0"}, "n"),
    ({"n": "three"}, "n"), ({"use_beam_search": "true", "n": "3", "beam_size": "4"}, "n"),
    ({"use_beam_search": "false", "beam_size": "4"}, "use_beam_search"),
    ({"use_beam_search": "true", "length_penalty": "0.5"}, "length_penalty"),  # vLLM's exponent: no equal here
]


@pytest.mark.parametrize("fields,param", BAD_DECODING, ids=[str(f) for f, _ in BAD_DECODING])
@pytest.mark.parametrize("order", ["fields_first", "file_first"])
def test_bad_decoding_fields(client, backend, fields, param, order):
    file = [("file", ("a.wav", AUDIO))]
    parts = list(fields.items()) + file if order == "fields_first" else file + list(fields.items())
    error = error_of(post(client, "/v1/audio/transcriptions", parts), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert all(c.cancelled for c in backend.calls)


# ---- the application ----------------------------------------------------------------------------------------


FIELDS = [("model", "whisper-1"), ("language", "it"), ("temperature", "0"), ("seed", "4419"),
          ("repetition_penalty", "1.3"), ("prompt", "Dragoman, Roma")]


@pytest.mark.parametrize("order", ["fields_first", "file_first", "file_between"])
def test_audio_reaches_the_service_whatever_the_field_order(client, backend, order):
    file = ("file", ("a.wav", AUDIO))
    parts = {"fields_first": FIELDS + [file], "file_first": [file] + FIELDS,
             "file_between": FIELDS[:1] + [file] + FIELDS[1:]}[order]
    resp = post(client, "/v1/audio/translations", parts + [("response_format", "json")])
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json() == {"text": TEXT.strip()}
    call = backend.calls[-1]
    assert bytes(call.audio) == AUDIO and call.closed
    assert all(c.cancelled for c in backend.calls[:-1])  # a call started before a field changed it is dropped
    r = call.request
    assert (r.task, r.model, r.language, r.temperature, r.seed, r.repetition_penalty, r.prompt) == (
        "translate", "/models/whisper-large-v3", "it", 0.0, 4419, 1.3, "Dragoman, Roma")


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "verbose_json", "vtt"])
def test_formats(client, fmt):
    resp = post(client, "/v1/audio/transcriptions", [("model", "whisper-large-v3"), ("response_format", fmt),
                                                      ("file", ("a.mp3", AUDIO))])
    assert resp.status_code == 200
    text = resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].count("charset") == (0 if fmt.endswith("json") else 1)
    if fmt == "json":
        assert resp.get_json() == {"text": TEXT.strip(), "usage": {"type": "duration", "seconds": 4}}
    elif fmt == "text":
        assert resp.mimetype == "text/plain" and text == TEXT.strip()
    elif fmt == "srt":
        assert len(list(srt.parse(text))) == 2
    elif fmt == "vtt":
        assert resp.mimetype == "text/vtt" and len(webvtt.from_string(text)) == 2
    else:
        assert resp.get_json()["language"] == "italian"


@pytest.mark.parametrize("continuous", [False, True])
def test_stream(client, continuous):
    resp = post(client, "/v1/audio/transcriptions", [("model", "whisper-1"), ("stream", "true"),
                                                      ("stream_include_usage", "true"),
                                                      ("stream_continuous_usage_stats", str(continuous).lower()),
                                                      ("file", ("a.wav", AUDIO))])
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    lines = [line for line in resp.get_data(as_text=True).split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    deltas = [e["choices"][0]["delta"]["content"] for e in events if e.get("choices")]
    assert "".join(deltas) == TEXT.strip()
    assert [e["type"] for e in events] == ["transcript.text.delta"] * 2 + ["transcript.text.done",
                                                                          "transcript.text.usage"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 12
    # With vLLM's continuous usage, each text chunk has what the call had used by its text (the
    # service's count with each delta; segment 1 is empty and sends none).
    running = [e.get("usage") for e in events if e["type"] == "transcript.text.delta"]
    assert running == ([{"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                        {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}] if continuous else [None] * 2)


def test_stream_ignores_the_response_format(client):
    resp = post(client, "/v1/audio/translations", [("stream", "true"), ("response_format", "srt"),
                                                    ("file", ("a.wav", AUDIO))])
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    assert resp.get_data(as_text=True).endswith("data: [DONE]\n\n")


def test_stream_error_before_first_event_keeps_its_status(client, backend):
    backend.fail_events = APIError(400, "bad audio", param="file", code="invalid_file")
    resp = post(client, "/v1/audio/transcriptions", [("stream", "true"), ("file", ("a.wav", AUDIO))])
    assert error_of(resp, 400)["param"] == "file"


@pytest.mark.parametrize("parts,status,param", [
    ([("model", "whisper-1")], 400, "file"),
    ([("file", ("a.wav", b""))], 400, "file"),
    ([("file", "not a file")], 400, "file"),
    ([("temperature", "3"), ("file", ("a.wav", AUDIO))], 400, "temperature"),
    ([("file", ("a.wav", AUDIO)), ("temperature", "warm")], 400, "temperature"),
    ([("language", "xx"), ("file", ("a.wav", AUDIO))], 400, "language"),
    ([("response_format", "docx"), ("file", ("a.wav", AUDIO))], 400, "response_format"),
    ([("model", "gpt-4o-transcribe"), ("file", ("a.wav", AUDIO))], 404, "model"),
])
def test_bad_requests(client, backend, parts, status, param):
    resp = post(client, "/v1/audio/transcriptions", parts)
    assert error_of(resp, status)["param"] == param
    assert all(c.cancelled for c in backend.calls)
    assert post(client, "/v1/audio/transcriptions", [("file", ("a.wav", AUDIO))]).status_code == 200


def test_not_multipart(client):
    assert error_of(client.post("/v1/audio/translations", json={"model": "whisper-1"}), 400)["param"] == "file"


def test_malformed_forms_are_refused_and_the_server_serves_on(client):
    """Media types are case-insensitive; a boundary outside RFC 2046's characters, a part without a
    name and a field that is no text (a lone surrogate, by way of UTF-7) are 400s naming the fault."""
    body, ctype = multipart([("file", ("a.wav", AUDIO))])
    upper = client.post("/v1/audio/translations", data=body, headers={"Content-Type": ctype.replace(
        "multipart/form-data", "Multipart/Form-Data")})
    assert upper.status_code == 200
    euro = client.post("/v1/audio/translations", data=body,
                       headers={"Content-Type": "multipart/form-data; boundary*=UTF-8''%E2%82%AC"})
    assert error_of(euro, 400)["code"] == "invalid_content_type" and "boundary" in euro.get_json()["error"]["message"]
    boundary = ctype.split("boundary=")[1]
    nameless = (f'--{boundary}\r\nContent-Disposition: form-data\r\n\r\nv\r\n'.encode() + body)
    resp = client.post("/v1/audio/translations", data=nameless, headers={"Content-Type": ctype})
    assert error_of(resp, 400)["code"] == "invalid_multipart" and "no name" in resp.get_json()["error"]["message"]
    surrogate = (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n'
                 f'Content-Type: text/plain; charset=utf-7\r\n\r\n+2AA-\r\n'.encode() + body)
    resp = client.post("/v1/audio/translations", data=surrogate, headers={"Content-Type": ctype})
    assert error_of(resp, 400)["param"] == "prompt"
    assert client.post("/v1/audio/translations", data=body, headers={"Content-Type": ctype}).status_code == 200


def test_oversize(make_client):
    client = make_client(max_upload_bytes=100_000)
    assert error_of(post(client, "/v1/audio/translations", [("file", ("a.wav", AUDIO))]), 413)["param"] == "file"
    body, ctype = multipart([("file", ("a.wav", AUDIO))])
    chunked = client.post("/v1/audio/translations", input_stream=io.BytesIO(body),
                          headers={"Content-Type": ctype, "Transfer-Encoding": "chunked"},
                          environ_overrides={"wsgi.input_terminated": True})
    assert error_of(chunked, 413)["code"] == "file_too_large"
    assert post(client, "/v1/audio/translations", [("file", ("a.wav", AUDIO[:50_000]))]).status_code == 200


def test_service_errors_map_to_statuses(client, backend):
    backend.fail_send = APIError(429, "busy", code="rate_limit_exceeded", retry_after=1.5)
    resp = post(client, "/v1/audio/translations", [("model", "whisper-1"), ("file", ("a.wav", AUDIO))])
    assert error_of(resp, 429)["code"] == "rate_limit_exceeded" and resp.headers["Retry-After"] == "2"
    backend.fail_send = None
    backend.down = True
    assert error_of(post(client, "/v1/audio/translations", [("file", ("a.wav", AUDIO))]), 503)
    assert error_of(client.get("/v1/models"), 503)


def test_api_key(make_client):
    client = make_client(api_key="sk-test-123456")
    assert error_of(client.get("/v1/models"), 401)["code"] is None
    assert error_of(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)["code"] == "invalid_api_key"
    resp = post(client, "/v1/audio/translations", [("file", ("a.wav", AUDIO))], {"Authorization": "Bearer bad"})
    assert error_of(resp, 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-test-123456"}).status_code == 200
    assert client.get("/health").status_code == 200  # health needs no key


def test_models_and_health(client, backend):
    data = client.get("/v1/models").get_json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["/models/whisper-large-v3", "whisper-large-v3", "whisper-1"]
    assert {m["root"] for m in data["data"]} == {"/models/whisper-large-v3"}
    assert all(m["object"] == "model" and "created" in m and "owned_by" in m for m in data["data"])
    for name in ("whisper-1", "whisper-large-v3"):  # every name a request may give is one GET finds
        assert client.get(f"/v1/models/{name}").get_json()["id"] == name
    assert error_of(client.get("/v1/models/nope"), 404)["code"] == "model_not_found"
    assert client.get("/health").status_code == 200
    backend.status = "NOT_SERVING"
    assert client.get("/health").status_code == 503
    assert error_of(client.get("/v1/nothing"), 404)
    assert error_of(client.get("/v1/audio/translations"), 405)


def test_cors(make_client):
    off = make_client()
    assert "Access-Control-Allow-Origin" not in off.get("/v1/models", headers={"Origin": "https://a.example"}).headers
    on = make_client(cors_origins=["https://a.example"])
    pre = on.options("/v1/audio/translations", headers={"Origin": "https://a.example",
                                                        "Access-Control-Request-Method": "POST",
                                                        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    other = on.get("/v1/models", headers={"Origin": "https://b.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_config_flags_and_env():
    from http_shim.config import parse_args

    c = parse_args(["--port", "9000", "--max-upload-bytes", "10MB", "--cors-origins", "https://a, https://b/"],
                   env={"DRAGOMAN_API_KEY": "k", "DRAGOMAN_GRPC_TARGET": "svc:1"})
    assert (c.port, c.max_upload_bytes, c.cors_origins, c.api_key, c.grpc_target) == (
        9000, 10 << 20, ["https://a", "https://b"], "k", "svc:1")
    d = parse_args([], env={})
    assert (d.port, d.max_upload_bytes, d.api_key, d.cors_origins) == (8000, 25 << 20, None, [])
    assert math.isclose(parse_args([], env={"DRAGOMAN_HTTP_REQUEST_TIMEOUT": "2.5"}).request_timeout, 2.5)


@pytest.mark.parametrize("var, value, message", [
    ("DRAGOMAN_HTTP_PORT", "http", "DRAGOMAN_HTTP_PORT='http' is not an integer"),
    ("DRAGOMAN_HTTP_REQUEST_TIMEOUT", "inf", "DRAGOMAN_HTTP_REQUEST_TIMEOUT='inf' is not a positive number"),
    ("DRAGOMAN_HTTP_MAX_UPLOAD_BYTES", "0MB", "DRAGOMAN_HTTP_MAX_UPLOAD_BYTES='0MB' is not a positive size"),
    ("DRAGOMAN_HTTP_LOG_LEVEL", "loud", "DRAGOMAN_HTTP_LOG_LEVEL='loud' is not one of debug, info, warning, error"),
    ("DRAGOMAN_HTTP_CORS_ORIGINS", "", None),  # empty: unset
])
def test_a_bad_environment_variable_is_named(var, value, message, capsys):
    from http_shim.config import parse_args

    if message is None:
        assert parse_args([], env={var: value}) == parse_args([], env={})
        return
    with pytest.raises(SystemExit):
        parse_args([], env={var: value})
    assert message in capsys.readouterr().err


def test_the_api_key_is_never_shown_in_the_help(capsys):
    from http_shim.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"], env={"DRAGOMAN_API_KEY": "sk-secret"})
    shown = capsys.readouterr().out
    assert "sk-secret" not in shown and "default set" in shown


def test_the_help_shows_what_the_environment_set(capsys):
    from http_shim.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"], env={"DRAGOMAN_HTTP_MAX_UPLOAD_BYTES": "1GB", "DRAGOMAN_HTTP_CORS_ORIGINS": "https://a%b"})
    shown = " ".join(capsys.readouterr().out.split())
    assert "DRAGOMAN_HTTP_MAX_UPLOAD_BYTES; default 1073741824)" in shown
    assert "DRAGOMAN_HTTP_CORS_ORIGINS; default https://a%b)" in shown  # argparse's % formatting escaped


def test_unknown_fields_are_logged_and_ignored(client, caplog):
    caplog.set_level("INFO", logger="http_shim")
    resp = post(client, "/v1/audio/transcriptions", [("model", "whisper-1"), ("colour", "blue"),
                                                      ("include[]", "logprobs"), ("file", ("a.wav", AUDIO))])
    assert resp.status_code == 200
    assert any("colour" in r.getMessage() for r in caplog.records)
    assert any("include[]" in r.getMessage() for r in caplog.records)


# ---- gRPC status (with google.rpc details) to HTTP ------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, message, details=()):
        status = status_pb2.Status(code=code.value[0], message=message)
        for d in details:
            status.details.add().Pack(d)
        self._status = rpc_status.to_status(status)

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata


def _violation(field):
    return error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=field, description="is wrong")])


def _retry(seconds):
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds, nanos=500_000_000))


def _info(reason, domain="dragoman.v1"):
    return error_details_pb2.ErrorInfo(reason=reason, domain=domain)


@pytest.mark.parametrize("code,details,status,param,retry_after", [
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("config.language")], 400, "language", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("config.max_new_tokens")], 400, "max_completion_tokens", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("config.temperature")], 400, "temperature", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("audio")], 400, "file", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("config.model")], 404, "model", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("config.beam_size")], 400, "beam_size", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("config.patience")], 400, "patience", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("config.logprob_threshold")], 400, "logprob_threshold", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [], 400, None, None),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, [_retry(2)], 429, None, "3"),
    (grpc.StatusCode.UNAVAILABLE, [_retry(0)], 503, None, "1"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, [], 504, None, None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("audio"), _info("AUDIO_TOO_LARGE")], 413, "file", None),
    (grpc.StatusCode.INVALID_ARGUMENT, [_violation("audio"), _info("AUDIO_TOO_LARGE", "example.com")], 400, "file",
     None),
    (grpc.StatusCode.DEADLINE_EXCEEDED, [_info("AUDIO_TIMEOUT")], 408, None, None),
    (grpc.StatusCode.INTERNAL, [], 500, None, None),
    (grpc.StatusCode.UNIMPLEMENTED, [], 501, None, None),
])
def test_grpc_errors_to_http(code, details, status, param, retry_after):
    from http_shim.grpc_backend import http_error

    err = http_error(FakeRpcError(code, "something happened", details))
    assert (err.status, err.param, err.headers().get("Retry-After")) == (status, param, retry_after)
    # OpenAI's SDKs would send a timed-out or failed request again, twice, unless told not to.
    assert err.headers().get("x-should-retry") == ("false" if status in (500, 501, 504) else None)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert err.body()["error"]["type"] == ("invalid_request_error" if status < 429 else
                                           "rate_limit_error" if status == 429 else "server_error")


def test_grpc_errors_name_the_form_field_the_beam_width_came_from():
    from http_shim.grpc_backend import http_error

    err = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "too wide", [_violation("config.beam_size")])
    assert http_error(err, {"config.beam_size": "n"}).param == "n"
    assert http_error(err, {"config.beam_size": "use_beam_search"}).param == "use_beam_search"
    assert http_error(err).param == "beam_size"


# ---- metrics ------------------------------------------------------------------------------------------------


def scrape(client) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.mimetype == "text/plain"
    resp.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.get_data(as_text=True)) for s in family.samples}


def requests_of(metrics: dict, endpoint: str, code: str, method: str = "POST") -> float:
    return metrics.get(("dragoman_http_requests_total", (("code", code), ("endpoint", endpoint), ("method", method))), 0)


def test_metrics_count_requests_by_endpoint_and_status_code(make_client):
    """Refusals the service never sees are counted too. A request counts once its answer is out
    (the server closes it), so an event stream is in progress until its last event."""
    client = make_client(api_key="sk-test")
    auth = {"Authorization": "Bearer sk-test"}

    def answered(resp) -> int:
        resp.get_data()
        resp.close()  # what the WSGI server does once the answer is sent
        return resp.status_code

    assert answered(post(client, "/v1/audio/transcriptions", [("file", ("a.wav", AUDIO))], auth)) == 200
    assert answered(post(client, "/v1/audio/transcriptions", [("file", ("a.wav", AUDIO))])) == 401
    assert answered(post(client, "/v1/audio/translations", [("temperature", "hot"), ("file", ("a.wav", AUDIO))],
                         auth)) == 400
    assert answered(client.get("/no/such/path")) == 404
    stream = post(client, "/v1/audio/translations", [("stream", "true"), ("file", ("a.wav", AUDIO))], auth)
    before = scrape(client)
    assert before[("dragoman_http_requests_in_progress", (("endpoint", "translations"),))] == 1
    assert requests_of(before, "translations", "200") == 0
    assert stream.get_data(as_text=True).endswith("data: [DONE]\n\n")
    stream.close()
    after = scrape(client)
    assert requests_of(after, "transcriptions", "200") == 1 and requests_of(after, "transcriptions", "401") == 1
    assert requests_of(after, "translations", "400") == 1 and requests_of(after, "translations", "200") == 1
    assert requests_of(after, "unknown", "404", "GET") == 1
    assert after[("dragoman_http_requests_in_progress", (("endpoint", "translations"),))] == 0
    assert after[("dragoman_http_request_duration_seconds_count", (("endpoint", "translations"),))] == 2


def test_metrics_label_unknown_methods_as_one_and_count_what_is_sent(backend):
    """A method of no route (anything a client sends) is one series, not one each; an answer that
    fails in Flask's last steps is replaced by a 500, and that is what is counted."""
    app = create_app(Config(), backend=backend)

    @app.after_request
    def fails(response):  # runs before the shim's own hooks (Flask runs them last added first)
        if request.path == "/v1/models":
            raise RuntimeError("a later step failed")
        return response

    client = app.test_client()
    for method in ("PROPFIND", "BREW", "GET"):
        resp = client.open("/no/such/path", method=method)
        resp.close()
        assert resp.status_code == 404
    resp = client.get("/v1/models")
    resp.close()
    assert resp.status_code == 500
    metrics = scrape(client)
    assert requests_of(metrics, "unknown", "404", "other") == 2 and requests_of(metrics, "unknown", "404", "GET") == 1
    assert requests_of(metrics, "models", "500", "GET") == 1 and requests_of(metrics, "models", "200", "GET") == 0
    assert metrics[("dragoman_http_requests_in_progress", (("endpoint", "models"),))] == 0
