"""Audio in: any container PyAV reads, or headerless PCM, to 16 kHz mono float32.

A container is decoded as it is read, a piece at a time (`audio_pieces`), so that a long file is
transcribed while it decodes and is never held whole as samples (an hour is 230 MB of them).
Decoding is bounded: audio whose container says it is longer than allowed is refused before
any of it decodes, and decoding stops as soon as the decoded audio passes the allowed duration,
so a small file that expands to hours (a decompression bomb) costs little.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import threading
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
PCM_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}  # little-endian on any host
# Floating-point audio can hold these; the features of such a window would be meaningless.
NOT_FINITE = "the audio holds NaN or infinite samples; floating-point samples must be finite, in [-1, 1]"
PIECE_SAMPLES = 10 * SAMPLE_RATE  # handed on at a time: a decoded frame is a few milliseconds
# A container's length is over the limit by more than this before it is refused: codecs pad the
# last frame and prime the first (at most a few hundred milliseconds).
LENGTH_SLACK_SECONDS = 0.25
ACCEPTED = ("accepted: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm, or headerless PCM (s16le, f32le) with its "
            "sample rate")


class AudioError(ValueError):
    """Audio that cannot be decoded, is empty, or is over a limit."""


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 4 * 3600.0

    def too_long(self) -> AudioError:
        return AudioError(f"the audio is longer than the {self.max_seconds:g} s allowed")


def decode_audio(source: bytes | str | Path, limits: AudioLimits = AudioLimits(),
                 cancel: threading.Event | None = None) -> np.ndarray:
    """The whole of `audio_pieces`, as one array."""
    return np.concatenate(list(audio_pieces(source, limits, cancel)))


def audio_pieces(source: bytes | str | Path, limits: AudioLimits = AudioLimits(),
                 cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
    """The first audio stream of a container (its format sniffed from the bytes, not a name),
    mixed to mono and resampled to 16 kHz float32, in pieces of about PIECE_SAMPLES as it decodes.

    As the ffmpeg command line (and so openai-whisper) does, a packet that fails to decode (a
    damaged stretch of the file) is skipped, and a file cut short gives what it holds; only a
    file of which nothing decodes fails. A stream whose sample rate or channels change midway
    (concatenated files, broadcast recordings) is resampled piece by piece. Once `cancel` is
    set (the caller went away), decoding stops with CancelledError. Raises AudioError, before
    the first piece where it can tell, for audio that cannot be decoded or is too long."""
    if isinstance(source, (bytes, bytearray, memoryview)) and len(source) == 0:
        raise AudioError("the audio is empty")
    max_samples = int(min((limits.max_seconds + LENGTH_SLACK_SECONDS) * SAMPLE_RATE, np.iinfo(np.int64).max))
    pending: list[np.ndarray] = []  # decoded, not handed on yet
    pending_samples = total = skipped = 0
    resampler, resampling = None, None

    def take(frames: list[av.AudioFrame]) -> None:
        nonlocal pending_samples, total
        for frame in frames:
            samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
            if not np.isfinite(samples).all():
                raise AudioError(NOT_FINITE)
            if total + len(samples) > max_samples:
                raise limits.too_long()
            pending.append(samples)
            pending_samples += len(samples)
            total += len(samples)

    def handed_on() -> np.ndarray:
        nonlocal pending_samples
        piece = np.concatenate(pending) if len(pending) > 1 else pending[0]
        pending.clear()
        pending_samples = 0
        return piece

    try:
        with _open(source) as container:
            if not container.streams.audio:
                raise AudioError("the file has no audio stream")
            stream = container.streams.audio[0]
            if _longer_than(limits.max_seconds, source, container, stream):
                raise limits.too_long()
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
                                take(resampler.resample(None))
                            resampler, resampling = _mono_resampler(), source_format
                        take(resampler.resample(frame))
                    if pending_samples >= PIECE_SAMPLES:
                        yield handed_on()
            except (av.error.FFmpegError, OSError, EOFError) as e:
                if total == 0:
                    raise
                log.warning("the audio ends early: the file could not be read past %.1f s (%s)",
                            total / SAMPLE_RATE, e)
            if resampler is not None:
                take(resampler.resample(None))
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as e:
        raise AudioError(f"the audio could not be decoded ({e}); {ACCEPTED}") from e
    if total == 0:
        if skipped:
            raise AudioError(f"the audio could not be decoded: none of its {skipped} packets holds valid data")
        raise AudioError("the audio holds no samples")
    if skipped:
        log.warning("skipped %d damaged audio packets", skipped)
    if pending:
        yield handed_on()


def _open(source: bytes | str | Path) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        source = str(source)
    else:
        raise TypeError(f"audio must be bytes or a path, got {type(source).__name__}")
    return av.open(source, mode="r", metadata_errors="ignore")


def _readable_twice(source: bytes | str | Path) -> bool:
    """Bytes or a regular file: not a pipe (or a device), which a second reader would drain."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return True
    try:
        return stat.S_ISREG(os.stat(source).st_mode)
    except OSError:
        return False


def declared_seconds(source: bytes | str | Path) -> float | None:
    """The duration of the audio as its container's header gives it, without decoding (None where
    it gives none, the source cannot be read, or is a pipe, which only its decoding may read).
    Some formats' figure is an estimate (see `_longer_than`): for a progress bar, not a limit."""
    if not _readable_twice(source):
        return None
    try:
        with _open(source) as container:
            return _header_seconds(container, container.streams.audio[0]) if container.streams.audio else None
    except (av.error.FFmpegError, OSError, EOFError, ValueError):
        return None


def _header_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _longer_than(seconds: float, source, container, stream) -> bool:
    """The audio is longer than `seconds`, as the container tells. A header's duration is taken
    when it is within the limit; one over it, or none, is checked against the durations of the
    stream's packets, read without decoding them (about 0.2 s for an hour of mp3): a header's
    figure can be an estimate far off (a variable-bitrate mp3's, from its first frame's rate).
    A pipe is not read twice: its length is found by decoding it."""
    declared = _header_seconds(container, stream)
    if (declared is not None and declared <= seconds) or not _readable_twice(source):
        return False
    try:
        with _open(source) as again:
            packets = again.demux(again.streams.audio[0])
            found = sum(float(p.duration * p.time_base) for p in packets if p.duration and p.time_base is not None)
    except (av.error.FFmpegError, OSError, EOFError, ValueError):
        return False  # decoding finds out, and stops at the limit
    return found > seconds + LENGTH_SLACK_SECONDS


def _mono_resampler() -> av.AudioResampler:
    """To 16 kHz mono float. Channels are mixed down as the ffmpeg command line does it for
    openai-whisper's 16-bit output (and as headerless PCM is): scaled so that the mix cannot clip,
    stereo to the mean of its channels. For float output FFmpeg would otherwise not scale it,
    and stereo would come out 3 dB louder."""
    return av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE, options={"rematrix_maxval": "1.0"})
