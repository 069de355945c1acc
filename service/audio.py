"""Audio in: any container PyAV reads, or headerless PCM, to 16 kHz mono float32.

Decoding is bounded while it runs: it stops as soon as the decoded audio passes the allowed
duration, so a small file that expands to hours (a decompression bomb) costs little.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

SAMPLE_RATE = 16000
PCM_FORMATS = {"s16le": np.int16, "f32le": np.float32}
# Floating-point audio can hold these; the features of such a window would be meaningless.
NOT_FINITE = "the audio holds NaN or infinite samples; floating-point samples must be finite, in [-1, 1]"


class AudioError(ValueError):
    """Audio that cannot be decoded, is empty, or is over a limit."""


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 4 * 3600.0


def decode_audio(source: bytes | str | Path | BinaryIO, limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Decode the first audio stream of a container (format sniffed from the bytes, not a name),
    mixed to mono and resampled to 16 kHz float32."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError("the audio is empty")
        source = io.BytesIO(source)
    max_samples = int(limits.max_seconds * SAMPLE_RATE)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError("the file has no audio stream")
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    total += _append(chunks, out, limits, total, max_samples)
            for out in resampler.resample(None):
                total += _append(chunks, out, limits, total, max_samples)
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as e:
        raise AudioError(f"the audio could not be decoded ({e}); accepted: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, "
                         "webm, or headerless PCM (s16le, f32le) with its sample rate") from e
    if total == 0:
        raise AudioError("the audio holds no samples")
    return np.concatenate(chunks)


def _append(chunks: list[np.ndarray], frame: av.AudioFrame, limits: AudioLimits, total: int, max_samples: int) -> int:
    samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise AudioError(NOT_FINITE)
    if total + len(samples) > max_samples:
        raise AudioError(f"the audio is longer than the {limits.max_seconds:g} s allowed")
    chunks.append(samples)
    return len(samples)
