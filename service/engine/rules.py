"""Logit rules and token selection, as pure functions of (logits, per-row state) over a batch.

Each rule mirrors one of openai-whisper's logit filters (`SuppressBlank`, `SuppressTokens`,
`ApplyTimestampRules`), vectorised over rows so that they compile into the decode step.
Rows carry their own options (temperature, timestamps, penalty, sampling filters), so windows of
different requests share one batch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .tokenizer import WhisperTokenizer

NEG_INF = -jnp.inf


class Vocabulary(NamedTuple):
    """The token ids and masks the rules need; arrays so that they are traced, not baked in."""
    eot: jax.Array
    no_timestamps: jax.Array
    timestamp_begin: jax.Array
    suppress: jax.Array  # [vocab] bool: never sampled
    blank: jax.Array  # [vocab] bool: not sampled first

    @classmethod
    def of(cls, tokenizer: WhisperTokenizer, n_vocab: int) -> "Vocabulary":
        def mask(ids: list[int]) -> np.ndarray:
            m = np.zeros(n_vocab, bool)
            m[[i for i in ids if i < n_vocab]] = True
            return m

        return cls(np.int32(tokenizer.eot), np.int32(tokenizer.no_timestamps), np.int32(tokenizer.timestamp_begin),
                   mask(tokenizer.suppress_tokens), mask(tokenizer.blank_suppress))


class RowOptions(NamedTuple):
    """Per-row decoding options, each [batch]."""
    temperature: jax.Array  # float32; 0 = greedy
    timestamps: jax.Array  # bool: apply the timestamp rules
    max_initial_timestamp: jax.Array  # int32 index; < 0 = unbounded
    repetition_penalty: jax.Array  # float32; 1 = off
    key: jax.Array  # uint32 [batch, 2]: the row's sampling key
    # Which tokens a sample may take (vLLM's sampling parameters, applied in its order):
    min_p: jax.Array  # float32: at least this times the likeliest token's probability; 0 = off
    top_k: jax.Array  # int32: among the k likeliest; 0 = off
    top_p: jax.Array  # float32: among the fewest likeliest whose probabilities sum to this; 1 = off

    @classmethod
    def off(cls, rows: int) -> "RowOptions":
        """Options of `rows` rows with every rule and filter off (greedy, no timestamps), on the
        host: those of empty batch slots, of an admission's pairs that write nowhere, and the
        stand-ins the warm-up compiles with."""
        return cls(np.zeros(rows, np.float32), np.zeros(rows, bool), np.full(rows, -1, np.int32),
                   np.ones(rows, np.float32), np.zeros((rows, 2), np.uint32),
                   np.zeros(rows, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32))


class RowState(NamedTuple):
    """What the rules need of each row's history, each [batch] unless noted."""
    last_token: jax.Array  # the token fed at this step
    prev_token: jax.Array  # the sampled token before it, or -1
    last_timestamp: jax.Array  # the last sampled timestamp token, or -1
    n_sampled: jax.Array  # tokens sampled so far
    seen: jax.Array  # [batch, vocab] bool: tokens in the sequence (repetition penalty)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """Tokens already in the sequence lose likelihood: positive logits divided, negative multiplied.
    Kept finite: a tiny penalty (1e-40) would take them past the float's range, to inf and NaN."""
    p = penalty[:, None]
    big = jnp.finfo(logits.dtype).max
    return jnp.where(seen, jnp.clip(jnp.where(logits > 0, logits / p, logits * p), -big, big), logits)


def suppress_blank(logits: jax.Array, state: RowState, vocab: Vocabulary) -> jax.Array:
    first = (state.n_sampled == 0)[:, None]
    return jnp.where(first & vocab.blank[None], NEG_INF, logits)


def suppress_tokens(logits: jax.Array, vocab: Vocabulary) -> jax.Array:
    return jnp.where(vocab.suppress[None], NEG_INF, logits)


