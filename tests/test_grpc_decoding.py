"""Config's decoding options end to end (beam search, best-of, temperature fallback and its
thresholds) on an in-process server with a random-weight tiny Whisper: each call equals the
engine called directly with the TranscribeOptions it stands for.

Random weights always fail the default -1 log-probability threshold, so with the fallback on a
window is decoded again up to temperature 1; a few tokens per attempt keep the calls quick."""
from __future__ import annotations

import math

import pytest

from dragoman.v1 import speech_pb2 as pb
from grpc_support import call, config, encode, seconds, start_server, stub, tone
from service.audio import decode_audio
from service.engine import TranscribeOptions

TOKENS = 4  # max_new_tokens of every call (grpc_support.FAST)


@pytest.fixture(scope="module")
def server(tiny_engine):
    assert tiny_engine.max_batch >= 5, "beam_size 5 needs 5 rows of the batch"
    srv = start_server(tiny_engine)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return stub(server.port)


@pytest.fixture(scope="module")
def wav():
    return encode(tone(3.0, seed=21), 16000, "wav", "pcm_s16le")


def segments(r) -> list[tuple]:
    """What a call's segments say: (exact fields, float fields)."""
    return [((s.id, s.seek, s.text, list(s.tokens)),
             [seconds(s.start_offset), seconds(s.end_offset), s.temperature, s.avg_logprob, s.compression_ratio])
            for s in r.segments]


def engine_segments(engine, wav: bytes, **options) -> list[tuple]:
    """The same, from the engine called directly on the same decoded audio."""
    result = engine.transcribe(decode_audio(wav), TranscribeOptions(max_new_tokens=TOKENS, **options))
    return [((s.id, s.seek, s.text, list(s.tokens)),
             [s.start, s.end, float(s.temperature), float(s.avg_logprob), float(s.compression_ratio)])
            for s in result.segments]


def same(a: list[tuple], b: list[tuple]) -> bool:
    """Equal segments; floats to the precision of the contract's 32-bit floats."""
    return len(a) == len(b) and all(x[0] == y[0] and x[1] == pytest.approx(y[1], rel=1e-5, abs=1e-5)
                                    for x, y in zip(a, b))


def test_beam_search_equals_the_engines(client, wav, tiny_engine):
    r = call(client, "transcribe", config(language="en", temperature=0, temperature_fallback=False, beam_size=5), wav)
    assert r.segments and r.summary.text == "".join(s.text for s in r.segments)
    assert all(s.temperature == 0 for s in r.segments)
    assert same(segments(r), engine_segments(tiny_engine, wav, language="en", beam_size=5, temperatures=(0.0,)))
    # On this audio five beams find another text than greedy decoding: a dropped beam_size would show.
    assert not same(segments(r), engine_segments(tiny_engine, wav, language="en", temperatures=(0.0,)))


def test_beam_search_with_patience_and_length_penalty_equals_the_engines(client, wav, tiny_engine):
    r = call(client, "translate", config(language="it", temperature_fallback=False, beam_size=3, patience=2.0,
                                         length_penalty=0.5), wav)
    assert same(segments(r), engine_segments(tiny_engine, wav, task="translate", language="it", beam_size=3,
                                             patience=2.0, length_penalty=0.5, temperatures=(0.0,)))


def test_beam_size_1_is_greedy(client, wav):
    greedy = call(client, "transcribe", config(language="en", temperature=0, temperature_fallback=False), wav)
    beam_1 = call(client, "transcribe", config(language="en", temperature=0, temperature_fallback=False,
                                               beam_size=1), wav)
    assert greedy.segments and same(segments(beam_1), segments(greedy))
    assert beam_1.summary == greedy.summary


def test_best_of_is_reproducible_and_equals_the_engines(client, wav, tiny_engine):
    cfg = config(language="en", temperature=0.6, temperature_fallback=False, best_of=3, seed=77)
    first, second = call(client, "transcribe", cfg, wav), call(client, "transcribe", cfg, wav)
    assert first.segments and same(segments(first), segments(second)) and first.summary == second.summary
    assert all(s.temperature == pytest.approx(0.6) for s in first.segments)
    assert same(segments(first), engine_segments(tiny_engine, wav, language="en", best_of=3, seed=77,
                                                 temperatures=(0.6,)))
    # The best of three is not the first sample here: a dropped best_of would show.
    assert not same(segments(first), engine_segments(tiny_engine, wav, language="en", seed=77, temperatures=(0.6,)))


class RecordingEngine:
    """The engine, keeping the options of each transcription it is asked for (it does the work)."""

    def __init__(self, engine):
        self.engine = engine
        self.options: list[TranscribeOptions] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def transcribe(self, audio, options, **kwargs):
        self.options.append(options)
        return self.engine.transcribe(audio, options, **kwargs)


