"""Decoding equals openai-whisper's `decode()` and `transcribe()` on the same random weights."""
from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
import whisper

from audio_signals import speechlike
from random_models import openai_model
from service.engine import Engine, TranscribeOptions


@pytest.fixture(scope="module", params=["tiny_model", "v3_model"])
def pair(request):
    """(our engine, openai-whisper model) on the same weights."""
    directory, hf = request.getfixturevalue(request.param)
    engine = Engine.load(str(directory), max_batch=8)
    yield engine, openai_model(hf)[0]
    engine.close()


# A parity check on a sequence that repeats one token (or two, in turn) to the limit proves little
# beyond the first steps: the references' sequences here hold at least this many different tokens.
MIN_DISTINCT = 3


def window_mel(n_mels: int, seconds: float = 12.0, seed: int = 0) -> np.ndarray:
    audio = whisper.pad_or_trim(torch.from_numpy(speechlike(seconds, seed=seed)))
    return whisper.log_mel_spectrogram(audio, n_mels).numpy()


CASES = {
    "translate": dict(task="translate", language="it"),
    "transcribe": dict(task="transcribe", language="de"),
    "translate-no-timestamps": dict(task="translate", language="fr", without_timestamps=True),
    "transcribe-no-timestamps": dict(task="transcribe", language="en", without_timestamps=True),
    "prompt": dict(task="transcribe", language="it", prompt="Nel mezzo del cammin di nostra vita"),
    "prompt-no-timestamps": dict(task="translate", language="es", prompt="Hola, Ana.", without_timestamps=True),
    # Longer than half the context: only its last 223 tokens are kept.
    "long-prompt": dict(task="transcribe", language="it", prompt="Nel mezzo del cammin di nostra vita " * 40),
}


@pytest.mark.parametrize("case", CASES)
def test_greedy_decode_equals_openai_whisper(pair, case):
    engine, om = pair
    kw = CASES[case]
    mel = window_mel(engine.dims.n_mels, seed=len(case))
    ref = whisper.decode(om, torch.from_numpy(mel), whisper.DecodingOptions(fp16=False, temperature=0.0, **kw))
    ours, language = engine.decode(mel, TranscribeOptions(
        task=kw["task"], language=kw["language"], prompt=kw.get("prompt"), temperatures=(0.0,),
        timestamps=not kw.get("without_timestamps", False)))
    assert len(set(ref.tokens)) >= MIN_DISTINCT
    assert ours.tokens == ref.tokens
    assert ours.text == ref.text
    assert language == ref.language
    assert ours.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)
    assert ours.no_speech_prob == pytest.approx(ref.no_speech_prob, rel=1e-3)
    assert ours.compression_ratio == pytest.approx(ref.compression_ratio)


class RepetitionPenalty(whisper.decoding.LogitFilter):
    """transformers' repetition penalty (vLLM's formula) as the first of openai-whisper's logit
    filters, over every token of the sequence: the start-of-transcript tokens and prompt too."""

    def __init__(self, penalty: float):
        from transformers import RepetitionPenaltyLogitsProcessor

        self.processor = RepetitionPenaltyLogitsProcessor(penalty)

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        logits[:] = self.processor(tokens, logits)


@pytest.mark.parametrize("penalty, kw", [
    (1.3, dict(task="translate", language="it", prompt=True)),
    (2.0, dict(task="transcribe", language="de")),
    (1.5, dict(task="transcribe", language="en", without_timestamps=True, prompt=True)),
    (0.7, dict(task="translate", language="fr")),  # below 1: repeats made likelier
])
def test_repetition_penalty_equals_transformers_penalty_in_openai_whisper(pair, penalty, kw):
    """prompt=True: the prompt is the text this window decodes to without one, so that the
    penalty on the prompt's tokens changes what is chosen."""
    engine, om = pair
    mel = window_mel(engine.dims.n_mels, seed=11)
    options = lambda **more: whisper.DecodingOptions(fp16=False, temperature=0.0, **{**kw, **more})  # noqa: E731
    plain = whisper.decode(om, torch.from_numpy(mel), options(prompt=None))
    prompt = plain.text if kw.get("prompt") else None
    task = whisper.decoding.DecodingTask(om, options(prompt=prompt))
    task.logit_filters.insert(0, RepetitionPenalty(penalty))
    ref = task.run(torch.from_numpy(mel)[None])[0]
    assert ref.tokens != whisper.decode(om, torch.from_numpy(mel), options(prompt=prompt)).tokens
    assert len(set(ref.tokens)) >= MIN_DISTINCT
    ours, _ = engine.decode(mel, TranscribeOptions(
        task=kw["task"], language=kw["language"], prompt=prompt, temperatures=(0.0,),
        repetition_penalty=penalty, timestamps=not kw.get("without_timestamps", False)))
    assert ours.tokens == ref.tokens
    assert ours.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)


