"""The scheduler's encoder thread: windows are encoded while others decode, and a window the
encoder fails on fails its own jobs only. On CPU, the encoder and the decoder on lanes of
their own cores."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future

import jax
import numpy as np
import pytest

from compile_events import PROGRAMS, compiles
from service.engine.lanes import SWITCH, cpu_lanes, split_cores
from service.engine.programs import Programs
from service.engine.rules import RowOptions, Vocabulary
from service.engine.scheduler import DecodeJob, DecodeScheduler, Window, _row_key


def endless(engine, n_slots: int, **layout) -> Programs:
    """The engine's programs at `n_slots`, with a vocabulary that never ends a sequence early."""
    tok = engine.tokenizer
    vocab = Vocabulary.of(tok, engine.dims.n_vocab)
    suppress = vocab.suppress.copy()
    suppress[tok.eot] = True
    return Programs(engine.programs.params, engine.dims, vocab._replace(suppress=suppress), n_slots,
                    list(tok.language_tokens.values()), **layout)


def english(tok) -> list[int]:
    return [tok.sot, tok.language_tokens["en"], tok.transcribe, tok.no_timestamps]


@pytest.fixture(scope="module")
def one_slot(tiny_engine):
    """A scheduler with a single batch slot whose vocabulary never ends a sequence early."""
    scheduler = DecodeScheduler(endless(tiny_engine, 1), tiny_engine.tokenizer)
    yield scheduler, english(tiny_engine.tokenizer)
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


def test_calls_given_up_while_queued_end_and_the_scheduler_serves_on(tiny_engine):
    """A caller that gives up sets its cancel event and cancels its futures. Its queued jobs end
    without being decoded, and their windows are not encoded. A cancelled language detection is
    dropped. The batch decoding meanwhile and the calls after it are served."""
    tok = tiny_engine.tokenizer
    prefix = english(tok)
    n_mels = tiny_engine.dims.n_mels
    scheduler = DecodeScheduler(endless(tiny_engine, 1), tok)
    try:
        shared = Window(noise(n_mels, 60))
        assert len(scheduler.submit(DecodeJob(shared, prefix, 0, timestamps=False, sample_len=2)).result(
            timeout=120).tokens) == 2
        assert shared.mel is None and shared.features is not None  # the log-mel is let go once encoded
        busy = scheduler.submit(DecodeJob(Window(noise(n_mels, 61)), prefix, 0, timestamps=False, sample_len=60))
        detection = scheduler.detect_language(Window(noise(n_mels, 62)))
        assert detection.cancel()
        gave_up = threading.Event()
        gave_up.set()
        on_shared = scheduler.submit(DecodeJob(shared, prefix, 0, timestamps=False, cancel=gave_up))
        assert on_shared.cancel()  # its window is encoded already: it reaches the batch's queue
        never_encoded = [Window(noise(n_mels, 63 + i)) for i in range(2)]
        later = [scheduler.submit(DecodeJob(w, prefix, 0, timestamps=False, cancel=gave_up)) for w in never_encoded]
        after = scheduler.submit(DecodeJob(Window(noise(n_mels, 65)), prefix, 0, timestamps=False, sample_len=3))
        assert len(after.result(timeout=120).tokens) == 3
        assert len(busy.result(timeout=120).tokens) == 60
        for f in later:
            with pytest.raises(CancelledError):
                f.result(timeout=120)
        assert on_shared.cancelled() and detection.cancelled()
        assert all(w.features is None and w.mel is not None for w in never_encoded)
    finally:
        scheduler.close()


