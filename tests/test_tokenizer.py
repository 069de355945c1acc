"""Special tokens are found in the vocabulary, as openai-whisper's tokenizer has them, and the
generation config's lists win over the computed ones."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from whisper.tokenizer import get_tokenizer

from random_models import tokenizer_dir
from service.engine.tokenizer import WhisperTokenizer

VOCABULARIES = {51864: dict(multilingual=False), 51865: dict(multilingual=True, num_languages=99),
                51866: dict(multilingual=True, num_languages=100)}


@pytest.fixture(scope="module")
def tokenizers_dir(model_root):
    """Where the test models' tokenizers are built: each vocabulary's is built once a session."""
    return str(model_root)


@pytest.mark.parametrize("vocab", VOCABULARIES)
def test_special_tokens_equal_openai_whisper(tokenizers_dir, vocab):
    ours = WhisperTokenizer.from_directory(tokenizer_dir(vocab, tokenizers_dir), vocab)
    ref = get_tokenizer(**VOCABULARIES[vocab], language="it", task="translate")
    for name in ("eot", "sot", "sot_prev", "sot_lm", "no_timestamps", "timestamp_begin", "no_speech", "translate",
                 "transcribe"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.is_multilingual == VOCABULARIES[vocab]["multilingual"]
    assert ours.sot_sequence("it", "translate") == (list(ref.sot_sequence) if ours.is_multilingual else [ref.sot])
    if ours.is_multilingual:
        assert ours.language_tokens == {code: ref.to_language_token(code) for code in ref.all_language_codes}
    assert ours.suppress_tokens == sorted(set(ref.non_speech_tokens) | {
        ref.translate, ref.transcribe, ref.sot, ref.sot_prev, ref.sot_lm, ref.no_speech})
    assert ours.blank_suppress == sorted(ref.encode(" ") + [ref.eot])


def test_the_generation_config_names_languages_and_suppressed_tokens(tokenizers_dir):
    tokenizer = Tokenizer.from_file(str(tokenizer_dir(51865, tokenizers_dir) / "tokenizer.json"))
    config = {"lang_to_id": {"<|en|>": 50259, "<|it|>": 50274}, "suppress_tokens": [1, 2, 3],
              "begin_suppress_tokens": [220, 50257, 13]}
    ours = WhisperTokenizer(tokenizer, config)
    assert ours.language_tokens == {"en": 50259, "it": 50274}
    ref = get_tokenizer(multilingual=True)
    controls = {ref.translate, ref.transcribe, ref.sot, ref.sot_prev, ref.sot_lm, ref.no_speech}  # always suppressed
    assert ours.suppress_tokens == sorted({1, 2, 3} | controls)
    assert ours.blank_suppress == [13, 220, 50257]


def test_special_tokens_written_in_text_are_text(tokenizers_dir):
    """A prompt cannot feed the decoder control tokens: "<|endoftext|>" in it is those
    characters, encoded as openai-whisper's tokenizer encodes them with no special token allowed."""
    ours = WhisperTokenizer.from_directory(tokenizer_dir(51865, tokenizers_dir), 51865)
    text = " Nel mezzo <|endoftext|> del <|en|><|transcribe|><|30.00|> cammin"
    tokens = ours.encode(text)
    assert tokens == get_tokenizer(multilingual=True).encoding.encode(text, disallowed_special=())
    assert all(t < ours.eot for t in tokens)
    assert ours.decode(tokens) == text