def test_timestamps_are_produced_and_ordered(pair):
    engine, _ = pair
    result, _ = engine.decode(window_mel(engine.dims.n_mels, seed=9), TranscribeOptions(language="en", temperatures=(0.0,)))
    stamps = [t - engine.tokenizer.timestamp_begin for t in result.tokens if t >= engine.tokenizer.timestamp_begin]
    assert stamps, "a timestamped decode holds timestamp tokens"
    assert stamps == sorted(stamps)
    assert stamps[0] <= 50  # max_initial_timestamp = 1 s


def test_language_detection_equals_openai_whisper(pair):
    engine, om = pair
    mel = window_mel(engine.dims.n_mels, seed=3)
    _, ref_probs = whisper.detect_language(om, torch.from_numpy(mel))
    ours = engine.detect_language(mel)
    assert ours.keys() == ref_probs.keys()
    for code, p in ref_probs.items():
        assert ours[code] == pytest.approx(p, abs=1e-4)
    ref = whisper.decode(om, torch.from_numpy(mel), whisper.DecodingOptions(fp16=False, task="translate"))
    result, language = engine.decode(mel, TranscribeOptions(task="translate", temperatures=(0.0,)))
    assert language == ref.language == max(ref_probs, key=ref_probs.get)
    assert result.tokens == ref.tokens


@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_sequential_mode_equals_openai_transcribe_on_70s(pair, task):
    engine, om = pair
    audio = speechlike(70.0, seed=11)
    ref = whisper.transcribe(om, audio, task=task, temperature=0.0, fp16=False, verbose=None)
    ours = engine.transcribe(audio, TranscribeOptions(task=task, mode="sequential", temperatures=(0.0,)))
    assert ours.language == ref["language"]
    assert len(ours.segments) == len(ref["segments"]) > 1
    for a, b in zip(ours.segments, ref["segments"]):
        assert (a.id, a.seek, a.tokens, a.text) == (b["id"], b["seek"], b["tokens"], b["text"])
        assert a.start == pytest.approx(b["start"], abs=1e-3)
        assert a.end == pytest.approx(b["end"], abs=1e-3)
        assert a.avg_logprob == pytest.approx(b["avg_logprob"], abs=1e-4)
        assert a.no_speech_prob == pytest.approx(b["no_speech_prob"], rel=1e-3)
    assert ours.text == ref["text"]


def test_word_timestamps_equal_openai_transcribe(pair):
    engine, om = pair
    audio = speechlike(40.0, seed=12)
    ref = whisper.transcribe(om, audio, language="en", temperature=0.0, fp16=False, verbose=None, word_timestamps=True)
    ours = engine.transcribe(audio, TranscribeOptions(language="en", mode="sequential", temperatures=(0.0,),
                                                      word_timestamps=True))
    assert len(ours.segments) == len(ref["segments"]) > 1
    n_words = 0
    for a, b in zip(ours.segments, ref["segments"]):
        assert (a.seek, a.tokens) == (b["seek"], b["tokens"])
        assert a.start == pytest.approx(b["start"], abs=1e-3)
        assert a.end == pytest.approx(b["end"], abs=1e-3)
        assert [w.word for w in a.words] == [w["word"] for w in b["words"]]
        for w, r in zip(a.words, b["words"]):
            assert (w.start, w.end) == pytest.approx((r["start"], r["end"]), abs=1e-6)
            assert w.probability == pytest.approx(r["probability"], abs=1e-4)
        n_words += len(a.words)
    assert n_words >= 5