def test_a_fault_in_the_bookkeeping_fails_the_calls_it_holds_and_the_scheduler_serves_on(tiny_engine):
    tok = tiny_engine.tokenizer
    n_mels = tiny_engine.dims.n_mels
    scheduler = DecodeScheduler(endless(tiny_engine, 1), tok)
    faults = [RuntimeError("a fault in the bookkeeping")]
    take_jobs = scheduler._take_jobs

    def faulty_take_jobs():
        if faults and scheduler._jobs and scheduler._jobs[0].window.encoded:
            raise faults.pop()
        return take_jobs()

    scheduler._take_jobs = faulty_take_jobs
    try:
        failed = scheduler.submit(DecodeJob(Window(noise(n_mels, 66)), english(tok), 0, timestamps=False))
        with pytest.raises(RuntimeError, match="a fault in the bookkeeping"):
            failed.result(timeout=120)
        served = scheduler.submit(DecodeJob(Window(noise(n_mels, 67)), english(tok), 0, timestamps=False,
                                            sample_len=3))
        assert len(served.result(timeout=120).tokens) == 3
    finally:
        scheduler.close()


def test_a_device_error_while_the_decoder_encodes_leaves_the_queued_windows_to_be_encoded(tiny_engine, monkeypatch):
    """With CPU lanes, the decode thread encodes a window itself while the encoder is busy, after
    deciding on its queued step. When that decision fails (a device error surfaces there), the
    window it had taken goes back to the encoder's queue, and its job is decoded."""
    monkeypatch.setenv(SWITCH, "on")
    tok = tiny_engine.tokenizer
    n_mels = tiny_engine.dims.n_mels
    taken: list[list[Window]] = []
    failed: list[bool] = []
    next_work, settle, encode = DecodeScheduler._next_work, DecodeScheduler._settle, DecodeScheduler._encode

    # Patched on the class: the scheduler's threads are waiting in these methods as soon as it exists.
    def watched_next_work(self):
        work = next_work(self)
        if work is not None and work[1] and not taken:
            taken.append(work[1])
            return (True, *work[1:])  # decide on a step first, which fails
        return work

    def failing_settle(self):
        if taken and not failed:
            failed.append(True)
            raise RuntimeError("a device error")
        settle(self)

    def slow_encoder(self, chunk, device, by_encoder=False):  # the encoder stays busy while the decoder helps
        if by_encoder:
            time.sleep(1.0)
        encode(self, chunk, device, by_encoder)

    monkeypatch.setattr(DecodeScheduler, "_next_work", watched_next_work)
    monkeypatch.setattr(DecodeScheduler, "_settle", failing_settle)
    monkeypatch.setattr(DecodeScheduler, "_encode", slow_encoder)
    scheduler = DecodeScheduler(endless(tiny_engine, 2), tok)
    try:
        assert scheduler.programs.lanes is not None
        with scheduler._cv:  # all three queued at once: the encoder takes the first, the decoder the second
            jobs = [scheduler.submit(DecodeJob(Window(noise(n_mels, 68 + i)), english(tok), 0, timestamps=False,
                                               sample_len=3)) for i in range(3)]
        assert [len(job.result(timeout=60).tokens) for job in jobs] == [3, 3, 3]
        assert taken and failed, "the decode thread never encoded a window itself"
    finally:
        scheduler.close()


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


def test_the_next_step_is_queued_before_the_host_hands_out_a_token(tiny_engine):
    """A row fed by its own pick needs no host round trip: when the host hands out token i, the
    step that computes token i + 1 is already queued; and no step is queued past the last token."""
    programs = endless(tiny_engine, 1)
    queued = [0]
    step = programs.step

    def counting_step(*args, **kwargs):
        queued[0] += 1
        return step(*args, **kwargs)

    programs.step = counting_step
    scheduler = DecodeScheduler(programs, tiny_engine.tokenizer)
    seen: list[int] = []
    try:
        job = DecodeJob(Window(noise(tiny_engine.dims.n_mels, 40)), english(tiny_engine.tokenizer), 0,
                        timestamps=False, sample_len=12, on_token=lambda _token: seen.append(queued[0]))
        assert len(scheduler.submit(job).result(timeout=300).tokens) == 12
    finally:
        scheduler.close()
    # Token 0 comes from the admission; token i from step i, handed out once step i + 1 is
    # queued, except the last, after which no step is queued (it would be wasted).
    assert seen == [0] + [i + 1 for i in range(1, 11)] + [11]
    assert queued[0] == 11


