"""The speech service over gRPC (dragoman.v1.SpeechService), and its errors as HTTP errors."""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from dragoman.v1 import speech_pb2, speech_pb2_grpc
from service.errors import AUDIO_TIMEOUT, AUDIO_TOO_LARGE, DOMAIN

from .backend import DECODING_FIELDS, Delta, Event, ModelInfo, Request, SegmentEvent, Summary
from .errors import APIError
from .render import Result, Segment, Word

log = logging.getLogger(__name__)

QUEUE_CHUNKS = 8  # chunks of audio waiting for gRPC to send them (backpressure on the upload)
CONTROL_TIMEOUT = 5.0  # seconds for health checks and ListModels

# The request's fields (google.rpc.BadRequest field violations) by the form's names for them.
FORM_FIELDS = {
    "config.model": "model",
    "config.language": "language",
    "config.prompt": "prompt",
    "config.temperature": "temperature",
    "config.seed": "seed",
    "config.repetition_penalty": "repetition_penalty",
    "config.max_new_tokens": "max_completion_tokens",
    "config.timestamp_granularities": "timestamp_granularities[]",
    "config.stream_deltas": "stream",
    "audio": "file",
}
CODES = {  # error codes in OpenAI's body, by form field
    "model": "model_not_found",
    "language": "unsupported_language",
    "file": "invalid_file",
}


def form_field(field: str, overrides: dict[str, str] | None = None) -> str | None:
    """The form field for a request field of the contract: `config.language` -> `language`.
    `overrides` names the form fields that one request set a contract field from."""
    if overrides and field in overrides:
        return overrides[field]
    if field in FORM_FIELDS:
        return FORM_FIELDS[field]
    if field.startswith("audio"):
        return "file"
    if field.startswith("config."):
        name = field.split(".", 1)[1].split("[", 1)[0]
        return FORM_FIELDS.get(f"config.{name}", name)
    return field or None


def _seconds(d) -> float:
    return d.seconds + d.nanos / 1e9


