"""The Whisper network as pure JAX functions over an explicit parameter tree.

Parameters follow openai-whisper's names; linear kernels are stored as [in, out], and so is the
token embedding, which the decoder's output projection reads whole at every step (the input
lookup takes a few of its columns): on CPU (jaxlib 0.10, base, 2 cores) that product takes
3.2 ms for one row against 4.0 ms with the embedding as [vocab, state], though 7.3 against
6.4 ms for 8 rows; a lone window's steps are the ones a caller waits on. The encoder's
blocks are stacked (leading axis = layer) and run by one `lax.scan`: its layers are compute-bound,
and a scan keeps programs small. The decoder's blocks are a list, unrolled: a decode step is
memory-bound, and slicing one layer out of a stacked array (weights or caches) costs a copy of
it at every step, while separate buffers are read in place.

The decoder keeps a preallocated self-attention cache of `n_text_ctx` positions per row; each
call writes its new keys/values at the row's own positions, so rows of one batch can be at
different lengths (continuous batching). Cross-attention keys/values are computed once per
window by `cross_kv` and reused at every step. Caches are head-major ([B, H, T, Dh]), the
layout attention's batched matmuls read without transposing, and each layer's cache is a tuple
of blocks of rows (the batch is their rows in order): a call given the first blocks of a batch
reads only theirs, so a step for few live rows does not pay for reading every row's cache.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .dims import ModelDimensions

Params = dict
Blocks = tuple  # blocks of rows of one layer's cache, each [rows, heads, positions, head_dim]
Layers = tuple  # one entry per decoder layer


class KVCache(NamedTuple):
    self_k: Layers  # of Blocks, each [rows, heads, n_text_ctx, head_dim]
    self_v: Layers
    cross_k: Layers  # of Blocks, each [rows, heads, n_audio_ctx, head_dim]
    cross_v: Layers


def split_rows(x: jax.Array, sizes: list[int]) -> list[jax.Array]:
    """The rows of x, cut into consecutive blocks of `sizes` rows."""
    return [x] if len(sizes) == 1 else jnp.split(x, list(np.cumsum(sizes)[:-1]))


def join_rows(blocks: list[jax.Array]) -> jax.Array:
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks)


def layer_norm(x: jax.Array, p: dict, eps: float = 1e-5) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w as float32, whatever the operands' type. For bfloat16 operands on CPU, XLA then
    takes the bfloat16 dot instructions where the CPU has them (AVX512-BF16, AMX): on Zen 4 a
    large product runs at twice float32's rate, where asking for a bfloat16 result runs slower
    than float32 (the encoder of base on 2 Zen 4 cores: 0.53 s a window in bfloat16 -> 0.31 s;
    0.48 s in float32). A single row takes a second one (see `two_rows`)."""
    if not single_bf16_row_on_cpu(int(np.prod(x.shape[:-1])), x.dtype):
        return jnp.matmul(x, w, preferred_element_type=jnp.float32)
    y = jnp.matmul(two_rows(x.reshape(1, -1), 0), w, preferred_element_type=jnp.float32)
    return y[:1].reshape(*x.shape[:-1], w.shape[-1])


def single_bf16_row_on_cpu(rows: int, dtype) -> bool:
    return rows == 1 and dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


def two_rows(x: jax.Array, axis: int) -> jax.Array:
    """x, one row long on `axis`, with a row of zeros after it. XLA's CPU backend has no
    bfloat16 kernel for a product with a single row: it converts the whole other operand to
    float32 at every call (a decode step's weights and cross-attention caches). Two rows take
    the bfloat16 kernel (base on 2 Zen 4 cores, the vocabulary projection of one row: 34 ms ->
    3.7 ms). Callers keep the first row of the result."""
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=axis)


def linear(x: jax.Array, p: dict) -> jax.Array:
    y = product(x, p["kernel"])
    return (y + p["bias"] if "bias" in p else y).astype(x.dtype)


def mlp(x: jax.Array, p: dict) -> jax.Array:
    return linear(jax.nn.gelu(linear(x, p["mlp1"]), approximate=False), p["mlp2"])


