"""The audio endpoints' form: fields as OpenAI's SDK (and vLLM's clients) send them, read as they arrive.

`read_multipart` turns a multipart/form-data body into events while it is being received, so the
file can go on to the service chunk by chunk; `Params` collects and checks the other fields.
"""
from __future__ import annotations

import logging
import math
import re
import struct
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio import multipart as mp

from .errors import APIError, bad_request
from service.languages import language_code

log = logging.getLogger(__name__)

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
READ_SIZE = 16 * 1024  # bytes read from the request at a time (gunicorn waits until it has them all)
CHUNK_SIZE = 256 * 1024  # bytes of audio per message to the service
FLUSH_SECONDS = 1.0  # the longest the file's bytes wait for a chunk to fill
MAX_FIELD_BYTES = 256 * 1024  # a text field (the prompt is the longest)
MAX_PARTS = 200

# OpenAI fields that exist for other models and have no meaning here: accepted, logged, ignored.
IGNORED = {"include[]", "include", "chunking_strategy", "known_speaker_names[]", "known_speaker_references[]",
           "user", "frequency_penalty", "presence_penalty", "vllm_xargs"}
DEFAULT_BEAM_WIDTH = 5  # use_beam_search=true without n or beam_size: openai-whisper's CLI default
MAX_WINDOW_TOKENS = 448  # the service's limit on tokens per 30 s window (max_new_tokens)
MAX_CANDIDATES = 10  # beam_size, best_of and n (as the beam width) are at most this
OFF = ("none", "null", "off")  # a threshold given as one of these is turned off
BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046's bchars


@dataclass
class Params:
    """What a translation or transcription request asks for, in the shim's terms."""

    task: str  # "translate" or "transcribe"
    model: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    temperature: float | None = None
    language: str | None = None  # a code, checked against Whisper's languages
    timestamp_granularities: list[str] = field(default_factory=list)
    stream: bool = False
    stream_include_usage: bool = False
    stream_continuous_usage_stats: bool = False
    seed: int | None = None
    repetition_penalty: float | None = None
    max_completion_tokens: int | None = None
    to_language: str | None = None
    beam_size: int | None = None
    best_of: int | None = None
    patience: float | None = None
    length_penalty: float | None = None
    temperature_fallback: bool | None = None  # None: on
    compression_ratio_threshold: float | None = None  # None: the service's default; NaN: off
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    min_p: float | None = None  # vLLM's sampling filters; None: off
    top_k: int | None = None
    top_p: float | None = None
    use_beam_search: bool | None = None  # vLLM's switch: beam search, n (else 5) beams wide
    n: int | None = None  # vLLM's beam width with use_beam_search; ignored without it
    seen: set[str] = field(default_factory=set)  # fields given, by their canonical name

    @property
    def word_timestamps(self) -> bool:
        return self.response_format == "verbose_json" and "word" in self.timestamp_granularities

    def beam(self) -> tuple[int | None, str]:
        """The beam width asked for (None: greedy) and the form field that set it, from beam_size, or
        from vLLM's use_beam_search and n. Raises APIError (400) when they contradict each other."""
        if not self.use_beam_search:
            if self.beam_size is not None and self.use_beam_search is False:
                raise bad_request(f"use_beam_search=false contradicts beam_size={self.beam_size}; give one of them",
                                  "use_beam_search")
            return self.beam_size, "beam_size"
        if self.n is not None and not 1 <= self.n <= MAX_CANDIDATES:
            raise bad_request(f"Invalid 'n': {self.n} is not in [1, {MAX_CANDIDATES}] (the beam width with "
                              "use_beam_search)", "n")
        if self.beam_size is not None:
            if self.n is not None and self.n != self.beam_size:
                raise bad_request(f"n={self.n} and beam_size={self.beam_size} disagree on the beam width; give one "
                                  "of them", "n")
            return self.beam_size, "beam_size"
        if self.n is not None:
            return self.n, "n"
        return DEFAULT_BEAM_WIDTH, "use_beam_search"

    def ranking_penalty(self) -> float | None:
        """length_penalty as the service takes it (openai-whisper's: a score is divided by
        ((5 + length) / 6) ** alpha, or by the length when None). With use_beam_search it is vLLM's,
        whose score is divided by length ** alpha: its default 1 is taken as openai-whisper's None
        (vLLM's length also counts the decoder's prompt, which shifts every hypothesis's by as much),
        and 0, no division, is 0 in both; other exponents have no equal here and are refused rather
        than ranked otherwise."""
        if not self.use_beam_search or self.length_penalty is None or self.length_penalty == 0:
            return self.length_penalty
        if self.length_penalty == 1:
            return None
        raise bad_request(f"length_penalty={self.length_penalty:g} with use_beam_search is vLLM's length exponent "
                          "(score / length ** alpha), which this server ranks by only for 0 and 1; give beam_size "
                          "instead of use_beam_search for openai-whisper's penalty (score / ((5 + length) / 6) ** "
                          "alpha, alpha in [0, 1])", "length_penalty")

    def set_field(self, name: str, value: str) -> bool:
        """Apply one text field. Returns False for a field that is not ours (logged and ignored);
        raises APIError (400) naming the field for a bad value."""
        if name == "timestamp_granularities" or name == "timestamp_granularities[]":
            v = value.strip().lower()
            if v not in GRANULARITIES:
                raise bad_request(f"'{value}' is not one of {list(GRANULARITIES)} - 'timestamp_granularities[]'",
                                  "timestamp_granularities[]")
            if v not in self.timestamp_granularities:
                self.timestamp_granularities.append(v)
            self.seen.add("timestamp_granularities[]")
            return True
        setter = _SETTERS.get(name)
        if setter is None:
            if name in IGNORED or name.startswith("stream_options"):
                log.info("ignoring form field %r: not used by this server", name)
            else:
                log.info("ignoring unknown form field %r", name)
            return False
        setter(self, name, value)
        self.seen.add(name)
        return True

    def check(self) -> None:
        """Checks across fields, once all are known."""
        if self.stream and self.response_format not in ("json", "text"):
            # As vLLM does: a stream is text deltas whatever format was asked for.
            log.info("stream=true: response_format %r does not apply to the event stream", self.response_format)
        self.beam()
        if self.n is not None and not self.use_beam_search:
            log.info("ignoring form field 'n' without use_beam_search")