def apply_timestamp_rules(logits: jax.Array, state: RowState, opts: RowOptions, vocab: Vocabulary) -> jax.Array:
    """Timestamps come in pairs (but for one before end-of-text), never decrease, open the text,
    and win whenever their total probability beats every single text token."""
    ids = jnp.arange(logits.shape[-1])[None, :]
    is_ts = ids >= vocab.timestamp_begin
    n = state.n_sampled[:, None]
    last_ts = (n >= 1) & (state.last_token[:, None] >= vocab.timestamp_begin)
    penultimate_ts = (n < 2) | (state.prev_token[:, None] >= vocab.timestamp_begin)
    ban = ids == vocab.no_timestamps
    ban |= last_ts & penultimate_ts & is_ts
    ban |= last_ts & ~penultimate_ts & (ids < vocab.eot)
    seen_ts = state.last_timestamp[:, None] >= 0
    floor = jnp.where(last_ts & ~penultimate_ts, state.last_timestamp[:, None], state.last_timestamp[:, None] + 1)
    ban |= seen_ts & is_ts & (ids < floor)
    first = n == 0
    ban |= first & ~is_ts
    max_init = opts.max_initial_timestamp[:, None]
    ban |= first & (max_init >= 0) & (ids > vocab.timestamp_begin + max_init)
    logits = jnp.where(opts.timestamps[:, None] & ban, NEG_INF, logits)

    # The reference compares log-probabilities; the logits differ from them by one constant per
    # row, so they compare the same without a second log-softmax over the vocabulary.
    ts_total = jax.nn.logsumexp(jnp.where(is_ts, logits, NEG_INF), axis=-1)
    max_text = jnp.max(jnp.where(is_ts, NEG_INF, logits), axis=-1)
    force_ts = opts.timestamps & (ts_total > max_text)
    return jnp.where(force_ts[:, None] & ~is_ts, NEG_INF, logits)


def apply_rules(logits: jax.Array, state: RowState, opts: RowOptions, vocab: Vocabulary) -> jax.Array:
    """Every rule, in openai-whisper's order. A rule no row of the batch uses is skipped at run
    time (each is a few passes over the vocabulary: a sizeable part of a small batch's step)."""
    logits = jax.lax.cond(jnp.any(opts.repetition_penalty != 1), apply_repetition_penalty, lambda x, *_: x,
                          logits, state.seen, opts.repetition_penalty)
    logits = suppress_blank(logits, state, vocab)
    logits = suppress_tokens(logits, vocab)
    return jax.lax.cond(jnp.any(opts.timestamps), apply_timestamp_rules, lambda x, *_: x, logits, state, opts, vocab)


TOP_K = 11  # candidates handed out per row: enough for beam search of up to 10 beams


def first_argmax(x: jax.Array, top: jax.Array | None = None) -> jax.Array:
    """jnp.argmax over the last axis (the first index of the maximum `top`), as two plain
    reductions: XLA's CPU backend runs the paired value-and-index reduction of argmax 5-10x slower."""
    top = x.max(-1, keepdims=True) if top is None else top
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, ids, x.shape[-1] - 1), axis=-1)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (-inf lowest), for bisection over the values."""
    i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    i = jnp.where(i < 0, i ^ 0x7FFFFFFF, i)  # negative floats: the larger the magnitude, the lower
    return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _highest_key_where(keys: jax.Array, holds) -> jax.Array:
    """Per row, the highest key t with holds(t) (monotone: true for low t, false above some
    point; true at the row's lowest key), by bisection over the 2^32 keys: 32 passes over the
    vocabulary, a fraction of the cost of sorting it (on CPU: 10 ms a row)."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        ok = holds(mid[:, None])[:, 0]
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (keys.min(-1), keys.max(-1)))
    return lo[:, None]


