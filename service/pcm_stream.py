"""Headerless PCM that arrives in pieces, turned into 16 kHz mono float32 as it arrives.

A stream is cut anywhere (even inside a sample frame), and resampling carries its filter state
across pieces, so the output does not depend on how the bytes were split.
"""
from __future__ import annotations

import av
import numpy as np

from .audio import NOT_FINITE, PCM_FORMATS, SAMPLE_RATE, AudioError


class PcmStream:
    def __init__(self, encoding: str, sample_rate: int, channels: int = 1):
        if encoding not in PCM_FORMATS:
            raise AudioError(f"PCM encoding must be one of {', '.join(PCM_FORMATS)}, got {encoding!r}")
        if not 1 <= channels <= 8:
            raise AudioError(f"channels must be in [1, 8], got {channels}")
        if not 8000 <= sample_rate <= 192000:
            raise AudioError(f"sample_rate must be in [8000, 192000] Hz, got {sample_rate}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self.dtype = np.dtype(PCM_FORMATS[encoding])
        self.frame_bytes = self.dtype.itemsize * channels
        self.frames_in = 0  # sample frames received so far
        self._rest = b""  # the start of an incomplete frame
        self._resampler = None
        if sample_rate != SAMPLE_RATE:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    @property
    def seconds_in(self) -> float:
        return self.frames_in / self.sample_rate

    def push(self, data: bytes) -> np.ndarray:
        """The 16 kHz samples that the bytes received so far complete (possibly none)."""
        data = self._rest + data if self._rest else data
        whole = len(data) - len(data) % self.frame_bytes
        self._rest = bytes(data[whole:])
        if whole == 0:
            return np.zeros(0, np.float32)
        frames = np.frombuffer(data, self.dtype, count=whole // self.dtype.itemsize).reshape(-1, self.channels)
        if self.dtype.kind == "f" and not np.isfinite(frames).all():
            raise AudioError(NOT_FINITE)
        self.frames_in += len(frames)
        mono = frames.astype(np.float32).mean(axis=1) if self.channels > 1 else frames[:, 0].astype(np.float32)
        if self.dtype.kind == "i":  # 16-bit integers
            mono /= 32768.0
        return self._resample(mono)

    def finish(self) -> np.ndarray:
        """The last samples, once the stream has ended. Raises AudioError for a cut frame."""
        if self._rest:
            raise AudioError(f"{self.encoding} PCM with {self.channels} channel(s) comes in {self.frame_bytes}-byte "
                             f"frames; the audio ended {len(self._rest)} byte(s) into a frame")
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._collect(self._resampler.resample(None))

    def _resample(self, mono: np.ndarray) -> np.ndarray:
        if self._resampler is None:
            return mono
        frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._collect(self._resampler.resample(frame))

    @staticmethod
    def _collect(frames: list) -> np.ndarray:
        if not frames:
            return np.zeros(0, np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)
