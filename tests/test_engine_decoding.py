"""Decoding behaviour of the engine: seeds, batching, limits, fallback, cancellation, long form."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest
import torch
import whisper

from audio_signals import speechlike
from service.engine import TranscribeOptions
from service.engine.alignment import align_words


def mel(engine, seed: int) -> np.ndarray:
    audio = whisper.pad_or_trim(torch.from_numpy(speechlike(20.0, seed=seed)))
    return whisper.log_mel_spectrogram(audio, engine.dims.n_mels).numpy()


def test_seeded_sampling_is_reproducible(tiny_engine):
    m = mel(tiny_engine, 1)
    opts = TranscribeOptions(language="en", temperatures=(1.0,), seed=7)
    a, _ = tiny_engine.decode(m, opts)
    b, _ = tiny_engine.decode(m, opts)
    c, _ = tiny_engine.decode(m, TranscribeOptions(language="en", temperatures=(1.0,), seed=8))
    greedy, _ = tiny_engine.decode(m, TranscribeOptions(language="en", temperatures=(0.0,)))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.tokens != greedy.tokens


def test_sampling_filters_narrow_what_a_sample_may_take(tiny_engine):
    m = mel(tiny_engine, 1)
    greedy, _ = tiny_engine.decode(m, TranscribeOptions(language="en", temperatures=(0.0,)))
    sampling = lambda **kw: TranscribeOptions(language="en", temperatures=(1.0,), seed=7, **kw)  # noqa: E731
    # Filters that leave only the likeliest token sample what greedy decoding takes.
    for narrowest in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(top_k=50, top_p=1e-6)):
        assert tiny_engine.decode(m, sampling(**narrowest))[0].tokens == greedy.tokens, narrowest
    free, _ = tiny_engine.decode(m, sampling())
    top3, _ = tiny_engine.decode(m, sampling(top_k=3))
    assert tiny_engine.decode(m, sampling(top_k=3))[0].tokens == top3.tokens  # seeded
    assert len({tuple(greedy.tokens), tuple(free.tokens), tuple(top3.tokens)}) == 3
    # Filters that keep every token change nothing.
    assert tiny_engine.decode(m, sampling(top_k=10**9, top_p=1.0, min_p=0.0))[0].tokens == free.tokens


def test_a_window_decodes_the_same_alone_and_in_a_batch_of_8(tiny_engine, monkeypatch):
    live_rows = []  # windows in the batch at each step
    step = tiny_engine.programs.step

    def counted_step(*args, **kwargs):
        live_rows.append(sum(group is not None for group in tiny_engine.scheduler._groups))
        return step(*args, **kwargs)

    monkeypatch.setattr(tiny_engine.programs, "step", counted_step)
    mels = [mel(tiny_engine, s) for s in range(8)]
    opts = TranscribeOptions(language="en", temperatures=(0.0,))
    alone = [tiny_engine.decode(m, opts)[0].tokens for m in mels]
    assert max(live_rows) == 1
    live_rows.clear()
    barrier = threading.Barrier(8)

    def together(m):
        barrier.wait()
        return tiny_engine.decode(m, opts)[0].tokens

    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(together, mels))
    assert max(live_rows) == 8
    assert batched == alone


def test_steps_that_read_only_the_live_part_of_the_context_choose_the_same_tokens(tiny_engine):
    # Rows of one batch at different lengths (prompts of several sizes), each crossing the
    # 64 and 128 context buckets: the step reads the cache up to the longest live row only.
    words = "the quick brown fox jumps over the lazy dog and then some more words follow"
    jobs = [(mel(tiny_engine, s), TranscribeOptions(language="en", temperatures=(0.0,), timestamps=False,
                                                    prompt=" ".join(words.split()[: 2 * s]) or None))
            for s in range(8)]

    def decode_all():
        barrier = threading.Barrier(len(jobs))

        def one(job):
            barrier.wait()
            result = tiny_engine.decode(*job)[0]
            return result.tokens, result.avg_logprob

        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(one, jobs))

    programs = tiny_engine.programs
    assert programs.kv_sizes[0] < 100 < programs.kv_sizes[-1]
    bucketed = decode_all()
    full_context = programs.kv_sizes
    programs.kv_sizes = (tiny_engine.dims.n_text_ctx,)
    try:
        whole = decode_all()
    finally:
        programs.kv_sizes = full_context
    assert [tokens for tokens, _ in bucketed] == [tokens for tokens, _ in whole]
    # A key left out at any step would move the log-probabilities (not always the argmax).
    np.testing.assert_allclose([lp for _, lp in bucketed], [lp for _, lp in whole], rtol=1e-6)
    assert max(len(tokens) for tokens, _ in bucketed) > 130  # the sequences did cross the buckets


def test_max_new_tokens_bounds_each_window(tiny_engine):
    result, _ = tiny_engine.decode(mel(tiny_engine, 2), TranscribeOptions(language="en", temperatures=(0.0,),
                                                                         timestamps=False, max_new_tokens=5))
    assert len(result.tokens) == 5  # random weights never end a text: it runs to the bound


def test_usage_counts_the_prompt_and_the_tokens_of_every_attempt(tiny_engine):
    audio = speechlike(10.0)
    options = dict(language="en", timestamps=False, max_new_tokens=4)
    once = tiny_engine.transcribe(audio, TranscribeOptions(temperatures=(0.0,), **options))
    assert [len(s.tokens) for s in once.segments] == [4]  # random weights never end a text: cut at 4, no end
    # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>, then 4 tokens.
    assert (once.prompt_tokens, once.completion_tokens) == (4, 4) and once.truncated
    every = tiny_engine.transcribe(audio, TranscribeOptions(**options))  # fails the thresholds at 0, 0.2 ... 1
    assert [s.temperature for s in every.segments] == [1.0]
    assert (every.prompt_tokens, every.completion_tokens) == (6 * 4, 6 * 4)
    prompted = tiny_engine.transcribe(audio, TranscribeOptions(temperatures=(0.0,), prompt=" Ana", **options))
    assert prompted.prompt_tokens == 4 + 2  # <|startofprev|> and the prompt's one token
    # A prompt's last 223 tokens are kept: with <|startofprev|> and the 4 above, 228 of the text
    # context's 448, so the text stops at 221 (as openai-whisper), its end-of-text never produced.
    long = tiny_engine.transcribe(audio, TranscribeOptions(temperatures=(0.0,), prompt=" Ana" * 300, language="en",
                                                           timestamps=False))
    assert [len(s.tokens) for s in long.segments] == [221]
    assert (long.prompt_tokens, long.completion_tokens) == (228, 221) and long.truncated


def test_repetition_penalty_changes_the_choice_of_repeated_tokens(tiny_engine):
    m = mel(tiny_engine, 3)
    plain, _ = tiny_engine.decode(m, TranscribeOptions(language="en", temperatures=(0.0,), timestamps=False))
    penalised, _ = tiny_engine.decode(m, TranscribeOptions(language="en", temperatures=(0.0,), timestamps=False,
                                                           repetition_penalty=5.0))
    def repeats(tokens):
        return len(tokens) - len(set(tokens))
    assert penalised.tokens != plain.tokens
    assert repeats(penalised.tokens) < repeats(plain.tokens)


def test_failing_windows_fall_back_to_higher_temperatures(tiny_engine):
    # Random weights give low log-probabilities, so every window fails the -1.0 threshold.
    result = tiny_engine.transcribe(speechlike(10.0), TranscribeOptions(language="en"))
    assert {s.temperature for s in result.segments} == {1.0}
    single = tiny_engine.transcribe(speechlike(10.0), TranscribeOptions(language="en", temperatures=(0.0,)))
    assert {s.temperature for s in single.segments} == {0.0}


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_a_silent_window_is_skipped_without_falling_back(tiny_engine, mode):
    """Over the no-speech threshold with a log-probability under its threshold, a window is
    silence: it gives no segment, and is not decoded again at higher temperatures (as in
    openai-whisper), though its log-probability fails the fallback's threshold."""
    silence = dict(language="en", mode=mode, no_speech_threshold=1e-9, logprob_threshold=-1.0)
    once = tiny_engine.transcribe(speechlike(10.0), TranscribeOptions(temperatures=(0.0,), **silence))
    result = tiny_engine.transcribe(speechlike(10.0), TranscribeOptions(**silence))  # the fallback schedule
    assert once.segments == result.segments == []
    assert result.completion_tokens == once.completion_tokens > 0