def test_windows_through_few_slots_with_steps_queued_ahead_decode_as_alone(tiny_engine):
    """Six windows of different lengths through two slots: each end frees a slot while the next
    step is already queued; a window is admitted into it only once that step is decided on."""
    tok = tiny_engine.tokenizer
    scheduler = DecodeScheduler(endless(tiny_engine, 2), tok)

    def jobs() -> list[DecodeJob]:
        return [DecodeJob(Window(noise(tiny_engine.dims.n_mels, 50 + s)), english(tok), 0, timestamps=False,
                          sample_len=3 + 5 * s) for s in (2, 0, 5, 1, 4, 3)]

    try:
        alone = [scheduler.submit(job).result(timeout=300).tokens for job in jobs()]
        together = [scheduler.submit(job) for job in jobs()]
        assert [f.result(timeout=300).tokens for f in together] == alone
    finally:
        scheduler.close()
    assert [len(t) for t in alone] == [13, 3, 28, 8, 23, 18]


def test_an_encoded_window_queued_behind_does_not_hold_the_encoder_back(tiny_engine, monkeypatch):
    """One slot on one pool of threads: A decodes; B waits to be encoded, and behind it F, whose
    window is encoded already (as a fallback attempt's is). B must still be encoded and decoded,
    and F after it."""
    monkeypatch.setenv(SWITCH, "off")
    scheduler = DecodeScheduler(endless(tiny_engine, 1), tiny_engine.tokenizer)
    prefix = english(tiny_engine.tokenizer)
    n_mels = tiny_engine.dims.n_mels
    try:
        encoded = Window(noise(n_mels, 30))
        scheduler.submit(DecodeJob(encoded, prefix, 0, timestamps=False, sample_len=2)).result(timeout=300)
        first = Window(noise(n_mels, 31))
        a = scheduler.submit(DecodeJob(first, prefix, 0, timestamps=False, sample_len=40))
        deadline = time.monotonic() + 60
        while not first.encoded:  # so that B is not encoded together with it
            assert time.monotonic() < deadline
            time.sleep(0.001)
        b = scheduler.submit(DecodeJob(Window(noise(n_mels, 32)), prefix, 0, timestamps=False, sample_len=2))
        f = scheduler.submit(DecodeJob(encoded, prefix, 0, timestamps=False, sample_len=2))
        assert len(a.result(timeout=300).tokens) == 40
        assert len(b.result(timeout=60).tokens) == 2 and len(f.result(timeout=60).tokens) == 2
    finally:
        scheduler.close()


def test_lanes_give_the_decoder_a_quarter_of_the_cores_and_at_least_one():
    assert split_cores({0, 1}) == ({1}, {0})
    assert split_cores(set(range(8))) == (set(range(2, 8)), {0, 1})
    assert split_cores({4, 5, 6}) == ({5, 6}, {4})


def test_the_lanes_switch_takes_on_or_off(monkeypatch):
    monkeypatch.setenv(SWITCH, "of")
    with pytest.raises(ValueError, match=r"DRAGOMAN_CPU_LANES='of' is not one of on, off"):
        cpu_lanes()
    monkeypatch.setenv(SWITCH, "off")
    assert cpu_lanes() is None


lanes_only = pytest.mark.skipif(cpu_lanes() is None, reason="CPU lanes need a CPU backend and at least two cores")


@lanes_only
def test_lanes_decode_the_same_tokens_as_one_pool(tiny_engine, monkeypatch):
    """Greedy, beam and sampled jobs, batched together, give the same tokens whether the
    encoder and the decoder run on cores of their own or share every core."""
    tok = tiny_engine.tokenizer
    prefix = [tok.sot, tok.language_tokens["en"], tok.transcribe]
    n_mels = tiny_engine.dims.n_mels

    def decode_all(programs: Programs) -> list[list[int]]:
        scheduler = DecodeScheduler(programs, tok)
        try:
            jobs = [DecodeJob(Window(noise(n_mels, 20)), prefix, 2, sample_len=30),
                    DecodeJob(Window(noise(n_mels, 21)), prefix, 2, sample_len=30, beam_size=3),
                    DecodeJob(Window(noise(n_mels, 22)), prefix, 2, temperature=0.8, key=(7, 1), sample_len=30)]
            return [scheduler.submit(j).result(timeout=300).tokens for j in jobs]
        finally:
            scheduler.close()

    args = (tiny_engine.programs.params, tiny_engine.dims, tiny_engine.programs.vocab, 6,
            list(tok.language_tokens.values()))
    with_lanes = Programs(*args)
    monkeypatch.setenv(SWITCH, "off")
    one_pool = Programs(*args)
    assert with_lanes.lanes is not None and one_pool.lanes is None
    assert decode_all(with_lanes) == decode_all(one_pool)