BEAM_CASES = {
    "translate-beam5": dict(task="translate", language="it", beam_size=5),
    "transcribe-beam5": dict(task="transcribe", language="de", beam_size=5),
    "translate-beam5-no-timestamps": dict(task="translate", language="fr", beam_size=5, without_timestamps=True),
    "transcribe-beam5-no-timestamps": dict(task="transcribe", language="en", beam_size=5, without_timestamps=True),
    "beam5-patience2": dict(task="translate", language="es", beam_size=5, patience=2.0),
    "beam3-length-penalty": dict(task="transcribe", language="en", beam_size=3, length_penalty=0.6),
}


def beam_search_pair(engine, om, case: str, seed: int):
    """A beam case decoded by openai-whisper and by our engine on the same window: (ref, ours)."""
    kw = dict(BEAM_CASES[case])
    mel = window_mel(engine.dims.n_mels, seed=seed)
    ref = whisper.decode(om, torch.from_numpy(mel), whisper.DecodingOptions(fp16=False, temperature=0.0, **kw))
    ours, _ = engine.decode(mel, TranscribeOptions(
        task=kw["task"], language=kw["language"], temperatures=(0.0,), beam_size=kw["beam_size"],
        patience=kw.get("patience"), length_penalty=kw.get("length_penalty"),
        timestamps=not kw.get("without_timestamps", False)))
    return ref, ours


@pytest.mark.parametrize("case", BEAM_CASES)
def test_beam_search_equals_openai_whisper(pair, case):
    ref, ours = beam_search_pair(*pair, case, seed=len(case) + 40)
    assert len(set(ref.tokens)) >= MIN_DISTINCT
    assert ours.tokens == ref.tokens
    assert ours.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)
    assert ours.no_speech_prob == pytest.approx(ref.no_speech_prob, rel=1e-3)


@pytest.fixture(scope="module")
def ending_pair(tiny_model, model_root):
    """(our engine, openai-whisper model) on tiny_model's weights with end-of-text's embedding made
    1.02 times that of the token they decode to most (7403): random weights otherwise never end a
    sequence, and beam search's finished hypotheses, patience among them, go untested."""
    hf = copy.deepcopy(tiny_model[1])
    with torch.no_grad():
        embedding = hf.model.decoder.embed_tokens.weight  # the output projection's too
        embedding[50257] = 1.02 * embedding[7403]
    out = model_root / "ending"
    hf.save_pretrained(out)
    for f in tiny_model[0].glob("*token*"):
        shutil.copy(f, out / f.name)
    engine = Engine.load(str(out), max_batch=8)
    yield engine, openai_model(hf)[0]
    engine.close()


# On these weights, English without timestamps repeats one token to the limit at every seed tried.
@pytest.mark.parametrize("case", [case for case in BEAM_CASES if case != "transcribe-beam5-no-timestamps"])
def test_beam_search_whose_hypotheses_end_equals_openai_whisper(ending_pair, case):
    ref, ours = beam_search_pair(*ending_pair, case, seed=len(case))
    assert 0 < len(ref.tokens) < 224  # ended
    assert ours.tokens == ref.tokens
    assert ours.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_single_beam_with_patience_is_a_beam_search_as_openai_whisper(ending_pair, seed):
    """openai-whisper searches with one beam, past its first ending, when patience asks for more
    than one; greedy decoding stops at that ending."""
    engine, om = ending_pair
    mel = window_mel(engine.dims.n_mels, seed=seed)
    greedy = whisper.decode(om, torch.from_numpy(mel), whisper.DecodingOptions(fp16=False, language="en"))
    ref = whisper.decode(om, torch.from_numpy(mel), whisper.DecodingOptions(fp16=False, language="en", beam_size=1,
                                                                            patience=3.0))
    assert ref.tokens != greedy.tokens
    ours, _ = engine.decode(mel, TranscribeOptions(language="en", temperatures=(0.0,), beam_size=1, patience=3.0))
    assert ours.tokens == ref.tokens
    assert ours.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)


