"""Cutting long audio into windows of at most 30 s, at the quietest point near each window's end."""
from __future__ import annotations

import numpy as np

from .dims import HOP_LENGTH, N_SAMPLES


def split_windows(audio: np.ndarray, max_samples: int = N_SAMPLES, search_fraction: float = 1 / 3) -> list[tuple[int, int]]:
    """[(start, end)] sample spans covering `audio`, each at most `max_samples` long.

    Each cut is placed at the lowest-energy 10 ms frame (smoothed over 100 ms) in the last
    `search_fraction` of the window, so cuts fall in pauses rather than inside words.
    """
    n = len(audio)
    if n <= max_samples:
        return [(0, n)]
    frames = n // HOP_LENGTH
    energy = np.square(audio[: frames * HOP_LENGTH].reshape(frames, HOP_LENGTH)).mean(axis=1)
    energy = np.convolve(energy, np.ones(10) / 10, mode="same")
    spans, start = [], 0
    while n - start > max_samples:
        lo = (start + int(max_samples * (1 - search_fraction))) // HOP_LENGTH
        hi = (start + max_samples) // HOP_LENGTH
        cut = (lo + int(np.argmin(energy[lo:hi]))) * HOP_LENGTH
        spans.append((start, cut))
        start = cut
    spans.append((start, n))
    return spans