def test_the_accelerators_layout_decodes_as_the_cpus(tiny_engine):
    """Windows encoded together, their attention all heads at once in chunks of queries (how an
    accelerator runs the encoder), decode to the tokens that the CPU's layout, one window and
    one head at a time, gives each window."""
    tok = tiny_engine.tokenizer
    n_mels = tiny_engine.dims.n_mels

    def decode_all(programs: Programs) -> tuple[list[list[int]], list[int]]:
        sizes: list[int] = []  # windows of each encoder call
        submitted = threading.Event()
        encode = programs.encode

        def gated_encode(mel, device=None):
            submitted.wait()  # the first call waits until every window is queued: the rest go together
            sizes.append(mel.shape[0])
            return encode(mel, device)

        programs.encode = gated_encode
        scheduler = DecodeScheduler(programs, tok)
        try:
            futures = [scheduler.submit(DecodeJob(Window(noise(n_mels, 80 + i)), english(tok)[:-1], 0,
                                                  timestamps=True, sample_len=12)) for i in range(4)]
            submitted.set()
            return [f.result(timeout=300).tokens for f in futures], sizes
        finally:
            scheduler.close()

    accelerator, together = decode_all(endless(tiny_engine, 4, accelerator=True))
    cpu, alone = decode_all(endless(tiny_engine, 4, accelerator=False))
    assert accelerator == cpu and all(len(t) == 12 for t in cpu)
    assert max(together) > 1 and set(alone) == {1}


def recording(programs: Programs) -> list:
    """The devices `programs` encodes on from now on, in order."""
    devices: list = []
    encode = programs.encode

    def recording_encode(mel, device=None):
        devices.append(device)
        return encode(mel, device)

    programs.encode = recording_encode
    return devices


@lanes_only
def test_with_lanes_an_idle_batch_has_its_window_encoded_on_every_core(tiny_engine):
    tok = tiny_engine.tokenizer
    programs = Programs(tiny_engine.programs.params, tiny_engine.dims, tiny_engine.programs.vocab, 2,
                        list(tok.language_tokens.values()))
    devices = recording(programs)
    scheduler = DecodeScheduler(programs, tok)
    prefix = english(tok)
    try:
        job = DecodeJob(Window(noise(tiny_engine.dims.n_mels, 29)), prefix, 0, timestamps=False, sample_len=3)
        assert len(scheduler.submit(job).result(timeout=300).tokens) == 3
    finally:
        scheduler.close()
    assert devices == [programs.lanes.wide]


def devices_encoding_two_windows_beside_one(tiny_engine, n_slots: int, seed: int) -> tuple[list, Programs]:
    """The devices the windows are encoded on, in order, when two windows arrive together while
    a first one decodes, at `n_slots` slots."""
    tok = tiny_engine.tokenizer
    programs = endless(tiny_engine, n_slots)  # the first window decodes all its tokens
    programs.warmup(tok.sot, tok.is_multilingual)
    devices = recording(programs)
    scheduler = DecodeScheduler(programs, tok)
    prefix = english(tok)
    n_mels = tiny_engine.dims.n_mels
    decoding = threading.Event()
    try:
        first = scheduler.submit(DecodeJob(Window(noise(n_mels, seed)), prefix, 0, timestamps=False, sample_len=100,
                                           on_token=lambda _token: decoding.set()))
        assert decoding.wait(300)
        with scheduler._cv:  # both windows are waiting before either thread looks
            futures = [scheduler.submit(DecodeJob(Window(noise(n_mels, seed + 1 + i)), prefix, 0, timestamps=False,
                                                  sample_len=3)) for i in range(2)]
        assert all(len(f.result(timeout=300).tokens) == 3 for f in futures)
        assert len(first.result(timeout=300).tokens) == 100
    finally:
        scheduler.close()
    return devices, programs


