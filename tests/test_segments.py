"""A window's tokens to timed segments."""
from __future__ import annotations

import pytest

from service.engine.segments import split_segments
from service.engine.tokenizer import WhisperTokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return WhisperTokenizer.from_directory(tiny_model[0], 51865)


def test_text_after_the_last_closed_segment_runs_from_its_timestamp_to_the_window_end(tok):
    """<|0.00|> a<|2.00|><|2.40|> b c, cut off: " b c" is spoken from 2.40 s on (kept as a segment
    up to the window's end in batched mode; where the next window resumes in sequential mode)."""
    ts = lambda seconds: tok.timestamp_begin + round(seconds / 0.02)  # noqa: E731
    tokens = [ts(0.0), *tok.encode(" a"), ts(2.0), ts(2.4), *tok.encode(" b c")]
    kept, frames, single = split_segments(tokens, tok, 60.0, 3000, keep_tail=True)
    assert [(s.start, s.end, s.text) for s in kept] == [(60.0, 62.0, " a"), (62.4, 90.0, " b c")]
    assert (frames, single) == (3000, False)
    resumed, frames, _ = split_segments(tokens, tok, 60.0, 3000, keep_tail=False)
    assert [(s.start, s.end) for s in resumed] == [(60.0, 62.0)] and frames == 200  # resumes at 2.00 s
    # A window shorter than its last opening timestamp: the segment is at its end, not before its start.
    short = [ts(0.0), *tok.encode(" a"), ts(5.02), ts(5.02), *tok.encode(" b")]
    (_, last), _, _ = split_segments(short, tok, 0.0, 500, keep_tail=True)
    assert last.start == last.end == 5.0
