"""The decoding rules equal openai-whisper's logit filters (suppress blank, suppress tokens,
timestamp rules with the maximum initial timestamp) on random logits after random histories."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from whisper.decoding import ApplyTimestampRules, SuppressBlank, SuppressTokens
from whisper.tokenizer import get_tokenizer

from random_models import tokenizer_dir
from service.engine.rules import RowOptions, RowState, Vocabulary, apply_rules, commit_tokens, restrict_samples
from service.engine.tokenizer import WhisperTokenizer

N_VOCAB = 51865
ROWS = 64


@pytest.fixture(scope="module")
def tokenizers(model_root):
    ours = WhisperTokenizer.from_directory(tokenizer_dir(N_VOCAB, str(model_root)), N_VOCAB)
    return ours, get_tokenizer(multilingual=True, language="en", task="transcribe")


def histories(rng: np.random.Generator, tok: WhisperTokenizer) -> list[list[int]]:
    """Sampled tokens of ROWS rows: none, text, timestamps, pairs, a timestamp then text, and
    so on; a space and end-of-text among the text, as they are what blank suppression is about."""
    out = []
    for i in range(ROWS):
        seq = []
        for _ in range(i % 7):
            kind = rng.integers(4)
            if kind == 0:
                seq.append(int(tok.timestamp_begin + rng.integers(0, 1501)))
            elif kind == 1 and seq and seq[-1] >= tok.timestamp_begin:
                seq.append(seq[-1])  # a pair
            else:
                seq.append(int(rng.choice([220, int(rng.integers(0, tok.eot))])))
        out.append(seq)
    return out


def random_logits(rng: np.random.Generator, tok: WhisperTokenizer) -> np.ndarray:
    logits = rng.standard_normal((ROWS, N_VOCAB)).astype(np.float32) * 3
    logits[::3, tok.timestamp_begin:] += 4  # timestamps' total beats every text token in some rows
    logits[1::4, 220] = 30  # a lone space on top, and end-of-text in others
    logits[2::4, tok.eot] = 30
    return logits


@pytest.mark.parametrize("timestamps,max_initial", [(True, 50), (True, -1), (False, -1)])
def test_rules_equal_openai_whisper_logit_filters(tokenizers, timestamps, max_initial):
    ours, ref_tok = tokenizers
    rng = np.random.default_rng(7 + max_initial)
    vocab = Vocabulary.of(ours, N_VOCAB)
    sequences = histories(rng, ours)
    logits = random_logits(rng, ours)

    state = RowState(last_token=jnp.full(ROWS, -1, jnp.int32), prev_token=jnp.full(ROWS, -1, jnp.int32),
                     last_timestamp=jnp.full(ROWS, -1, jnp.int32), n_sampled=jnp.zeros(ROWS, jnp.int32),
                     seen=jnp.zeros((ROWS, N_VOCAB), bool))
    live = np.zeros(ROWS, bool)
    for step in range(max(map(len, sequences))):
        tokens = np.array([s[step] if step < len(s) else 0 for s in sequences], np.int32)
        moved = commit_tokens(state, jnp.asarray(tokens), vocab)
        live = np.array([step < len(s) for s in sequences])
        state = RowState(*(jnp.where(live.reshape(-1, *[1] * (a.ndim - 1)), a, b) for a, b in zip(moved, state)))
    options = RowOptions(temperature=jnp.zeros(ROWS), timestamps=jnp.full(ROWS, timestamps),
                         max_initial_timestamp=jnp.full(ROWS, max_initial, jnp.int32),
                         repetition_penalty=jnp.ones(ROWS), key=jnp.zeros((ROWS, 2), jnp.uint32),
                         min_p=jnp.zeros(ROWS), top_k=jnp.zeros(ROWS, jnp.int32), top_p=jnp.ones(ROWS))
    got = np.asarray(apply_rules(jnp.asarray(logits), state, options, vocab))

    prefix = list(ref_tok.sot_sequence)
    if not timestamps:
        prefix.append(ref_tok.no_timestamps)
    filters = [SuppressBlank(ref_tok, len(prefix)), SuppressTokens(ours.suppress_tokens)]
    if timestamps:
        filters.append(ApplyTimestampRules(ref_tok, len(prefix), max_initial if max_initial >= 0 else None))
    blanked = 0
    for row, seq in enumerate(sequences):
        want = torch.from_numpy(logits[row:row + 1].copy())
        history = torch.tensor([prefix + seq])
        for f in filters:
            f.apply(want, history)
        want = want[0].numpy()
        np.testing.assert_array_equal(np.isneginf(got[row]), np.isneginf(want), err_msg=f"row {row}: {seq}")
        np.testing.assert_array_equal(got[row][np.isfinite(want)], want[np.isfinite(want)])
        blanked += not seq and logits[row].argmax() in (220, ours.eot)
    assert blanked, "some rows start with a blank on top"


def allowed_as_vllm(logits: np.ndarray, min_p: float, top_k: int, top_p: float) -> set[int]:
    """The tokens vLLM's sampler may draw, written out plainly: min_p on the probabilities, then
    the k likeliest (ties kept), then the fewest likeliest of those, renormalised, whose
    probabilities reach top_p."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    keep = (p > 0) & (p >= min_p * p.max())
    if top_k:
        keep &= logits >= np.sort(logits[keep])[::-1][min(top_k, keep.sum()) - 1]
    if top_p < 1:
        q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
        order = np.argsort(-q, kind="stable")
        before = np.cumsum(q[order]) - q[order]
        keep &= q >= q[order][before < top_p].min()
    return set(np.flatnonzero(keep).tolist())


def test_sampling_filters_keep_the_tokens_vllm_keeps():
    rng = np.random.default_rng(7)
    cases = [(0.0, 0, 1.0), (0.0, 1, 1.0), (0.0, 5, 1.0), (0.0, 0, 0.5), (0.0, 0, 0.9), (0.2, 0, 1.0),
             (0.05, 40, 0.8), (0.0, 3, 0.95), (1.0, 0, 1.0), (0.0, 0, 1e-6), (0.0, 100000, 1.0)]
    logits = rng.standard_normal((len(cases), 500)).astype(np.float32) * 3
    logits[[1, -2], 20:23] = logits.max() + 1  # ties at the top: top_k=1 and a tiny top_p keep all three
    logits[:, 100:150] = -np.inf  # suppressed tokens stay suppressed
    min_p, top_k, top_p = (np.array(c, dtype) for c, dtype in zip(zip(*cases), (np.float32, np.int32, np.float32)))
    opts = RowOptions(*([jnp.zeros(len(cases))] * 5), min_p=jnp.asarray(min_p), top_k=jnp.asarray(top_k),
                      top_p=jnp.asarray(top_p))
    got = np.asarray(restrict_samples(jnp.asarray(logits), opts))
    for row, case in enumerate(cases):
        kept = set(np.flatnonzero(np.isfinite(got[row])).tolist())
        assert kept == allowed_as_vllm(logits[row], *case), case
        np.testing.assert_array_equal(got[row][sorted(kept)], logits[row][sorted(kept)])  # not rescaled
    sizes = [len(allowed_as_vllm(logits[r], *c)) for r, c in enumerate(cases)]
    assert sizes[0] == 450 and sizes[1] == 3 and sizes[8] == 1 and sizes[-2] == 3 and sizes[-1] == 450, sizes
    assert all(1 < n < 450 for n in sizes[2:8]), sizes  # each filter, and their mix, removes some