def test_beam_size_1_is_greedy(pair):
    engine, om = pair
    mel = window_mel(engine.dims.n_mels, seed=31)
    ref = whisper.decode(om, torch.from_numpy(mel), whisper.DecodingOptions(fp16=False, language="en", beam_size=1))
    beam1, _ = engine.decode(mel, TranscribeOptions(language="en", temperatures=(0.0,), beam_size=1))
    greedy, _ = engine.decode(mel, TranscribeOptions(language="en", temperatures=(0.0,)))
    assert beam1.tokens == greedy.tokens == ref.tokens


def without_special_tokens(text: str) -> str:
    """openai-whisper's text with the special tokens that the model sampled left out, as ours
    (and faster-whisper's) is: it writes them out (a random English-only model samples language
    tokens, which nothing suppresses)."""
    return re.sub(r"<\|[^|]*\|>", "", text)


@pytest.fixture(scope="module")
def english_pair(en_model, en_engine):
    """(our engine, openai-whisper model, generation config) on the same English-only weights
    (GPT-2's vocabulary); openai-whisper is given the config's alignment heads (its suppress
    tokens are passed as decoding options)."""
    directory, hf = en_model
    config = json.loads((directory / "generation_config.json").read_text())
    om = openai_model(hf)[0]
    heads = torch.zeros(om.dims.n_text_layer, om.dims.n_text_head, dtype=torch.bool)
    for layer, head in config["alignment_heads"]:
        heads[layer, head] = True
    om.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    return en_engine, om, config


ENGLISH_CASES = {
    "timestamps": dict(),
    "no-timestamps": dict(without_timestamps=True),
    "prompt": dict(prompt="Call me Ishmael."),
}


@pytest.mark.parametrize("case", ENGLISH_CASES)
def test_english_only_model_decodes_as_openai_whisper(english_pair, case):
    """The vocabulary of an English-only model holds language and task tokens too; the model
    starts from <|startoftranscript|> alone, and English is assumed, not detected (openai-whisper's
    `decode()` refuses to detect a language with such a model: it is given English)."""
    engine, om, config = english_pair
    assert not om.is_multilingual and not engine.tokenizer.is_multilingual
    kw = ENGLISH_CASES[case]
    mel = window_mel(engine.dims.n_mels, seed=len(case) + 40)
    ref = whisper.decode(om, torch.from_numpy(mel), whisper.DecodingOptions(
        fp16=False, temperature=0.0, language="en", suppress_tokens=config["suppress_tokens"], **kw))
    ours, language = engine.decode(mel, TranscribeOptions(prompt=kw.get("prompt"), temperatures=(0.0,),
                                                          timestamps=not kw.get("without_timestamps", False)))
    assert len(ref.tokens) > 0
    assert (ours.tokens, language) == (ref.tokens, "en")
    assert ours.text == without_special_tokens(ref.text)
    assert ours.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)


def test_suppress_tokens_come_from_the_generation_config(english_pair):
    engine, om, config = english_pair
    mel = torch.from_numpy(window_mel(engine.dims.n_mels, seed=50))
    by_default = whisper.decode(om, mel, whisper.DecodingOptions(fp16=False, temperature=0.0, language="en"))
    assert set(by_default.tokens) & set(config["suppress_tokens"]), "the config's extra tokens would be sampled"
    ref = whisper.decode(om, mel, whisper.DecodingOptions(
        fp16=False, temperature=0.0, language="en", suppress_tokens=config["suppress_tokens"]))
    ours, _ = engine.decode(mel.numpy(), TranscribeOptions(temperatures=(0.0,)))
    assert ours.tokens == ref.tokens


def test_english_only_model_transcribes_70s_as_openai_whisper(english_pair):
    engine, om, config = english_pair
    audio = speechlike(70.0, seed=13)
    ref = whisper.transcribe(om, audio, temperature=0.0, fp16=False, verbose=None,
                             suppress_tokens=config["suppress_tokens"])
    ours = engine.transcribe(audio, TranscribeOptions(mode="sequential", temperatures=(0.0,)))
    assert ours.language == ref["language"] == "en"
    assert len(ours.segments) == len(ref["segments"]) > 1
    for a, b in zip(ours.segments, ref["segments"]):
        assert (a.seek, a.tokens, a.text) == (b["seek"], b["tokens"], without_special_tokens(b["text"]))
        assert (a.start, a.end) == pytest.approx((b["start"], b["end"]), abs=1e-3)


