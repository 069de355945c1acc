"""Cutting long audio into windows of at most 30 s, at the quietest point near each window's end."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from .dims import HOP_LENGTH, N_SAMPLES


class WindowCutter:
    """Cuts audio that arrives in pieces into windows as soon as each can be cut.

    Each cut is placed at the lowest-energy 10 ms frame (smoothed over 100 ms) in the last
    `search_fraction` of the window, so cuts fall in pauses rather than inside words.
    """

    def __init__(self, max_samples: int = N_SAMPLES, search_fraction: float = 1 / 3):
        self.max_samples = max_samples
        self.search_fraction = search_fraction
        self._buffer = np.zeros(0, np.float32)
        self._offset = 0  # absolute sample index of the buffer's start; always a whole frame

    def push(self, samples: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """Windows (start, end, samples) that are complete once `samples` are added."""
        self._buffer = np.concatenate([self._buffer, np.asarray(samples, np.float32).reshape(-1)])
        out = []
        while len(self._buffer) > self.max_samples:
            cut = self._quietest_cut()
            out.append((self._offset, self._offset + cut, self._buffer[:cut]))
            self._buffer = self._buffer[cut:]
            self._offset += cut
        return out

    def finish(self) -> list[tuple[int, int, np.ndarray]]:
        """The last window, if any audio is left."""
        if len(self._buffer) == 0:
            return []
        out = [(self._offset, self._offset + len(self._buffer), self._buffer)]
        self._offset += len(self._buffer)
        self._buffer = np.zeros(0, np.float32)
        return out

    def _quietest_cut(self) -> int:
        frames = len(self._buffer) // HOP_LENGTH
        energy = np.square(self._buffer[: frames * HOP_LENGTH].reshape(frames, HOP_LENGTH)).mean(axis=1)
        energy = np.convolve(energy, np.ones(10) / 10, mode="same")
        lo = int(self.max_samples * (1 - self.search_fraction)) // HOP_LENGTH
        hi = self.max_samples // HOP_LENGTH
        return (lo + int(np.argmin(energy[lo:hi]))) * HOP_LENGTH


def cut_windows(chunks: Iterable[np.ndarray], max_samples: int = N_SAMPLES) -> Iterator[tuple[int, int, np.ndarray]]:
    """Windows of audio given as a sequence of pieces, yielded as soon as each is complete."""
    cutter = WindowCutter(max_samples)
    for chunk in chunks:
        yield from cutter.push(chunk)
    yield from cutter.finish()
