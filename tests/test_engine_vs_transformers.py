"""The JAX network equals transformers' Whisper (PyTorch) on the same random weights."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from service.engine import model, weights

ARCHS = ["tiny_model", "v3_model", "turbo_model"]


def load(directory):
    ckpt = weights.resolve(str(directory))
    params = weights.build_params(ckpt.tensors(), ckpt.dims, np.float32)
    return params, ckpt.dims


def random_mel(n_mels: int, batch: int = 2) -> np.ndarray:
    return (np.random.default_rng(5).standard_normal((batch, n_mels, 3000)) * 0.5).astype(np.float32)


# How the encoder's attention is cut: all heads, 500 queries at a time (accelerators); one head at
# a time (CPU); and chunks that do not divide the heads or the queries (attention then uncut).
CHUNKS = [model.Chunks(), model.Chunks(heads=1, queries=None), model.Chunks(heads=2, queries=300),
          model.Chunks(heads=5, queries=7)]


@pytest.mark.parametrize("fixture", ARCHS)
@pytest.mark.parametrize("chunks", CHUNKS, ids=str)
def test_encoder_output_matches_transformers(fixture, chunks, request):
    directory, hf = request.getfixturevalue(fixture)
    params, dims = load(directory)
    mel = random_mel(dims.n_mels)
    ours = np.asarray(model.encode(params, jnp.asarray(mel), dims, chunks))
    with torch.inference_mode():
        ref = hf.model.encoder(torch.from_numpy(mel)).last_hidden_state.numpy()
    assert ours.shape == ref.shape == (2, dims.n_audio_ctx, dims.n_audio_state)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture", ARCHS)
def test_teacher_forced_logits_match_transformers(fixture, request):
    directory, hf = request.getfixturevalue(fixture)
    params, dims = load(directory)
    mel = random_mel(dims.n_mels)
    rng = np.random.default_rng(6)
    tokens = np.concatenate([np.array([[50258, 50259, 50360]] * 2), rng.integers(0, 50000, (2, 17))], axis=1).astype(np.int32)
    feats = model.encode(params, jnp.asarray(mel), dims)
    ck, cv = model.cross_kv(params, feats, dims)
    sk, sv = model.empty_self_cache(dims, 2, jnp.float32)
    index = np.tile(np.arange(tokens.shape[1]), (2, 1)).astype(np.int32)
    ours, _ = model.decode(params, jnp.asarray(tokens), jnp.zeros(2, jnp.int32), model.KVCache(sk, sv, ck, cv),
                           jnp.asarray(index), dims)
    with torch.inference_mode():
        ref = hf(input_features=torch.from_numpy(mel), decoder_input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    assert ours.shape == ref.shape == (2, tokens.shape[1], dims.n_vocab)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_incremental_decoding_equals_full_sequence(tiny_model):
    """Feeding tokens one at a time through the cache gives the logits of the whole sequence."""
    directory, _ = tiny_model
    params, dims = load(directory)
    feats = model.encode(params, jnp.asarray(random_mel(dims.n_mels, 1)), dims)
    ck, cv = model.cross_kv(params, feats, dims)
    tokens = np.array([[50258, 50259, 50359, 50363, 440, 2068, 3699, 11]], np.int32)
    sk, sv = model.empty_self_cache(dims, 1, jnp.float32)
    full, _ = model.decode(params, jnp.asarray(tokens), jnp.zeros(1, jnp.int32), model.KVCache(sk, sv, ck, cv),
                           jnp.arange(8, dtype=jnp.int32)[None], dims)
    cache = model.KVCache(*model.empty_self_cache(dims, 1, jnp.float32), ck, cv)
    step_logits = []
    for i in range(8):
        logits, cache = model.decode(params, jnp.asarray(tokens[:, i : i + 1]), jnp.array([i], jnp.int32), cache,
                                     jnp.zeros((1, 1), jnp.int32), dims)
        step_logits.append(np.asarray(logits[0, 0]))
    np.testing.assert_allclose(np.stack(step_logits), np.asarray(full[0]), atol=1e-4, rtol=0)