def test_batched_long_form_segments_are_ordered_and_cover_the_audio(tiny_engine):
    audio = speechlike(70.0, seed=4)
    result = tiny_engine.transcribe(audio, TranscribeOptions(language="en", temperatures=(0.0,)))
    assert result.duration == pytest.approx(70.0)
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts)
    assert all(0 <= s.start <= s.end <= 70.0 + 1e-6 for s in result.segments)
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    assert {s.seek for s in result.segments} >= {0}
    assert len({s.seek for s in result.segments}) >= 3  # three windows of at most 30 s
    assert result.text == "".join(s.text for s in result.segments)


def test_audio_given_in_pieces_equals_audio_given_whole(tiny_engine):
    audio = speechlike(45.0, seed=5)
    opts = TranscribeOptions(language="en", temperatures=(0.0,))
    whole = tiny_engine.transcribe(audio, opts)
    pieces = tiny_engine.transcribe((audio[i : i + 12345] for i in range(0, len(audio), 12345)), opts)
    # Windows that join the batch at other moments share it with other rows: the same tokens,
    # and log-probabilities equal up to float rounding.
    fuzzy = ("avg_logprob", "no_speech_prob")

    def exact(r):
        return [{k: v for k, v in s.to_dict().items() if k not in fuzzy} for s in r.segments]

    assert exact(pieces) == exact(whole)
    for field in fuzzy:
        assert [getattr(s, field) for s in pieces.segments] == pytest.approx([getattr(s, field) for s in whole.segments],
                                                                             rel=1e-6)


