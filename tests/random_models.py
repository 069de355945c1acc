"""Random-weight Whisper models for tests, in the layout real checkpoints use.

Weights come from `transformers` (seeded) and are saved with `save_pretrained`; the tokenizer is
Whisper's real vocabulary (multilingual, or GPT-2's for English-only models), converted from the
tiktoken file that openai-whisper ships, so token ids match Whisper's exactly.
"""
from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from service.engine.tokenizer import MULTILINGUAL_VOCAB

# name: (n_mels, vocab, encoder layers, decoder layers)
ARCHITECTURES = {
    "tiny": (80, 51865, 2, 2),  # multilingual, 99 languages, as tiny..large-v2
    "v3": (128, 51866, 2, 2),  # large-v3: 128 mel bins, Cantonese added
    "turbo": (128, 51866, 3, 1),  # large-v3-turbo: far fewer decoder than encoder layers
    "en": (80, 51864, 2, 2),  # English-only (tiny.en ... medium.en): GPT-2's vocabulary
}


@lru_cache(maxsize=None)
def tokenizer_dir(vocab: int, root: str) -> Path:
    """A Hugging Face tokenizer.json for Whisper's vocabulary of `vocab` tokens, built once each:
    51864 is the English-only models' (GPT-2's), 51865 the multilingual (99 languages), 51866
    large-v3's (100)."""
    import whisper
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from whisper.tokenizer import get_tokenizer

    out = Path(root) / f"tokenizer-{vocab}"
    if (out / "tokenizer.json").exists():
        return out
    multilingual = vocab >= MULTILINGUAL_VOCAB
    enc = get_tokenizer(multilingual=multilingual, num_languages=vocab - 51766 if multilingual else 99).encoding
    assert enc.n_vocab == vocab, (enc.n_vocab, vocab)
    eot = enc.eot_token
    name = "multilingual" if multilingual else "gpt2"
    vocab_file = os.path.join(os.path.dirname(whisper.__file__), "assets", f"{name}.tiktoken")
    specials = [enc.decode_single_token_bytes(i).decode() for i in range(eot, enc.n_vocab)]
    fast = TikTokenConverter(vocab_file=vocab_file, pattern=enc._pat_str, extra_special_tokens=specials).converted()
    PreTrainedTokenizerFast(tokenizer_object=fast, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(out)
    return out


def build_model(out: Path, arch: str = "tiny", *, d_model: int = 64, heads: int = 2, seed: int = 0,
                init_std: float = 0.1):
    """Save a random Whisper of the given architecture to `out`; returns the transformers model."""
    n_mels, vocab, enc_layers, dec_layers = ARCHITECTURES[arch]
    return save_random_whisper(out, n_mels=n_mels, vocab=vocab, encoder_layers=enc_layers, decoder_layers=dec_layers,
                               d_model=d_model, heads=heads, seed=seed, init_std=init_std)


def save_random_whisper(out: Path, *, n_mels: int, vocab: int, encoder_layers: int, decoder_layers: int, d_model: int,
                        heads: int, seed: int = 0, init_std: float = 0.02):
    """A seeded random Whisper of any dimensions, saved to `out` with Whisper's real tokenizer."""
    from tokenizers import Tokenizer
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tok = tokenizer_dir(vocab, str(Path(out).parent))
    eot = Tokenizer.from_file(str(tok / "tokenizer.json")).token_to_id("<|endoftext|>")
    cfg = WhisperConfig(vocab_size=vocab, num_mel_bins=n_mels, d_model=d_model, encoder_layers=encoder_layers,
                        decoder_layers=decoder_layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                        encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model, max_source_positions=1500,
                        max_target_positions=448, init_std=init_std, decoder_start_token_id=eot + 1,
                        pad_token_id=eot, eos_token_id=eot, bos_token_id=eot,
                        begin_suppress_tokens=[220, eot], suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    out = Path(out)
    model.save_pretrained(out)
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)
    return model


def openai_model(hf_model):
    """The same weights as an openai-whisper `Whisper` module."""
    from whisper.model import ModelDimensions, Whisper

    from service.engine.weights import hf_to_openai_name

    c = hf_model.config
    dims = ModelDimensions(n_mels=c.num_mel_bins, n_audio_ctx=c.max_source_positions, n_audio_state=c.d_model,
                           n_audio_head=c.encoder_attention_heads, n_audio_layer=c.encoder_layers,
                           n_vocab=c.vocab_size, n_text_ctx=c.max_target_positions, n_text_state=c.d_model,
                           n_text_head=c.decoder_attention_heads, n_text_layer=c.decoder_layers)
    state = {}
    for name, t in hf_model.state_dict().items():
        new = hf_to_openai_name(name)
        if new is not None:
            state[new] = t
    model = Whisper(dims)
    model.load_state_dict(state, strict=True)
    return model.eval(), dims
