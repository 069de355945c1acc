"""The engine: a loaded Whisper model that turns 16 kHz audio into timed text.

`Engine.transcribe` is blocking and thread-safe: calls from many threads share one decode
scheduler, so their windows are batched together on the device.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Callable, Iterable, Iterator

import jax
import ml_dtypes
import numpy as np

from . import features, weights
from .alignment import add_word_timestamps, align_words, alignment_heads, last_end
from .dims import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, SECONDS_PER_TOKEN, ModelDimensions
from .programs import Programs
from .results import Segment, TranscribeOptions, Transcription, Usage
from .rules import Vocabulary
from .scheduler import DecodeJob, DecodeOutput, DecodeScheduler, Window
from .segments import WindowResult, compression_ratio, split_segments
from .tokenizer import WhisperTokenizer
from .windows import cut_windows

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
NO_SAMPLES = "the audio holds no samples"


def enable_compilation_cache(directory: str | None = None) -> None:
    """Keep compiled programs on disk, so a restart does not compile again: every program, however
    quick its compile (JAX keeps only those of a second or more by default, and which those are
    depends on the machine's speed)."""
    directory = directory or os.environ.get("DRAGOMAN_COMPILATION_CACHE", str(Path.home() / ".cache" / "dragoman" / "jax"))
    if directory.lower() in ("", "off", "none"):
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _checked_batch(max_batch: int) -> int:
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    return max_batch


class Engine:
    def __init__(self, params: dict, dims: ModelDimensions, tokenizer: WhisperTokenizer, *, max_batch: int = 8,
                 name: str = "whisper", max_queue: int = 4096):
        self.dims = dims
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch = _checked_batch(max_batch)
        # Whisper's vocabulary ends with its 1501 timestamp tokens. Another model's tokenizer (large-v2's
        # beside large-v3's weights) would shift every special token by the difference.
        if tokenizer.timestamp_begin + 1501 != dims.n_vocab:
            raise weights.CheckpointError(
                f"the tokenizer is not this model's: its vocabulary has {tokenizer.timestamp_begin + 1501} tokens "
                f"(timestamps from id {tokenizer.timestamp_begin}), the model's {dims.n_vocab} (large-v3 and "
                "large-v3-turbo: 51866, the other multilingual models: 51865, the English-only ones: 51864)")
        self.programs = Programs(params, dims, Vocabulary.of(tokenizer, dims.n_vocab), max_batch,
                                 list(tokenizer.language_tokens.values()),
                                 alignment_heads(tokenizer.generation_config, dims))
        self.scheduler = DecodeScheduler(self.programs, tokenizer, max_queue=max_queue)
        # Windows of one call in flight at most: enough to fill the batch and keep the encoder's
        # read-ahead of the next batch's worth busy while it decodes.
        self.read_ahead = 2 * self.max_batch

    @classmethod
    def load(cls, model: str, *, max_batch: int = 8, dtype: str | None = None, name: str | None = None,
             max_queue: int = 4096) -> "Engine":
        """Load from a hub id, a Hugging Face directory, or an OpenAI `.pt` checkpoint (the
        tokenizer then comes from the directory that holds it). fp32 on CPU, bf16 elsewhere."""
        dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        _checked_batch(max_batch)  # before the weights are read
        t0 = time.perf_counter()
        ckpt = weights.resolve(model)
        tokenizer = WhisperTokenizer.from_directory(ckpt.directory, ckpt.dims.n_vocab)
        params = weights.build_params(ckpt.tensors(), ckpt.dims, DTYPES[dtype])
        _to_device(params)
        log.info("loaded %s (%s, %s) in %.1f s", model, ckpt.dims, dtype, time.perf_counter() - t0)
        return cls(params, ckpt.dims, tokenizer, max_batch=max_batch, name=name or model, max_queue=max_queue)

    @property
    def languages(self) -> dict[str, int]:
        return self.tokenizer.language_tokens

    def close(self) -> None:
        self.scheduler.close()

    def warmup(self) -> None:
        """Compile every program for every bucket it serves (encoder batch, prefix, context and
        alignment lengths), so no request pays for it."""
        t0 = time.perf_counter()
        p = self.programs
        p.warmup(self.tokenizer.sot, self.tokenizer.is_multilingual)
        features.window_log_mel(np.zeros((1, N_SAMPLES), np.float32), self.dims.n_mels)
        log.info("warm-up compiled %d encoder batch, %d prefix, %d context and %d alignment buckets%s in %.1f s",
                 len(p.encode_sizes), len(p.prefix_sizes), len(p.kv_sizes), len(p.align_sizes),
                 "" if p.lanes is None else " for each CPU lane", time.perf_counter() - t0)

    # ---- transcription --------------------------------------------------------------------

    def transcribe(self, audio: np.ndarray | Iterable[np.ndarray], options: TranscribeOptions = TranscribeOptions(), *,
                   on_segment: Callable[[Segment, Usage], None] | None = None,
                   on_progress: Callable[[float], None] | None = None,
                   on_waiting: Callable[[bool], None] | None = None,
                   cancel: threading.Event | None = None) -> Transcription:
        """Transcribe (or translate) 16 kHz mono float32 audio, given whole or as an iterable of
        pieces (batched mode starts on each window as soon as its samples have arrived).

        on_segment gets each final segment in order as soon as it and all before it are final,
        with what the run had used by then;
        on_progress gets the seconds of audio done; on_waiting gets True when the run has done
        all it can with the pieces read so far and waits for the next one, and False when it
        has work again (a server tells a stalled client from one awaiting results by it).
        Raises ValueError for bad options and concurrent.futures.CancelledError once `cancel`
        is set.
        """
        self.validate(options)
        run = _Run(self, options, cancel, on_segment, on_progress, on_waiting)
        if isinstance(audio, np.ndarray):
            audio = [audio.astype(np.float32, copy=False).reshape(-1)]
        if options.mode == "sequential":
            samples = [np.asarray(a, np.float32).reshape(-1) for a in run.read(audio)]
            if not sum(map(len, samples)):
                raise ValueError(NO_SAMPLES)
            return run.sequential(samples[0] if len(samples) == 1 else np.concatenate(samples))
        return run.batched(audio)

    def validate(self, options: TranscribeOptions) -> None:
        """Raises ValueError, naming the field first, for options this engine cannot take: those
        TranscribeOptions.validate refuses, a language the model does not know (an English-only
        model knows only English), and more beams or best-of candidates than the batch has rows."""
        options.validate(self.languages if self.tokenizer.is_multilingual else ("en",))
        for name in ("beam_size", "best_of"):
            rows = getattr(options, name)
            if rows is not None and rows > self.max_batch:
                raise ValueError(f"{name} must be at most the batch size {self.max_batch}, got {rows}")

    def detect_language(self, mel: np.ndarray) -> dict[str, float]:
        """Probability of each language, from one 30 s window of log-mel features [n_mels, 3000]."""
        return self._language_probabilities(self._window(mel))

    def _window(self, mel: np.ndarray) -> Window:
        """A window of a caller's log-mel features, refused here if it has the wrong shape: in the
        batch it would fail the windows encoded with it."""
        mel = np.asarray(mel, np.float32)
        if mel.shape != (self.dims.n_mels, N_FRAMES):
            raise ValueError(f"mel must have the shape ({self.dims.n_mels}, {N_FRAMES}) (mel bins, frames of "
                             f"30 s), got {mel.shape}")
        return Window(mel)

    def _language_probabilities(self, window: Window) -> dict[str, float]:
        probs = self.scheduler.detect_language(window).result()
        return dict(zip(self.languages, map(float, probs)))

    def decode(self, mel: np.ndarray, options: TranscribeOptions = TranscribeOptions()) -> tuple[WindowResult, str]:
        """Decode one 30 s window of log-mel features [n_mels, 3000] once, at the first of
        `options.temperatures`, as openai-whisper's `decode()`. Returns (result, language)."""
        self.validate(options)
        run = _Run(self, options, None, None, None)
        window = self._window(mel)
        run._detect(window)
        out = self.scheduler.submit(run._job(window, run.initial_prompt, 0, salt=0)).result()
        return run._result(out, options.temperatures[0]), run.language


def _to_device(tree: dict | list) -> None:
    """Move a parameter tree to the device leaf by leaf, in place, so each host copy is freed as
    soon as its device copy exists (the model is never held twice in full)."""
    for key, value in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
        if isinstance(value, (dict, list)):
            _to_device(value)
        else:
            tree[key] = jax.device_put(value)


class _ReadAhead:
    """How far batched mode's feeder may read ahead of the decoding: it cuts a window only while
    fewer than `in_flight` are cut and not yet final (enough to fill the batch and keep the
    encoder busy), and fewer than twice that are cut and not yet emitted (the windows final
    behind one that still decodes, at higher temperatures, wait to be emitted in order; with word
    timestamps they hold their encoder outputs). So a long file's audio and log-mel features are
    held a few windows at a time, not whole (an hour of audio: 230 MB of samples, 60-90 MB of
    features)."""

    def __init__(self, in_flight: int):
        self.in_flight, self.held = in_flight, 2 * in_flight
        self._deciding = self._unemitted = 0
        self._cv = threading.Condition()

    def wait_for_room(self, stopped: Callable[[], bool]) -> bool:
        """Wait until one more window may be cut, and count it; False (and not counted) once `stopped`."""
        with self._cv:
            while not stopped() and (self._deciding >= self.in_flight or self._unemitted >= self.held):
                self._cv.wait(timeout=0.5)  # `stopped` is not told: look again now and then
            if stopped():
                return False
            self._deciding += 1
            self._unemitted += 1
            return True

    def final(self) -> None:
        with self._cv:
            self._deciding -= 1
            self._cv.notify()

    def emitted(self) -> None:
        with self._cv:
            self._unemitted -= 1
            self._cv.notify()


class _Run:
    """One transcription: language, prompts, windows, temperature fallback, segments."""

    def __init__(self, engine: Engine, options: TranscribeOptions, cancel, on_segment, on_progress,
                 on_waiting=None):
        self.engine = engine
        self.tok = engine.tokenizer
        self.options = options
        self.cancel = cancel
        self.on_segment = on_segment
        self.on_progress = on_progress
        self.on_waiting = on_waiting
        # What on_waiting reports: the run reads the caller's audio with no window in flight.
        # Two threads change it (the window feeder and the collector), so under a lock, which
        # also keeps the reports in the order of the changes.
        self._state_lock = threading.Lock()
        self._reading = False
        self._windows_in_flight = 0
        self._waiting: bool | None = None
        self.segments: list[Segment] = []
        # Tokens fed and sampled, for usage. Batched mode counts on two threads (the feeder's first
        # tries, the collector's retries at the next temperature).
        self._count_lock = threading.Lock()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.truncated = False  # some window's text was cut rather than ended
        self.language = options.language
        self.language_probability = 1.0
        n_ctx = engine.dims.n_text_ctx
        self.sample_len = options.max_new_tokens or n_ctx // 2
        self.initial_prompt = self.tok.encode(" " + options.prompt.strip()) if options.prompt else []
        self.last_speech_timestamp = 0.0

    # -- pieces shared by both modes

    def read(self, audio: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The caller's audio, piece by piece, reporting while the run waits on the next piece."""
        pieces = iter(audio)
        while True:
            self._update(reading=True)
            try:
                piece = next(pieces)
            except StopIteration:
                return
            finally:
                self._update(reading=False)
            yield piece

    def _update(self, reading: bool | None = None, windows: int = 0) -> None:
        """Note that the run reads (or stops reading) audio, or that `windows` more are in flight."""
        with self._state_lock:
            if reading is not None:
                self._reading = reading
            self._windows_in_flight += windows
            waiting = self._reading and self._windows_in_flight == 0
            if self.on_waiting is not None and waiting != self._waiting:
                self._waiting = waiting
                self.on_waiting(waiting)

    def _detect(self, window: Window) -> None:
        if self.language is None:
            if self.tok.is_multilingual:
                probs = self.engine._language_probabilities(window)
                self.language = max(probs, key=probs.get)
                self.language_probability = probs[self.language]
            else:
                self.language = "en"

    def _job(self, window: Window, prompt: list[int], temperature_index: int, salt: int) -> DecodeJob:
        o = self.options
        n_ctx = self.engine.dims.n_text_ctx
        sot_seq = self.tok.sot_sequence(self.language, o.task)
        if not o.timestamps:
            sot_seq = sot_seq + [self.tok.no_timestamps]
        prefix = ([self.tok.sot_prev] + prompt[-(n_ctx // 2 - 1):] if prompt else []) + sot_seq
        max_initial = round(o.max_initial_timestamp / SECONDS_PER_TOKEN) if o.max_initial_timestamp else -1
        seed = o.seed & 0xFFFFFFFF
        key = (seed, (salt * 7919 + temperature_index * 104729 + (o.seed >> 32)) & 0xFFFFFFFF)
        with self._count_lock:
            self.prompt_tokens += len(prefix)
        temperature = o.temperatures[temperature_index]
        # As openai-whisper: beam search when greedy, best-of when sampling.
        beam_size, patience = ((o.beam_size or 1), (o.patience or 1.0)) if temperature == 0 else (1, 1.0)
        best_of = (o.best_of or 1) if temperature > 0 else 1
        return DecodeJob(window, prefix, prefix.index(self.tok.sot), temperature, o.timestamps, max_initial,
                         o.repetition_penalty, key, self.sample_len, beam_size=beam_size, patience=patience,
                         best_of=best_of, length_penalty=o.length_penalty, min_p=o.min_p,
                         top_k=min(o.top_k or 0, 2**31 - 1), top_p=o.top_p, attempt=temperature_index,
                         owner=self, cancel=self.cancel)

    def _result(self, out: DecodeOutput, temperature: float) -> WindowResult:
        with self._count_lock:  # and its end-of-text, if it produced one
            self.completion_tokens += len(out.tokens) + out.ended
        text = self.tok.decode(out.tokens).strip()
        return WindowResult(out.tokens, text, temperature, out.sum_logprob / (len(out.tokens) + 1),
                            compression_ratio(text), out.no_speech_prob, out.ended)

    def _needs_fallback(self, r: WindowResult) -> bool:
        o = self.options
        needs = (o.compression_ratio_threshold is not None and r.compression_ratio > o.compression_ratio_threshold) or (
            o.logprob_threshold is not None and r.avg_logprob < o.logprob_threshold)
        silence = (o.no_speech_threshold is not None and r.no_speech_prob > o.no_speech_threshold
                   and o.logprob_threshold is not None and r.avg_logprob < o.logprob_threshold)
        return needs and not silence

    def _is_silence(self, r: WindowResult) -> bool:
        o = self.options
        if o.no_speech_threshold is None or not r.no_speech_prob > o.no_speech_threshold:
            return False
        return not (o.logprob_threshold is not None and r.avg_logprob > o.logprob_threshold)

    def _add_words(self, raw: list, window: Window, num_frames: int, time_offset: float) -> None:
        """Word timestamps for the segments of one window (their bounds move to their words)."""
        if not self.options.word_timestamps or not raw:
            return
        text = [t for s in raw for t in s.tokens if t < self.tok.eot]
        timings = align_words(self.engine.programs, self.tok, window.features,
                              self.tok.sot_sequence(self.language, self.options.task), text, num_frames, self.language)
        add_word_timestamps(raw, timings, self.tok.eot, time_offset, self.last_speech_timestamp)
        self.last_speech_timestamp = last_end(raw)  # as openai-whisper: where speech last ended, words or not

    def _emit(self, seek: int, raw, result: WindowResult) -> list[Segment]:
        self.truncated |= not result.ended
        out = []
        for s in raw:
            empty = s.start == s.end or not s.text.strip()  # kept, emptied, as openai-whisper does
            seg = Segment(len(self.segments), seek, round(s.start, 3), round(s.end, 3), "" if empty else s.text,
                          [] if empty else s.tokens, result.temperature, result.avg_logprob, result.compression_ratio,
                          result.no_speech_prob, [] if empty else s.words)
            self.segments.append(seg)
            out.append(seg)
            if self.on_segment is not None:
                with self._count_lock:
                    used = Usage(self.prompt_tokens, self.completion_tokens)
                self.on_segment(seg, used)
        return out

    def _wait(self, future: Future):
        while True:
            try:
                return future.result(timeout=0.5)
            except TimeoutError:
                if self._cancelled:
                    future.cancel()
                    raise CancelledError()

    @property
    def _cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def _stop_if_cancelled(self) -> None:
        """Cancelled is cancelled whenever it happens: between windows, while a callback runs,
        or after the last window (a result the caller gave up on is not returned)."""
        if self._cancelled:
            raise CancelledError()

    def _finish(self, duration: float) -> Transcription:
        self._stop_if_cancelled()
        text = "".join(s.text for s in self.segments)
        return Transcription(text, self.language or "en", self.language_probability, duration, self.segments,
                             self.prompt_tokens, self.completion_tokens, self.truncated)

    # -- batched: every window at once, times offset by each window's start

    def batched(self, audio: Iterable[np.ndarray]) -> Transcription:
        """Windows are cut and submitted as the audio arrives (a feeder thread reads `audio`);
        this thread collects results, retries failing windows at the next temperature, and
        emits segments in order."""
        events: queue.Queue = queue.Queue()
        spans: list[tuple[int, int]] = []
        windows: list[Window | None] = []
        ahead = _ReadAhead(self.engine.read_ahead)
        collected = threading.Event()  # this thread is done collecting (finished, failed or cancelled)

        def submit(i: int, t: int) -> None:
            f = self.engine.scheduler.submit(self._job(windows[i], self.initial_prompt, t, salt=i))
            f.add_done_callback(lambda f: events.put(("window", i, t, f)))

        def feed() -> None:
            try:
                samples = 0
                for start, end, chunk in cut_windows(self.read(audio)):
                    if not ahead.wait_for_room(lambda: collected.is_set() or self._cancelled):
                        break
                    self._update(windows=1)
                    padded = np.zeros((1, N_SAMPLES), np.float32)
                    padded[0, : end - start] = chunk
                    spans.append((start, end))
                    windows.append(Window(features.window_log_mel(padded, self.engine.dims.n_mels)[0]))
                    if len(windows) == 1:
                        self._detect(windows[0])
                    submit(len(windows) - 1, 0)
                    samples = end
                events.put(("end", len(windows), samples))
            except BaseException as e:  # surfaced on the caller's thread
                events.put(("error", e))

        feeder = threading.Thread(target=feed, name="window-feeder", daemon=True)
        feeder.start()
        try:
            return self._collect(events, submit, ahead, windows, spans)
        finally:
            collected.set()  # the feeder reads and submits no more

    def _collect(self, events: queue.Queue, submit: Callable[[int, int], None], ahead: _ReadAhead,
                 windows: list[Window | None], spans: list[tuple[int, int]]) -> Transcription:
        """Batched mode's collector: results as they come, retries, segments in order."""
        temps = self.options.temperatures
        final: dict[int, WindowResult] = {}
        next_out, total, duration = 0, None, 0.0
        while total is None or next_out < total:
            self._stop_if_cancelled()
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event[0] == "error":
                raise event[1]
            if event[0] == "end":
                total, duration = event[1], event[2] / SAMPLE_RATE
                continue
            _, i, t, f = event
            result = self._result(f.result(), temps[t])
            if self._needs_fallback(result) and t + 1 < len(temps):
                submit(i, t + 1)
                continue
            final[i] = result
            ahead.final()
            if not self.options.word_timestamps:
                windows[i] = None  # its features are not needed any more
            while next_out in final:
                self._stop_if_cancelled()
                r = final.pop(next_out)
                start, end = spans[next_out]
                if not self._is_silence(r):
                    frames = (end - start) // HOP_LENGTH
                    raw, _, _ = split_segments(r.tokens, self.tok, start / SAMPLE_RATE, frames, keep_tail=True)
                    self._add_words(raw, windows[next_out], frames, start / SAMPLE_RATE)
                    limit = end / SAMPLE_RATE  # a window shorter than 30 s is padded; no time past its end is real
                    for seg in raw:
                        seg.start, seg.end = min(seg.start, limit), min(seg.end, limit)
                        for w in seg.words:
                            w.start, w.end = min(w.start, limit), min(w.end, limit)
                    self._emit(start // HOP_LENGTH, raw, r)
                if self.on_progress is not None:
                    self.on_progress(end / SAMPLE_RATE)
                windows[next_out] = None  # its features are not needed any more
                next_out += 1
                ahead.emitted()
                self._update(windows=-1)
        if total == 0:
            raise ValueError(NO_SAMPLES)
        return self._finish(duration)

    # -- sequential: openai-whisper's seek loop, the reference for exactness

    def sequential(self, audio: np.ndarray) -> Transcription:
        o = self.options
        n_mels = self.engine.dims.n_mels
        mel = features.file_log_mel(audio, n_mels, padding=N_SAMPLES)
        content_frames = mel.shape[-1] - N_FRAMES
        duration = content_frames * HOP_LENGTH / SAMPLE_RATE

        def window_at(seek: int, size: int) -> Window:
            m = np.zeros((n_mels, N_FRAMES), np.float32)
            m[:, :size] = mel[:, seek : seek + size]
            return Window(m)

        self._detect(window_at(0, min(N_FRAMES, mel.shape[-1])))
        all_tokens = list(self.initial_prompt)
        prompt_reset_since = 0
        seek = 0
        while seek < content_frames:
            self._stop_if_cancelled()
            segment_size = min(N_FRAMES, content_frames - seek)
            window = window_at(seek, segment_size)
            prompt = all_tokens[prompt_reset_since:]
            result = None
            for t in range(len(o.temperatures)):
                result = self._result(self._wait(self.engine.scheduler.submit(self._job(window, prompt, t, salt=seek))),
                                      o.temperatures[t])
                if not self._needs_fallback(result):
                    break
            if self._is_silence(result):
                seek += segment_size
                continue
            time_offset = seek * HOP_LENGTH / SAMPLE_RATE
            raw, consumed, single_ending = split_segments(result.tokens, self.tok, time_offset, segment_size, keep_tail=False)
            self._add_words(raw, window, segment_size, time_offset)
            emitted = self._emit(seek, raw, result)
            last_word_end = last_end(raw)
            if o.word_timestamps and not single_ending and last_word_end is not None and last_word_end > time_offset:
                seek = round(last_word_end * 100)  # resume after the last word
            else:
                seek += consumed
            all_tokens.extend(t for s in emitted for t in s.tokens)
            if not o.condition_on_previous_text or result.temperature > 0.5:
                prompt_reset_since = len(all_tokens)
            if self.on_progress is not None:
                self.on_progress(min(seek, content_frames) * HOP_LENGTH / SAMPLE_RATE)
        return self._finish(duration)