def _text(p: Params, name: str, value: str) -> None:
    setattr(p, name, value if value != "" else None)


def _model(p: Params, name: str, value: str) -> None:
    p.model = value.strip() or None


def _format(p: Params, name: str, value: str) -> None:
    v = value.strip().lower()
    if v == "":
        v = "json"
    if v not in FORMATS:
        raise bad_request(f"'{value}' is not one of {list(FORMATS)} - 'response_format'", "response_format",
                          "unsupported_value")
    p.response_format = v


# Numbers as JSON writes them (and OpenAI's SDKs send them), in ASCII digits: Python's float()
# and int() also take "1_000", " ١٢ " or "infinity", which no client means to send.
DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
ASCII_SPACE = " \t\r\n"


def _float(lo: float, hi: float, lo_open: bool = False):
    """A number in [lo, hi] (or (lo, hi]), as the service's 32-bit float field takes it."""
    def setter(p: Params, name: str, value: str) -> None:
        text = value.strip(ASCII_SPACE)
        if text == "":
            setattr(p, name, None)
            return
        if not DECIMAL.fullmatch(text):
            raise bad_request(f"Invalid type for '{name}': expected a number, but got a string ('{_shown(value)}')",
                              name, "invalid_type")
        v = float(text)
        left = "(" if lo_open else "["
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            raise bad_request(f"Invalid '{name}': {_shown(text)} is not in {left}{lo:g}, {hi:g}]", name)
        if lo_open and _float32(v) == lo:  # 1e-50 for (0, 10]: within the range, but not once sent
            raise bad_request(f"Invalid '{name}': {text} rounds to {lo:g} as the 32-bit float it is sent as; "
                              f"give a value in {left}{lo:g}, {hi:g}]", name)
        setattr(p, name, v)
    return setter


def _shown(value: str, limit: int = 40) -> str:
    """A field's value as an error message quotes it: whole, or its start (fields may be 256 KiB)."""
    return value if len(value) <= limit else value[:limit] + "..."


def _float32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _int(lo: int, hi: int, attr: str | None = None):
    def setter(p: Params, name: str, value: str) -> None:
        target = attr or name
        text = value.strip(ASCII_SPACE)
        if text == "":
            setattr(p, target, None)
            return
        if not INTEGER.fullmatch(text):
            raise bad_request(f"Invalid type for '{name}': expected an integer, but got a string ('{_shown(value)}')",
                              name, "invalid_type")
        # Out of range at once past 40 digits: int() refuses strings of over 4300 (a ValueError).
        too_long = len(text.lstrip("+-").lstrip("0")) > 40
        v = None if too_long else int(text)
        if v is None or not lo <= v <= hi:
            raise bad_request(f"Invalid '{name}': {_shown(text)} is not in [{lo}, {hi}]", name)
        setattr(p, target, v)
    return setter


