"""Log-mel spectrogram on the device, equal to openai-whisper's `log_mel_spectrogram`.

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


def reflect_pad(audio: np.ndarray, bucket: int = N_SAMPLES) -> np.ndarray:
    """Centre the STFT frames (reflect by N_FFT/2 each side) and zero-fill to a multiple of
    `bucket` samples, so one compiled program serves every length in the bucket."""
    padded = np.pad(audio.astype(np.float32), [(0, 0)] * (audio.ndim - 1) + [(N_FFT // 2, N_FFT // 2)], mode="reflect")
    target = -(-audio.shape[-1] // bucket) * bucket + N_FFT
    return np.pad(padded, [(0, 0)] * (audio.ndim - 1) + [(0, target - padded.shape[-1])])


@partial(jax.jit, static_argnames=("n_mels",))
def log_mel_spectrogram(padded: jax.Array, valid_frames: jax.Array, n_mels: int) -> jax.Array:
    """padded [..., samples] from `reflect_pad` -> log-mel [..., n_mels, frames].

    Frames at or past `valid_frames` are ignored by the max-8 floor; the caller slices them off.
    """
    frames_total = (padded.shape[-1] - N_FFT) // HOP_LENGTH
    idx = jnp.arange(frames_total)[:, None] * HOP_LENGTH + jnp.arange(N_FFT)[None, :]
    window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(N_FFT) / N_FFT)  # periodic Hann
    frames = padded[..., idx] * window
    power = jnp.abs(jnp.fft.rfft(frames, n=N_FFT, axis=-1)) ** 2  # [..., frames, 201]
    filters = jnp.asarray(mel_filters(n_mels))
    mel = jnp.einsum("...tf,mf->...mt", power, filters, precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    valid = jnp.arange(frames_total) < jnp.asarray(valid_frames)[..., None, None]
    peak = jnp.max(jnp.where(valid, log_spec, -jnp.inf), axis=(-2, -1), keepdims=True)
    log_spec = jnp.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def file_log_mel(audio: np.ndarray, n_mels: int, padding: int = 0) -> np.ndarray:
    """Log-mel of a whole signal (floor over the whole file), with `padding` zeros appended
    first, as openai-whisper's `log_mel_spectrogram(audio, padding=...)`."""
    if padding:
        audio = np.concatenate([audio, np.zeros(padding, np.float32)])
    frames = n_frames(audio.shape[-1])
    mel = log_mel_spectrogram(reflect_pad(audio), frames, n_mels)
    return np.asarray(mel)[..., :frames]


def window_log_mel(windows: np.ndarray, n_mels: int) -> np.ndarray:
    """Log-mel of 30 s windows [B, N_SAMPLES] (zero-padded), floor per window: [B, n_mels, 3000].
    On the host, as the encoder takes them: slicing them on the device compiles a program."""
    frames = n_frames(N_SAMPLES)
    mel = log_mel_spectrogram(reflect_pad(windows), np.full((windows.shape[0],), frames), n_mels)
    return np.asarray(mel)[..., :frames]