@pytest.mark.parametrize("fields, expected", [
    (dict(language="Italian", prompt="Dragoman", temperature=0.2, seed=9, repetition_penalty=1.25, max_new_tokens=3,
          long_form_mode=pb.LONG_FORM_MODE_SEQUENTIAL, timestamp_granularities=[pb.TIMESTAMP_GRANULARITY_WORD],
          beam_size=3, patience=2.0, length_penalty=0.5, compression_ratio_threshold=2.0,
          logprob_threshold=math.nan, no_speech_threshold=0.5),
     TranscribeOptions(task="translate", language="it", prompt="Dragoman", temperatures=(0.2, 0.4, 0.6, 0.8, 1.0),
                       seed=9, repetition_penalty=1.25, max_new_tokens=3, mode="sequential", word_timestamps=True,
                       beam_size=3, patience=2.0, length_penalty=0.5, compression_ratio_threshold=2.0,
                       logprob_threshold=None, no_speech_threshold=0.5)),
    (dict(language="en", temperature=0.6, temperature_fallback=False, best_of=4, top_k=3, top_p=0.9, min_p=0.01,
          max_new_tokens=2),
     TranscribeOptions(task="translate", language="en", temperatures=(0.6,), best_of=4, top_k=3, top_p=0.9,
                       min_p=0.01, max_new_tokens=2)),
])
def test_every_config_field_reaches_the_engine(tiny_engine, wav, fields, expected):
    """The options the servicer hands the engine are exactly those the Config stands for: none
    dropped, none read from another field (end-to-end equality above cannot tell an option that
    changes nothing on this audio, such as patience, from one that never arrived)."""
    engine = RecordingEngine(tiny_engine)
    srv = start_server(engine)
    try:
        r = call(stub(srv.port), "translate", pb.Config(**fields), wav)
    finally:
        srv.stop()
    assert r.summary is not None and engine.options == [expected]


def test_sampling_filters_equal_the_engines(client, wav, tiny_engine):
    filters = dict(top_k=3, top_p=0.9, min_p=0.01)
    cfg = config(language="en", temperature=0.8, temperature_fallback=False, seed=5, **filters)
    r = call(client, "transcribe", cfg, wav)
    assert r.segments and same(segments(r), engine_segments(tiny_engine, wav, language="en", seed=5,
                                                           temperatures=(0.8,), **filters))
    unfiltered = call(client, "transcribe", config(language="en", temperature=0.8, temperature_fallback=False,
                                                   seed=5), wav)
    assert not same(segments(r), segments(unfiltered))
    off = call(client, "transcribe", config(language="en", temperature=0.8, temperature_fallback=False, seed=5,
                                            top_k=0, top_p=1.0, min_p=0.0), wav)  # each at its "any" value
    assert same(segments(off), segments(unfiltered))


def test_temperature_fallback(client, wav):
    off = call(client, "transcribe", config(language="en", temperature=0, temperature_fallback=False), wav)
    assert off.segments and all(s.temperature == 0 for s in off.segments)
    on = call(client, "transcribe", config(language="en", temperature=0), wav)  # on by default
    assert on.segments and max(s.temperature for s in on.segments) > 0
    assert on.summary.usage.completion_tokens > off.summary.usage.completion_tokens  # every attempt counts
    explicit = call(client, "transcribe", config(language="en", temperature=0, temperature_fallback=True), wav)
    assert same(segments(explicit), segments(on))
    unset = call(client, "transcribe", config(language="en"), wav)  # no temperature: 0, with the fallback
    assert same(segments(unset), segments(on))


def test_fallback_from_a_given_temperature(client, wav):
    off = call(client, "transcribe", config(language="en", temperature=0.4, temperature_fallback=False, seed=3), wav)
    assert off.segments and all(s.temperature == pytest.approx(0.4) for s in off.segments)
    on = call(client, "transcribe", config(language="en", temperature=0.4, seed=3), wav)
    assert on.segments and all(s.temperature >= 0.4 - 1e-6 for s in on.segments)
    assert max(s.temperature for s in on.segments) > 0.4 + 1e-6


def test_thresholds_are_passed_through(client, wav, tiny_engine):
    off = call(client, "transcribe", config(language="en", temperature=0, temperature_fallback=False), wav)
    # A logprob threshold that random weights pass: temperature 0 is kept, with the fallback on.
    low = call(client, "transcribe", config(language="en", temperature=0, logprob_threshold=-100), wav)
    assert same(segments(low), segments(off))
    # NaN turns a check off: with both off, nothing fails.
    nan = call(client, "transcribe", config(language="en", temperature=0, logprob_threshold=math.nan,
                                            compression_ratio_threshold=math.nan, no_speech_threshold=math.nan), wav)
    assert same(segments(nan), segments(off))
    # A compression ratio threshold that every text fails, with the log probability check off: every
    # window falls back to temperature 1, as the engine does with the same thresholds.
    high = call(client, "transcribe", config(language="en", temperature=0, logprob_threshold=math.nan,
                                             compression_ratio_threshold=0, seed=5), wav)
    assert high.segments and all(s.temperature == 1.0 for s in high.segments)
    assert same(segments(high), engine_segments(tiny_engine, wav, language="en", logprob_threshold=None,
                                                compression_ratio_threshold=0.0, seed=5))
    # A no-speech threshold every window passes, under a logprob threshold every window fails: silence.
    silent = call(client, "transcribe", config(language="en", temperature=0, no_speech_threshold=0,
                                               logprob_threshold=-1e-3), wav)
    assert silent.segments == [] and silent.summary.text == ""
