import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LongFormMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LONG_FORM_MODE_UNSPECIFIED: _ClassVar[LongFormMode]
    LONG_FORM_MODE_BATCHED: _ClassVar[LongFormMode]
    LONG_FORM_MODE_SEQUENTIAL: _ClassVar[LongFormMode]

class TimestampGranularity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIMESTAMP_GRANULARITY_UNSPECIFIED: _ClassVar[TimestampGranularity]
    TIMESTAMP_GRANULARITY_SEGMENT: _ClassVar[TimestampGranularity]
    TIMESTAMP_GRANULARITY_WORD: _ClassVar[TimestampGranularity]

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_S16LE: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_F32LE: _ClassVar[AudioEncoding]
LONG_FORM_MODE_UNSPECIFIED: LongFormMode
LONG_FORM_MODE_BATCHED: LongFormMode
LONG_FORM_MODE_SEQUENTIAL: LongFormMode
TIMESTAMP_GRANULARITY_UNSPECIFIED: TimestampGranularity
TIMESTAMP_GRANULARITY_SEGMENT: TimestampGranularity
TIMESTAMP_GRANULARITY_WORD: TimestampGranularity
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_S16LE: AudioEncoding
AUDIO_ENCODING_F32LE: AudioEncoding

class TranslateRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: Config
    audio: bytes
    def __init__(self, config: _Optional[_Union[Config, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("delta", "segment", "summary")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    delta: Delta
    segment: Segment
    summary: Summary
    def __init__(self, delta: _Optional[_Union[Delta, _Mapping]] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class TranscribeRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: Config
    audio: bytes
    def __init__(self, config: _Optional[_Union[Config, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class TranscribeResponse(_message.Message):
    __slots__ = ("delta", "segment", "summary")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    delta: Delta
    segment: Segment
    summary: Summary
    def __init__(self, delta: _Optional[_Union[Delta, _Mapping]] = ..., segment: _Optional[_Union[Segment, _Mapping]] = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("model", "language", "prompt", "temperature", "seed", "repetition_penalty", "max_new_tokens", "long_form_mode", "timestamp_granularities", "stream_deltas", "encoding", "sample_rate_hertz", "channels", "beam_size", "best_of", "patience", "length_penalty", "temperature_fallback", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold", "min_p", "top_k", "top_p")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LONG_FORM_MODE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_GRANULARITIES_FIELD_NUMBER: _ClassVar[int]
    STREAM_DELTAS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NO_SPEECH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    model: str
    language: str
    prompt: str
    temperature: float
    seed: int
    repetition_penalty: float
    max_new_tokens: int
    long_form_mode: LongFormMode
    timestamp_granularities: _containers.RepeatedScalarFieldContainer[TimestampGranularity]
    stream_deltas: bool
    encoding: AudioEncoding
    sample_rate_hertz: int
    channels: int
    beam_size: int
    best_of: int
    patience: float
    length_penalty: float
    temperature_fallback: bool
    compression_ratio_threshold: float
    logprob_threshold: float
    no_speech_threshold: float
    min_p: float
    top_k: int
    top_p: float
    def __init__(self, model: _Optional[str] = ..., language: _Optional[str] = ..., prompt: _Optional[str] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., long_form_mode: _Optional[_Union[LongFormMode, str]] = ..., timestamp_granularities: _Optional[_Iterable[_Union[TimestampGranularity, str]]] = ..., stream_deltas: _Optional[bool] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hertz: _Optional[int] = ..., channels: _Optional[int] = ..., beam_size: _Optional[int] = ..., best_of: _Optional[int] = ..., patience: _Optional[float] = ..., length_penalty: _Optional[float] = ..., temperature_fallback: _Optional[bool] = ..., compression_ratio_threshold: _Optional[float] = ..., logprob_threshold: _Optional[float] = ..., no_speech_threshold: _Optional[float] = ..., min_p: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("text", "usage")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    usage: Usage
    def __init__(self, text: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("id", "seek", "start_offset", "end_offset", "text", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob", "words")
    ID_FIELD_NUMBER: _ClassVar[int]
    SEEK_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    AVG_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    NO_SPEECH_PROB_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    id: int
    seek: int
    start_offset: _duration_pb2.Duration
    end_offset: _duration_pb2.Duration
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: _containers.RepeatedCompositeFieldContainer[Word]
    def __init__(self, id: _Optional[int] = ..., seek: _Optional[int] = ..., start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., temperature: _Optional[float] = ..., avg_logprob: _Optional[float] = ..., compression_ratio: _Optional[float] = ..., no_speech_prob: _Optional[float] = ..., words: _Optional[_Iterable[_Union[Word, _Mapping]]] = ...) -> None: ...

class Word(_message.Message):
    __slots__ = ("word", "start_offset", "end_offset", "probability")
    WORD_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    word: str
    start_offset: _duration_pb2.Duration
    end_offset: _duration_pb2.Duration
    probability: float
    def __init__(self, word: _Optional[str] = ..., start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., end_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., probability: _Optional[float] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("text", "language", "language_probability", "duration", "usage", "truncated")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    text: str
    language: str
    language_probability: float
    duration: _duration_pb2.Duration
    usage: Usage
    truncated: bool
    def __init__(self, text: _Optional[str] = ..., language: _Optional[str] = ..., language_probability: _Optional[float] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "audio_seconds")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    audio_seconds: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., audio_seconds: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "aliases", "languages", "multilingual")
    ID_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    LANGUAGES_FIELD_NUMBER: _ClassVar[int]
    MULTILINGUAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    languages: _containers.RepeatedCompositeFieldContainer[Language]
    multilingual: bool
    def __init__(self, id: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., languages: _Optional[_Iterable[_Union[Language, _Mapping]]] = ..., multilingual: _Optional[bool] = ...) -> None: ...

class Language(_message.Message):
    __slots__ = ("code", "name")
    CODE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    code: str
    name: str
    def __init__(self, code: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...
