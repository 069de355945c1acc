"""The HTTP API end to end: the gRPC service and the shim (under gunicorn) as real processes with a
tiny random-weight Whisper, driven by OpenAI's Python SDK, a vLLM-style streaming client and raw HTTP.

Random weights give nonsense text: the tests check structure, status codes, and that the same
request (temperature 0, a fixed seed) gives the same text every way it is asked for.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import av
import httpx
import numpy as np
import openai
from openai.types.audio import Transcription, Translation
import pytest
import srt
import webvtt

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-dragoman-test"
MAX_UPLOAD = 1 << 20  # the shim under test takes files up to 1 MiB
# Few tokens per window: random weights never stop on their own, and the suite must stay quick.
FAST = {"language": "it", "seed": 4419, "repetition_penalty": 1.3, "max_completion_tokens": 8}
FORMATS = ["json", "text", "srt", "verbose_json", "vtt"]
MAX_BATCH = 5  # the service's batch: room for use_beam_search's default 5 beams


def make_audio(seconds: float = 3.0, fmt: str = "wav", rate: int = 16000, seed: int = 0) -> bytes:
    """A few seconds of a modulated tone with a little noise, encoded by PyAV (wav or mp3)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t))
    pcm = ((x + 0.02 * rng.standard_normal(len(t))) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream({"wav": "pcm_s16le", "mp3": "libmp3lame"}[fmt], rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        frames = [frame]
        if fmt != "wav":
            frames = av.AudioResampler(format=stream.codec_context.format.name, layout="mono",
                                       rate=rate).resample(frame)
        for f in frames:
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return buf.getvalue()


WAV = make_audio(3.0, "wav")
MP3 = make_audio(3.0, "mp3", seed=1)
LONG = make_audio(35.0, "mp3", seed=2)  # two 30 s windows, several segments (some empty)


def free_port() -> int:
    """A port nothing listens on (for a target that must be down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVICE_LISTENING = r"listening on \S+:(\d+)"
SHIM_LISTENING = r"Listening at: http://\S+:(\d+)"  # gunicorn's


def listening_port(proc: subprocess.Popen, log: Path, pattern: str, timeout: float = 120) -> int:
    """The port a process started with port 0 took, from its log: no other process can take it
    between the choice and the bind, as with a port picked for it beforehand."""
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, log.read_text())
        if m:
            return int(m.group(1))
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no port in the log (exit status {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


class Servers:
    def __init__(self, url: str, grpc_target: str, model_dir: str):
        self.url = url
        self.grpc_target = grpc_target
        self.model_dir = model_dir

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", API_KEY), max_retries=0,
                             timeout=120, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def post(self, path: str, files=None, data=None, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}", **kw.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", files=files, data=data, headers=headers, timeout=120, **kw)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def servers(tiny_model, tmp_path_factory):
    model_dir = str(tiny_model[0])
    logs = tmp_path_factory.mktemp("logs")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("DRAGOMAN_API_KEY", None)
    server_log = open(logs / "service.log", "w")
    shim_log = open(logs / "shim.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "INFO", "serve", "--model", model_dir,
                               "--port", "0", "--max-batch", str(MAX_BATCH)],
                              cwd=ROOT, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    shim = None
    try:
        grpc_port = listening_port(server, logs / "service.log", SERVICE_LISTENING)
        shim = subprocess.Popen([sys.executable, "-m", "http_shim", "--port", "0",
                                 "--grpc-target", f"127.0.0.1:{grpc_port}", "--api-key", API_KEY,
                                 "--max-upload-bytes", str(MAX_UPLOAD), "--threads", "8", "--request-timeout", "120"],
                                cwd=ROOT, env=env, stdout=shim_log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{listening_port(shim, logs / 'shim.log', SHIM_LISTENING)}"
        deadline = time.monotonic() + 400
        while True:
            for name, proc, log in (("service", server, logs / "service.log"), ("shim", shim, logs / "shim.log")):
                if proc.poll() is not None:
                    pytest.fail(f"the {name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"not ready in time:\n{(logs / 'service.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield Servers(url, f"127.0.0.1:{grpc_port}", model_dir)
    finally:
        if shim is not None:
            _stop(shim)
        _stop(server)
        server_log.close()
        shim_log.close()


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.fixture(scope="session")
def reference(servers):
    """The non-streamed texts of the requests the other tests repeat."""
    c = servers.client()
    texts = {
        "translate": c.audio.translations.create(file=("a.mp3", LONG), model="whisper-1", temperature=0.0,
                                                 extra_body=FAST).text,
        "transcribe": c.audio.transcriptions.create(file=("a.mp3", LONG), model="whisper-1", temperature=0.0,
                                                    extra_body=FAST).text,
    }
    assert all(texts.values()), texts
    return texts


# ---- health and models -------------------------------------------------------------------------------------


def test_health_and_models(servers):
    health = httpx.get(f"{servers.url}/health")  # no API key needed
    assert health.status_code == 200 and health.json()["status"] == "SERVING"
    models = servers.client().models.list()
    ids = [m.id for m in models.data]
    assert servers.model_dir in ids and "whisper-1" in ids and servers.model_dir.rsplit("/", 1)[-1] in ids
    assert len(ids) == len(set(ids))
    assert all(m.object == "model" for m in models.data)
    assert servers.client().models.retrieve("whisper-1").id == "whisper-1"


# ---- the official SDK, sync and async -------------------------------------------------------------------------


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _check_format(fmt: str, result, task: str, expected_text: str) -> None:
    if fmt == "json":
        assert isinstance(result, (Translation, Transcription))
        assert result.text == expected_text
        if task == "transcribe":
            assert result.usage.type == "duration" and result.usage.seconds == 35
    elif fmt == "text":
        assert isinstance(result, str) and result == expected_text
    elif fmt == "srt":
        subs = list(srt.parse(result))
        assert subs and all(s.content.strip() for s in subs)
        assert _squeeze("".join(s.content for s in subs)) == _squeeze(expected_text)
        assert all(s.end >= s.start for s in subs) and [s.index for s in subs] == list(range(1, len(subs) + 1))
    elif fmt == "vtt":
        assert result.startswith("WEBVTT")
        captions = webvtt.from_string(result)
        assert len(captions) and _squeeze("".join(c.text for c in captions)) == _squeeze(expected_text)
    else:
        assert result.text == expected_text
        assert result.language == "italian" and isinstance(result.duration, float)
        assert abs(result.duration - 35.0) < 0.1
        assert result.segments, "verbose_json has segments"
        for i, s in enumerate(result.segments):
            assert s.id == i and s.end >= s.start and isinstance(s.tokens, list)
            assert isinstance(s.avg_logprob, float) and 0 <= s.temperature <= 1
        assert "".join(s.text for s in result.segments).strip() == expected_text
        assert getattr(result, "task", task) == task


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("task", ["translate", "transcribe"])
def test_sdk_formats(servers, reference, task, fmt):
    c = servers.client()
    endpoint = c.audio.translations if task == "translate" else c.audio.transcriptions
    result = endpoint.create(file=("a.mp3", LONG, "audio/mpeg"), model="whisper-1", response_format=fmt,
                             temperature=0.0, extra_body=FAST)
    _check_format(fmt, result, task, reference[task])


def test_sdk_served_model_names_and_mp3(servers):
    c = servers.client()
    name = Path(servers.model_dir).name  # the id's last part, as "whisper-large-v3" names openai/whisper-large-v3
    for model in (servers.model_dir, name):
        r = c.audio.transcriptions.create(file=("a.mp3", MP3, "audio/mpeg"), model=model, response_format="verbose_json",
                                          temperature=0.0, extra_body=FAST)
        assert r.language == "italian" and abs(r.duration - 3.0) < 0.1


def test_sdk_word_timestamps(servers):
    r = servers.client().audio.transcriptions.create(
        file=("a.wav", WAV), model="whisper-1", response_format="verbose_json",
        timestamp_granularities=["word", "segment"], temperature=0.0, extra_body=FAST)
    assert r.segments and r.words
    for w in r.words:
        assert isinstance(w.word, str) and w.end >= w.start >= 0


def test_sdk_async(servers, reference):
    async def main():
        c = servers.async_client()
        tr, ts, vtt = await asyncio.gather(
            c.audio.translations.create(file=("a.mp3", LONG), model="whisper-1", temperature=0.0, extra_body=FAST),
            c.audio.transcriptions.create(file=("a.mp3", LONG), model="whisper-1", temperature=0.0,
                                          response_format="verbose_json", extra_body=FAST),
            c.audio.translations.create(file=("a.mp3", LONG), model="whisper-1", temperature=0.0,
                                        response_format="vtt", extra_body=FAST))
        with pytest.raises(openai.BadRequestError):
            await c.audio.transcriptions.create(file=("a.wav", WAV), model="whisper-1", language="xx")
        await c.close()
        return tr, ts, vtt

    tr, ts, vtt = asyncio.run(main())
    assert tr.text == reference["translate"]
    _check_format("verbose_json", ts, "transcribe", reference["transcribe"])
    _check_format("vtt", vtt, "translate", reference["translate"])


def test_sdk_typed_errors(servers):
    c = servers.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.audio.transcriptions.create(file=("a.wav", WAV), model="whisper-1", temperature=3)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.audio.translations.create(file=("a.wav", b"this is not audio" * 100), model="whisper-1")
    assert e.value.param == "file"
    with pytest.raises(openai.NotFoundError) as e:
        c.audio.translations.create(file=("a.wav", WAV), model="gpt-4o-transcribe")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        servers.client(api_key="sk-wrong").audio.translations.create(file=("a.wav", WAV), model="whisper-1")
    with pytest.raises(openai.APIStatusError) as e:
        c.audio.transcriptions.create(file=("big.wav", make_audio(40.0)), model="whisper-1")
    assert e.value.status_code == 413 and e.value.code == "file_too_large"


# ---- streaming: vLLM's client and OpenAI's, same endpoint -------------------------------------------------------


def _vllm_stream(servers, path: str, data: dict) -> tuple[list[dict], str]:
    """What vLLM's example client does: POST with stream=true, read `data: ` lines, join
    choices[0].delta.content until [DONE]."""
    chunks, text = [], ""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{servers.url}{path}", files={"file": ("a.mp3", LONG, "audio/mpeg")},
                      data={**data, "stream": "true"}, headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            payload = line[len("data: "):]
            if payload.strip() == "[DONE]":
                break
            chunk = json.loads(payload)
            chunks.append(chunk)
            if chunk.get("choices"):
                text += chunk["choices"][0].get("delta", {}).get("content") or ""
    return chunks, text


@pytest.mark.parametrize("task, continuous", [("translate", False), ("transcribe", True)])
def test_vllm_streaming_client(servers, reference, task, continuous):
    path = "/v1/audio/translations" if task == "translate" else "/v1/audio/transcriptions"
    fields = {"model": "whisper-1", "temperature": "0.0", "stream_include_usage": "true",
              "stream_continuous_usage_stats": str(continuous).lower(), **{k: str(v) for k, v in FAST.items()}}
    chunks, text = _vllm_stream(servers, path, fields)
    assert text == reference[task]
    kind = "translation.chunk" if task == "translate" else "transcription.chunk"
    assert all(c["object"] == kind for c in chunks)
    deltas = [c for c in chunks if c.get("type") == "transcript.text.delta"]
    assert "".join(c["delta"] for c in deltas) == text
    done = [c for c in chunks if c.get("type") == "transcript.text.done"]
    # Random weights never end a text: each window's is cut at max_completion_tokens, and vLLM says so.
    assert len(done) == 1 and done[0]["text"] == text and done[0]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    # vLLM's stream_continuous_usage_stats: every text chunk tells what the call had used so far.
    assert all(("usage" in c) is continuous for c in deltas)
    if continuous:
        running = [(c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) for c in deltas]
        assert running == sorted(running) and 0 < running[-1][1] <= usage["usage"]["completion_tokens"]
        assert all(c["usage"]["total_tokens"] == sum(r) for c, r in zip(deltas, running))


def test_openai_sdk_stream(servers, reference):
    stream = servers.client().audio.transcriptions.create(file=("a.mp3", LONG), model="whisper-1", stream=True,
                                                          temperature=0.0, extra_body=FAST)
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert "".join(deltas) == reference["transcribe"]
    assert len(done) == 1 and done[0].text == reference["transcribe"]


def test_stream_errors_keep_their_status(servers):
    with pytest.raises(openai.BadRequestError):
        list(servers.client().audio.transcriptions.create(file=("a.wav", b"\x00" * 5000), model="whisper-1",
                                                          stream=True))


# ---- decoding options: beam search, best-of, temperature fallback ---------------------------------------------


def _verbose(servers, **extra):
    """A verbose_json transcription of WAV through the SDK, FAST's fields and `extra` in extra_body."""
    temperature = extra.pop("temperature", 0.0)
    return servers.client().audio.transcriptions.create(file=("a.wav", WAV), model="whisper-1",
                                                        response_format="verbose_json", temperature=temperature,
                                                        extra_body={**FAST, **extra})


def _segments(result) -> list[tuple]:
    return [(s.text.strip(), list(s.tokens), round(s.temperature, 4)) for s in result.segments]


def _grpc_segments(servers, **config) -> list[tuple]:
    """The same request straight to the gRPC service, FAST's fields in the Config."""
    import grpc

    from dragoman.v1 import speech_pb2 as pb
    from dragoman.v1 import speech_pb2_grpc

    cfg = pb.Config(language=FAST["language"], seed=FAST["seed"], repetition_penalty=FAST["repetition_penalty"],
                    max_new_tokens=FAST["max_completion_tokens"], **config)
    with grpc.insecure_channel(servers.grpc_target) as channel:
        stub = speech_pb2_grpc.SpeechServiceStub(channel)
        responses = list(stub.Transcribe(iter([pb.TranscribeRequest(config=cfg), pb.TranscribeRequest(audio=WAV)]),
                                         timeout=120))
    return [(r.segment.text.strip(), list(r.segment.tokens), round(r.segment.temperature, 4))
            for r in responses if r.WhichOneof("event") == "segment"]


def test_sdk_beam_search(servers):
    beam_5 = _verbose(servers, beam_size=5, temperature_fallback=False)
    assert beam_5.segments and all(s.temperature == 0 for s in beam_5.segments)
    assert _segments(beam_5) == _grpc_segments(servers, beam_size=5, temperature=0, temperature_fallback=False)
    # vLLM's spelling: use_beam_search, n beams wide (5 without n).
    assert _segments(_verbose(servers, use_beam_search=True, temperature_fallback=False)) == _segments(beam_5)
    beam_3 = _verbose(servers, beam_size=3, patience=2.0, length_penalty=0.5, temperature_fallback=False)
    assert _segments(beam_3) == _grpc_segments(servers, beam_size=3, patience=2.0, length_penalty=0.5, temperature=0,
                                               temperature_fallback=False)
    # vLLM's length_penalty of 1 (score / length) is openai-whisper's default ranking.
    vllm_3 = _verbose(servers, use_beam_search=True, n=3, patience=2.0, length_penalty=1.0, temperature_fallback=False)
    assert _segments(vllm_3) == _grpc_segments(servers, beam_size=3, patience=2.0, temperature=0,
                                               temperature_fallback=False)
    greedy = _verbose(servers, temperature_fallback=False)
    assert _segments(_verbose(servers, beam_size=1, temperature_fallback=False)) == _segments(greedy)
    # Streamed, beam search sends each segment's final text: the deltas join to the same text.
    stream = servers.client().audio.transcriptions.create(file=("a.wav", WAV), model="whisper-1", stream=True,
                                                          temperature=0.0,
                                                          extra_body={**FAST, "beam_size": 5,
                                                                      "temperature_fallback": False})
    events = list(stream)
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == beam_5.text
    assert [e.text for e in events if e.type == "transcript.text.done"] == [beam_5.text]


def test_sdk_best_of(servers):
    first = _verbose(servers, temperature=0.6, best_of=3, temperature_fallback=False)
    second = _verbose(servers, temperature=0.6, best_of=3, temperature_fallback=False)
    assert first.segments and _segments(first) == _segments(second)
    assert all(s.temperature == pytest.approx(0.6) for s in first.segments)
    assert _segments(first) == _grpc_segments(servers, best_of=3, temperature=0.6, temperature_fallback=False)
    # The best of three is not the one sample drawn without best_of: a best_of lost on the way would show.
    assert _segments(first) != _segments(_verbose(servers, temperature=0.6, temperature_fallback=False))


def test_sdk_sampling_filters(servers):
    filters = dict(top_k=3, top_p=0.9, min_p=0.01)
    got = _verbose(servers, temperature=0.8, temperature_fallback=False, **filters)
    assert got.segments and _segments(got) == _grpc_segments(servers, temperature=0.8, temperature_fallback=False,
                                                             **filters)
    # vLLM's values for "any token": top_k -1 (or 0), top_p 1, min_p 0.
    off = _verbose(servers, temperature=0.8, temperature_fallback=False, top_k=-1, top_p=1, min_p=0)
    assert _segments(off) == _segments(_verbose(servers, temperature=0.8, temperature_fallback=False))
    assert _segments(off) != _segments(got)


def test_sdk_temperature_fallback(servers):
    off = _verbose(servers, temperature_fallback=False)
    assert off.segments and all(s.temperature == 0 for s in off.segments)
    on = _verbose(servers)  # random weights fail the default thresholds: higher temperatures follow
    assert on.segments and max(s.temperature for s in on.segments) > 0
    assert _segments(on) == _grpc_segments(servers, temperature=0)
    # A threshold that random weights pass keeps temperature 0.
    assert _segments(_verbose(servers, logprob_threshold=-100)) == _segments(off)
    assert _segments(_verbose(servers, logprob_threshold="off", compression_ratio_threshold="off")) == _segments(off)


BAD_DECODING = [
    ({"beam_size": 11}, "beam_size"),
    ({"beam_size": MAX_BATCH + 1}, "beam_size"),  # more beams than the service's batch: the service says so
    ({"use_beam_search": True, "n": MAX_BATCH + 1}, "n"),
    ({"use_beam_search": True, "n": 11}, "n"),
    ({"best_of": 0}, "best_of"),
    ({"patience": 2.0}, "patience"),  # without beam search: the service says so
    ({"beam_size": 2, "patience": 0}, "patience"),
    ({"length_penalty": 2}, "length_penalty"),
    ({"temperature_fallback": "maybe"}, "temperature_fallback"),
    ({"logprob_threshold": 1}, "logprob_threshold"),
    ({"no_speech_threshold": 2}, "no_speech_threshold"),
    ({"compression_ratio_threshold": "high"}, "compression_ratio_threshold"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
]


@pytest.mark.parametrize("extra,param", BAD_DECODING, ids=[str(e) for e, _ in BAD_DECODING])
def test_sdk_bad_decoding_options(servers, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        servers.client().audio.transcriptions.create(file=("a.wav", WAV), model="whisper-1", extra_body=extra)
    assert e.value.status_code == 400 and e.value.param == param
    assert e.value.type == "invalid_request_error"


# ---- bad input, each answered in OpenAI's shape; a good request still works after them ----------------------------


BAD = [
    ("no_file", None, {"model": "whisper-1"}, 400, "file"),
    ("empty_file", ("a.wav", b""), {}, 400, "file"),
    ("not_audio", ("a.wav", b"RIFF....not really a wav file" * 50), {}, 400, "file"),
    ("file_as_text", (None, "hello"), {}, 400, "file"),
    ("temperature_type", ("a.wav", WAV), {"temperature": "hot"}, 400, "temperature"),
    ("seed_type", ("a.wav", WAV), {"seed": "four"}, 400, "seed"),
    ("stream_type", ("a.wav", WAV), {"stream": "maybe"}, 400, "stream"),
    ("granularity", ("a.wav", WAV), {"timestamp_granularities[]": "sentence"}, 400, "timestamp_granularities[]"),
    ("temperature_3", ("a.wav", WAV), {"temperature": "3"}, 400, "temperature"),
    ("language_xx", ("a.wav", WAV), {"language": "xx"}, 400, "language"),
    ("format_docx", ("a.wav", WAV), {"response_format": "docx"}, 400, "response_format"),
    ("to_language", ("a.wav", WAV), {"to_language": "fr"}, 400, "to_language"),
    ("unknown_model", ("a.wav", WAV), {"model": "nope"}, 404, "model"),
    ("oversize", ("big.wav", b"\x00" * (MAX_UPLOAD + 1)), {}, 413, "file"),
]


@pytest.mark.parametrize("name,file,data,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(servers, name, file, data, status, param):
    # Always multipart (as OpenAI's SDK sends it), with or without a file part.
    files = {k: (None, v) for k, v in {"model": "whisper-1", **data}.items()}
    if file is not None:
        files["file"] = file  # (None, text) makes a text part named "file"
    resp = servers.post("/v1/audio/translations", files=files)
    error = error_of(resp, status)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_good_request_after_bad_ones(servers, reference):
    for data in ({"temperature": "3"}, {"language": "xx"}):
        assert servers.post("/v1/audio/translations", files={"file": ("a.wav", WAV)},
                            data={"model": "whisper-1", **data}).status_code == 400
    assert servers.post("/v1/audio/translations", files={"file": ("big.wav", b"\x00" * (3 * MAX_UPLOAD))},
                        data={"model": "whisper-1"}).status_code == 413
    resp = servers.post("/v1/audio/translations", files={"file": ("a.mp3", LONG)},
                        data={"model": "whisper-1", "temperature": "0", **{k: str(v) for k, v in FAST.items()}})
    assert resp.status_code == 200 and resp.json()["text"] == reference["translate"]


def test_not_multipart_and_auth(servers):
    resp = httpx.post(f"{servers.url}/v1/audio/translations", json={"model": "whisper-1"},
                      headers={"Authorization": f"Bearer {API_KEY}"})
    assert error_of(resp, 400)["code"] == "invalid_content_type"
    no_key = httpx.post(f"{servers.url}/v1/audio/translations", files={"file": ("a.wav", WAV)})
    assert error_of(no_key, 401)
    assert error_of(httpx.get(f"{servers.url}/v1/models", headers={"Authorization": "Bearer x"}), 401)


def test_fields_after_the_file(servers, reference):
    """curl -F file=@a.wav -F model=... (and OpenAI's Node SDK) put the file first."""
    fields = {"model": "whisper-1", "temperature": "0", **{k: str(v) for k, v in FAST.items()}}
    boundary = "dragomanboundary"
    body = io.BytesIO()
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
               f"Content-Type: audio/mpeg\r\n\r\n".encode() + LONG + b"\r\n")
    for k, v in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    body.write(f"--{boundary}--\r\n".encode())
    resp = httpx.post(f"{servers.url}/v1/audio/translations", content=body.getvalue(),
                      headers={"Authorization": f"Bearer {API_KEY}",
                               "Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=120)
    assert resp.status_code == 200 and resp.json()["text"] == reference["translate"]


@contextlib.contextmanager
def own_shim(servers, tmp_path: Path, *flags: str, **environ: str) -> Iterator[tuple[int, str]]:
    """A shim of its own (`python -m http_shim` with `flags`) in front of the test service, once it
    answers /health: (its port, its URL); stopped after."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", **environ}
    env.pop("DRAGOMAN_API_KEY", None)
    with open(tmp_path / "shim.log", "w") as log:
        shim = subprocess.Popen([sys.executable, "-m", "http_shim", "--port", "0", "--grpc-target",
                                 servers.grpc_target, *flags], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        port = listening_port(shim, tmp_path / "shim.log", SHIM_LISTENING)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert shim.poll() is None and time.monotonic() < deadline, (tmp_path / "shim.log").read_text()
            time.sleep(0.3)
        yield port, url
    finally:
        _stop(shim)


def test_a_stalled_upload_is_answered_408_and_frees_its_thread(servers, tmp_path):
    """gunicorn's threads read a request body for as long as the client takes: --upload-timeout
    ends the wait. The file comes first (as curl sends it), so no call to the service has begun
    that could time out instead. The shim has one thread, which then serves the next request."""
    with own_shim(servers, tmp_path, "--threads", "1", "--upload-timeout", "1") as (port, url):
        boundary = "stallboundary"
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
                + WAV[:1000])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/v1/audio/transcriptions")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head) + len(WAV)))
        conn.endheaders(head)  # and nothing more
        started = time.monotonic()
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        assert resp.status == 408 and body["error"]["code"] == "request_timeout", body
        assert 0.5 < time.monotonic() - started < 20
        served = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("a.wav", WAV)},
                            data={k: str(v) for k, v in FAST.items()}, timeout=120)
        assert served.status_code == 200 and served.json()["text"]


def test_metrics_sum_every_workers_requests(servers, tmp_path):
    """With several gunicorn workers, /metrics (answered by any one of them) counts the requests
    of all; their shared counts go with the shim."""
    from prometheus_client.parser import text_string_to_metric_families

    with own_shim(servers, tmp_path, "--workers", "2", "--threads", "2", TMPDIR=str(tmp_path)) as (_, url):
        for _ in range(11):  # a connection each: the workers take turns as they accept
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/models/no-such-model", timeout=10).status_code == 404
        for _ in range(4):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}
            assert samples[("dragoman_http_requests_total", (("code", "200"), ("endpoint", "health"),
                                                            ("method", "GET")))] >= 12
            assert samples[("dragoman_http_requests_total", (("code", "404"), ("endpoint", "model"),
                                                            ("method", "GET")))] == 1
        assert list(tmp_path.glob("dragoman-http-metrics-*"))
    assert not list(tmp_path.glob("dragoman-http-metrics-*"))


# ---- the service down, or too slow (the shim in-process, with the real gRPC client) -----------------------------


def test_service_down_and_deadline(servers):
    from http_shim import Config, create_app

    down = create_app(Config(grpc_target=f"127.0.0.1:{free_port()}")).test_client()
    assert down.get("/health").status_code == 503
    resp = down.post("/v1/audio/translations", data={"file": (io.BytesIO(WAV), "a.wav"), "model": "whisper-1"})
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "service_unavailable"

    slow = create_app(Config(grpc_target=servers.grpc_target, request_timeout=0.001)).test_client()
    resp = slow.post("/v1/audio/translations", data={"model": "whisper-1", "file": (io.BytesIO(WAV), "a.wav")})
    assert resp.status_code == 504 and resp.get_json()["error"]["code"] == "timeout"


class StallingBody(io.BytesIO):
    """A request body that stops for `pause` seconds once `at` bytes have been read: a client
    whose upload stalls."""

    def __init__(self, body: bytes, at: int, pause: float):
        super().__init__(body)
        self.at, self.pause = at, pause

    def read(self, size: int | None = -1) -> bytes:
        pos = self.tell()
        if pos == self.at:
            time.sleep(self.pause)
            self.at = -1
        elif pos < self.at and (size is None or size < 0 or pos + size > self.at):
            size = self.at - pos
        return super().read(size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def test_service_limits_over_http(tiny_engine):
    """The service's own limits, below the shim's, answered with HTTP's statuses for them: a file
    over its upload limit is a 413, an upload that stalls past its receive timeout a 408; the
    service serves the next request."""
    from grpc_support import start_server
    from http_shim import Config, create_app

    srv = start_server(tiny_engine, max_upload_bytes=60_000, receive_timeout=1.0)
    try:
        app = create_app(Config(grpc_target=f"127.0.0.1:{srv.port}")).test_client()
        fields = {"model": "whisper-1", **{k: str(v) for k, v in FAST.items()}}
        resp = app.post("/v1/audio/translations", data={**fields, "file": (io.BytesIO(make_audio(3.0)), "a.wav")})
        assert resp.status_code == 413, resp.get_data(as_text=True)
        error = resp.get_json()["error"]
        assert (error["param"], error["code"]) == ("file", "file_too_large") and "60000 bytes" in error["message"]
        assert error["message"].startswith("The file is too large")

        small = make_audio(1.0)
        boundary = "stallboundary"
        head = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                       for k, v in fields.items())
        head += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        body = head.encode() + small + f"\r\n--{boundary}--\r\n".encode()
        # The fields and the file's first bytes arrive (the call to the service starts), then nothing for 2 s.
        stalled = StallingBody(body, len(head) + 1000, pause=2.0)
        resp = app.post("/v1/audio/translations", input_stream=stalled,
                        content_length=len(body), content_type=f"multipart/form-data; boundary={boundary}")
        assert resp.status_code == 408, resp.get_data(as_text=True)
        assert resp.get_json()["error"]["code"] == "request_timeout"

        resp = app.post("/v1/audio/translations", data={**fields, "file": (io.BytesIO(small), "a.wav")})
        assert resp.status_code == 200 and resp.get_json()["text"]
    finally:
        srv.stop()