def test_a_long_file_is_read_only_a_few_windows_ahead_of_its_decoding(tiny_engine, monkeypatch):
    """A run holds `read_ahead` windows in flight at most (cut and not yet decoded), and reads the
    audio no further ahead: an hour of it is not held as samples or features all at once."""
    monkeypatch.setattr(tiny_engine, "read_ahead", 2)
    submit = tiny_engine.scheduler.submit
    in_flight, most, done = set(), [0], [0]

    def counted(job):
        future = submit(job)
        in_flight.add(future)
        most[0] = max(most[0], len(in_flight))

        def ended(f):
            in_flight.discard(f)
            done[0] += 1
        future.add_done_callback(ended)
        return future

    monkeypatch.setattr(tiny_engine.scheduler, "submit", counted)
    piece = speechlike(30.0, seed=9)
    read_past = []  # at each piece read: seconds read beyond 30 s a decoded window

    def pieces():
        for k in range(8):
            read_past.append(30 * k - 30 * done[0])
            yield piece

    result = tiny_engine.transcribe(pieces(), TranscribeOptions(language="en", temperatures=(0.0,), max_new_tokens=8))
    assert result.duration == pytest.approx(240.0) and done[0] >= 8
    assert most[0] == 2  # windows were decoded two at a time, never more
    # Windows are at most 30 s: the two in flight, the one cut and waiting, and the piece after it.
    assert max(read_past) <= 30 * (2 + 2)


def test_the_read_ahead_bounds_windows_in_flight_and_windows_not_yet_emitted():
    """Windows final behind one still decoding (at higher temperatures) are not emitted yet: they
    free their place in flight, and the feeder reads on, but no more than twice as far."""
    from service.engine.engine import _ReadAhead

    ahead = _ReadAhead(2)

    def room_now() -> bool:  # one more window may be cut (and is counted), asked for 0.3 s
        deadline = time.monotonic() + 0.3
        return ahead.wait_for_room(lambda: time.monotonic() > deadline)

    assert room_now() and room_now() and not room_now()  # two in flight
    ahead.final()  # the second window is final; the first still decodes
    assert room_now() and not room_now()
    ahead.final()
    assert room_now() and not room_now()  # four cut and not emitted: no further
    ahead.final()  # still none emitted: the first window decodes on
    assert not room_now()
    ahead.emitted()
    assert room_now()
    assert not ahead.wait_for_room(lambda: True)  # stopped: no room taken


def test_a_run_that_fails_stops_reading_its_audio(tiny_engine):
    """When the run fails (here the caller's own callback), its window feeder, waiting to read
    further ahead, stops and lets the audio go, instead of waiting for good."""
    closed = threading.Event()

    def pieces():
        try:
            for _ in range(40):
                yield speechlike(30.0, seed=10)
        finally:
            closed.set()

    def on_segment(segment, used):
        raise RuntimeError("the caller's callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        tiny_engine.transcribe(pieces(), TranscribeOptions(language="en", temperatures=(0.0,), max_new_tokens=4),
                               on_segment=on_segment)
    assert closed.wait(10), "the feeder still holds the audio"


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_on_waiting_tells_when_the_run_waits_on_its_audio(tiny_engine, mode):
    """on_waiting: True while the run has done all it can with the audio read so far and waits for
    more; False while it has work. Batched, a complete window is work until its segments are out."""
    audio = speechlike(40.0, seed=8)
    events = []
    more = threading.Event()

    def on_waiting(waiting):
        events.append(("waiting", waiting))
        if waiting and any(kind == "segment" for kind, _ in events):
            more.set()

    def pieces():
        yield audio[: 35 * 16000]  # one complete window, and 5 s of the next
        if mode == "batched":
            assert more.wait(60), "the run never waited for more audio after the first window's segments"
        yield audio[35 * 16000 :]

    tiny_engine.transcribe(pieces(), TranscribeOptions(language="en", temperatures=(0.0,), max_new_tokens=16,
                                                       mode=mode),
                           on_segment=lambda s, _: events.append(("segment", s.end)), on_waiting=on_waiting)
    kinds = [kind if kind == "segment" else waiting for kind, waiting in events]
    if mode == "batched":  # waits for the first piece, has work, waits after the first window's segments, ...
        first_segment = kinds.index("segment")
        assert kinds[:2] == [True, False] and True not in kinds[2:first_segment]
        states = [k for k in kinds if k != "segment"]
        assert kinds[first_segment:].index(True) > 0 and states[-1] is False
    else:  # reads all the audio first (two pieces, then the end), then decodes it all
        assert kinds[:6] == [True, False] * 3 and set(kinds[6:]) == {"segment"}


