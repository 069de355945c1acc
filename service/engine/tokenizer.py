"""Whisper's tokenizer: byte-level BPE through `tokenizers`, special tokens found in the vocabulary.

Special token ids are never hard-coded: they move by one between large-v2 and large-v3 (which
added Cantonese), and by one again in the English-only models, whose vocabulary (GPT-2's) has
one token fewer. Those models' vocabularies hold language and task tokens too, but the models
were never trained with them: whether a model is multilingual is told by its vocabulary's size,
as openai-whisper tells it.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import ByteLevel as ByteLevelDecoder
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel

from ..languages import LANGUAGES
from .weights import read_json

MULTILINGUAL_VOCAB = 51865  # the smallest multilingual vocabulary; English-only models have 51864 tokens


class WhisperTokenizer:
    def __init__(self, tokenizer: Tokenizer, generation_config: dict | None = None, *, multilingual: bool = True):
        self._tok = tokenizer
        # Text is text: "<|endoftext|>" in a prompt is those characters, not the control token
        # (as openai-whisper's tiktoken encodes it with no special tokens allowed).
        self._tok.encode_special_tokens = True
        self.generation_config = generation_config or {}
        self.eot = self._require("<|endoftext|>")
        self.sot = self._require("<|startoftranscript|>")
        self.sot_prev = self._require("<|startofprev|>")
        self.sot_lm = self._id("<|startoflm|>")
        self.no_timestamps = self._require("<|notimestamps|>")
        self.no_speech = self._id("<|nospeech|>") or self._id("<|nocaptions|>")
        self.translate = self._id("<|translate|>")
        self.transcribe = self._id("<|transcribe|>")
        # Older tokenizer files leave the timestamp tokens implicit, right after <|notimestamps|>.
        self.timestamp_begin = self._id("<|0.00|>") or self.no_timestamps + 1
        lang_to_id = self.generation_config.get("lang_to_id")
        if lang_to_id:
            pairs = [(tok[2:-2], i) for tok, i in lang_to_id.items()]
        else:
            pairs = [(code, self._id(f"<|{code}|>")) for code in LANGUAGES]
        known = sorted((i, code) for code, i in pairs if i is not None) if multilingual else []
        self.language_tokens: dict[str, int] = {code: i for i, code in known}  # none: English only

    @classmethod
    def from_directory(cls, directory: str | Path, n_vocab: int) -> "WhisperTokenizer":
        """The tokenizer in `directory`, for a model of `n_vocab` tokens."""
        d = Path(directory)
        gen_path = d / "generation_config.json"
        gen = read_json(gen_path) if gen_path.exists() else {}
        multilingual = n_vocab >= MULTILINGUAL_VOCAB
        if (d / "tokenizer.json").exists():
            return cls(Tokenizer.from_file(str(d / "tokenizer.json")), gen, multilingual=multilingual)
        if (d / "vocab.json").exists() and (d / "merges.txt").exists():
            tok = Tokenizer(BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
            tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
            tok.decoder = ByteLevelDecoder()
            added = d / "added_tokens.json"
            if added.exists():
                specials = sorted(read_json(added).items(), key=lambda kv: kv[1])
                tok.add_special_tokens([name for name, _ in specials])
            return cls(tok, gen, multilingual=multilingual)
        raise FileNotFoundError(
            f"no tokenizer in {d}: expected tokenizer.json, or vocab.json and merges.txt (an OpenAI .pt checkpoint "
            "needs those of the same model's Hugging Face repository beside it, e.g. openai/whisper-large-v3's)")

    def _id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _require(self, token: str) -> int:
        i = self._id(token)
        if i is None:
            raise ValueError(f"the tokenizer has no {token} token; is it a Whisper tokenizer?")
        return i

    @property
    def is_multilingual(self) -> bool:
        return bool(self.language_tokens)

    def sot_sequence(self, language: str | None, task: str) -> list[int]:
        """<|startoftranscript|> [<|lang|> <|task|>] as the model expects it."""
        seq = [self.sot]
        if self.is_multilingual:
            seq.append(self.language_tokens[language or "en"])
            seq.append(self.translate if task == "translate" else self.transcribe)
        return seq

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: list[int]) -> str:
        """Text of the text tokens; special and timestamp tokens are left out."""
        return self._tok.decode([t for t in tokens if t < self.eot], skip_special_tokens=False)

    def decode_raw(self, tokens: list[int]) -> str:
        """Text of any tokens below the timestamps, special ones written out (<|endoftext|>)."""
        return self._tok.decode([t for t in tokens if t < self.timestamp_begin], skip_special_tokens=False)

    @cached_property
    def blank_suppress(self) -> list[int]:
        """Tokens never allowed as the first sampled one: a lone space and end-of-text."""
        begin = self.generation_config.get("begin_suppress_tokens")
        return sorted(set(begin)) if begin else sorted(set(self.encode(" ") + [self.eot]))

    @cached_property
    def non_speech_tokens(self) -> list[int]:
        """Speaker tags and sound annotations (♪, [MUSIC], ...), kept out of transcripts."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")  # first token of a multi-token symbol in U+2640..U+267F
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return sorted(result)

    @cached_property
    def suppress_tokens(self) -> list[int]:
        """What never appears in sampled text: non-speech symbols and the control tokens."""
        base = self.generation_config.get("suppress_tokens")
        tokens = set(base) if base else set(self.non_speech_tokens)
        tokens |= {t for t in (self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm, self.no_speech) if t is not None}
        return sorted(tokens)
