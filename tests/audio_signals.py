"""Synthetic test audio: speech-like tones with pauses, at 16 kHz unless asked otherwise."""
from __future__ import annotations

import numpy as np


def speechlike(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Voiced bursts (harmonics with a wandering pitch and syllable-rate envelope), separated by
    pauses and a little noise, so long-form cutting has quiet places to find."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)))
    words = (np.sin(2 * np.pi * 0.2 * t + rng.uniform(0, 6)) > -0.3).astype(np.float32)
    signal = 0.2 * voiced * syllables * words + 0.003 * rng.standard_normal(n)
    return signal.astype(np.float32)
