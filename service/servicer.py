"""dragoman.v1.SpeechService on grpc.aio: one streaming call from its Config to its Summary.

Each Translate/Transcribe call runs the engine's blocking `transcribe()` on a worker thread;
all calls share the engine's scheduler, which batches their windows together. Segments come
back to the event loop through `call_soon_threadsafe` and go out as soon as they are final.
Headerless PCM goes to the engine piece by piece as it arrives, so decoding starts before the
upload ends; a container file is decoded once it has fully arrived.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Iterator

import grpc
import numpy as np
from google.protobuf import duration_pb2

from dragoman.v1 import speech_pb2 as pb
from dragoman.v1 import speech_pb2_grpc

from . import errors
from .audio import SAMPLE_RATE, AudioError, AudioLimits, audio_pieces
from .engine import DEFAULT_TEMPERATURES, QueueFull, SchedulerClosed, TranscribeOptions, Transcription, Usage
from .engine import Segment as EngineSegment
from .errors import ServiceError, invalid_argument
from .languages import LANGUAGES, language_code
from .metrics import ServiceMetrics
from .pcm_stream import PcmStream
from .model_names import short_name
from .settings import ServerConfig

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpeechService"].full_name
PCM_ENCODINGS = {pb.AUDIO_ENCODING_S16LE: "s16le", pb.AUDIO_ENCODING_F32LE: "f32le"}
UPLOAD_MEMORY = 16 << 20  # bytes of a container kept in memory; a larger one goes to a temporary file
PCM_BACKLOG_SECONDS = 60  # PCM received and not yet taken by the engine, at most (a window is 30 s)
MODES = {pb.LONG_FORM_MODE_BATCHED: "batched", pb.LONG_FORM_MODE_SEQUENTIAL: "sequential"}
# TranscribeOptions.validate names the option at fault first; the request field it comes from:
OPTION_FIELDS = {"temperature": "config.temperature", "temperatures": "config.temperature",
                 "repetition_penalty": "config.repetition_penalty", "max_new_tokens": "config.max_new_tokens",
                 "language": "config.language", "mode": "config.long_form_mode",
                 "word_timestamps": "config.timestamp_granularities", "prompt": "config.prompt",
                 "beam_size": "config.beam_size", "best_of": "config.best_of", "patience": "config.patience",
                 "length_penalty": "config.length_penalty",
                 "compression_ratio_threshold": "config.compression_ratio_threshold",
                 "logprob_threshold": "config.logprob_threshold", "no_speech_threshold": "config.no_speech_threshold",
                 "min_p": "config.min_p", "top_k": "config.top_k", "top_p": "config.top_p"}
THRESHOLDS = ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold")
DEADLINE_SLACK = 1.0  # seconds (see SpeechServicer._stream)


class SpeechServicer(speech_pb2_grpc.SpeechServiceServicer):
    def __init__(self, config: ServerConfig, executor: ThreadPoolExecutor):
        self.config = config
        self.executor = executor
        self.engine = None  # set once loaded and warmed up
        self.draining = False
        self.active = 0  # Translate/Transcribe calls in progress
        self.metrics = ServiceMetrics(self)

    @property
    def model_id(self) -> str:
        return self.config.model_id or self.engine.name

    # ---- RPCs ----------------------------------------------------------------------------

    async def Translate(self, request_iterator, context) -> AsyncIterator[pb.TranslateResponse]:
        async for response in self._stream("translate", request_iterator, context, pb.TranslateResponse):
            yield response

    async def Transcribe(self, request_iterator, context) -> AsyncIterator[pb.TranscribeResponse]:
        async for response in self._stream("transcribe", request_iterator, context, pb.TranscribeResponse):
            yield response

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        if self.engine is None:
            await context.abort_with_status(errors.unavailable("the model is still loading").status())
        languages = [pb.Language(code=code, name=LANGUAGES.get(code, code)) for code in self.engine.languages]
        multilingual = bool(self.engine.tokenizer.is_multilingual)
        model = pb.Model(id=self.model_id, aliases=self.model_names()[1:],
                         languages=languages if multilingual else [pb.Language(code="en", name="english")],
                         multilingual=multilingual)
        return pb.ListModelsResponse(models=[model])

    def model_names(self) -> list[str]:
        """What Config.model may name the served model by: its id, then its aliases (the id's last
        part and the configured ones)."""
        return list(dict.fromkeys([self.model_id, short_name(self.model_id), *self.config.aliases]))

    # ---- one streaming call --------------------------------------------------------------

    async def _stream(self, task: str, requests, context, response_type):
        code = grpc.StatusCode.CANCELLED  # kept when the call's task is cancelled (client gone, grace period over)
        call = None
        error: ServiceError | None = None
        try:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            self.active += 1
            call = _Call(self, task, requests.__aiter__(), response_type)
            async for response in call.run():
                yield response
            code = grpc.StatusCode.OK
            self.metrics.call_succeeded(task, time.perf_counter() - call.started, call.result)
        except ServiceError as e:
            error = e
            if e.code == grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", task, e.message)
        except Exception as e:  # a bug: the call fails, the server goes on
            log.exception("%s failed", task)
            error = errors.internal(f"{type(e).__name__}: {e}")
        finally:
            if error is not None:
                code = error.code
            # gRPC cancels a call at the client's deadline. The server's copy of the deadline runs
            # later than the client's (it starts when the headers arrive), so the client may
            # cancel a little before it: a cancellation within DEADLINE_SLACK of it counts as one.
            remaining = context.time_remaining()  # None: no deadline
            if code == grpc.StatusCode.CANCELLED and remaining is not None and remaining <= DEADLINE_SLACK:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            # Counted before the client hears of the end, so that what it sees is already counted.
            self.metrics.call_ended(task, code)
            if call is not None:
                self.active -= 1
                call.stop()
        if error is not None:
            await context.abort_with_status(error.status())

    def _refusal(self) -> ServiceError | None:
        """Why a new call is refused at once, if it is."""
        if self.engine is None:
            return errors.unavailable("the model is still loading")
        if self.draining:
            return errors.unavailable("the server is shutting down")
        if self.active >= self.config.max_concurrent_streams:
            return errors.resource_exhausted(f"the server is already serving {self.active} calls, its limit")
        return None


class _Call:
    """The state of one Translate/Transcribe call."""

    def __init__(self, servicer: SpeechServicer, task: str, requests: AsyncIterator, response_type):
        self.servicer = servicer
        self.config = servicer.config
        self.engine = servicer.engine
        self.task = task
        self.requests = requests
        self.response_type = response_type
        self.cancel = threading.Event()  # set: the engine drops this call's windows at once
        self.events: asyncio.Queue = asyncio.Queue()
        self.receiver: asyncio.Task | None = None
        self.input_error: ServiceError | None = None
        self.started = time.perf_counter()
        self.first_segment_sent = False
        self.result: Transcription | None = None  # once the engine is done
        # Whether the call waits on its client: until the engine starts on the audio, and then
        # whenever it has done all it can with the audio so far (the engine's on_waiting). Only
        # then does the receive timeout run: a client may wait for results before it sends more.
        self.waiting_on_client = True
        self.samples_read = 0  # PCM samples the engine has taken (written on its thread only)
        self.upload_file: str | None = None  # where a large container upload is kept

    def stop(self) -> None:
        self.cancel.set()
        if self.receiver is not None and not self.receiver.done():
            self.receiver.cancel()
        if self.upload_file is not None:  # the engine may still hold it open: it reads on until it stops
            with contextlib.suppress(OSError):
                os.unlink(self.upload_file)

    async def run(self):
        first = await self._next_message()
        if first is None:
            raise invalid_argument("config", "the call ended before its config; send a config message first")
        payload = first.WhichOneof("payload")
        if payload is None:
            raise invalid_argument("config", "the first message holds neither config nor audio; it must hold the config")
        if payload != "config":
            raise invalid_argument("config", "audio came before the config; the first message must hold the config")
        options, pcm = self._options(first.config)
        stream_deltas = first.config.stream_deltas
        loop = asyncio.get_running_loop()

        if pcm is None:  # a container: decoded as the engine reads it (its errors are the engine's)
            audio = audio_pieces(await self._receive_all(), AudioLimits(self.config.max_audio_seconds), self.cancel)
        else:
            feed: queue.Queue = queue.Queue()
            audio = self._pieces(feed)
            self.receiver = asyncio.create_task(self._receive_pcm(pcm, feed))

        def on_segment(segment: EngineSegment, used: Usage) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, ("segment", (segment, used)))

        def on_waiting(waiting: bool) -> None:
            self.waiting_on_client = waiting

        def transcribe():  # never raises: its exception is the result, so asyncio does not translate it
            try:
                return self.engine.transcribe(audio, options, on_segment=on_segment, on_waiting=on_waiting,
                                              cancel=self.cancel), None
            except BaseException as e:
                return None, e

        done = loop.run_in_executor(self.servicer.executor, transcribe)
        done.add_done_callback(lambda f: self.events.put_nowait(
            ("done", (None, concurrent.futures.CancelledError()) if f.cancelled() else f.result())))
        while True:
            kind, value = await self.events.get()
            if kind == "segment":
                segment, used = value
                if not self.first_segment_sent:
                    self.first_segment_sent = True
                    self.servicer.metrics.first_segment(self.task, time.perf_counter() - self.started)
                if stream_deltas:
                    yield self.response_type(delta=pb.Delta(text=segment.text, usage=pb.Usage(
                        prompt_tokens=used.prompt_tokens, completion_tokens=used.completion_tokens,
                        audio_seconds=segment.end)))
                yield self.response_type(segment=_segment(segment))
            elif kind == "input_error":
                raise value
            else:
                result, error = value
                break
        if self.input_error is not None:
            raise self.input_error
        if error is not None:
            raise self._engine_error(error)
        log.info("%s: %.1f s of audio, %d segments, %s, in %.2f s", self.task, result.duration, len(result.segments),
                 result.language, time.perf_counter() - self.started)
        self.result = result
        yield self.response_type(summary=_summary(result))

    # -- the Config

    def _options(self, c: pb.Config) -> tuple[TranscribeOptions, PcmStream | None]:
        names = self.servicer.model_names()
        if c.model not in {"", self.engine.name, *names}:
            raise invalid_argument("config.model", f"model {c.model!r} is not served here; use "
                                   f"{', '.join(map(repr, names))}, or leave it empty")
        language = None
        if c.language.strip():
            language = language_code(c.language)
            if language is None:
                raise invalid_argument("config.language", f"unknown language {c.language!r}; give a code such as 'it' "
                                       "or an English name such as 'Italian'")
        t = _decimal(c.temperature) if c.HasField("temperature") else 0.0
        if not 0.0 <= t <= 1.0:  # NaN fails too
            raise invalid_argument("config.temperature", f"temperature must be in [0, 1], got {t:g}")
        if c.HasField("temperature_fallback") and not c.temperature_fallback:
            temperatures = (t,)
        else:
            temperatures = (t,) + tuple(x for x in DEFAULT_TEMPERATURES if x > t)
        search = {}  # beam search, best-of and sampling; unset fields keep TranscribeOptions' defaults
        for name in ("beam_size", "best_of"):
            if c.HasField(name):
                search[name] = getattr(c, name)
        for name in ("patience", "length_penalty", "min_p", "top_p"):
            if c.HasField(name):
                search[name] = _decimal(getattr(c, name))  # NaN fails validate()'s range check
        if c.top_k:  # 0: any
            search["top_k"] = c.top_k
        for name in THRESHOLDS:
            if c.HasField(name):
                value = getattr(c, name)
                search[name] = None if math.isnan(value) else _decimal(value)  # NaN: the check is off
        mode = MODES.get(c.long_form_mode, self.config.default_mode)
        if c.long_form_mode not in MODES and c.long_form_mode != pb.LONG_FORM_MODE_UNSPECIFIED:
            raise invalid_argument("config.long_form_mode", f"unknown long-form mode {c.long_form_mode}")
        for g in c.timestamp_granularities:
            if g not in (pb.TIMESTAMP_GRANULARITY_UNSPECIFIED, pb.TIMESTAMP_GRANULARITY_SEGMENT,
                         pb.TIMESTAMP_GRANULARITY_WORD):
                raise invalid_argument("config.timestamp_granularities", f"unknown timestamp granularity {g}")
        words = pb.TIMESTAMP_GRANULARITY_WORD in c.timestamp_granularities
        try:
            options = TranscribeOptions(
                task=self.task, language=language, prompt=c.prompt or None, temperatures=temperatures, seed=c.seed,
                repetition_penalty=c.repetition_penalty if c.HasField("repetition_penalty") else 1.0,
                max_new_tokens=c.max_new_tokens if c.HasField("max_new_tokens") else None,
                timestamps=True, mode=mode, word_timestamps=words, **search)
            self.engine.validate(options)
        except ValueError as e:
            raise invalid_argument(_option_field(str(e)), str(e)) from None

        pcm = None
        if c.encoding != pb.AUDIO_ENCODING_UNSPECIFIED:
            if c.encoding not in PCM_ENCODINGS:
                raise invalid_argument("config.encoding", f"unknown audio encoding {c.encoding}")
            if c.sample_rate_hertz == 0:
                raise invalid_argument("config.sample_rate_hertz", "PCM audio needs its sample rate, in [8000, 192000] Hz")
            if not 8000 <= c.sample_rate_hertz <= 192000:
                raise invalid_argument("config.sample_rate_hertz",
                                       f"sample_rate_hertz must be in [8000, 192000], got {c.sample_rate_hertz}")
            if c.channels > 8:
                raise invalid_argument("config.channels", f"channels must be in [1, 8] (0 means 1), got {c.channels}")
            pcm = PcmStream(PCM_ENCODINGS[c.encoding], c.sample_rate_hertz, c.channels or 1)
        return options, pcm

    # -- the audio

    async def _next_message(self):
        """The call's next request message; None once the client half-closes. The call fails
        (DEADLINE_EXCEEDED, AUDIO_TIMEOUT) when none comes for the receive timeout while the call
        waits on its client; time the engine spends on the audio received so far does not count."""
        limit = self.config.receive_timeout
        if not limit:
            return await anext(self.requests, None)
        loop = asyncio.get_running_loop()
        read = asyncio.ensure_future(anext(self.requests, None))
        idle_since = loop.time()
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=min(limit / 4, 1.0))
                if done:
                    return read.result()
                if not self.waiting_on_client:
                    idle_since = loop.time()
                elif loop.time() - idle_since >= limit:
                    log.info("%s: the client sent nothing for %g s; ending the call", self.task, limit)
                    raise errors.audio_timeout(limit)
        finally:
            read.cancel()  # a no-op once it is done

    def _check_message(self, message, received: int) -> bytes:
        payload = message.WhichOneof("payload")
        if payload == "config":
            raise invalid_argument("config", "a second config; the config comes once, in the first message")
        if payload is None:
            raise invalid_argument("audio", "a message with neither config nor audio; after the config, every "
                                            "message carries audio")
        if received + len(message.audio) > self.config.max_upload_bytes:
            raise invalid_argument("audio", f"the audio is larger than the {self.config.max_upload_bytes} bytes allowed",
                                   errors.AUDIO_TOO_LARGE)
        return message.audio

    async def _receive_all(self) -> bytes | str:
        """A container's bytes; past UPLOAD_MEMORY, the path of a temporary file that holds them
        (removed when the call ends), so that a call does not hold a large upload in memory."""
        chunks, received, spool = [], 0, None
        try:
            while (message := await self._next_message()) is not None:
                data = self._check_message(message, received)
                received += len(data)
                if spool is None and received > UPLOAD_MEMORY:
                    spool = tempfile.NamedTemporaryFile(prefix="dragoman-upload-", delete=False)
                    self.upload_file = spool.name
                    spool.writelines(chunks)
                    chunks = []
                if spool is None:
                    chunks.append(data)
                else:
                    spool.write(data)
        finally:
            if spool is not None:
                spool.close()
        if received == 0:
            raise invalid_argument("audio", "the audio is empty; send the audio after the config")
        return b"".join(chunks) if spool is None else spool.name

    async def _receive_pcm(self, pcm: PcmStream, feed: queue.Queue) -> None:
        """Reads PCM messages into `feed` until the half-close; a bad one ends the call. Reading
        pauses while the engine has PCM_BACKLOG_SECONDS of it not yet taken (it reads only a few
        windows ahead of its decoding): a client that sends faster than real time is held back
        by HTTP/2 flow control, rather than the call holding all of its audio."""
        received = samples = 0
        try:
            while (message := await self._next_message()) is not None:
                data = self._check_message(message, received)
                received += len(data)
                pieces = pcm.push(data)
                if pcm.seconds_in > self.config.max_audio_seconds:
                    raise AudioLimits(self.config.max_audio_seconds).too_long()
                if len(pieces):
                    feed.put(pieces)
                    samples += len(pieces)
                while samples - self.samples_read > PCM_BACKLOG_SECONDS * SAMPLE_RATE:
                    await asyncio.sleep(0.05)
            if received == 0:
                raise invalid_argument("audio", "the audio is empty; send the audio after the config")
            tail = pcm.finish()
            if len(tail):
                feed.put(tail)
            feed.put(None)
        except AudioError as e:
            self._fail_input(invalid_argument("audio", str(e)))
        except ServiceError as e:
            self._fail_input(e)
        except Exception as e:  # the request stream broke
            log.warning("%s: reading the audio failed: %r", self.task, e)
            self._fail_input(errors.cancelled(f"reading the audio failed: {e}"))

    def _fail_input(self, error: ServiceError) -> None:
        self.input_error = error
        self.cancel.set()
        self.events.put_nowait(("input_error", error))

    def _pieces(self, feed: queue.Queue) -> Iterator[np.ndarray]:
        """The PCM as it arrives, read on the engine's side; ends at the half-close, and
        stops (CancelledError) once the call is cancelled."""
        while True:
            try:
                piece = feed.get(timeout=0.1)
            except queue.Empty:
                if self.cancel.is_set():
                    raise concurrent.futures.CancelledError() from None
                continue
            if piece is None:
                return
            self.samples_read += len(piece)
            yield piece

    # -- the engine's errors

    def _engine_error(self, e: BaseException) -> ServiceError:
        if isinstance(e, ServiceError):
            return e
        if isinstance(e, QueueFull):
            return errors.resource_exhausted(f"the decoding queue is full ({e}); retry later")
        if isinstance(e, SchedulerClosed):
            return errors.unavailable("the server is shutting down")
        if isinstance(e, concurrent.futures.CancelledError):
            return errors.cancelled("the call was cancelled")
        if isinstance(e, AudioError) or (isinstance(e, ValueError) and "audio" in str(e)):
            return invalid_argument("audio", str(e))
        if isinstance(e, ValueError):
            return invalid_argument(_option_field(str(e)), str(e))
        log.error("%s failed", self.task, exc_info=e)
        return errors.internal(f"{type(e).__name__}: {e}")


def _decimal(x: float) -> float:
    """A float of the request (32 bits) as the shortest decimal that is that float: 0.2, not 0.20000000298."""
    return float(str(np.float32(x)))


def _option_field(message: str) -> str:
    return OPTION_FIELDS.get(message.split(" ", 1)[0], "config")


def _duration(seconds: float) -> duration_pb2.Duration:
    nanos = max(0, round(seconds * 1e9))
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def _segment(s: EngineSegment) -> pb.Segment:
    words = [pb.Word(word=w.word, start_offset=_duration(w.start), end_offset=_duration(w.end),
                     probability=float(w.probability))
             for w in getattr(s, "words", None) or []]
    return pb.Segment(id=s.id, seek=s.seek, start_offset=_duration(s.start), end_offset=_duration(s.end), text=s.text,
                      tokens=[int(t) for t in s.tokens], temperature=float(s.temperature),
                      avg_logprob=float(s.avg_logprob), compression_ratio=float(s.compression_ratio),
                      no_speech_prob=float(s.no_speech_prob), words=words)


def _summary(r: Transcription) -> pb.Summary:
    return pb.Summary(text=r.text, language=r.language, language_probability=float(r.language_probability),
                      duration=_duration(r.duration),
                      usage=pb.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                                     audio_seconds=r.duration), truncated=r.truncated)
