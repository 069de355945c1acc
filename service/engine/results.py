"""What a transcription request asks for, and what it gives back."""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
TASKS = ("transcribe", "translate")
MODES = ("batched", "sequential")


@dataclass(frozen=True)
class TranscribeOptions:
    task: str = "transcribe"  # or "translate" (into English)
    language: str | None = None  # code; None = detect from the first 30 s
    prompt: str | None = None  # text that precedes the audio (names, spelling, style)
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES  # tried in order while a result fails the thresholds
    seed: int = 0
    repetition_penalty: float = 1.0
    # Which tokens a sample may take, at temperatures above 0 (vLLM's filters, in its order):
    min_p: float = 0.0  # at least this times the likeliest token's probability, in [0, 1]; 0 = any
    top_k: int | None = None  # among the k likeliest tokens, k >= 1; None = any
    top_p: float = 1.0  # among the fewest likeliest whose probabilities sum to this, in (0, 1]; 1 = any
    max_new_tokens: int | None = None  # per 30 s window; None = half the text context (224)
    timestamps: bool = True  # segment timestamps; off = one segment per window
    mode: str = "batched"  # "batched" (all windows at once) or "sequential" (openai-whisper's seek loop)
    condition_on_previous_text: bool = True  # sequential mode: previous text is the next window's prompt
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    max_initial_timestamp: float | None = 1.0  # seconds; the first timestamp is at most this
    word_timestamps: bool = False  # a start and end time for every word
    beam_size: int | None = None  # beam search at temperature 0 (None = greedy); 1..10
    best_of: int | None = None  # candidates sampled at temperatures above 0, the best kept; 1..10
    patience: float | None = None  # beam search: stop once beam_size * patience hypotheses ended (default 1)
    length_penalty: float | None = None  # ranking: None divides the log-probability by the length, else by ((5 + length) / 6) ** alpha

    def validate(self, languages: Collection[str] | None = None) -> None:
        """Raises ValueError naming the field, what it was and what is accepted; `languages`:
        the codes a language must be one of (None: any)."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.temperatures:
            raise ValueError("temperatures must hold at least one temperature")
        for t in self.temperatures:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"temperature must be in [0, 1], got {t}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or unset for any), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= 448:
            raise ValueError(f"max_new_tokens must be in [1, 448], got {self.max_new_tokens}")
        for name in ("beam_size", "best_of"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 10:
                raise ValueError(f"{name} must be in [1, 10], got {value}")
        if self.patience is not None and not 0.0 < self.patience <= 10.0:
            raise ValueError(f"patience must be in (0, 10], got {self.patience}")
        if self.patience is not None and self.beam_size is None:
            raise ValueError("patience needs beam_size")
        if self.length_penalty is not None and not 0.0 <= self.length_penalty <= 1.0:
            raise ValueError(f"length_penalty must be in [0, 1], got {self.length_penalty}")
        for name, lo, hi in (("compression_ratio_threshold", 0.0, 100.0), ("logprob_threshold", -100.0, 0.0),
                             ("no_speech_threshold", 0.0, 1.0)):
            value = getattr(self, name)
            if value is not None and not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value}")
        if self.max_initial_timestamp is not None and not 0.0 <= self.max_initial_timestamp <= 30.0:
            raise ValueError(f"max_initial_timestamp must be in [0, 30] seconds (or unset for none), got "
                             f"{self.max_initial_timestamp}")
        if languages is not None and self.language is not None and self.language not in languages:
            raise ValueError(f"language {self.language!r} is not one this model knows; accepted: {', '.join(languages)}")


@dataclass
class Word:
    word: str  # with its leading space, as in the text
    start: float
    end: float
    probability: float


@dataclass
class Segment:
    id: int
    seek: int  # mel frame (10 ms) at which the window that produced it starts
    start: float  # seconds
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    """What a run had used by a point in it: prompt tokens fed to the decoder and tokens it
    produced, over every window and attempt so far."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Transcription:
    text: str
    language: str
    language_probability: float
    duration: float  # seconds of audio
    segments: list[Segment] = field(default_factory=list)
    prompt_tokens: int = 0  # prompt tokens fed to the decoder, over all windows
    completion_tokens: int = 0  # tokens sampled, over all windows and attempts
    truncated: bool = False  # some window's text was cut at max_new_tokens or the text context, not ended

    def to_dict(self) -> dict:
        d = asdict(self)
        d["segments"] = [s.to_dict() for s in self.segments]
        return d
