"""The scheduler's encoder thread: windows are encoded while others decode, and a window the
encoder fails on fails its own jobs only."""
from __future__ import annotations


import numpy as np
import pytest

from service.engine.programs import Programs
from service.engine.rules import Vocabulary
from service.engine.scheduler import DecodeJob, DecodeScheduler, Window


@pytest.fixture(scope="module")
def one_slot(tiny_engine):
    """A scheduler with a single batch slot whose vocabulary never ends a sequence early."""
    tok = tiny_engine.tokenizer
    vocab = Vocabulary.of(tok, tiny_engine.dims.n_vocab)
    suppress = vocab.suppress.copy()
    suppress[tok.eot] = True
    programs = Programs(tiny_engine.programs.params, tiny_engine.dims, vocab._replace(suppress=suppress), 1,
                        list(tok.language_tokens.values()))
    scheduler = DecodeScheduler(programs, tok)
    yield scheduler, [tok.sot, tok.language_tokens["en"], tok.transcribe, tok.no_timestamps]
    scheduler.close()


def noise(n_mels: int, seed: int, frames: int = 3000) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_mels, frames)).astype(np.float32)


def test_the_next_window_is_encoded_while_the_batch_decodes(one_slot, tiny_engine):
    scheduler, prefix = one_slot
    n_mels = tiny_engine.dims.n_mels
    warm = DecodeJob(Window(noise(n_mels, 0)), prefix, 0, timestamps=False, sample_len=2)
    scheduler.submit(warm).result()  # compiles the programs
    waiting = Window(noise(n_mels, 2))
    seen_while_decoding: list[bool] = []

    def on_token(_token: int) -> None:
        seen_while_decoding.append(waiting.features is not None)

    first = DecodeJob(Window(noise(n_mels, 1)), prefix, 0, timestamps=False, sample_len=200, on_token=on_token)
    scheduler.submit(first)
    second = scheduler.submit(DecodeJob(waiting, prefix, 0, timestamps=False, sample_len=4))
    assert len(first.future.result(timeout=300).tokens) == 200
    assert len(second.result(timeout=300).tokens) == 4
    # The only slot was busy with the first window throughout, yet the second was encoded.
    assert seen_while_decoding[-1]


def test_a_window_the_encoder_fails_on_fails_its_job_only(one_slot, tiny_engine):
    scheduler, prefix = one_slot
    n_mels = tiny_engine.dims.n_mels
    bad = scheduler.submit(DecodeJob(Window(noise(n_mels, 3, frames=100)), prefix, 0, timestamps=False))
    good = scheduler.submit(DecodeJob(Window(noise(n_mels, 4)), prefix, 0, timestamps=False, sample_len=3))
    with pytest.raises(ValueError, match="Incompatible shapes"):
        bad.result(timeout=300)
    assert len(good.result(timeout=300).tokens) == 3


def test_the_encoder_reads_at_most_one_batch_ahead(one_slot, tiny_engine):
    scheduler, prefix = one_slot
    n_mels = tiny_engine.dims.n_mels
    waiting = [Window(noise(n_mels, 10 + i)) for i in range(4)]
    encoded_while_decoding: list[int] = []

    def on_token(_token: int) -> None:
        encoded_while_decoding.append(sum(w.features is not None for w in waiting))

    first = DecodeJob(Window(noise(n_mels, 5)), prefix, 0, timestamps=False, sample_len=200, on_token=on_token)
    scheduler.submit(first)
    later = [scheduler.submit(DecodeJob(w, prefix, 0, timestamps=False, sample_len=2)) for w in waiting]
    assert len(first.future.result(timeout=300).tokens) == 200
    assert all(len(f.result(timeout=300).tokens) == 2 for f in later)
    # One batch (a single slot here) of windows was encoded ahead, not the whole queue.
    assert encoded_while_decoding[-1] == 1
