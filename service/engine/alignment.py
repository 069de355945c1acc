"""Word timestamps: align the text tokens of a window to its audio through the cross-attention
of the alignment heads and dynamic time warping, as openai-whisper's `timing.py` does."""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from .dims import ModelDimensions
from .results import Word
from .segments import RawSegment
from .tokenizer import WhisperTokenizer

TOKENS_PER_SECOND = 50  # one cross-attention position per 20 ms
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"
NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}


def alignment_heads(generation_config: dict, dims: ModelDimensions) -> list[tuple[int, int]]:
    """(layer, head) pairs whose cross-attention follows the speech: the checkpoint's own list,
    else every head of the upper half of the decoder."""
    heads = generation_config.get("alignment_heads")
    if heads:
        return [(int(layer), int(head)) for layer, head in heads]
    return [(layer, head) for layer in range(dims.n_text_layer // 2, dims.n_text_layer) for head in range(dims.n_text_head)]


@dataclass
class WordTiming:
    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float


def median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of the last axis, reflect-padded to keep the length."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1)
    return np.sort(windows, axis=-1)[..., pad]


def dtw(cost_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment path (row indices, column indices) of least total cost.

    Cells on one anti-diagonal depend only on the two before it, so each diagonal is computed
    at once; every cell sees exactly the arithmetic (and tie-breaking) of the cell-by-cell loop.
    """
    x = cost_matrix.astype(np.float64)
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, np.float32)
    trace = np.full((n + 1, m + 1), -1, np.int8)
    cost[0, 0] = 0
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        c = np.choose(t, [c0, c1, c2])
        cost[i, j] = x[i - 1, j - 1] + c
        trace[i, j] = t
    trace[0, :] = 2
    trace[:, 0] = 1
    i, j = n, m
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        if t == 0:
            i, j = i - 1, j - 1
        elif t == 1:
            i -= 1
        else:
            j -= 1
    rows, cols = np.array(path[::-1]).T
    return rows, cols


def split_words(tokenizer: WhisperTokenizer, tokens: list[int], language: str) -> tuple[list[str], list[list[int]]]:
    """Words and their tokens: at spaces and punctuation, or at every whole character for
    languages written without spaces."""
    pieces, piece_tokens = _split_on_characters(tokenizer, tokens)
    if language in NO_SPACE_LANGUAGES:
        return pieces, piece_tokens
    words: list[str] = []
    word_tokens: list[list[int]] = []
    for piece, toks in zip(pieces, piece_tokens):
        if toks[0] >= tokenizer.eot or piece.startswith(" ") or piece.strip() in string.punctuation or not words:
            words.append(piece)
            word_tokens.append(list(toks))
        else:
            words[-1] += piece
            word_tokens[-1].extend(toks)
    return words, word_tokens


def _split_on_characters(tokenizer: WhisperTokenizer, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
    """Cut wherever the tokens so far decode to whole characters (no U+FFFD of a split byte)."""
    full = tokenizer.decode_raw(tokens)
    words, word_tokens, current, offset = [], [], [], 0
    for token in tokens:
        current.append(token)
        decoded = tokenizer.decode_raw(current)
        if "\ufffd" not in decoded or full[offset + decoded.index("\ufffd")] == "\ufffd":
            words.append(decoded)
            word_tokens.append(current)
            current = []
            offset += len(decoded)
    return words, word_tokens


def align_words(programs, tokenizer: WhisperTokenizer, features, sot_sequence: list[int], text_tokens: list[int],
                num_frames: int, language: str) -> list[WordTiming]:
    """Word timings of one window's text tokens, its first `num_frames` mel frames being audio.

    As openai-whisper, the tokens fed are sot, no-timestamps, the text and end-of-text. A window
    decoded to the end of the text context holds one token too many for that: end-of-text is
    then left out (openai-whisper fails there). Its position is only one of the rows each head's
    weights are normalised over; no word's timing is read from it."""
    if not text_tokens:
        return []
    tokens = sot_sequence + [tokenizer.no_timestamps] + text_tokens + [tokenizer.eot]
    scores, probs = programs.align(features, tokens[: programs.dims.n_text_ctx])
    return find_alignment(scores, probs, tokenizer, len(sot_sequence), text_tokens, num_frames, language)


def find_alignment(scores: np.ndarray, probs: np.ndarray, tokenizer: WhisperTokenizer, sot_length: int,
                   text_tokens: list[int], num_frames: int, language: str, medfilt_width: int = 7) -> list[WordTiming]:
    """Word timings from the alignment heads' scores [heads, tokens, n_audio_ctx] and the token
    probabilities of the teacher-forced sequence sot, no-timestamps, text, end-of-text (left out
    where it does not fit)."""
    if not text_tokens:
        return []
    text_probs = probs[sot_length : sot_length + len(text_tokens), : tokenizer.eot]
    text_probs = text_probs / text_probs.sum(axis=-1, keepdims=True)  # a softmax over the text tokens only
    token_probs = text_probs[np.arange(len(text_tokens)), text_tokens]

    words, word_tokens = split_words(tokenizer, text_tokens + [tokenizer.eot], language)
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    if num_frames // 2 == 0:
        # A window of a single mel frame (a file's last 10 ms) has no audio position of its own:
        # its words are timed at its start (openai-whisper's path leaves the audio, at -0.02 s).
        jump_times = np.zeros(len(text_tokens) + 1)
    else:
        weights = scores[:, :, : num_frames // 2].astype(np.float32)
        weights = np.exp(weights - weights.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):  # one token: no spread; NaN, as the reference
            weights = (weights - weights.mean(axis=-2, keepdims=True)) / weights.std(axis=-2, keepdims=True)
        weights = median_filter(weights, medfilt_width)
        matrix = weights.mean(axis=0)[sot_length : sot_length + len(text_tokens) + 1]  # no-timestamps, text
        text_indices, time_indices = dtw(-matrix)
        jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
        jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
    return [WordTiming(w, t, float(s), float(e), float(np.mean(token_probs[i:j])))
            for w, t, s, e, i, j in zip(words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:])]


def merge_punctuations(alignment: list[WordTiming]) -> None:
    """Opening punctuation joins the next word, closing punctuation the previous one."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        previous, following = alignment[i], alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in PREPEND_PUNCTUATION:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        previous, following = alignment[i], alignment[j]
        if not previous.word.endswith(" ") and following.word in APPEND_PUNCTUATION:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def add_word_timestamps(segments: list[RawSegment], alignment: list[WordTiming], eot: int, time_offset: float,
                        last_speech_timestamp: float) -> None:
    """Give each segment its words, trimming implausibly long first/last words (a first word long
    after `last_speech_timestamp`, the end of speech before these segments) and moving the
    segment's bounds to its words'."""
    durations = np.array([t.end - t.start for t in alignment])
    durations = durations[durations.nonzero()]
    median_duration = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    max_duration = median_duration * 2
    if len(durations):
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > max_duration:
                if alignment[i].word in SENTENCE_END:
                    alignment[i].end = alignment[i].start + max_duration
                elif alignment[i - 1].word in SENTENCE_END:
                    alignment[i].start = alignment[i].end - max_duration
    merge_punctuations(alignment)

    word_index = 0
    for segment in segments:
        text_tokens = [t for t in segment.tokens if t < eot]
        saved, words = 0, []
        while word_index < len(alignment) and saved < len(text_tokens):
            timing = alignment[word_index]
            if timing.word:
                words.append(Word(timing.word, round(time_offset + timing.start, 2), round(time_offset + timing.end, 2),
                                  timing.probability))
            saved += len(timing.tokens)
            word_index += 1
        if words:
            first, last = words[0], words[-1]
            if first.end - last_speech_timestamp > median_duration * 4 and (
                    first.end - first.start > max_duration or (len(words) > 1 and words[1].end - first.start > max_duration * 2)):
                if len(words) > 1 and words[1].end - words[1].start > max_duration:
                    boundary = max(words[1].end / 2, words[1].end - max_duration)
                    first.end = words[1].start = boundary
                first.start = max(0, first.end - max_duration)
            if segment.start < first.end and segment.start - 0.5 > first.start:
                first.start = max(0, min(first.end - median_duration, segment.start))
            else:
                segment.start = first.start
            if segment.end > last.start and segment.end + 0.5 < last.end:
                last.end = max(last.start + median_duration, segment.end)
            else:
                segment.end = last.end
            last_speech_timestamp = segment.end
        segment.words = words


def last_end(segments: list[RawSegment]) -> float | None:
    """openai-whisper's `get_end`: the end of the last word, else of the last segment."""
    return next((w.end for s in reversed(segments) for w in reversed(s.words)), segments[-1].end if segments else None)
