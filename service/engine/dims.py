"""Whisper architecture dimensions, read from a checkpoint's config."""
from __future__ import annotations

from dataclasses import dataclass

# Whisper's fixed audio geometry: 16 kHz, 25 ms window, 10 ms hop, 30 s context.
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS  # 480000 samples in a window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a window
SECONDS_PER_TOKEN = 0.02  # one timestamp step, two mel frames after the stride-2 conv


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelDimensions":
        """From a Hugging Face `config.json` (WhisperConfig)."""
        return cls(
            n_mels=cfg["num_mel_bins"],
            n_audio_ctx=cfg["max_source_positions"],
            n_audio_state=cfg["d_model"],
            n_audio_head=cfg["encoder_attention_heads"],
            n_audio_layer=cfg["encoder_layers"],
            n_vocab=cfg["vocab_size"],
            n_text_ctx=cfg["max_target_positions"],
            n_text_state=cfg["d_model"],
            n_text_head=cfg["decoder_attention_heads"],
            n_text_layer=cfg["decoder_layers"],
        )
