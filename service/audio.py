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
    if total + len(samples) > max_samples:
        raise AudioError(f"the audio is longer than the {limits.max_seconds:g} s allowed")
    chunks.append(samples)
    return len(samples)


def decode_pcm(data: bytes, sample_rate: int, channels: int = 1, encoding: str = "s16le") -> np.ndarray:
    """Headerless little-endian PCM (interleaved channels) to 16 kHz mono float32."""
    if encoding not in PCM_FORMATS:
        raise AudioError(f"PCM encoding must be one of {', '.join(PCM_FORMATS)}, got {encoding!r}")
    if not 1 <= channels <= 8:
        raise AudioError(f"channels must be in [1, 8], got {channels}")
    if not 8000 <= sample_rate <= 192000:
        raise AudioError(f"sample_rate must be in [8000, 192000] Hz, got {sample_rate}")
    dtype = PCM_FORMATS[encoding]
    frame_bytes = np.dtype(dtype).itemsize * channels
    if len(data) == 0:
        raise AudioError("the audio is empty")
    if len(data) % frame_bytes:
        raise AudioError(f"{encoding} PCM with {channels} channel(s) comes in {frame_bytes}-byte frames; got {len(data)} bytes")
    samples = np.frombuffer(data, dtype).reshape(-1, channels)
    mono = samples.astype(np.float32).mean(axis=1)
    if dtype == np.int16:
        mono /= 32768.0
    return resample(mono, sample_rate)


def resample(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at any rate to 16 kHz, through FFmpeg's resampler."""
    if sample_rate == SAMPLE_RATE:
        return audio.astype(np.float32, copy=False)
    frame = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate = sample_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