@lanes_only
def test_with_lanes_windows_read_ahead_of_a_full_batch_are_encoded_on_every_core(tiny_engine):
    """Windows queued behind a full batch are encoded on every core, shared with the decoder's
    steps, not on the encoder's share of the cores (the decoder, with no free slot to fill,
    encodes nothing)."""
    devices, programs = devices_encoding_two_windows_beside_one(tiny_engine, 1, seed=40)
    assert devices == [programs.lanes.wide] * 3


@lanes_only
def test_with_lanes_the_decoder_encodes_rather_than_wait(tiny_engine):
    """While a window decodes, two more arrive for the free slots: the encoder takes one on its
    own cores, and the decoder, which would otherwise wait for it, encodes the other on its own."""
    devices, programs = devices_encoding_two_windows_beside_one(tiny_engine, 3, seed=30)
    lanes = programs.lanes
    assert devices[0] is lanes.wide  # nothing was decoding yet
    assert sorted(map(id, devices[1:])) == sorted(map(id, [lanes.encode, lanes.decode]))


def test_a_step_computes_only_the_blocks_that_hold_live_slots(tiny_engine):
    """Eight slots in blocks of 1, 3 and 4 rows, filled lowest first: a lone window's steps are
    given one block, five windows' steps all three, fewer as the windows in the last slots
    end; and every window decodes as it does alone."""
    tok = tiny_engine.tokenizer
    programs = endless(tiny_engine, 8)
    assert programs.blocks == (1, 3, 4)
    given: list[int] = []
    step = programs._step

    def recording_step(params, cross, moving, *args, **kwargs):
        given.append(len(moving[0][0]))  # the blocks of the first layer's self-attention cache
        return step(params, cross, moving, *args, **kwargs)

    programs._step = recording_step
    scheduler = DecodeScheduler(programs, tok)

    def jobs() -> list[DecodeJob]:
        return [DecodeJob(Window(noise(tiny_engine.dims.n_mels, 60 + i)), english(tok), 0, timestamps=False,
                          sample_len=n) for i, n in enumerate((12, 9, 7, 5, 3))]

    try:
        alone = []
        for job in jobs():
            given.clear()
            alone.append(scheduler.submit(job).result(timeout=300).tokens)
            assert set(given) == {1}
        given.clear()
        with scheduler._cv:  # admitted together, into slots 0 to 4
            together = [scheduler.submit(job) for job in jobs()]
        assert [f.result(timeout=300).tokens for f in together] == alone
    finally:
        scheduler.close()
    assert given == sorted(given, reverse=True) and set(given) == {1, 2, 3}


def test_a_row_left_alone_past_the_first_block_moves_into_it(tiny_engine):
    """Five windows in slots 0 to 4 (blocks of 1, 3 and 4 rows); the first four end after three
    tokens: the fifth moves into slot 0, and its steps are given one block from then on. It
    decodes as it does alone: its caches, state and options (a seeded sample with a repetition
    penalty) moved with it."""
    tok = tiny_engine.tokenizer
    programs = endless(tiny_engine, 8)
    given: list[int] = []
    moves: list = []
    step, move = programs._step, programs.move

    def recording_step(params, cross, moving, *args, **kwargs):
        given.append(len(moving[0][0]))
        return step(params, cross, moving, *args, **kwargs)

    def recording_move(slots, pairs, device=None):
        moves.append(list(pairs))
        return move(slots, pairs, device)

    programs._step, programs.move = recording_step, recording_move
    scheduler = DecodeScheduler(programs, tok)

    def jobs() -> list[DecodeJob]:
        short = [DecodeJob(Window(noise(tiny_engine.dims.n_mels, 90 + i)), english(tok), 0, timestamps=False,
                           sample_len=3) for i in range(4)]
        return short + [DecodeJob(Window(noise(tiny_engine.dims.n_mels, 94)), english(tok), 0, temperature=0.7,
                                  key=(3, 4), repetition_penalty=1.5, timestamps=False, sample_len=16)]

    try:
        alone = [scheduler.submit(job).result(timeout=300) for job in jobs()]
        assert moves == []
        given.clear()
        with scheduler._cv:  # admitted together, into slots 0 to 4
            together = [scheduler.submit(job) for job in jobs()]
        together = [f.result(timeout=300) for f in together]
    finally:
        scheduler.close()
    assert moves == [[(4, 0)]]
    assert given[0] == 3 and given[-12:] == [1] * 12
    assert [t.tokens for t in together] == [a.tokens for a in alone]
    assert together[4].sum_logprob == pytest.approx(alone[4].sum_logprob, abs=1e-4)


