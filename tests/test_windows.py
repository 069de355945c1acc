"""Cutting long audio into windows for batched decoding: at pauses, at most 30 s, the same
however the audio arrives."""
from __future__ import annotations

import numpy as np
import pytest

from audio_signals import speechlike
from service.engine.dims import N_SAMPLES, SAMPLE_RATE
from service.engine.windows import WindowCutter, cut_windows


def spans(windows) -> list[tuple[int, int]]:
    return [(start, end) for start, end, _ in windows]


@pytest.mark.parametrize("seconds", [29.0, 30.0, 30.005, 45.0, 95.3])
def test_windows_are_contiguous_at_most_30_s_and_hold_the_audio(seconds):
    audio = speechlike(seconds, seed=int(seconds))
    windows = list(cut_windows([audio]))
    assert windows[0][0] == 0 and windows[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert all(0 < end - start <= N_SAMPLES and start % 160 == 0 for start, end, _ in windows)
    np.testing.assert_array_equal(np.concatenate([w for _, _, w in windows]), audio)


@pytest.mark.parametrize("piece", [160, 320, 4000, 12345])
def test_the_windows_do_not_depend_on_how_the_audio_arrives(piece):
    """Real-time PCM comes in messages of 10-40 ms: a window is cut only once the frames its
    choice reads have all arrived, so the cuts are those of the whole file."""
    audio = speechlike(95.3, seed=7)
    whole = spans(cut_windows([audio]))
    assert spans(cut_windows(audio[i : i + piece] for i in range(0, len(audio), piece))) == whole
    assert len(whole) == 4


def test_a_cut_falls_in_a_pause():
    audio = speechlike(50.0, seed=3)
    audio[int(24.0 * SAMPLE_RATE) : int(24.3 * SAMPLE_RATE)] = 0.0
    (_, end, _), _ = cut_windows([audio])
    assert 24.0 * SAMPLE_RATE <= end <= 24.3 * SAMPLE_RATE


def test_audio_given_at_once_is_cut_a_window_at_a_time():
    """Hours pushed at once: the first window comes out before the others are cut."""
    cutter = WindowCutter()
    audio = speechlike(600.0, seed=1)
    windows = cutter.push(audio)
    start, end, _ = next(windows)
    assert start == 0 and cutter._offset == end  # one cut made
    rest = list(windows) + list(cutter.finish())
    assert len(rest) >= 19 and rest[-1][1] == len(audio)