def _bool(p: Params, name: str, value: str) -> None:
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        setattr(p, name, True)
    elif v in ("false", "0", "no", "off", ""):
        setattr(p, name, False)
    else:
        raise bad_request(f"Invalid type for '{name}': expected a boolean, but got a string ('{value}')",
                          name, "invalid_type")


def _optional_bool(p: Params, name: str, value: str) -> None:
    """A boolean whose empty value means its default (None)."""
    if value.strip() == "":
        setattr(p, name, None)
    else:
        _bool(p, name, value)


def _threshold(lo: float, hi: float):
    """A threshold in [lo, hi]; 'none', 'null' or 'off' turns its check off (NaN, as the service takes it)."""
    number = _float(lo, hi)

    def setter(p: Params, name: str, value: str) -> None:
        if value.strip().lower() in OFF:
            setattr(p, name, math.nan)
        else:
            number(p, name, value)
    return setter


def _top_k(p: Params, name: str, value: str) -> None:
    """vLLM's top_k: a count of tokens, or -1 or 0 for all of them."""
    _int(-1, 2**31 - 1)(p, name, value)
    if p.top_k is not None and p.top_k < 1:
        p.top_k = None


def _max_tokens(p: Params, name: str, value: str) -> None:
    """Tokens per 30 s window: at least 1; more than a window holds (448) is taken as 448, as vLLM
    caps the number at the model's length (its clients send 1024 and more)."""
    _int(1, 2**63 - 1, "max_completion_tokens")(p, name, value)
    if p.max_completion_tokens is not None:
        p.max_completion_tokens = min(p.max_completion_tokens, MAX_WINDOW_TOKENS)


def _language(p: Params, name: str, value: str) -> None:
    if value.strip() == "":
        p.language = None
        return
    code = language_code(value)
    if code is None:
        raise bad_request(f"Language '{value}' is not supported; give an ISO-639-1 code such as 'it' or an "
                          "English name such as 'italian'", "language", "unsupported_language")
    p.language = code


def _to_language(p: Params, name: str, value: str) -> None:
    if value.strip() == "":
        p.to_language = None
        return
    code = language_code(value)
    if p.task == "translate" and code != "en":
        raise bad_request(f"Translations are into English only; to_language '{value}' is not supported",
                          "to_language", "unsupported_language")
    if p.task != "translate":
        log.info("ignoring form field 'to_language' on a transcription")
        return
    p.to_language = code


_SETTERS = {
    "model": _model,
    "prompt": _text,
    "response_format": _format,
    "temperature": _float(0.0, 1.0),
    "language": _language,
    "stream": _bool,
    "stream_include_usage": _bool,
    "stream_continuous_usage_stats": _bool,
    "seed": _int(-(2**63), 2**64 - 1),
    "repetition_penalty": _float(0.0, 10.0, lo_open=True),
    "max_completion_tokens": _max_tokens,
    "max_new_tokens": _max_tokens,
    "max_tokens": _max_tokens,
    "to_language": _to_language,
    "beam_size": _int(1, MAX_CANDIDATES),
    "best_of": _int(1, MAX_CANDIDATES),
    "patience": _float(0.0, 10.0, lo_open=True),
    "length_penalty": _float(0.0, 1.0),
    "temperature_fallback": _optional_bool,
    "compression_ratio_threshold": _threshold(0.0, 100.0),
    "logprob_threshold": _threshold(-100.0, 0.0),
    "no_speech_threshold": _threshold(0.0, 1.0),
    "min_p": _float(0.0, 1.0),
    "top_k": _top_k,
    "top_p": _float(0.0, 1.0, lo_open=True),
    "use_beam_search": _optional_bool,
    "n": _int(-(2**63), 2**63 - 1),  # its range is checked only when use_beam_search uses it
}


# ---- multipart/form-data, read as it arrives --------------------------------------------------------


@dataclass
class FieldEvent:
    name: str
    value: str


@dataclass
class FileStart:
    name: str
    filename: str
    content_type: str | None


@dataclass
class FileData:
    data: bytes


@dataclass
class FileEnd:
    size: int