def http_error(err: grpc.RpcError, overrides: dict[str, str] | None = None) -> APIError:
    """An HTTP error in OpenAI's shape for a failed gRPC call; `overrides` as form_field takes them."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else None) or str(code)
    violations, retry, reasons = [], None, set()
    try:
        status = rpc_status.from_call(err)
    except Exception:  # a malformed or mismatched details trailer: keep the code and message
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry = _seconds(info.retry_delay)
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == DOMAIN:
                    reasons.add(info.reason)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param = form_field(violations[0].field, overrides) if violations else None
        text = violations[0].description if violations and violations[0].description else message
        if param and violations:
            text = f"Invalid '{param}': {text}"
        if AUDIO_TOO_LARGE in reasons:
            return APIError(413, f"The file is too large for the speech service ({violations[0].description})"
                            if violations else "The file is too large for the speech service",
                            param="file", code="file_too_large")
        if param == "model":
            return APIError(404, f"The model does not exist or you do not have access to it: {text}",
                            param="model", code="model_not_found")
        return APIError(400, text, param=param, code=CODES.get(param or "", "invalid_value"))
    if code == grpc.StatusCode.NOT_FOUND:
        return APIError(404, message, param="model", code="model_not_found")
    if code == grpc.StatusCode.OUT_OF_RANGE:
        return APIError(400, message, code="invalid_value")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return APIError(429, f"The speech service is at capacity; retry shortly. ({message})",
                        code="rate_limit_exceeded", retry_after=retry if retry is not None else 1.0)
    if code == grpc.StatusCode.UNAVAILABLE:
        return APIError(503, f"The speech service is not available: {message}", code="service_unavailable",
                        retry_after=retry)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and AUDIO_TIMEOUT in reasons:
        return APIError(408, "The upload stalled: the speech service received nothing for longer than its receive "
                             "timeout", code="request_timeout")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, "The request took longer than the server's request timeout", code="timeout",
                        retry=False)
    if code == grpc.StatusCode.CANCELLED:
        return APIError(503, f"The speech service cancelled the request: {message}", code="cancelled")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return APIError(501, f"Not supported by the speech service: {message}", code="not_implemented",
                        retry=False)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return APIError(400, message, code="failed_precondition")
    log.error("speech service call failed: %s %s", code, message)
    return APIError(500, f"The speech service failed: {message}", code="internal_error", retry=False)


def _config(r: Request) -> speech_pb2.Config:
    seed = r.seed or 0
    if seed >= 2**63:  # an unsigned 64-bit seed, folded into int64
        seed -= 2**64
    cfg = speech_pb2.Config(model=r.model, language=r.language or "", prompt=r.prompt or "", seed=seed,
                            stream_deltas=r.stream_deltas)
    if r.temperature is not None:
        cfg.temperature = r.temperature
    if r.repetition_penalty is not None:
        cfg.repetition_penalty = r.repetition_penalty
    if r.max_new_tokens is not None:
        cfg.max_new_tokens = r.max_new_tokens
    for name in ("beam_size", *DECODING_FIELDS):
        value = getattr(r, name)
        if value is not None:  # NaN (a threshold turned off) goes as it is
            setattr(cfg, name, value)
    cfg.timestamp_granularities.append(speech_pb2.TIMESTAMP_GRANULARITY_SEGMENT)
    if r.word_timestamps:
        cfg.timestamp_granularities.append(speech_pb2.TIMESTAMP_GRANULARITY_WORD)
    return cfg


def _segment(s) -> Segment:
    return Segment(id=s.id, seek=s.seek, start=_seconds(s.start_offset), end=_seconds(s.end_offset), text=s.text,
                   tokens=list(s.tokens), temperature=s.temperature, avg_logprob=s.avg_logprob,
                   compression_ratio=s.compression_ratio, no_speech_prob=s.no_speech_prob,
                   words=[Word(w.word, _seconds(w.start_offset), _seconds(w.end_offset), w.probability)
                          for w in s.words])


class GrpcCall:
    """One Translate or Transcribe call: audio goes in through a bounded queue (so a slow service
    slows the upload down instead of filling memory), results come out as events."""

    def __init__(self, method, request: Request, timeout: float):
        message = speech_pb2.TranslateRequest if request.task == "translate" else speech_pb2.TranscribeRequest
        self._message = message
        self._fields = {"config.beam_size": request.beam_field}  # errors name the form field it came from
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._stop = threading.Event()
        first = message(config=_config(request))
        self._call = method(self._requests(first), timeout=timeout)

    def _requests(self, first) -> Iterator:
        yield first
        while True:
            try:
                item = self._queue.get(timeout=0.25)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is None:
                return
            yield self._message(audio=item)

    def _put(self, item: bytes | None) -> None:
        while True:
            if self._call.done():
                self._raise()
            try:
                self._queue.put(item, timeout=0.25)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        try:
            code = self._call.code()
        except Exception:
            code = None
        if code is not None and code != grpc.StatusCode.OK:
            raise http_error(self._call, self._fields)
        raise APIError(502, "The speech service ended the call before the audio was sent", code="bad_gateway")

    def send(self, data: bytes) -> None:
        self._put(data)

    def close_send(self) -> None:
        self._put(None)

    def events(self) -> Iterator[Event]:
        try:
            for response in self._call:
                kind = response.WhichOneof("event")
                if kind == "delta":
                    d = response.delta
                    yield Delta(d.text, d.usage.prompt_tokens, d.usage.completion_tokens)
                elif kind == "segment":
                    yield SegmentEvent(_segment(response.segment))
                elif kind == "summary":
                    s = response.summary
                    yield Summary(Result(text=s.text, language=s.language, duration=_seconds(s.duration),
                                         language_probability=s.language_probability,
                                         prompt_tokens=s.usage.prompt_tokens,
                                         completion_tokens=s.usage.completion_tokens, truncated=s.truncated))
        except grpc.RpcError as e:
            raise http_error(e, self._fields) from None

    def cancel(self) -> None:
        self._stop.set()
        self._call.cancel()


class GrpcBackend:
    """A client of the SpeechService at `target`. The channel opens on first use, and again in a
    process forked after that (gRPC channels do not survive a fork)."""

    def __init__(self, target: str):
        self.target = target
        self._lock = threading.Lock()
        self._pid = None
        self._channel: grpc.Channel | None = None
        self._stub = None
        self._health = None

    def _connect(self):
        with self._lock:
            if self._channel is None or self._pid != os.getpid():
                self._channel = grpc.insecure_channel(self.target, options=[
                    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.keepalive_time_ms", 60_000),
                    ("grpc.keepalive_timeout_ms", 20_000),
                    ("grpc.enable_retries", 0),
                ])
                self._pid = os.getpid()
                self._stub = speech_pb2_grpc.SpeechServiceStub(self._channel)
                self._health = health_pb2_grpc.HealthStub(self._channel)
            return self._stub, self._health

    def health(self) -> str:
        _, health = self._connect()
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CONTROL_TIMEOUT)
        except grpc.RpcError as e:
            log.info("health check of %s failed: %s", self.target, e.code() if hasattr(e, "code") else e)
            return "UNAVAILABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def models(self) -> list[ModelInfo]:
        stub, _ = self._connect()
        try:
            reply = stub.ListModels(speech_pb2.ListModelsRequest(), timeout=CONTROL_TIMEOUT)
        except grpc.RpcError as e:
            raise http_error(e) from None
        return [ModelInfo(id=m.id, aliases=list(m.aliases)) for m in reply.models]

    def start(self, request: Request, timeout: float) -> GrpcCall:
        stub, _ = self._connect()
        method = stub.Translate if request.task == "translate" else stub.Transcribe
        return GrpcCall(method, request, timeout)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None
