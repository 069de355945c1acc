"""bfloat16, the engine's type on accelerators, run here on CPU: it serves, compiles nothing
after its warm-up, and stays within its precision of float32 on the same weights."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import whisper

from audio_signals import speechlike
from compile_events import compiles
from service.engine import Engine, TranscribeOptions, model


@pytest.fixture(scope="module")
def bf16_engine(tiny_model):
    engine = Engine.load(str(tiny_model[0]), max_batch=4, dtype="bfloat16")
    yield engine
    engine.close()


def window_mel(seed: int) -> np.ndarray:
    audio = whisper.pad_or_trim(torch.from_numpy(speechlike(20.0, seed=seed)))
    return whisper.log_mel_spectrogram(audio, 80).numpy()


def test_bfloat16_stays_within_its_precision_of_float32(bf16_engine, tiny_engine):
    assert bf16_engine.programs.dtype == ml_dtypes.bfloat16 and tiny_engine.programs.dtype == np.float32
    for seed in range(3):
        mel = window_mel(seed)
        full, half = (e.programs.encode(mel[None])[0] for e in (tiny_engine, bf16_engine))
        # bfloat16 keeps 8 bits of mantissa: a relative error of 2^-9 per rounding, some dozens of them deep.
        error = np.abs(np.asarray(half, np.float32) - np.asarray(full))
        assert error.mean() < 0.02 * np.abs(np.asarray(full)).mean()
        # Next-token log-probabilities along float32's greedy tokens, teacher-forced.
        result, _ = tiny_engine.decode(mel, TranscribeOptions(language="en", temperatures=(0.0,)))
        tokens = tiny_engine.tokenizer.sot_sequence("en", "transcribe") + result.tokens
        assert len(tokens) > 100
        logprobs = []
        for engine, features in ((tiny_engine, full), (bf16_engine, half)):
            _, probs = engine.programs.align(features, tokens)
            logprobs.append(np.log(probs[np.arange(len(tokens) - 1), tokens[1:]].astype(np.float64)))
        assert np.abs(logprobs[1] - logprobs[0]).max() < 0.05


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_a_bfloat16_engine_serves_after_its_warm_up_without_compiling(bf16_engine, mode):
    bf16_engine.warmup()
    audio = speechlike(45.0, seed=3)
    with compiles() as compiled:
        out = bf16_engine.transcribe(audio, TranscribeOptions(temperatures=(0.0,), word_timestamps=True, mode=mode))
    assert compiled == []
    assert out.language in bf16_engine.languages and out.duration == pytest.approx(45.0)
    spoken = [s for s in out.segments if s.tokens]
    assert spoken and all(math.isfinite(s.avg_logprob) for s in spoken)
    assert any(s.words for s in spoken)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the single-row workaround is for XLA's CPU backend")
def test_one_bfloat16_row_takes_the_bfloat16_kernel_and_keeps_its_precision():
    """A decode step of one window multiplies single rows: on CPU these are computed as two rows,
    for which XLA has a bfloat16 kernel, rather than by converting the weights (or the
    cross-attention caches) to float32 at every step."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 1, 384)), rng.standard_normal((384, 51865)) / 20
    q, k, v = (rng.standard_normal((1, 6, n, 64)) for n in (1, 1500, 1500))
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731
    widened = lambda a: bf16(a).astype(jnp.float32)  # noqa: E731 (the bfloat16 operands' values, exactly)

    programs = {"product": (model.product, (bf16(x), bf16(w))), "attention": (model.attention, (bf16(q), bf16(k), bf16(v)))}
    for name, (fn, args) in programs.items():
        text = jax.jit(fn).lower(*args).compile().as_text()
        assert "f32[384,51865]" not in text and "f32[1,6,1500,64]" not in text, f"{name} converts an operand"

    got = np.asarray(model.product(bf16(x), bf16(w)), np.float32)
    want = np.asarray(model.product(*map(widened, (x, w))))
    assert got.shape == (1, 1, 51865)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)  # float32 sums of bfloat16 products

    got = np.asarray(model.attention(bf16(q), bf16(k), bf16(v)), np.float32)
    want = np.asarray(model.attention(*map(widened, (q, k, v))))
    assert got.shape == (1, 6, 1, 64)
    np.testing.assert_allclose(got, want, atol=2e-2)  # the result is rounded to bfloat16
