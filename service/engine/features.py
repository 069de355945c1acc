"""Log-mel spectrogram, equal to openai-whisper's `log_mel_spectrogram`: the mel power on the
device, 30 s at a time; the floor and scaling on the host.

Two flavours of the dynamic-range floor (log values are clamped to max - 8):
- per window (Hugging Face's feature extractor; what batched long-form uses), and
- over the whole file (openai-whisper's `transcribe()`; what sequential long-form uses).
`log_mel_spectrogram` takes the floor over whatever it is given, so the caller chooses.
"""
from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from .dims import HOP_LENGTH, N_FFT, N_SAMPLES, SAMPLE_RATE


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mels = f / (200.0 / 3)
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mels)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    freqs = (200.0 / 3) * m
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), freqs)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters [n_mels, N_FFT//2 + 1], as librosa computes them."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, len(fft_freqs)), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights


def n_frames(n_samples: int) -> int:
    """STFT frames of a signal, the last one dropped as openai-whisper does."""
    return n_samples // HOP_LENGTH


def reflect_pad(audio: np.ndarray, padding: int = 0) -> np.ndarray:
    """The signal `audio` then `padding` zeros, its STFT frames centred (reflected by N_FFT/2 at
    each end) and zero-filled to whole pieces. One float32 buffer, the audio copied into it once:
    hours of audio are gigabytes."""
    half = N_FFT // 2
    n = audio.shape[-1] + padding
    out = np.zeros(audio.shape[:-1] + (-(-n // N_SAMPLES) * N_SAMPLES + N_FFT,), np.float32)
    out[..., half : half + audio.shape[-1]] = audio
    signal = out[..., half : half + n]
    # Each end reflects only the signal's half + 1 samples nearest to it (all of a shorter signal).
    ends = [(0, 0)] * (audio.ndim - 1)
    left = np.pad(signal[..., : half + 1], ends + [(half, 0)], mode="reflect")[..., :half]
    right = np.pad(signal[..., -(half + 1) :], ends + [(0, half)], mode="reflect")[..., -half:]
    out[..., :half], out[..., half + n : n + 2 * half] = left, right
    return out


@partial(jax.jit, static_argnames=("n_mels",))
def _log10_mel(piece: jax.Array, n_mels: int) -> jax.Array:
    """30 s of a signal from `reflect_pad` (N_SAMPLES + N_FFT samples, the last N_FFT shared with
    the next piece) -> log10 of its mel power [n_mels, 3000], not yet floored. A signal of any
    length is computed piece by piece: one program (compiled by the warm-up), and device memory
    that does not grow with the length."""
    frames_total = N_SAMPLES // HOP_LENGTH
    idx = jnp.arange(frames_total)[:, None] * HOP_LENGTH + jnp.arange(N_FFT)[None, :]
    window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(N_FFT) / N_FFT)  # periodic Hann
    frames = piece[idx] * window
    power = jnp.abs(jnp.fft.rfft(frames, n=N_FFT, axis=-1)) ** 2  # [frames, 201]
    filters = jnp.asarray(mel_filters(n_mels))
    mel = jnp.einsum("tf,mf->mt", power, filters, precision=jax.lax.Precision.HIGHEST)
    return jnp.log10(jnp.maximum(mel, 1e-10))


def log_mel_spectrogram(audio: np.ndarray, n_mels: int, padding: int = 0) -> np.ndarray:
    """Log-mel [n_mels, frames] of a signal followed by `padding` zeros, floored at 8 below its
    peak, as openai-whisper's `log_mel_spectrogram` (its last STFT frame dropped)."""
    frames = n_frames(audio.shape[-1] + padding)
    padded = reflect_pad(audio, padding)
    starts = range(0, padded.shape[-1] - N_FFT, N_SAMPLES)
    per_piece = N_SAMPLES // HOP_LENGTH
    log_spec = np.empty((n_mels, len(starts) * per_piece), np.float32)  # filled in place: no copies of hours
    for i, start in enumerate(starts):
        log_spec[:, i * per_piece : (i + 1) * per_piece] = _log10_mel(padded[start : start + N_SAMPLES + N_FFT], n_mels)
    del padded
    log_spec = log_spec[:, :frames]
    np.maximum(log_spec, log_spec.max() - 8.0, out=log_spec)
    log_spec += 4.0
    log_spec /= 4.0
    return log_spec


def file_log_mel(audio: np.ndarray, n_mels: int, padding: int = 0) -> np.ndarray:
    """Log-mel of a whole signal (floor over the whole file), with `padding` zeros appended
    first, as openai-whisper's `log_mel_spectrogram(audio, padding=...)`."""
    return log_mel_spectrogram(audio, n_mels, padding)


def window_log_mel(windows: np.ndarray, n_mels: int) -> np.ndarray:
    """Log-mel of 30 s windows [B, N_SAMPLES] (zero-padded), floor per window: [B, n_mels, 3000],
    on the host, as the encoder takes them."""
    return np.stack([log_mel_spectrogram(w, n_mels) for w in windows])
