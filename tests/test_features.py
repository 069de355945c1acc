"""Log-mel features equal openai-whisper's on the same audio."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import whisper

from audio_signals import speechlike
from service.engine.dims import N_SAMPLES
from service.engine.features import file_log_mel, mel_filters, window_log_mel


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
