"""From a window's sampled tokens to timed segments, as openai-whisper's `transcribe()` cuts them."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from .dims import SECONDS_PER_TOKEN
from .tokenizer import WhisperTokenizer

INPUT_STRIDE = 2  # mel frames per timestamp step


def compression_ratio(text: str) -> float:
    """How much zlib shrinks the text: high for repetitive (looping) output."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


@dataclass
class WindowResult:
    """One decoding of one window, at one temperature."""
    tokens: list[int]
    text: str
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    ended: bool = True  # by the model's end-of-text; else cut at the most tokens or by the text context


@dataclass
class RawSegment:
    start: float
    end: float
    tokens: list[int]
    text: str
    words: list = field(default_factory=list)


def split_segments(tokens: list[int], tokenizer: WhisperTokenizer, time_offset: float, window_frames: int,
                   keep_tail: bool) -> tuple[list[RawSegment], int, bool]:
    """Segments of one window, how many mel frames the window consumed, and whether it ended
    on a single timestamp (all its text is closed).

    Consecutive timestamp tokens close one segment and open the next. Text after the last
    closed segment is where openai-whisper resumes the next window (the frames returned stop
    there); `keep_tail` instead keeps it as a last segment, for windows that are never resumed.
    """
    ts_begin = tokenizer.timestamp_begin
    is_ts = [t >= ts_begin for t in tokens]
    single_timestamp_ending = is_ts[-2:] == [False, True]
    consecutive = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]

    def segment(start: float, end: float, toks: list[int]) -> RawSegment:
        return RawSegment(start, end, toks, tokenizer.decode([t for t in toks if t < tokenizer.eot]))

    window_seconds = window_frames * 0.01
    if not consecutive:
        duration = window_seconds
        timestamps = [t for t in tokens if t >= ts_begin]
        if timestamps and timestamps[-1] != ts_begin:
            duration = (timestamps[-1] - ts_begin) * SECONDS_PER_TOKEN
        return [segment(time_offset, time_offset + duration, tokens)], window_frames, single_timestamp_ending

    slices = consecutive + ([len(tokens)] if single_timestamp_ending else [])
    out, last = [], 0
    for current in slices:
        toks = tokens[last:current]
        out.append(segment(time_offset + (toks[0] - ts_begin) * SECONDS_PER_TOKEN,
                           time_offset + (toks[-1] - ts_begin) * SECONDS_PER_TOKEN, toks))
        last = current
    if single_timestamp_ending:
        return out, window_frames, True
    last_ts = tokens[last - 1] - ts_begin
    tail = tokens[last:]  # opened by its own timestamp, never closed: the window was cut, or the tokens ran out
    if keep_tail and tokenizer.decode(tail).strip():
        start = min((tail[0] - ts_begin) * SECONDS_PER_TOKEN, window_seconds)
        out.append(segment(time_offset + start, time_offset + window_seconds, tail))
        return out, window_frames, False
    return out, last_ts * INPUT_STRIDE, False
