"""The Whisper network as pure JAX functions over an explicit parameter tree.

Parameters follow openai-whisper's names, with each stack of residual blocks stored as arrays
whose leading axis is the layer, so one `lax.scan` runs the stack (small programs, fast compiles).
Linear kernels are stored as [in, out].

The decoder keeps a preallocated self-attention cache of `n_text_ctx` positions per row; each
call writes its new keys/values at the row's own positions, so rows of one batch can be at
different lengths (continuous batching). Cross-attention keys/values are computed once per
window by `cross_kv` and reused at every step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .dims import ModelDimensions

Params = dict


class KVCache(NamedTuple):
    self_k: jax.Array  # [layers, batch, n_text_ctx, state]
    self_v: jax.Array
    cross_k: jax.Array  # [layers, batch, n_audio_ctx, state]
    cross_v: jax.Array


def layer_norm(x: jax.Array, p: dict, eps: float = 1e-5) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def linear(x: jax.Array, p: dict) -> jax.Array:
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def mlp(x: jax.Array, p: dict) -> jax.Array:
    return linear(jax.nn.gelu(linear(x, p["mlp1"]), approximate=False), p["mlp2"])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, n_head: int, mask: jax.Array | None) -> jax.Array:
    """q [B, S, D], k/v [B, T, D], mask broadcastable to [B, 1, S, T] (True = attend)."""
    b, s, d = q.shape
    t = k.shape[1]
    dh = d // n_head
    q = q.reshape(b, s, n_head, dh)
    k = k.reshape(b, t, n_head, dh)
    v = v.reshape(b, t, n_head, dh)
    scores = jnp.einsum("bshd,bthd->bhst", q, k).astype(jnp.float32) * (dh**-0.5)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bthd->bshd", weights, v).reshape(b, s, d)


def conv1d(x: jax.Array, p: dict, stride: int) -> jax.Array:
    """x [B, T, C_in], kernel [3, C_in, C_out], 'same' padding of 1 as in Whisper."""
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], window_strides=(stride,), padding=((1, 1),), dimension_numbers=("NWC", "WIO", "NWC")
    )
    return y + p["bias"]


def encode(params: Params, mel: jax.Array, dims: ModelDimensions) -> jax.Array:
    """mel [B, n_mels, 3000] -> audio features [B, n_audio_ctx, state]."""
    p = params["encoder"]
    dtype = p["positional_embedding"].dtype
    x = jnp.transpose(mel, (0, 2, 1)).astype(dtype)
    x = jax.nn.gelu(conv1d(x, p["conv1"], 1), approximate=False)
    x = jax.nn.gelu(conv1d(x, p["conv2"], 2), approximate=False)
    x = x + p["positional_embedding"]

    def block(x, bp):
        h = layer_norm(x, bp["attn_ln"])
        a = bp["attn"]
        x = x + linear(attention(linear(h, a["query"]), linear(h, a["key"]), linear(h, a["value"]), dims.n_audio_head, None), a["out"])
        x = x + mlp(layer_norm(x, bp["mlp_ln"]), bp)
        return x, None

    x, _ = jax.lax.scan(block, x, p["blocks"])
    return layer_norm(x, p["ln_post"])


def cross_kv(params: Params, audio_features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention keys and values of every decoder layer: two [layers, B, n_audio_ctx, state]."""
    ca = params["decoder"]["blocks"]["cross_attn"]

    def per_layer(_, a):
        return None, (linear(audio_features, a["key"]), linear(audio_features, a["value"]))

    _, (k, v) = jax.lax.scan(per_layer, None, ca)
    return k, v


def empty_self_cache(dims: ModelDimensions, batch: int, dtype) -> tuple[jax.Array, jax.Array]:
    shape = (dims.n_text_layer, batch, dims.n_text_ctx, dims.n_text_state)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def decode(
    params: Params,
    tokens: jax.Array,
    start: jax.Array,
    cache: KVCache,
    logit_index: jax.Array,
    dims: ModelDimensions,
) -> tuple[jax.Array, KVCache]:
    """Run the decoder on `tokens` [B, S] placed at positions start[b] .. start[b]+S-1.

    Writes their keys/values into the cache and returns float32 logits [B, N, vocab] of the
    positions `logit_index` [B, N] (indices into S), so only the needed rows meet the vocabulary.
    """
    p = params["decoder"]
    b, s = tokens.shape
    positions = start[:, None] + jnp.arange(s)[None, :]  # [B, S]
    x = p["token_embedding"][tokens] + p["positional_embedding"][jnp.clip(positions, 0, dims.n_text_ctx - 1)]
    key_pos = jnp.arange(cache.self_k.shape[2])
    causal = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, S, T]
    rows = jnp.arange(b)[:, None]

    def block(carry, layer):
        x, sk, sv = carry
        bp, i, ck, cv = layer
        h = layer_norm(x, bp["attn_ln"])
        a = bp["attn"]
        q, k, v = linear(h, a["query"]), linear(h, a["key"]), linear(h, a["value"])
        # Positions past the cache (a full context) are dropped; their logits are never used.
        sk = sk.at[i, rows, positions].set(k, mode="drop")
        sv = sv.at[i, rows, positions].set(v, mode="drop")
        x = x + linear(attention(q, sk[i], sv[i], dims.n_text_head, causal), a["out"])
        h = layer_norm(x, bp["cross_attn_ln"])
        c = bp["cross_attn"]
        x = x + linear(attention(linear(h, c["query"]), ck, cv, dims.n_text_head, None), c["out"])
        x = x + mlp(layer_norm(x, bp["mlp_ln"]), bp)
        return (x, sk, sv), None

    layers = (p["blocks"], jnp.arange(dims.n_text_layer), cache.cross_k, cache.cross_v)
    (x, sk, sv), _ = jax.lax.scan(block, (x, cache.self_k, cache.self_v), layers)
    x = jnp.take_along_axis(x, logit_index[:, :, None], axis=1)
    x = layer_norm(x, p["ln"])
    logits = (x @ p["token_embedding"].T).astype(jnp.float32)
    return logits, KVCache(sk, sv, cache.cross_k, cache.cross_v)
