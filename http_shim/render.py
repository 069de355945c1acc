"""Results as OpenAI's audio API returns them: json, text, srt, verbose_json, vtt; and the SSE stream."""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from service.languages import language_name

MIMETYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}


@dataclass
class Word:
    word: str
    start: float
    end: float
    probability: float = 0.0


@dataclass
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: list[Word] = field(default_factory=list)


@dataclass
class Result:
    text: str
    language: str  # code
    duration: float  # seconds of audio
    segments: list[Segment] = field(default_factory=list)
    language_probability: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False  # some window's text was cut at the token limit


def clean_text(text: str) -> str:
    """The text as OpenAI returns it: without the leading space Whisper puts before each segment."""
    return text.strip()


def usage_duration(duration: float) -> dict:
    """OpenAI bills transcriptions by the second, rounded up."""
    return {"type": "duration", "seconds": int(math.ceil(max(0.0, duration) - 1e-9))}


def _token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """vLLM's usage of a chunk."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def render(result: Result, response_format: str, task: str, granularities: list[str] | None = None) -> str:
    """The body for one of OpenAI's response formats."""
    if response_format == "text":
        return clean_text(result.text)
    if response_format == "srt":
        return to_srt(result.segments)
    if response_format == "vtt":
        return to_vtt(result.segments)
    if response_format == "verbose_json":
        return json.dumps(verbose(result, task, granularities or []), ensure_ascii=False)
    body: dict = {"text": clean_text(result.text)}
    if task == "transcribe":
        body["usage"] = usage_duration(result.duration)
    return json.dumps(body, ensure_ascii=False)


def verbose(result: Result, task: str, granularities: list[str]) -> dict:
    words = "word" in granularities
    segments = "segment" in granularities or not words  # OpenAI leaves segments out when only words are asked
    body: dict = {
        "task": "translate" if task == "translate" else "transcribe",
        "language": language_name(result.language),
        "duration": round(result.duration, 3),
        "text": clean_text(result.text),
    }
    if segments:
        body["segments"] = [{
            "id": s.id,
            "seek": s.seek,
            "start": round(s.start, 3),
            "end": round(s.end, 3),
            "text": s.text,
            "tokens": list(s.tokens),
            "temperature": _num(s.temperature),
            "avg_logprob": _num(s.avg_logprob),
            "compression_ratio": _num(s.compression_ratio),
            "no_speech_prob": _num(s.no_speech_prob),
        } for s in result.segments]
    if words:
        body["words"] = [{"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
                         for s in result.segments for w in s.words]
    if task == "transcribe":
        body["usage"] = usage_duration(result.duration)
    return body


def _num(x: float) -> float | None:
    """A float for JSON: rounded off float32 noise; null for NaN (no_speech_prob of a model without a
    no-speech token)."""
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _stamp(seconds: float, sep: str) -> str:
    ms = max(0, int(round(seconds * 1000)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cues(segments: list[Segment]) -> list[tuple[float, float, str]]:
    cues = []
    for s in segments:
        text = s.text.strip()
        if not text:
            continue
        # A cue's text must not hold a blank line (it would end the cue) or the arrow of a timing line (as
        # openai-whisper writes both formats); its end is not before its start.
        text = "\n".join(line.strip() for line in text.splitlines() if line.strip()).replace("-->", "->")
        cues.append((s.start, max(s.start, s.end), text))
    return cues


def to_srt(segments: list[Segment]) -> str:
    out = []
    for i, (start, end, text) in enumerate(_cues(segments), 1):
        out.append(f"{i}\n{_stamp(start, ',')} --> {_stamp(end, ',')}\n{text}\n")
    return "\n".join(out)


def to_vtt(segments: list[Segment]) -> str:
    out = ["WEBVTT\n"]
    for start, end, text in _cues(segments):
        out.append(f"{_stamp(start, '.')} --> {_stamp(end, '.')}\n{text}\n")
    return "\n".join(out)


# ---- streaming: one JSON object per event, read by vLLM's and OpenAI's clients alike ------------------


class EventStream:
    """Server-sent events for a streamed transcription or translation.

    Each event carries vLLM's chunk (object, choices[0].delta.content) and OpenAI's event (type,
    delta) in the same object. The deltas, joined, are the text of the non-streamed response:
    leading whitespace is dropped and whitespace at the end of a delta is held back until more
    text follows it, as `clean_text` strips both ends.
    """

    def __init__(self, task: str, model: str, include_usage: bool, continuous_usage: bool = False):
        self.object = "translation.chunk" if task == "translate" else "transcription.chunk"
        self.id = ("trsl-" if task == "translate" else "trsc-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage  # vLLM's stream_continuous_usage_stats: usage on every chunk
        self.sent: list[str] = []
        self._held = ""

    def _chunk(self, choices: list[dict], **extra) -> str:
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

    def delta(self, text: str, used: tuple[int, int] | None = None) -> str | None:
        """The event for more text, or None when nothing can be sent yet; `used`, the prompt and
        completion tokens of the call by then, is shown with continuous usage."""
        text = self._held + text
        if not self.sent:
            text = text.lstrip()
        body = text.rstrip()
        self._held = text[len(body):]
        if not body:
            return None
        self.sent.append(body)
        extra = {"usage": _token_usage(*used)} if self.continuous_usage and used is not None else {}
        return self._chunk([{"index": 0, "delta": {"content": body}, "finish_reason": None}],
                           type="transcript.text.delta", delta=body, **extra)

    @property
    def text(self) -> str:
        return "".join(self.sent)

    def done(self, prompt_tokens: int = 0, completion_tokens: int = 0, truncated: bool = False) -> str:
        """The last text event: the whole text (OpenAI's `transcript.text.done`), and vLLM's
        finish_reason: "length" when some window's text was cut at the token limit."""
        extra: dict = {"type": "transcript.text.done", "text": self.text}
        if self.include_usage:
            # OpenAI's token usage, and vLLM's names of the same counts.
            extra["usage"] = {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                              **_token_usage(prompt_tokens, completion_tokens)}
        reason = "length" if truncated else "stop"
        return self._chunk([{"index": 0, "delta": {"content": ""}, "finish_reason": reason}], **extra)

    def usage(self, prompt_tokens: int, completion_tokens: int, duration: float) -> str:
        """vLLM's usage chunk (no choices), also typed for OpenAI's clients."""
        return self._chunk([], type="transcript.text.usage",
                           usage={**_token_usage(prompt_tokens, completion_tokens),
                                  "seconds": usage_duration(duration)["seconds"]})

    @staticmethod
    def error(body: dict) -> str:
        return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

    DONE = "data: [DONE]\n\n"
