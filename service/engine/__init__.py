"""JAX Whisper: model, weights, tokenizer, features, decoding, long-form transcription."""
from .engine import Engine, enable_compilation_cache
from .results import DEFAULT_TEMPERATURES, MODES, TASKS, Segment, TranscribeOptions, Transcription, Word
from .scheduler import QueueFull, SchedulerClosed
from .weights import CheckpointError

__all__ = ["Engine", "enable_compilation_cache", "TranscribeOptions", "Transcription", "Segment", "Word", "QueueFull",
           "SchedulerClosed", "CheckpointError", "DEFAULT_TEMPERATURES", "MODES", "TASKS"]