def boundary_of(content_type: str | None) -> bytes:
    mimetype, options = parse_options_header(content_type or "")
    if mimetype.lower() != "multipart/form-data":  # media types are case-insensitive
        raise APIError(400, "The request must be multipart/form-data with a 'file' part (as OpenAI's audio API "
                            f"takes it); got Content-Type '{content_type or ''}'", param="file",
                       code="invalid_content_type")
    boundary = options.get("boundary")
    if not boundary:
        raise APIError(400, "multipart/form-data without a boundary", code="invalid_content_type")
    if not BOUNDARY.fullmatch(boundary):
        raise APIError(400, f"The multipart boundary {boundary!r} is not 1 to 70 of the characters RFC 2046 allows "
                            "(letters, digits and '()+_,-./:=? )", code="invalid_content_type")
    return boundary.encode("ascii")


def read_multipart(stream: BinaryIO, boundary: bytes, *, file_field: str = "file",
                   max_file_bytes: int | None = None) -> Iterator[FieldEvent | FileStart | FileData | FileEnd]:
    """Events of a multipart body as it is read: text fields whole, the file in chunks of about
    CHUNK_SIZE bytes. Parts that are files but not `file_field` are read past and logged."""
    decoder = mp.MultipartDecoder(boundary, max_parts=MAX_PARTS)
    part: mp.Field | mp.File | None = None
    value = bytearray()
    pending = bytearray()
    flushed = time.monotonic()
    size = 0
    done = False
    while not done:
        try:
            event = decoder.next_event()
        except ValueError as e:
            raise APIError(400, f"The multipart/form-data body could not be parsed: {e}",
                           code="invalid_multipart") from None
        except RequestEntityTooLarge:
            raise APIError(413, f"The form has more than {MAX_PARTS} parts", code="too_many_parts") from None
        if isinstance(event, mp.NeedData):
            try:
                data = stream.read(READ_SIZE)
            except Exception as e:  # the client went away, the body was cut short, or it stalled
                if _timed_out(e):
                    raise APIError(408, "The upload stalled: no part of the request body arrived within the "
                                        "server's upload timeout", code="request_timeout") from None
                raise APIError(400, f"The request body could not be read: {e}", code="invalid_body") from None
            decoder.receive_data(data or None)
        elif isinstance(event, (mp.Field, mp.File)) and not event.name:
            raise bad_request("A part of the form has no name (each needs Content-Disposition: form-data; "
                              "name=\"...\")", None, "invalid_multipart")
        elif isinstance(event, mp.Field):
            part = event
            value.clear()
        elif isinstance(event, mp.File):
            part = event
            if event.name == file_field:
                size = 0
                pending.clear()
                yield FileStart(event.name, event.filename or "", event.headers.get("content-type"))
            else:
                log.info("ignoring file part %r", event.name)
        elif isinstance(event, mp.Data):
            if isinstance(part, mp.Field):
                value.extend(event.data)
                if len(value) > MAX_FIELD_BYTES:
                    raise bad_request(f"The form field '{part.name}' is longer than {MAX_FIELD_BYTES} bytes",
                                      part.name, "field_too_long")
                if not event.more_data:
                    charset = parse_options_header(part.headers.get("content-type", ""))[1].get("charset", "utf-8")
                    try:
                        text = value.decode(charset)
                        text.encode("utf-8")  # lone surrogates (UTF-7, say) are no text
                    except (UnicodeError, LookupError):
                        raise bad_request(f"The form field '{part.name}' is not valid {charset}", part.name,
                                          "invalid_type") from None
                    yield FieldEvent(part.name, text)
            elif isinstance(part, mp.File) and part.name == file_field:
                size += len(event.data)
                if max_file_bytes is not None and size > max_file_bytes:
                    raise APIError(413, f"The file is larger than the {_human(max_file_bytes)} allowed",
                                   param=file_field, code="file_too_large")
                pending.extend(event.data)
                # On at CHUNK_SIZE, or after FLUSH_SECONDS: a slow upload must not leave the call
                # to the service without a message for its receive timeout.
                if len(pending) >= CHUNK_SIZE or (pending and (not event.more_data
                                                               or time.monotonic() - flushed > FLUSH_SECONDS)):
                    yield FileData(bytes(pending))
                    pending.clear()
                    flushed = time.monotonic()
                if not event.more_data:
                    yield FileEnd(size)
        elif isinstance(event, mp.Epilogue):
            done = True


def _timed_out(error: BaseException | None) -> bool:
    """Whether a read failed on the socket's read timeout. werkzeug reports any error reading the
    body as ClientDisconnected, with the error it met as its context."""
    while error is not None:
        if isinstance(error, TimeoutError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _human(n: int) -> str:
    """25 MB for 26214400; bytes when the size is not a whole number of KB, MB or GB."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"
