"""Helpers of the gRPC tests: an in-process server, calls, error details, encoded test audio, metrics."""
from __future__ import annotations

import io
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from fractions import Fraction

import av
import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from dragoman.v1 import speech_pb2 as pb
from dragoman.v1 import speech_pb2_grpc
from service.server import ServerThread
from service.settings import ServerConfig

# Random weights never pass the fallback thresholds, so every window is decoded at each
# temperature; a few tokens per attempt keep calls quick on a CPU.
FAST = dict(max_new_tokens=4)


def start_server(engine=None, **config) -> ServerThread:
    return ServerThread(ServerConfig(host="127.0.0.1", port=0, **config), engine)


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}")


def stub(port: int) -> speech_pb2_grpc.SpeechServiceStub:
    return speech_pb2_grpc.SpeechServiceStub(channel(port))


def requests(task: str, config: pb.Config | None, data: bytes = b"", chunk: int = 32 * 1024, extra=()):
    message = pb.TranslateRequest if task == "translate" else pb.TranscribeRequest
    if config is not None:
        yield message(config=config)
    for i in range(0, len(data), chunk):
        yield message(audio=data[i : i + chunk])
    for m in extra:
        yield message(**m)


@dataclass
class Result:
    deltas: list = field(default_factory=list)
    segments: list = field(default_factory=list)
    summary: pb.Summary | None = None
    events: list = field(default_factory=list)  # "delta", "segment", "summary" in order of arrival


def call(s: speech_pb2_grpc.SpeechServiceStub, task: str, config: pb.Config, data: bytes, *, timeout: float = 300,
         chunk: int = 32 * 1024) -> Result:
    method = s.Translate if task == "translate" else s.Transcribe
    out = Result()
    for response in method(requests(task, config, data, chunk), timeout=timeout):
        kind = response.WhichOneof("event")
        out.events.append(kind)
        if kind == "delta":
            out.deltas.append(response.delta)
        elif kind == "segment":
            out.segments.append(response.segment)
        else:
            out.summary = response.summary
    return out


def config(**kw) -> pb.Config:
    return pb.Config(**{**FAST, **kw})


def seconds(d) -> float:
    return d.seconds + d.nanos / 1e9


def error_details(err: grpc.RpcError) -> dict:
    """The google.rpc details of a failed call, by kind: {"bad_request": BadRequest, "retry": RetryInfo,
    "info": ErrorInfo}."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status in the trailers of {err.code()}: {err.details()}"
    assert status.code == err.code().value[0]
    out = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            out["bad_request"] = error_details_pb2.BadRequest()
            detail.Unpack(out["bad_request"])
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            out["retry"] = error_details_pb2.RetryInfo()
            detail.Unpack(out["retry"])
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            out["info"] = error_details_pb2.ErrorInfo()
            detail.Unpack(out["info"])
    return out


def violated_fields(err: grpc.RpcError) -> list[str]:
    return [v.field for v in error_details(err)["bad_request"].field_violations]


def tone(seconds_: float, sample_rate: int = 16000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """[samples, channels] float32: a voiced, syllable-like signal, different in each channel."""
    from audio_signals import speechlike

    return np.stack([speechlike(seconds_, sample_rate, seed=seed + c) for c in range(channels)], axis=1)


def encode(audio: np.ndarray, sample_rate: int, container: str, codec: str, sample_format: str | None = None,
           bit_rate: int | None = None) -> bytes:
    """[samples, channels] float32 in [-1, 1] encoded with PyAV into a container in memory."""
    channels = audio.shape[1]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=sample_rate)
        stream.layout = "mono" if channels == 1 else "stereo"
        if sample_format:
            stream.format = sample_format
        if bit_rate:
            stream.bit_rate = bit_rate
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}
        stream.time_base = Fraction(1, sample_rate)
        resampler = av.AudioResampler(format=stream.format.name, layout=stream.layout.name, rate=sample_rate)
        step = 4096
        pts = 0
        for i in range(0, len(audio), step):
            piece = np.ascontiguousarray(audio[i : i + step].reshape(1, -1))  # packed float: channels interleaved
            frame = av.AudioFrame.from_ndarray(piece, format="flt", layout=stream.layout.name)
            frame.sample_rate = sample_rate
            frame.pts = pts
            frame.time_base = Fraction(1, sample_rate)
            pts += piece.shape[1] // channels
            for f in resampler.resample(frame):
                for packet in stream.encode(f):
                    out.mux(packet)
        for f in resampler.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def pcm(audio: np.ndarray, encoding: str) -> bytes:
    """[samples, channels] float32 as interleaved little-endian PCM."""
    if encoding == "s16le":
        return np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes()
    return audio.astype("<f4").tobytes()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(interval)


def held_pcm(seconds: float, release: threading.Event, **kw):
    """A PCM call that sends its audio, then keeps the stream open until released."""
    data = pcm(tone(seconds, seed=21), "s16le")

    def messages():
        yield pb.TranslateRequest(config=pb.Config(encoding=pb.AUDIO_ENCODING_S16LE, sample_rate_hertz=16000, **kw))
        for i in range(0, len(data), 64 * 1024):
            yield pb.TranslateRequest(audio=data[i : i + 64 * 1024])
        release.wait(60)

    return messages()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
