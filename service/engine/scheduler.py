"""Continuous batching: one thread owns the device and decodes windows from every caller together.

Callers submit `DecodeJob`s (one window at one temperature) from any thread and get a Future.
The scheduler thread fills free batch slots with waiting jobs, runs the compiled step for all
slots at once, hands each step's tokens out as they come, and frees a slot the moment its
window ends (end-of-text, token limit, or cancellation), so a short window never waits for a
long one and no request waits for another to finish.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .programs import Programs, Slots
from .rules import RowOptions
from .tokenizer import WhisperTokenizer

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More windows are waiting than the scheduler accepts; retry later."""


class SchedulerClosed(RuntimeError):
    """The engine is shutting down."""


@dataclass(eq=False)
class Window:
    """One 30 s window of log-mel features; its encoder output is computed once and reused
    by language detection and by every decoding attempt (temperature fallback)."""
    mel: jax.Array | np.ndarray  # [n_mels, 3000]
    features: jax.Array | None = None  # [n_audio_ctx, state]


@dataclass(eq=False)
class DecodeJob:
    window: Window
    prefix: list[int]  # prompt and start-of-transcript sequence, fed before sampling
    sot_index: int
    temperature: float = 0.0
    timestamps: bool = True
    max_initial_timestamp: int = -1  # in 0.02 s steps; < 0 = unbounded
    repetition_penalty: float = 1.0
    key: tuple[int, int] = (0, 0)  # sampling key
    sample_len: int = 224
    on_token: Callable[[int], None] | None = None
    cancel: threading.Event | None = None
    future: Future = field(default_factory=Future)


@dataclass
class DecodeOutput:
    tokens: list[int]  # sampled tokens, end-of-text excluded
    sum_logprob: float
    no_speech_prob: float


@dataclass(eq=False)
class _Row:
    job: DecodeJob
    no_speech_prob: float
    tokens: list[int] = field(default_factory=list)
    sum_logprob: float = 0.0


@dataclass(eq=False)
class _Detection:
    window: Window
    future: Future = field(default_factory=Future)


class DecodeScheduler:
    def __init__(self, programs: Programs, tokenizer: WhisperTokenizer, max_queue: int = 4096):
        self.programs = programs
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self._jobs: deque[DecodeJob] = deque()
        self._detections: deque[_Detection] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._rows: list[_Row | None] = [None] * programs.n_slots
        self._slots: Slots | None = None
        self._thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
        self._thread.start()

    # ---- callers -------------------------------------------------------------------------

    def submit(self, job: DecodeJob) -> Future:
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the engine is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} windows are already waiting to be decoded")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def detect_language(self, window: Window) -> Future:
        """Future of the language-token probabilities of one window."""
        d = _Detection(window)
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the engine is shutting down")
            self._detections.append(d)
            self._cv.notify()
        return d.future

    @property
    def queued(self) -> int:
        return len(self._jobs)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    # ---- the scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._jobs or self._detections or self._active() or self._closed):
                    self._cv.wait()
                if self._closed:
                    self._fail_all(SchedulerClosed("the engine is shutting down"))
                    return
                detections = list(self._detections)
                self._detections.clear()
                admitted = self._take_jobs()
            try:
                if detections:
                    self._detect(detections)
                if admitted:
                    self._admit(admitted)
                if self._active():
                    self._step()
            except Exception as e:  # a device error fails the work in flight, not the server
                log.exception("decoding failed")
                for d in detections:
                    if not d.future.done():
                        d.future.set_exception(e)
                self._fail_rows(e, admitted)
                self._slots = None

    def _active(self) -> bool:
        return any(r is not None for r in self._rows)

    def _take_jobs(self) -> list[DecodeJob]:
        free = sum(r is None for r in self._rows)
        taken: list[DecodeJob] = []
        while self._jobs and len(taken) < free:
            job = self._jobs.popleft()
            if job.cancel is not None and job.cancel.is_set():
                job.future.set_exception(CancelledError())
            elif job.future.set_running_or_notify_cancel():
                taken.append(job)
        return taken

    def _encode(self, windows: list[Window]) -> None:
        todo = [w for w in windows if w.features is None]
        for i in range(0, len(todo), self.programs.n_slots):
            chunk = todo[i : i + self.programs.n_slots]
            features = self.programs.encode(jnp.stack([jnp.asarray(w.mel) for w in chunk]))
            for j, w in enumerate(chunk):
                w.features = features[j]

    def _detect(self, detections: list[_Detection]) -> None:
        self._encode([d.window for d in detections])
        for i in range(0, len(detections), self.programs.n_slots):
            chunk = detections[i : i + self.programs.n_slots]
            probs = self.programs.detect_language(jnp.stack([d.window.features for d in chunk]), self.tokenizer.sot)
            for d, p in zip(chunk, probs):
                d.future.set_result(p)

    def _admit(self, jobs: list[DecodeJob]) -> None:
        if self._slots is None:
            self._slots = self.programs.empty_slots()
        self._encode([j.window for j in jobs])
        free = [i for i, r in enumerate(self._rows) if r is None]
        options = RowOptions(
            np.array([j.temperature for j in jobs], np.float32),
            np.array([j.timestamps for j in jobs], bool),
            np.array([j.max_initial_timestamp for j in jobs], np.int32),
            np.array([j.repetition_penalty for j in jobs], np.float32),
            np.array([j.key for j in jobs], np.uint32),
        )
        self._slots, tokens, logprobs, no_speech = self.programs.admit(
            self._slots, jnp.stack([j.window.features for j in jobs]), [j.prefix for j in jobs],
            [j.sot_index for j in jobs], free[: len(jobs)], options, self.tokenizer.no_speech or 0)
        for slot, job, token, logprob, ns in zip(free, jobs, tokens, logprobs, no_speech):
            self._rows[slot] = _Row(job, float(ns) if self.tokenizer.no_speech is not None else float("nan"))
            self._accept(slot, int(token), float(logprob))

    def _step(self) -> None:
        self._slots, tokens, logprobs = self.programs.step(self._slots)
        for slot, row in enumerate(self._rows):
            if row is not None:
                self._accept(slot, int(tokens[slot]), float(logprobs[slot]))

    def _accept(self, slot: int, token: int, logprob: float) -> None:
        row = self._rows[slot]
        job = row.job
        if job.cancel is not None and job.cancel.is_set():
            self._rows[slot] = None
            job.future.set_exception(CancelledError())
            return
        row.sum_logprob += logprob
        done = token == self.tokenizer.eot
        if not done:
            row.tokens.append(token)
            if job.on_token is not None:
                job.on_token(token)
            sampled = len(row.tokens)
            # As openai-whisper: at most sample_len tokens, and never past the text context.
            done = sampled >= job.sample_len or len(job.prefix) + sampled > self.programs.dims.n_text_ctx
        if done:
            self._rows[slot] = None
            job.future.set_result(DecodeOutput(row.tokens, row.sum_logprob, row.no_speech_prob))

    def _fail_rows(self, error: Exception, extra: list[DecodeJob]) -> None:
        for slot, row in enumerate(self._rows):
            if row is not None and not row.job.future.done():
                row.job.future.set_exception(error)
            self._rows[slot] = None
        for job in extra:
            if not job.future.done():
                job.future.set_exception(error)

    def _fail_all(self, error: Exception) -> None:
        self._fail_rows(error, list(self._jobs))
        self._jobs.clear()
        for d in self._detections:
            d.future.set_exception(error)
        self._detections.clear()