@pytest.mark.parametrize("group", [1, 2])
def test_windows_admitted_a_group_at_a_time_fill_the_slots_as_all_at_once(tiny_engine, group):
    """An admission computes its windows' caches a few at a time (at most `group_windows`
    windows and `group_bytes` of cross-attention keys and values), not the whole batch's beside
    the slots. Three windows (rows of eight, one a slot: five of padding), with copies of the
    first and the third into further slots, admitted in groups of one or two, leave the slots
    with the caches, row state, options and first tokens that all at once leaves; and language
    detection in groups gives the same probabilities."""
    tok, d = tiny_engine.tokenizer, tiny_engine.dims
    whole, grouped = endless(tiny_engine, 8), endless(tiny_engine, 8)
    per_window = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state * np.dtype(whole.dtype).itemsize
    whole.group_windows = grouped.group_windows = 8  # before their programs are first traced
    grouped.group_bytes = group * per_window
    assert (whole._group(), grouped._group()) == (8, group)
    features = whole.encode(np.stack([noise(d.n_mels, 120 + i) for i in range(3)]))
    prefixes = [english(tok), english(tok)[:-1], [tok.sot_prev, 300, 301] + english(tok)]
    options = RowOptions(np.array([0.0, 0.8, 0.5], np.float32), np.array([False, True, True]), np.full(3, -1, np.int32),
                         np.array([1.0, 1.0, 1.3], np.float32), np.arange(6, dtype=np.uint32).reshape(3, 2),
                         np.zeros(3, np.float32), np.zeros(3, np.int32), np.ones(3, np.float32))
    copy_options = RowOptions(*(np.asarray(o)[[0, 2]] for o in options))._replace(
        key=np.array([[9, 9], [8, 8]], np.uint32))
    out = [p.admit(p.empty_slots(), features, prefixes, [0, 0, 3], [1, 4, 6], options, tok.no_speech,
                   copies=[(0, 0), (2, 7)], copy_options=copy_options) for p in (whole, grouped)]
    (slots, choice, no_speech), (g_slots, g_choice, g_no_speech) = out
    for a, b in zip(jax.tree.leaves(slots), jax.tree.leaves(g_slots)):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, atol=1e-5)
        else:
            np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(g_choice.tokens, choice.tokens)
    np.testing.assert_allclose(g_choice.logprobs, choice.logprobs, atol=1e-5)
    np.testing.assert_allclose(g_no_speech, no_speech, atol=1e-6)
    # The copies hold their rows' caches; the slots no window went into stay empty.
    cross = np.concatenate([np.asarray(b) for b in g_slots.cache.cross_k[0]])  # [slots, heads, frames, dim]
    np.testing.assert_array_equal(cross[0], cross[1])
    np.testing.assert_array_equal(cross[7], cross[6])
    assert not cross[[2, 3, 5]].any() and all(cross[i].any() for i in (0, 1, 4, 6, 7))
    np.testing.assert_allclose(grouped.detect_language(features, tok.sot), whole.detect_language(features, tok.sot),
                               atol=1e-6)


