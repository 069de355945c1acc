"""Log-mel features equal openai-whisper's on the same audio."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import whisper

from audio_signals import speechlike
from service.engine.dims import N_FFT, N_SAMPLES
from service.engine.features import file_log_mel, mel_filters, reflect_pad, window_log_mel


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_the_ones_openai_whisper_ships(n_mels):
    path = os.path.join(os.path.dirname(whisper.__file__), "assets", "mel_filters.npz")
    with np.load(path) as f:
        np.testing.assert_allclose(mel_filters(n_mels), f[f"mel_{n_mels}"], atol=1e-6)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [1.3, 30.0, 70.0])
def test_whole_file_log_mel_matches_openai_whisper(n_mels, seconds):
    audio = speechlike(seconds, seed=int(seconds))
    ours = file_log_mel(audio, n_mels, padding=N_SAMPLES)
    ref = whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels, padding=N_SAMPLES).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_window_log_mel_floors_each_window_like_a_padded_30s_clip(n_mels):
    clips = [speechlike(s, seed=i) for i, s in enumerate([4.0, 30.0, 17.5])]
    windows = np.zeros((len(clips), N_SAMPLES), np.float32)
    for i, c in enumerate(clips):
        windows[i, : len(c)] = c
    ours = np.asarray(window_log_mel(windows, n_mels))
    for i, c in enumerate(clips):
        ref = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c)), n_mels).numpy()
        np.testing.assert_allclose(ours[i], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding", [0, 1, 200, 201, N_SAMPLES])
def test_reflect_pad_in_one_buffer_equals_padding_the_joined_signal(padding):
    """The centring of the STFT frames, done without joining the audio to its padding first: the
    same as numpy's reflect padding of the joined signal, for signals shorter than the reflection
    (200 samples) too."""
    rng = np.random.default_rng(padding)
    for n in (1, 5, 200, 201, 202, 1000, N_SAMPLES + 1):
        audio = rng.standard_normal(n).astype(np.float32)
        joined = np.concatenate([audio, np.zeros(padding, np.float32)])
        expected = np.pad(joined, (N_FFT // 2, N_FFT // 2), mode="reflect")
        got = reflect_pad(audio, padding)
        assert got.dtype == np.float32 and got.shape[-1] % N_SAMPLES == N_FFT
        np.testing.assert_array_equal(got[: len(expected)], expected)
        assert not got[len(expected):].any()