def restrict_samples(scaled: jax.Array, opts: RowOptions) -> jax.Array:
    """Temperature-scaled logits with the tokens a sample may not take at -inf, as vLLM filters
    them: min_p, then top_k, then top_p over what top_k left (its probabilities renormalised):
    the fewest likeliest tokens whose probabilities reach top_p. Ties with the last token kept
    are kept too. top_k's and top_p's searches run only when some row asks for them."""
    top = scaled.max(-1, keepdims=True)
    scaled = jnp.where(scaled >= top + jnp.log(opts.min_p)[:, None], scaled, NEG_INF)  # log(0) = -inf: all

    keys = _ordered_keys(scaled)
    lowest = jnp.zeros((scaled.shape[0], 1), jnp.uint32)  # keeps every token

    def kth(_):
        k = jnp.where(opts.top_k > 0, opts.top_k, scaled.shape[-1])[:, None]
        return _highest_key_where(keys, lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) >= k)

    least = jax.lax.cond(jnp.any(opts.top_k > 0), kth, lambda _: lowest, None)

    def nucleus(_):
        weights = jnp.where(keys >= least, jnp.exp(scaled - top), 0.0)
        need = opts.top_p[:, None] * weights.sum(-1, keepdims=True)
        cut = _highest_key_where(keys, lambda t: jnp.where(keys >= t, weights, 0.0).sum(-1, keepdims=True) >= need)
        return jnp.where(opts.top_p[:, None] < 1, jnp.maximum(least, cut), least)  # 1 is off, whatever the rounding

    least = jax.lax.cond(jnp.any(opts.top_p < 1), nucleus, lambda _: least, None)
    return jnp.where(keys >= least, scaled, NEG_INF)


def choose_tokens(logits: jax.Array, state: RowState, opts: RowOptions, vocab: Vocabulary,
                  candidates: jax.Array | bool = True):
    """Apply the rules and pick each row's next token: argmax, or a seeded sample when its
    temperature is above 0. Returns (tokens, their logprobs, top-k logprobs, top-k tokens);
    the top k are what beam search chooses from, computed only when `candidates` is true
    (zeros otherwise: the search over the vocabulary costs as much as the rules)."""
    logits = apply_rules(logits, state, opts, vocab)
    # Log-probabilities through their normaliser: the chosen tokens need one number per row, not a
    # second array over the vocabulary.
    top = logits.max(-1, keepdims=True)
    log_norm = top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))

    def sample(_):
        keys = jax.vmap(jax.random.fold_in)(opts.key, state.n_sampled)
        temperature = jnp.maximum(opts.temperature, 1e-6)[:, None]
        # Kept finite as the penalty keeps them: a logit near the float's maximum, divided by a
        # temperature below 1, would be inf, and the filters' thresholds NaN.
        scaled = jnp.minimum(logits / temperature, jnp.finfo(logits.dtype).max)
        return jax.vmap(jax.random.categorical)(keys, restrict_samples(scaled, opts)).astype(jnp.int32)

    # Drawing the noise costs a sixth of a CPU step: only when some row samples.
    sampled = jax.lax.cond(jnp.any(opts.temperature > 0), sample,
                           lambda _: jnp.zeros(logits.shape[0], jnp.int32), None)
    tokens = jnp.where(opts.temperature > 0, sampled, first_argmax(logits, top)).astype(jnp.int32)
    chosen = (jnp.take_along_axis(logits, tokens[:, None], axis=-1) - log_norm)[:, 0]

    def top_candidates(_):
        values, ids = jax.lax.top_k(logits, TOP_K)
        return values - log_norm, ids.astype(jnp.int32)

    def none(_):
        return jnp.zeros((logits.shape[0], TOP_K), logits.dtype), jnp.zeros((logits.shape[0], TOP_K), jnp.int32)

    top_logprobs, top_tokens = jax.lax.cond(jnp.asarray(candidates), top_candidates, none, None)
    return tokens, chosen, top_logprobs, top_tokens


def commit_tokens(state: RowState, tokens: jax.Array, vocab: Vocabulary) -> RowState:
    """The row state once `tokens` (one per row) are appended to the sequences."""
    rows = jnp.arange(tokens.shape[0])
    return RowState(
        last_token=tokens,
        prev_token=jnp.where(state.n_sampled >= 1, state.last_token, -1),
        last_timestamp=jnp.where(tokens >= vocab.timestamp_begin, tokens, state.last_timestamp),
        n_sampled=state.n_sampled + 1,
        seen=state.seen.at[rows, tokens].set(True),
    )