def split_heads(x: jax.Array, n_head: int) -> jax.Array:
    """[B, S, D] -> [B, H, S, D/H]: the layout batched attention matmuls read without copies."""
    b, s, d = x.shape
    return x.reshape(b, s, n_head, d // n_head).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    b, h, s, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * dh)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """q [B, H, S, Dh], k/v [B, H, T, Dh], mask broadcastable to [B, H, S, T] (True = attend)."""
    return attention_with_scores(q, k, v, mask)[0]


def attention_with_scores(q, k, v, mask=None) -> tuple[jax.Array, jax.Array]:
    """Attention, and its float32 scores before the softmax (what word alignment reads).

    The queries are scaled, not the scores: [S, Dh] numbers instead of [S, T] (on CPU, scaling
    the scores was 3% of the encoder's time), and with Whisper's head size of 64 the scale is
    1/8, so the scores are exactly the same. The softmax is normalised after the product with
    the values: the division then touches [S, Dh] numbers instead of [S, T] (the encoder's
    attention is a fifth faster on CPU)."""
    single = single_bf16_row_on_cpu(q.shape[2], q.dtype)  # one query: take a second (see `two_rows`)
    if single:
        q = two_rows(q, 2)
    scores = jnp.einsum("bhsd,bhtd->bhst", q * (q.shape[-1] ** -0.5), k, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, -jnp.inf)
    top = scores.max(-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    out = jnp.einsum("bhst,bhtd->bhsd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = (out / weights.sum(-1, keepdims=True)).astype(v.dtype)
    return (out[:, :, :1], scores[:, :, :1]) if single else (out, scores)


class Chunks(NamedTuple):
    """How the encoder's attention is cut: `heads` heads and `queries` queries at a time (None:
    all), so that one chunk's scores stay in cache (or, on an accelerator, memory stays small)."""
    heads: int | None = None
    queries: int | None = 500


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunks: Chunks = Chunks()) -> jax.Array:
    """Unmasked attention, one chunk of heads and queries at a time (`lax.map`, in sequence)."""
    b, h, s, dh = q.shape
    heads = chunks.heads if chunks.heads and h % chunks.heads == 0 else h
    queries = chunks.queries if chunks.queries and s % chunks.queries == 0 else s

    def head_group(args):
        qg, kg, vg = args  # [b, heads, s, dh], [b, heads, t, dh]
        blocks = qg.reshape(b, heads, s // queries, queries, dh).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda qb: attention(qb, kg, vg), blocks)
        return out.transpose(1, 2, 0, 3, 4).reshape(b, heads, s, dh)

    def groups(x):  # [b, h, n, dh] -> [h // heads, b, heads, n, dh]
        return x.reshape(b, h // heads, heads, *x.shape[2:]).transpose(1, 0, 2, 3, 4)

    out = jax.lax.map(head_group, (groups(q), groups(k), groups(v)))
    return out.transpose(1, 0, 2, 3, 4).reshape(b, h, s, dh)


def conv1d(x: jax.Array, p: dict, stride: int) -> jax.Array:
    """x [B, T, C_in], kernel [3, C_in, C_out], 'same' padding of 1 as in Whisper."""
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], window_strides=(stride,), padding=((1, 1),), dimension_numbers=("NWC", "WIO", "NWC"),
        preferred_element_type=jnp.float32)
    return (y + p["bias"]).astype(x.dtype)


def encode(params: Params, mel: jax.Array, dims: ModelDimensions, chunks: Chunks = Chunks()) -> jax.Array:
    """mel [B, n_mels, 3000] -> audio features [B, n_audio_ctx, state]; `chunks`: how attention is cut."""
    p = params["encoder"]
    dtype = p["positional_embedding"].dtype
    x = jnp.transpose(mel, (0, 2, 1)).astype(dtype)
    x = jax.nn.gelu(conv1d(x, p["conv1"], 1), approximate=False)
    x = jax.nn.gelu(conv1d(x, p["conv2"], 2), approximate=False)
    x = x + p["positional_embedding"]

    def block(x, bp):
        h = layer_norm(x, bp["attn_ln"])
        a = bp["attn"]
        q, k, v = (split_heads(linear(h, a[n]), dims.n_audio_head) for n in ("query", "key", "value"))
        x = x + linear(merge_heads(chunked_attention(q, k, v, chunks)), a["out"])
        x = x + mlp(layer_norm(x, bp["mlp_ln"]), bp)
        return x, None

    x, _ = jax.lax.scan(block, x, p["blocks"])
    return layer_norm(x, p["ln_post"])


def cross_kv(params: Params, audio_features: jax.Array, dims: ModelDimensions) -> tuple[Layers, Layers]:
    """Cross-attention keys and values of every decoder layer, each one block [B, heads, n_audio_ctx, head_dim]."""
    keys, values = [], []
    for bp in params["decoder"]["blocks"]:
        a = bp["cross_attn"]
        keys.append((split_heads(linear(audio_features, a["key"]), dims.n_text_head),))
        values.append((split_heads(linear(audio_features, a["value"]), dims.n_text_head),))
    return tuple(keys), tuple(values)


def empty_self_cache(dims: ModelDimensions, blocks: int | tuple[int, ...], dtype,
                     length: int | None = None) -> tuple[Layers, Layers]:
    """Zeroed self-attention caches of every layer, in blocks of `blocks` rows (an int: one block)."""
    sizes = (blocks,) if isinstance(blocks, int) else blocks
    shape = (dims.n_text_head, length or dims.n_text_ctx, dims.n_text_state // dims.n_text_head)
    zeros = lambda: tuple(tuple(jnp.zeros((n, *shape), dtype) for n in sizes) for _ in range(dims.n_text_layer))  # noqa: E731
    return zeros(), zeros()


def decode(
    params: Params,
    tokens: jax.Array,
    start: jax.Array,
    cache: KVCache,
    logit_index: jax.Array,
    dims: ModelDimensions,
    cross_scores: list | None = None,
    kv_len: int | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the decoder on `tokens` [B, S] placed at positions start[b] .. start[b]+S-1.

    Returns float32 logits [B, N, vocab] of the positions `logit_index` [B, N] (indices into S),
    so only the needed rows meet the vocabulary, and the cache with the new keys/values written
    in: each layer writes them into its own (donated) cache buffers, in place, then attends to
    every position up to each query's own. The cache's blocks hold the B rows between them;
    attention runs block by block, everything else on all rows at once. A list given as
    `cross_scores` receives each layer's cross-attention scores [B, H, S, n_audio_ctx]. With
    `kv_len`, self-attention reads only the first kv_len cache positions (every row's keys must
    lie within them): a short sequence then does not pay for reading the whole context at every
    step.
    """
    p = params["decoder"]
    b, s = tokens.shape
    positions = start[:, None] + jnp.arange(s)[None, :]  # [B, S]
    embedding = p["token_embedding"]["kernel"]  # [state, vocab]
    x = jnp.moveaxis(jnp.take(embedding, tokens, axis=1), 0, -1)
    x = x + p["positional_embedding"][jnp.clip(positions, 0, dims.n_text_ctx - 1)]
    sizes = [blk.shape[0] for blk in cache.self_k[0]]
    kv_len = kv_len or cache.self_k[0][0].shape[2]
    visible = jnp.arange(kv_len)[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, S, kv_len]
    heads = jnp.arange(dims.n_text_head)[None, :, None]
    at = positions[:, None, :]
    by_block = lambda x: split_rows(x, sizes)  # noqa: E731
    self_k, self_v = [], []
    for bp, sks, svs, cks, cvs in zip(p["blocks"], cache.self_k, cache.self_v, cache.cross_k, cache.cross_v):
        h = layer_norm(x, bp["attn_ln"])
        a = bp["attn"]
        q, k, v = (split_heads(linear(h, a[n]), dims.n_text_head) for n in ("query", "key", "value"))
        outs, layer_k, layer_v = [], [], []
        for qb, kb, vb, sk, sv, seen, where in zip(*map(by_block, (q, k, v)), sks, svs, by_block(visible), by_block(at)):
            rows = jnp.arange(qb.shape[0])[:, None, None]
            # Write first, then read: the donated buffer is then updated in place, not copied.
            # Positions past the context (a full cache) are dropped; their logits are never used.
            sk = sk.at[rows, heads, where].set(kb, mode="drop")
            sv = sv.at[rows, heads, where].set(vb, mode="drop")
            layer_k.append(sk)
            layer_v.append(sv)
            outs.append(attention(qb, sk[:, :, :kv_len], sv[:, :, :kv_len], seen))
        self_k.append(tuple(layer_k))
        self_v.append(tuple(layer_v))
        x = x + linear(merge_heads(join_rows(outs)), a["out"])
        h = layer_norm(x, bp["cross_attn_ln"])
        c = bp["cross_attn"]
        q = split_heads(linear(h, c["query"]), dims.n_text_head)
        outs, scores = zip(*(attention_with_scores(qb, ck, cv) for qb, ck, cv in zip(by_block(q), cks, cvs)))
        if cross_scores is not None:
            cross_scores.append(join_rows(list(scores)))
        x = x + linear(merge_heads(join_rows(list(outs))), c["out"])
        x = x + mlp(layer_norm(x, bp["mlp_ln"]), bp)
    x = jnp.take_along_axis(x, logit_index[:, :, None], axis=1)
    x = layer_norm(x, p["ln"])
    logits = product(x, embedding)
    return logits, KVCache(tuple(self_k), tuple(self_v), cache.cross_k, cache.cross_v)