def test_best_of_samples_share_one_admission_and_each_draws_as_alone(tiny_engine):
    """A best-of job is admitted as one row (its window's caches computed once) copied into its
    other slots, and each sample draws what a lone sample with its key draws: the result is the
    likeliest of those."""
    tok = tiny_engine.tokenizer
    programs = endless(tiny_engine, 4)
    admitted: list[tuple[int, int]] = []  # (rows computed, copies) of each admission
    admit = programs.admit

    def recording_admit(slots, features, prefixes, sot_index, slot_ids, options, no_speech, device=None, copies=(),
                        copy_options=None):
        admitted.append((len(features), len(copies)))
        return admit(slots, features, prefixes, sot_index, slot_ids, options, no_speech, device, copies, copy_options)

    programs.admit = recording_admit
    scheduler = DecodeScheduler(programs, tok)
    window = Window(noise(tiny_engine.dims.n_mels, 80))
    job = lambda **kw: DecodeJob(window, english(tok), 0, temperature=1.0, timestamps=False, sample_len=6, **kw)  # noqa: E731
    try:
        best = scheduler.submit(job(key=(7, 11), best_of=3)).result(timeout=300)
        assert admitted == [(1, 2)]
        alone = [scheduler.submit(job(key=_row_key((7, 11), r))).result(timeout=300) for r in range(3)]
    finally:
        scheduler.close()
    assert len({tuple(a.tokens) for a in alone}) == 3  # the samples differ: each drew with its own key
    likeliest = max(alone, key=lambda a: a.sum_logprob)  # all of one length (no end of text)
    assert best.tokens == likeliest.tokens
    assert best.sum_logprob == pytest.approx(likeliest.sum_logprob, abs=1e-4)


@pytest.mark.parametrize("lanes", ["on", "off"])
def test_serving_after_the_warm_up_compiles_nothing(tiny_engine, monkeypatch, lanes):
    """Every program a scheduler runs (language detection, admissions, steps fed by the host and
    queued ones, over any number of blocks, a move into a lower slot, a beam search's
    reordering) was compiled by the warm-up, which compiles without running: no request waits
    on the compiler (nor on the disk cache of compiled programs)."""
    monkeypatch.setenv(SWITCH, lanes)
    tok = tiny_engine.tokenizer
    programs = endless(tiny_engine, 3)
    with compiles() as compiled:
        programs.warmup(tok.sot, tok.is_multilingual)
        warmed_up = set(compiled)
        compiled.clear()
        moves = []
        move = programs.move
        programs.move = lambda slots, pairs, device=None: moves.append(pairs) or move(slots, pairs, device)
        scheduler = DecodeScheduler(programs, tok)
        n_mels = tiny_engine.dims.n_mels
        try:
            assert scheduler.detect_language(Window(noise(n_mels, 70))).result(timeout=300).shape == (
                len(tok.language_tokens),)
            first = scheduler.submit(DecodeJob(Window(noise(n_mels, 71)), english(tok), 0, timestamps=False,
                                               sample_len=30))
            rest = [scheduler.submit(DecodeJob(Window(noise(n_mels, 72 + i)), english(tok), 0, timestamps=False,
                                               sample_len=5 + 20 * i)) for i in range(3)]
            assert [len(f.result(timeout=300).tokens) for f in [first, *rest]] == [30, 5, 25, 45]
            beams = scheduler.submit(DecodeJob(Window(noise(n_mels, 75)), english(tok), 0, timestamps=False,
                                               sample_len=12, beam_size=3))
            assert len(beams.result(timeout=300).tokens) == 12
        finally:
            scheduler.close()
        serving = list(compiled)
        jax.jit(lambda x: x + 1)(np.zeros(3))  # the listener hears compiles
    assert moves  # the last window outlives the first's slot 0
    assert warmed_up >= PROGRAMS
    assert not serving, serving  # not even the glue between the programs
    assert compiled[len(serving):] == ["jit(<lambda>)"]


