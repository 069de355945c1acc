"""JAX Whisper: model, weights, tokenizer, features, decoding, long-form transcription."""
from .engine import Engine, enable_compilation_cache
from .results import DEFAULT_TEMPERATURES, MODES, TASKS, Segment, TranscribeOptions, Transcription, Usage, Word
from .scheduler import QueueFull, SchedulerClosed
from .weights import CheckpointError

__all__ = ["Engine", "enable_compilation_cache", "TranscribeOptions", "Transcription", "Segment", "Usage", "Word",
           "QueueFull", "SchedulerClosed", "CheckpointError", "DEFAULT_TEMPERATURES", "MODES", "TASKS"]
