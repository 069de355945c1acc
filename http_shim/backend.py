"""What the HTTP side needs from the speech service, apart from how it is reached.

`GrpcBackend` (grpc_backend.py) is the real one; tests can give `create_app` another.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

from .render import Result, Segment


@dataclass
class ModelInfo:
    id: str
    created: int = 0
    owned_by: str = "dragoman"
    aliases: list[str] = field(default_factory=list)


@dataclass
class Request:
    """One translation or transcription, as the service takes it."""

    task: str  # "translate" or "transcribe"
    model: str
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    word_timestamps: bool = False
    stream_deltas: bool = False
    beam_size: int | None = None  # None: greedy
    best_of: int | None = None
    patience: float | None = None
    length_penalty: float | None = None
    temperature_fallback: bool | None = None  # None: on
    compression_ratio_threshold: float | None = None  # None: the service's default; NaN: off
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    min_p: float | None = None  # None: any token may be sampled
    top_k: int | None = None
    top_p: float | None = None
    beam_field: str = "beam_size"  # the form field that set beam_size (beam_size, n or use_beam_search)


# Request fields that go to the service as they are, under the same name, when given (not None).
DECODING_FIELDS = ("best_of", "patience", "length_penalty", "temperature_fallback", "compression_ratio_threshold",
                   "logprob_threshold", "no_speech_threshold", "min_p", "top_k", "top_p")


@dataclass
class Delta:
    text: str
    prompt_tokens: int = 0  # what the call had used when the text became final
    completion_tokens: int = 0


@dataclass
class SegmentEvent:
    segment: Segment


@dataclass
class Summary:
    result: Result  # text, language, duration, usage; segments as received


Event = Delta | SegmentEvent | Summary


class Call(Protocol):
    def send(self, data: bytes) -> None:
        """Pass on a chunk of the file; raises APIError once the service has failed the call."""

    def close_send(self) -> None:
        """No more audio."""

    def events(self) -> Iterator[Event]:
        """What the service answers, in order; raises APIError for a failed call."""

    def cancel(self) -> None:
        """Stop the call (the client went away, or the request changed)."""


class Backend(Protocol):
    def health(self) -> str:
        """'SERVING', 'NOT_SERVING', 'UNKNOWN' or 'UNAVAILABLE' (the service cannot be reached)."""

    def models(self) -> list[ModelInfo]:
        """The served models; raises APIError (503) when the service cannot be reached."""

    def start(self, request: Request, timeout: float) -> Call:
        """Open a call and send it the request's configuration."""

    def close(self) -> None:
        ...