def test_extreme_repetition_penalties_give_finite_results(tiny_engine):
    """The range's ends: a penalty of 1e-44 makes seen tokens' logits overflow unless kept finite,
    also once divided by a temperature below 1."""
    m = mel(tiny_engine, 4)
    for penalty in (1e-44, 10.0):
        for temperature in (0.0, 0.5):
            r, _ = tiny_engine.decode(m, TranscribeOptions(language="en", temperatures=(temperature,), seed=1,
                                                           repetition_penalty=penalty, max_new_tokens=24))
            # Finite, and not -3.4e38: a sample drawn from NaN is token 0, whatever its probability.
            assert r.tokens and -1e3 < r.avg_logprob < 0, (penalty, temperature, r.avg_logprob)


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_segments_are_handed_out_in_order_as_they_finish(tiny_engine, mode):
    """With what the run had used by each: growing, and by the last segment all of it."""
    seen, used = [], []
    result = tiny_engine.transcribe(speechlike(65.0, seed=6), TranscribeOptions(language="en", mode=mode,
                                                                                max_new_tokens=32),
                                    on_segment=lambda s, u: (seen.append(s), used.append(u)))
    assert [s.id for s in seen] == [s.id for s in result.segments]
    counts = [(u.prompt_tokens, u.completion_tokens) for u in used]
    assert counts == sorted(counts) and counts[0] < counts[-1]  # three windows, each decoded several times
    assert counts[-1] == (result.prompt_tokens, result.completion_tokens)


def test_cancelled_transcription_stops_and_the_engine_serves_on(tiny_engine):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        tiny_engine.transcribe(speechlike(65.0), TranscribeOptions(language="en"), cancel=cancel)
    # Cancelled once the first window is done, or the last (as a server cancels when its client
    # goes away, at any time): whatever is left to do by then, the call ends in CancelledError.
    for mode, at in (("batched", 0.0), ("batched", 90.0), ("sequential", 0.0), ("sequential", 90.0)):
        cancel = threading.Event()
        errors = []

        def run():
            try:
                tiny_engine.transcribe(speechlike(90.0), TranscribeOptions(language="en", mode=mode),
                                       on_progress=lambda done: done >= at and cancel.set(), cancel=cancel)
            except CancelledError as e:
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        t.join(120)
        assert not t.is_alive() and len(errors) == 1, (mode, at)
    assert tiny_engine.scheduler.queued == 0
    ok = tiny_engine.transcribe(speechlike(3.0), TranscribeOptions(language="en", temperatures=(0.0,)))
    assert ok.segments


@pytest.mark.parametrize("options, field", [
    (TranscribeOptions(temperatures=(3.0,)), "temperature"),
    (TranscribeOptions(language="xx"), "language"),
    (TranscribeOptions(task="summarise"), "task"),
    (TranscribeOptions(mode="parallel"), "mode"),
    (TranscribeOptions(max_new_tokens=0), "max_new_tokens"),
    (TranscribeOptions(repetition_penalty=0.0), "repetition_penalty"),
    (TranscribeOptions(top_k=0), "top_k"),
    (TranscribeOptions(top_p=0.0), "top_p"),
    (TranscribeOptions(min_p=1.5), "min_p"),
    (TranscribeOptions(max_initial_timestamp=1e9), "max_initial_timestamp"),
    (TranscribeOptions(max_initial_timestamp=-1.0), "max_initial_timestamp"),
])
def test_bad_options_name_the_field(tiny_engine, options, field):
    with pytest.raises(ValueError, match=field):
        tiny_engine.transcribe(speechlike(1.0), options)