def test_word_alignment_reads_the_heads_of_the_generation_config(english_pair):
    engine, om, config = english_pair
    audio = speechlike(20.0, seed=14)
    ref = whisper.transcribe(om, audio, temperature=0.0, fp16=False, verbose=None, word_timestamps=True,
                             suppress_tokens=config["suppress_tokens"])
    ours = engine.transcribe(audio, TranscribeOptions(mode="sequential", temperatures=(0.0,), word_timestamps=True))
    ref_words = [w for s in ref["segments"] for w in s["words"]]
    our_words = [w for s in ours.segments for w in s.words]
    assert len(our_words) == len(ref_words) >= 5
    for w, r in zip(our_words, ref_words):
        assert w.word == r["word"]
        assert (w.start, w.end) == pytest.approx((r["start"], r["end"]), abs=1e-6)
    # openai-whisper with every head: other timings, so the heads read make the difference.
    configured = om.alignment_heads
    om.register_buffer("alignment_heads", torch.ones_like(configured.to_dense()).to_sparse(), persistent=False)
    try:
        every_head = whisper.transcribe(om, audio, temperature=0.0, fp16=False, verbose=None, word_timestamps=True,
                                        suppress_tokens=config["suppress_tokens"])
    finally:
        om.register_buffer("alignment_heads", configured, persistent=False)
    timings = lambda words: [(w["start"], w["end"]) for w in words]  # noqa: E731
    assert timings(w for s in every_head["segments"] for w in s["words"]) != timings(ref_words)


def test_english_only_model_refuses_other_languages(english_pair):
    engine = english_pair[0]
    assert engine.languages == {}
    with pytest.raises(ValueError, match="language 'it' is not one this model knows; accepted: en"):
        engine.transcribe(speechlike(2.0, seed=1), TranscribeOptions(language="it"))


def test_sequential_mode_skips_silent_windows_as_openai_transcribe(tiny_model, tiny_engine):
    """On these weights and this audio, the first windows' no-speech probabilities are 3.8e-5,
    4.0e-5 and 2.8e-5, and their average log-probabilities -7.35, -7.38 and -7.23: between them,
    the thresholds below keep the first window for its log-probability, though it is over the
    no-speech threshold, and skip the second (the reference's own decisions are checked too)."""
    om = openai_model(tiny_model[1])[0]
    audio = speechlike(70.0, seed=11)
    thresholds = dict(no_speech_threshold=3e-5, logprob_threshold=-7.36)
    ref = whisper.transcribe(om, audio, language="en", temperature=0.0, fp16=False, verbose=None, **thresholds)
    every = whisper.transcribe(om, audio, language="en", temperature=0.0, fp16=False, verbose=None,
                               no_speech_threshold=None, logprob_threshold=None)
    windows = lambda result: sorted({s["seek"] for s in result["segments"]})  # noqa: E731
    assert windows(every)[:2] == [0, 2986]
    assert windows(ref)[0] == 0 and 2986 not in windows(ref)
    ours = tiny_engine.transcribe(audio, TranscribeOptions(language="en", mode="sequential", temperatures=(0.0,),
                                                           **thresholds))
    assert [(a.seek, a.tokens) for a in ours.segments] == [(b["seek"], b["tokens"]) for b in ref["segments"]]
    for a, b in zip(ours.segments, ref["segments"]):
        assert (a.start, a.end) == pytest.approx((b["start"], b["end"]), abs=1e-3)


@pytest.mark.parametrize("beam_size", [None, 5])
def test_a_text_that_ends_counts_its_end_of_text_in_the_usage(ending_pair, beam_size):
    engine, _ = ending_pair
    result = engine.transcribe(speechlike(12.0, seed=29), TranscribeOptions(
        task="translate", language="fr", temperatures=(0.0,), timestamps=False, beam_size=beam_size))
    produced = sum(len(s.tokens) for s in result.segments)
    assert 0 < produced < 224 and not result.truncated  # ended
    assert result.completion_tokens == produced + 1
