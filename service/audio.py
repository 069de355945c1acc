"""Audio in: any container PyAV reads, or headerless PCM, to 16 kHz mono float32.

Decoding is bounded while it runs: it stops as soon as the decoded audio passes the allowed
duration, so a small file that expands to hours (a decompression bomb) costs little.
"""
from __future__ import annotations

import io
import logging
import threading
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
PCM_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}  # little-endian on any host
# Floating-point audio can hold these; the features of such a window would be meaningless.
NOT_FINITE = "the audio holds NaN or infinite samples; floating-point samples must be finite, in [-1, 1]"


class AudioError(ValueError):
    """Audio that cannot be decoded, is empty, or is over a limit."""


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 4 * 3600.0


def decode_audio(source: bytes | str | Path | BinaryIO, limits: AudioLimits = AudioLimits(),
                 cancel: threading.Event | None = None) -> np.ndarray:
    """Decode the first audio stream of a container (format sniffed from the bytes, not a name),
    mixed to mono and resampled to 16 kHz float32.

    As the ffmpeg command line (and so openai-whisper) does, a packet that fails to decode (a
    damaged stretch of the file) is skipped, and a file cut short gives what it holds; only a
    file of which nothing decodes fails. A stream whose sample rate or channels change midway
    (concatenated files, broadcast recordings) is resampled piece by piece. Once `cancel` is
    set (the caller went away), decoding stops with CancelledError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError("the audio is empty")
        source = io.BytesIO(source)
    max_samples = int(min(limits.max_seconds * SAMPLE_RATE, np.iinfo(np.int64).max))
    chunks: list[np.ndarray] = []
    total = 0
    skipped = 0
    resampler, resampling = None, None

    def append(frames: list[av.AudioFrame]) -> None:
        nonlocal total
        for out in frames:
            total += _append(chunks, out, limits, total, max_samples)

    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError("the file has no audio stream")
            stream = container.streams.audio[0]
            try:
                for packet in container.demux(stream):
                    if cancel is not None and cancel.is_set():
                        raise CancelledError()
                    try:
                        frames = packet.decode()
                    except av.error.InvalidDataError:
                        skipped += 1
                        continue
                    for frame in frames:
                        source_format = (frame.format.name, frame.layout.name, frame.sample_rate)
                        if source_format != resampling:
                            if resampler is not None:
                                append(resampler.resample(None))
                            resampler, resampling = _mono_resampler(), source_format
                        append(resampler.resample(frame))
            except (av.error.FFmpegError, OSError, EOFError) as e:
                if total == 0:
                    raise
                log.warning("the audio ends early: the file could not be read past %.1f s (%s)",
                            total / SAMPLE_RATE, e)
            if resampler is not None:
                append(resampler.resample(None))
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as e:
        raise AudioError(f"the audio could not be decoded ({e}); accepted: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, "
                         "webm, or headerless PCM (s16le, f32le) with its sample rate") from e
    if total == 0:
        if skipped:
            raise AudioError(f"the audio could not be decoded: none of its {skipped} packets holds valid data")
        raise AudioError("the audio holds no samples")
    if skipped:
        log.warning("skipped %d damaged audio packets", skipped)
    return np.concatenate(chunks)


def _mono_resampler() -> av.AudioResampler:
    """To 16 kHz mono float. Channels are mixed down as the ffmpeg command line does it for
    openai-whisper's 16-bit output (and as headerless PCM is): scaled so that the mix cannot clip,
    stereo to the mean of its channels. For float output FFmpeg would otherwise not scale it,
    and stereo would come out 3 dB louder."""
    return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE, options={"rematrix_maxval": "1.0"})


def _append(chunks: list[np.ndarray], frame: av.AudioFrame, limits: AudioLimits, total: int, max_samples: int) -> int:
    samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise AudioError(NOT_FINITE)
    if total + len(samples) > max_samples:
        raise AudioError(f"the audio is longer than the {limits.max_seconds:g} s allowed")
    chunks.append(samples)
    return len(samples)
