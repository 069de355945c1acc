"""Cutting long audio into windows of at most 30 s, at the quietest point near each window's end."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np

from .dims import HOP_LENGTH, N_SAMPLES

SMOOTHING = 10  # frames (100 ms) the energy is averaged over
# np.convolve(..., mode="same") with SMOOTHING taps centres frame i on frames i - 5 ... i + 4.
BEFORE, AFTER = SMOOTHING // 2, SMOOTHING - SMOOTHING // 2 - 1


class WindowCutter:
    """Cuts audio that arrives in pieces into windows as soon as each can be cut.

    Each cut is placed at the lowest-energy 10 ms frame (smoothed over 100 ms) in the last
    `search_fraction` of the window, so cuts fall in pauses rather than inside words. A cut is
    made once every frame its smoothing reads has arrived, so the windows do not depend on how
    the audio was split into pieces (frames past the end of the audio count as silent).
    """

    def __init__(self, max_samples: int = N_SAMPLES, search_fraction: float = 1 / 3):
        self.max_samples = max_samples
        self.lo = int(max_samples * (1 - search_fraction)) // HOP_LENGTH  # frames a cut may fall at: [lo, hi)
        self.hi = max_samples // HOP_LENGTH
        self._pieces: list[np.ndarray] = []  # the audio not yet cut, joined only to cut it
        self._length = 0
        self._offset = 0  # absolute sample index of the audio not yet cut; always a whole frame

    def push(self, samples: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Add `samples`; the windows (start, end, samples) complete with them, each cut as it is
        taken (hours of audio pushed at once need not all be cut before the first is decoded)."""
        samples = np.asarray(samples, np.float32).reshape(-1)
        if len(samples):
            self._pieces.append(samples)
            self._length += len(samples)
        # Every frame the smoothing around the last possible cut reads has arrived.
        return self._cuts(lambda: self._length >= (self.hi + AFTER) * HOP_LENGTH)

    def finish(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """The windows of the audio left, once no more will come."""
        yield from self._cuts(lambda: self._length > self.max_samples)
        if self._length:
            buffer = self._joined()
            yield self._offset, self._offset + len(buffer), buffer
            self._offset += len(buffer)
            self._pieces, self._length = [], 0

    def _cuts(self, ready: Callable[[], bool]) -> Iterator[tuple[int, int, np.ndarray]]:
        while ready():
            yield self._cut()

    def _joined(self) -> np.ndarray:
        if len(self._pieces) > 1:
            self._pieces = [np.concatenate(self._pieces)]
        return self._pieces[0]

    def _cut(self) -> tuple[int, int, np.ndarray]:
        buffer = self._joined()
        cut = self._quietest_frame(buffer) * HOP_LENGTH
        window = buffer[:cut]
        self._pieces, self._length = [buffer[cut:]], self._length - cut
        start = self._offset
        self._offset += cut
        return start, start + cut, window

    def _quietest_frame(self, buffer: np.ndarray) -> int:
        """The frame in [lo, hi) of least smoothed energy, reading only the frames around them."""
        first, last = self.lo - BEFORE, self.hi + AFTER
        energy = np.zeros(last - first, np.float32)
        frames = min(len(buffer) // HOP_LENGTH, last) - first
        energy[:frames] = np.square(buffer[first * HOP_LENGTH : (first + frames) * HOP_LENGTH].reshape(
            frames, HOP_LENGTH)).mean(axis=1)
        smoothed = np.convolve(energy, np.ones(SMOOTHING) / SMOOTHING, mode="valid")  # frames lo ... hi - 1
        return self.lo + int(np.argmin(smoothed))


def cut_windows(chunks: Iterable[np.ndarray], max_samples: int = N_SAMPLES) -> Iterator[tuple[int, int, np.ndarray]]:
    """Windows of audio given as a sequence of pieces, yielded as soon as each is complete."""
    cutter = WindowCutter(max_samples)
    for chunk in chunks:
        yield from cutter.push(chunk)
    yield from cutter.finish()