@pytest.mark.parametrize("mode", ["batched", "sequential"])
@pytest.mark.parametrize("audio", [np.zeros(0, np.float32), [], [np.zeros(0, np.float32)] * 2],
                         ids=["empty-array", "no-pieces", "empty-pieces"])
def test_audio_without_samples_is_refused_in_either_mode(tiny_engine, mode, audio):
    with pytest.raises(ValueError, match="the audio holds no samples"):
        tiny_engine.transcribe(audio, TranscribeOptions(language="en", mode=mode))


def test_a_window_of_the_wrong_shape_is_refused_and_the_engine_serves_on(tiny_engine):
    good = mel(tiny_engine, 3)
    for bad in (good[:, :2999], good[:40], good[None]):
        with pytest.raises(ValueError, match=r"mel must have the shape \(80, 3000\).*got"):
            tiny_engine.decode(bad)
        with pytest.raises(ValueError, match=r"mel must have the shape"):
            tiny_engine.detect_language(bad)
    assert tiny_engine.decode(good, TranscribeOptions(language="en", max_new_tokens=3))[0].tokens


def test_batched_word_timestamps_are_timed_within_their_window(tiny_engine):
    audio = speechlike(50.0, seed=8)
    result = tiny_engine.transcribe(audio, TranscribeOptions(language="en", temperatures=(0.0,), word_timestamps=True))
    plain = tiny_engine.transcribe(audio, TranscribeOptions(language="en", temperatures=(0.0,)))
    assert [s.seek for s in result.segments] == [s.seek for s in plain.segments]  # the same decoding, timed
    assert not any(s.words for s in plain.segments)
    words = [w for s in result.segments for w in s.words]
    assert len(words) >= 5
    for s in result.segments:
        window_start = s.seek / 100
        for w in s.words:
            assert window_start - 1e-6 <= w.start <= w.end <= min(window_start + 30.0, 50.0) + 1e-6
            assert 0.0 <= w.probability <= 1.0
        assert [w.start for w in s.words] == sorted(w.start for w in s.words)


@pytest.mark.parametrize("frames", [3000, 1])
def test_words_are_timed_for_the_longest_text_a_window_holds(tiny_engine, frames):
    """A window decoded to the end of the text context holds n_text_ctx - len(sot sequence) - 1
    text tokens after its first timestamp; a window of one mel frame (a file's last 10 ms) has
    no audio position of its own. Both still get a timing for every word, in order."""
    tok = tiny_engine.tokenizer
    sot = tok.sot_sequence("en", "transcribe")
    n_text = tiny_engine.dims.n_text_ctx - len(sot) - 1
    text = (tok.encode(" the quick brown fox jumps over the lazy dog") * 100)[:n_text]
    features = tiny_engine.programs.encode(mel(tiny_engine, 10)[None])[0]
    timings = align_words(tiny_engine.programs, tok, features, sot, text, frames, "en")
    assert "".join(t.word for t in timings) == tok.decode(text)
    assert [token for t in timings for token in t.tokens] == text
    assert all(0.0 <= t.start <= t.end <= 30.0 for t in timings)
    assert [t.start for t in timings] == sorted(t.start for t in timings)
    if frames == 1:
        assert all(t.start == t.end == 0.0 for t in timings)
    else:
        assert timings[-1].end > 1.0


def test_best_of_sampling_is_reproducible_and_keeps_the_likeliest(tiny_engine):
    m = mel(tiny_engine, 4)
    opts = TranscribeOptions(language="en", temperatures=(0.8,), best_of=4, seed=5, timestamps=False)
    a, _ = tiny_engine.decode(m, opts)
    b, _ = tiny_engine.decode(m, opts)
    assert a.tokens == b.tokens
    # The first of the best-of rows draws what a single sample with the same seed draws.
    single, _ = tiny_engine.decode(m, TranscribeOptions(language="en", temperatures=(0.8,), seed=5, timestamps=False))

    def rank_score(r):  # openai-whisper's ranking: sum of log-probabilities over the length
        return r.avg_logprob * (len(r.tokens) + 1) / len(r.tokens)

    assert rank_score(a) >= rank_score(single) - 1e-6


def test_beam_search_in_long_form_gives_ordered_segments(tiny_engine):
    result = tiny_engine.transcribe(speechlike(40.0, seed=9), TranscribeOptions(language="en", temperatures=(0.0,),
                                                                                 beam_size=4))
    starts = [s.start for s in result.segments]
    assert starts == sorted(starts) and len({s.seek for s in result.segments}) >= 2