def test_a_short_call_is_not_queued_behind_a_long_file(tiny_engine, monkeypatch):
    """Calls take turns in the batch: a short call that comes while a long file's windows wait
    for slots has its language detected and its window decoded next to them, not after them.
    The long file's run reads far ahead here (as several long calls together would queue)."""
    from audio_signals import speechlike
    from service.engine import TranscribeOptions

    monkeypatch.setattr(tiny_engine, "read_ahead", 64)

    once = dict(temperatures=(0.0,), max_new_tokens=64)  # a batch of the long file takes a while
    long_done: list[float] = []
    long_call = threading.Thread(target=tiny_engine.transcribe, args=(speechlike(40 * 30.0, seed=5),),
                                 kwargs=dict(options=TranscribeOptions(language="en", **once),
                                             on_progress=long_done.append))
    long_call.start()
    try:
        deadline = time.monotonic() + 120
        while tiny_engine.scheduler.queued < 30:  # the long file's windows wait for the batch's 8 slots
            assert time.monotonic() < deadline and long_call.is_alive()
            time.sleep(0.01)
        short = tiny_engine.transcribe(speechlike(5.0, seed=6), TranscribeOptions(**once))  # language detected
        done_then = len(long_done)
    finally:
        long_call.join(300)
    assert short.segments and len(long_done) >= 38
    # Taking turns, the short call is in the second batch (16 of the long file's windows admitted
    # by then at most); queued behind the long file, in the fifth (at least 32).
    assert done_then <= 24, done_then


class Call:
    """A job's owner: anything weakly referable, one per call."""


def test_callers_take_turns_and_a_retry_continues_its_call(one_slot, tiny_engine):
    """The queue's order: a caller's first window goes after one turn of the caller ahead of it,
    not after all its queued windows; callers with windows waiting alternate; and a retry at a
    higher temperature goes ahead of fresh windows."""
    scheduler, prefix = one_slot
    n_mels = tiny_engine.dims.n_mels

    a, b = Call(), Call()
    finished: list[str] = []

    def job(name: str, owner: Call, seed: int, **kw) -> None:
        j = DecodeJob(Window(noise(n_mels, seed)), prefix, 0, timestamps=False, owner=owner, **{"sample_len": 2, **kw})
        scheduler.submit(j).add_done_callback(lambda _: finished.append(name))

    job("a0", a, 30, sample_len=100)
    deadline = time.monotonic() + 120
    while scheduler.busy_slots == 0:  # a0 holds the only slot while the others queue
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for name, owner, seed in [("a1", a, 31), ("a2", a, 32), ("a3", a, 33), ("b0", b, 34), ("b1", b, 35)]:
        job(name, owner, seed)
    job("a0 again", a, 30, attempt=1)
    deadline = time.monotonic() + 120
    while len(finished) < 7:
        assert time.monotonic() < deadline, finished
        time.sleep(0.01)
    assert finished == ["a0", "a0 again", "a1", "b0", "a2", "b1", "a3"]


def test_calls_coming_while_a_long_file_waits_do_not_widen_the_read_ahead(tiny_engine):
    """With the accelerator's layout the encoder takes several windows at once; as calls come and
    go ahead of a long file's queued windows, it still encodes only the windows the batch takes
    next: one batch ahead, and one more for each call that has come since."""
    scheduler = DecodeScheduler(endless(tiny_engine, 4, accelerator=True), tiny_engine.tokenizer)
    prefix = english(tiny_engine.tokenizer)
    n_mels = tiny_engine.dims.n_mels

    jobs: list[DecodeJob] = []
    ahead: list[int] = []  # windows encoded and waiting for a slot, at each token

    def on_token(_token: int) -> None:
        ahead.append(sum(j.window.features is not None for j in jobs if not (j.future.running() or j.future.done())))

    def submit(owner: Call, seed: int) -> Future:
        jobs.append(DecodeJob(Window(noise(n_mels, seed)), prefix, 0, timestamps=False, sample_len=30,
                              owner=owner, on_token=on_token))
        return scheduler.submit(jobs[-1])

    try:
        long_file = Call()
        futures = [submit(long_file, 100 + i) for i in range(16)]
        for i in range(4):  # a call comes while the long file's first windows decode
            deadline = time.monotonic() + 120
            while len(ahead) < 40 * (i + 1):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            futures.append(submit(Call(), 200 + i))
        assert all(len(f.result(timeout=300).tokens) == 30 for f in futures)
    finally:
        scheduler.close()
    assert max(ahead) <= 4 + 4, max(ahead)
