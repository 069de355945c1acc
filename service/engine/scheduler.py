"""Continuous batching: one thread owns the device and decodes windows from every caller together.

Callers submit `DecodeJob`s (one window at one temperature) from any thread and get a Future.
The scheduler thread fills free batch slots with waiting jobs, runs the compiled step for all
slots at once, hands each step's tokens out as they come, and frees a slot the moment its
window ends (end-of-text, token limit, or cancellation), so a short window never waits for a
long one and no request waits for another to finish. Calls take turns for free slots (see
`_enqueue`): a short call that comes while a long file's windows wait is decoded beside them,
not after them.

A second thread runs the encoder on submitted windows, so that while every slot is busy the
next windows are encoded as the batch decodes (the encoder is compute-bound, a decode step
mostly waits on memory). While a slot is free and the window that would fill it is being
encoded, the batch waits for it instead: steps with empty slots would waste the device. Where
the decoder has cores of its own (CPU lanes, lanes.py), it encodes a waiting window itself
rather than wait. The encoder reads ahead the windows of the next batch's worth of queued jobs
(language detections' first: their calls wait on them), so a long queue does not hold its
encoder outputs in memory.

Steps are queued one ahead: a row fed by the program's own pick (greedy or sampled; not beam
search, whose host decides among candidates) needs no host round trip, so the next step is
queued on the device with the last step's tokens, and the host reads and hands out the last
step's tokens while it runs. The device never waits for the host's bookkeeping (or for the
interpreter lock, which the server's other threads hold at times). A row that ended is fed
one token more, which nothing reads; windows are admitted only once no step is queued, into
slots the host knows to be free.
"""
from __future__ import annotations

import bisect
import logging
import threading
import weakref
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable

import jax
import numpy as np

from .programs import Choice, Programs, Slots
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
    mel: np.ndarray | None  # [n_mels, 3000]; let go once encoded
    features: jax.Array | None = None  # [n_audio_ctx, state]
    error: Exception | None = None  # why the encoder failed on it

    @property
    def encoded(self) -> bool:
        return self.features is not None or self.error is not None


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
    beam_size: int = 1  # > 1: beam search over this many rows (at temperature 0)
    patience: float = 1.0  # beam search stops once beam_size * patience hypotheses have finished
    best_of: int = 1  # > 1: sample this many rows independently and keep the best
    length_penalty: float | None = None  # ranking: None = divide by length, else ((5 + length) / 6) ** alpha
    min_p: float = 0.0  # sampling filters (rules.RowOptions): 0, 0 and 1 are off
    top_k: int = 0
    top_p: float = 1.0
    attempt: int = 0  # 0: the window's first decoding; n: its nth temperature fallback
    owner: object = None  # the call it is for: calls take turns (None: a call of its own)
    on_token: Callable[[int], None] | None = None  # each token as it comes (single-row jobs only)
    cancel: threading.Event | None = None
    future: Future = field(default_factory=Future)
    queue_tag: int = field(default=0, init=False, repr=False)  # its place in the queue (DecodeScheduler._enqueue)

    @property
    def rows(self) -> int:
        return max(self.beam_size, self.best_of, 1)

    @property
    def beam_search(self) -> bool:
        """Decoded by beam search: several beams, or one whose patience has it collect other than
        exactly one ended hypothesis. One beam that stops at its first ending is greedy decoding."""
        return self.beam_size > 1 or round(self.beam_size * self.patience) != 1


@dataclass
class SchedulerStats:
    """Running totals for monitoring. Only the decode thread writes them; a reader on another
    thread may see one total a step ahead of another."""
    windows: int = 0  # windows admitted for decoding, each attempt (temperature fallback) counted
    fallbacks: int = 0  # of those, decodings again at a higher temperature
    steps: int = 0  # decoder steps
    rows: int = 0  # live rows summed over the steps: divided by `steps`, the batch's mean occupancy


@dataclass
class DecodeOutput:
    tokens: list[int]  # sampled tokens, end-of-text excluded
    sum_logprob: float
    no_speech_prob: float
    ended: bool  # with an end-of-text sampled (else cut at the most tokens or the text context)


@dataclass
class _Sequence:
    tokens: list[int] = field(default_factory=list)  # sampled so far, end-of-text excluded
    sum_logprob: float = 0.0
    done: bool = False
    ended: bool = False  # done by an end-of-text


@dataclass(eq=False)
class _Group:
    """The batch rows that decode one job: one, best_of samples, or beam_size beams."""
    job: DecodeJob
    slots: list[int]
    no_speech_prob: float
    sequences: list[_Sequence]  # one per slot, in slot order (a beam search's first: one)
    finished: dict[tuple[int, ...], float] = field(default_factory=dict)  # beam search's ended hypotheses


@dataclass(eq=False)
class _Detection:
    window: Window
    future: Future = field(default_factory=Future)


def _cancelled(job: DecodeJob) -> bool:
    return (job.cancel is not None and job.cancel.is_set()) or job.future.cancelled()


def _row_key(key: tuple[int, int], row: int) -> tuple[int, int]:
    """The sampling key of one row of a job: best-of rows draw different samples."""
    return key[0], (key[1] + 0x9E3779B9 * row) & 0xFFFFFFFF


class DecodeScheduler:
    def __init__(self, programs: Programs, tokenizer: WhisperTokenizer, max_queue: int = 4096):
        self.programs = programs
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self._jobs: deque[DecodeJob] = deque()  # in the order they are admitted (see _enqueue)
        self._now = 0  # the largest queue tag taken off the queue so far
        # Each owner's tag after its last job, weakly keyed: an owner's entry goes when the owner does.
        self._next_tag: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._detections: deque[_Detection] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._groups: list[_Group | None] = [None] * programs.n_slots  # the group each slot serves
        self._feed = np.zeros(programs.n_slots, np.int32)  # the token each slot is fed next
        self._source = np.arange(programs.n_slots, dtype=np.int32)  # the row each slot takes (beams)
        self._length = np.zeros(programs.n_slots, np.int64)  # tokens in each slot's cache
        self._slots: Slots | None = None
        self._queued: Choice | None = None  # the proposals of a step queued ahead, not yet decided on
        self._slots_on = None  # the device the slots are on
        self._encoder_busy = False  # the encoder thread is encoding
        self._encoder_wide = False  # on every core (CPU lanes)
        self._started: set[Window] = set()  # being encoded
        self.stats = SchedulerStats()
        self._thread = threading.Thread(target=self._run, name="decode-scheduler", daemon=True)
        self._encoder = threading.Thread(target=self._encode_loop, name="encoder", daemon=True)
        self._thread.start()
        self._encoder.start()

    # ---- callers -------------------------------------------------------------------------

    def submit(self, job: DecodeJob) -> Future:
        if not 1 <= job.rows <= self.programs.n_slots:
            raise ValueError(f"beam_size and best_of must be in [1, {self.programs.n_slots}] (the batch size), "
                             f"got {job.rows}")
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the engine is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} windows are already waiting to be decoded")
            self._enqueue(job)
            self._cv.notify_all()
        return job.future

    def _enqueue(self, job: DecodeJob) -> None:  # with self._cv held
        """Queues the job so that calls take turns (start-time fair queueing). The queue is in
        order of tags, ties in order of arrival; `_now` is the round being admitted. A call's job
        is tagged where its previous one ends (a job of several rows, beam search or best-of,
        takes as many turns), or with the next round if that has passed; a retry at a higher
        temperature continues work in flight and joins the current round. So a call that comes
        while a long file's windows wait goes after at most one turn of each call ahead of it,
        and then they alternate; one call alone keeps the order it submitted in."""
        owner = job.owner
        if job.attempt > 0:
            tag = self._now
        else:
            tag = max(self._now + 1, 0 if owner is None else self._next_tag.get(owner, 0))
        if owner is not None:
            self._next_tag[owner] = max(self._next_tag.get(owner, 0), tag + job.rows)
        job.queue_tag = tag
        self._jobs.insert(bisect.bisect_right(self._jobs, tag, key=lambda j: j.queue_tag), job)

    def detect_language(self, window: Window) -> Future:
        """Future of the language-token probabilities of one window."""
        d = _Detection(window)
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the engine is shutting down")
            self._detections.append(d)
            self._cv.notify_all()
        return d.future

    @property
    def queued(self) -> int:
        """Windows waiting for a batch slot."""
        return len(self._jobs)

    @property
    def busy_slots(self) -> int:
        """Batch slots decoding a window now."""
        return sum(g is not None for g in self._groups)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        self._encoder.join()

    # ---- the encoder thread --------------------------------------------------------------

    def _encode_loop(self) -> None:
        lanes = self.programs.lanes
        while True:
            with self._cv:
                while not (self._may_encode() or self._closed):
                    self._cv.wait()
                if self._closed:
                    return
                chunk = self._take_windows()
                if not chunk:  # all that waited were for cancelled calls
                    continue
                # Every core, shared with the decoder's steps, unless the decoder encodes another
                # window beside this one: then each on its own lane (lanes.py).
                self._encoder_wide = lanes is not None and not self._starved()
                device = None if lanes is None else lanes.wide if self._encoder_wide else lanes.encode
                self._encoder_busy = True
                self._cv.notify_all()  # the decoder may encode the next window meanwhile
            self._encode(chunk, device, by_encoder=True)

    def _may_encode(self) -> bool:  # with self._cv held
        return bool(self._next_to_encode())

    def _next_to_encode(self) -> list[Window]:  # with self._cv held
        """The windows to encode next, soonest needed first: language detections' (their calls
        wait on them before anything else), then those of the next batch's worth of queued jobs.
        The encoder reads that far ahead and no further, so a long queue does not hold encoder
        outputs in memory."""
        windows = [d.window for d in self._detections] + [j.window for j in islice(self._jobs, self.programs.n_slots)]
        return [w for w in dict.fromkeys(windows) if not w.encoded and w not in self._started]

    def _take_windows(self) -> list[Window]:  # with self._cv held
        """Up to one encoder batch of the windows to encode next."""
        self._forget_cancelled()
        chunk = self._next_to_encode()[: self.programs.encode_sizes[-1]]
        self._started.update(chunk)
        return chunk

    def _requeue(self, windows: list[Window]) -> None:
        """Windows taken to be encoded and not encoded are to be encoded again: their jobs, still
        queued, would otherwise wait for them forever."""
        with self._cv:
            self._started.difference_update(windows)
            self._cv.notify_all()

    def _forget_cancelled(self) -> None:  # with self._cv held
        """Queued jobs of cancelled calls end now, so their windows are not encoded: a long
        file's call cancelled midway does not keep the encoder busy."""
        if not any(map(_cancelled, self._jobs)):
            return
        for job in filter(_cancelled, self._jobs):
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(CancelledError())
        self._jobs = deque(j for j in self._jobs if not _cancelled(j))
        self._cv.notify_all()  # the batch may have waited for those windows

    def _encode(self, chunk: list[Window], device, by_encoder: bool = False) -> None:
        try:
            features = self.programs.encode(np.stack([w.mel for w in chunk]), device)
            jax.block_until_ready(features)  # encoded means computed: the decode thread never waits on it
            outcome = [(f, None) for f in features]
        except Exception as e:  # the windows' jobs fail, the server serves on
            log.exception("encoding failed")
            outcome = [(None, e)] * len(chunk)
        with self._cv:
            for w, (f, error) in zip(chunk, outcome):
                w.features, w.error = f, error
                if error is None:
                    w.mel = None
                self._started.discard(w)
            if by_encoder:
                self._encoder_busy = False
            self._cv.notify_all()

    # ---- the scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                try:
                    work = self._next_work()
                except Exception as e:  # a fault in the bookkeeping fails the calls it holds, not the server
                    log.exception("scheduling failed")
                    self._fail_all(e)
                    self._slots, self._queued = None, None
                    continue
            if work is None:
                return
            settle, to_encode, detections, admitted = work
            try:
                if settle:
                    self._settle()
                if to_encode:
                    self._encode(to_encode, self.programs.lanes.decode)  # the decoder's own cores
                    continue
                if detections:
                    self._detect(detections)
                if admitted:
                    self._admit(admitted)
                with self._cv:
                    step = self._active() and not self._filling()
                if step:
                    self._step()
            except Exception as e:  # a device error fails the work in flight, not the server
                log.exception("decoding failed")
                for d in detections:
                    if not d.future.done():
                        d.future.set_exception(e)
                self._fail_rows(e, admitted)
                self._slots, self._queued = None, None
                self._requeue([w for w in to_encode if not w.encoded])

    def _next_work(self) -> tuple | None:  # with self._cv held
        """Waits for work; returns what to do next (None: the scheduler is closed)."""
        while not (self._queued is not None or self._detections_ready() or self._helps_encoder()
                   or ((self._admissible() or self._active()) and not self._filling()) or self._closed):
            self._cv.wait()
        if self._closed:
            self._fail_all(SchedulerClosed("the engine is shutting down"))
            return None
        # Taken detections run: their callers can no longer cancel them.
        detections = [d for d in self._detections if d.window.encoded and d.future.set_running_or_notify_cancel()]
        self._detections = deque(d for d in self._detections if not d.window.encoded)
        # The batch would wait for the encoder: with cores of its own, encode a window too
        # (windows ready meanwhile are admitted together once it has caught up).
        to_encode = self._take_windows() if not detections and self._helps_encoder() else []
        # While the batch waits for the encoder anyway, the windows ready so far wait too, to
        # be admitted together (with CPU lanes: on every core, once the encoder is done).
        queued = len(self._jobs)
        admitted = [] if to_encode or self._filling() else self._take_jobs()
        if detections or len(self._jobs) < queued:  # admitted, or ended (cancelled, not encodable)
            self._cv.notify_all()  # the encoder reads ahead from the new head of the queue
        # Anything but the next step (or waiting) first decides on the queued step.
        settle = self._queued is not None and bool(detections or to_encode or admitted or not self._active()
                                                    or self._filling())
        return settle, to_encode, detections, admitted

    def _helps_encoder(self) -> bool:  # with self._cv held
        """The decoder has cores of its own (CPU lanes), and while the encoder is busy on its own,
        the batch has room for a window that waits to be encoded."""
        return (self.programs.lanes is not None and self._encoder_busy and not self._encoder_wide
                and self._starved())

    def _device(self):
        """Where the decoder's programs run: with CPU lanes, on the decoder's own cores while the
        encoder thread encodes, on every core while it does not."""
        lanes = self.programs.lanes
        return None if lanes is None else lanes.decode if self._encoder_busy else lanes.wide

    def _active(self) -> bool:
        return any(g is not None for g in self._groups)

    def _live_groups(self) -> list[_Group]:
        """The groups in the batch, each once (a group holds one slot per row), in slot order."""
        return list({id(g): g for g in self._groups if g is not None}.values())

    def _admissible(self) -> bool:
        """The next job's window is encoded."""
        return bool(self._jobs and self._jobs[0].window.encoded)

    def _detections_ready(self) -> bool:
        return any(d.window.encoded for d in self._detections)

    def _filling(self) -> bool:
        """A job that fits in the free slots is waiting for the encoder."""
        return self._fitting_job_waits(lambda w: not w.encoded)

    def _starved(self) -> bool:
        """A job that fits in the free slots has a window that no one has begun to encode: the
        batch will wait for it, so it is worth the decoder's cores too (CPU lanes)."""
        return self._fitting_job_waits(lambda w: not w.encoded and w not in self._started)

    def _fitting_job_waits(self, waits) -> bool:
        """Among the jobs that fit in the free slots, in order, one's window `waits`."""
        free = sum(g is None for g in self._groups)
        for job in self._jobs:
            if job.rows > free:
                return False
            if waits(job.window):
                return True
            free -= job.rows
        return False

    def _take_jobs(self) -> list[DecodeJob]:
        free = sum(g is None for g in self._groups)
        taken: list[DecodeJob] = []
        # In order: a wide job, or one whose window is still being encoded, is not overtaken.
        while self._jobs and self._jobs[0].rows <= free and self._jobs[0].window.encoded:
            job = self._jobs.popleft()
            self._now = max(self._now, job.queue_tag)
            if not job.future.set_running_or_notify_cancel():  # its future was cancelled
                continue
            if _cancelled(job):
                job.future.set_exception(CancelledError())
            elif job.window.error is not None:
                job.future.set_exception(job.window.error)
            else:
                taken.append(job)
                free -= job.rows
        return taken

    def _detect(self, detections: list[_Detection]) -> None:
        for d in [d for d in detections if d.window.error is not None]:
            d.future.set_exception(d.window.error)
        detections = [d for d in detections if d.window.error is None]
        for i in range(0, len(detections), self.programs.n_slots):
            chunk = detections[i : i + self.programs.n_slots]
            probs = self.programs.detect_language([d.window.features for d in chunk], self.tokenizer.sot,
                                                  self._device())
            for d, p in zip(chunk, probs):
                d.future.set_result(p)

    def _admit(self, jobs: list[DecodeJob]) -> None:
        """Put the jobs' windows into free slots. A job of several slots (beam search, best-of)
        is admitted once, in its first slot: the window's caches are computed there and copied
        into its other slots. Best-of's samples each draw their own first token; a beam search
        begins as one hypothesis, and the first step's reordering gives the other beams its state."""
        if self._slots is None:
            self._slots = self.programs.empty_slots()
        # The lowest free slots first: a step computes the blocks up to the last live slot.
        free = iter([i for i, g in enumerate(self._groups) if g is None])
        groups = []
        for j in jobs:
            slots = [next(free) for _ in range(j.rows)]
            groups.append(_Group(j, slots, float("nan"), [_Sequence() for _ in range(1 if j.beam_search else j.rows)]))
        copies = [(i, r) for i, g in enumerate(groups) for r in range(1, len(g.slots))]  # (group, its row)

        def options(rows: list[tuple[_Group, int]]) -> RowOptions:
            return RowOptions(
                np.array([g.job.temperature for g, _ in rows], np.float32),
                np.array([g.job.timestamps for g, _ in rows], bool),
                np.array([g.job.max_initial_timestamp for g, _ in rows], np.int32),
                np.array([g.job.repetition_penalty for g, _ in rows], np.float32),
                np.array([_row_key(g.job.key, r) for g, r in rows], np.uint32).reshape(-1, 2),
                np.array([g.job.min_p for g, _ in rows], np.float32),
                np.array([g.job.top_k for g, _ in rows], np.int32),
                np.array([g.job.top_p for g, _ in rows], np.float32),
            )

        # The Choice's rows: each group's first slot, then the copies.
        by_slot = {g.slots[0]: i for i, g in enumerate(groups)}
        by_slot.update({groups[i].slots[r]: len(groups) + c for c, (i, r) in enumerate(copies)})
        device = self._device()
        self._slots, choice, no_speech = self.programs.admit(
            self._slots, [g.job.window.features for g in groups], [g.job.prefix for g in groups],
            [g.job.sot_index for g in groups], [g.slots[0] for g in groups], options([(g, 0) for g in groups]),
            self.tokenizer.no_speech or 0, device, [(i, groups[i].slots[r]) for i, r in copies],
            options([(groups[i], r) for i, r in copies]))
        self._slots_on = device
        self.stats.windows += len(jobs)
        self.stats.fallbacks += sum(j.attempt > 0 for j in jobs)
        for i, g in enumerate(groups):
            self._length[g.slots] = len(g.job.prefix)
            if self.tokenizer.no_speech is not None:
                g.no_speech_prob = float(no_speech[i])
            for slot in g.slots:
                self._groups[slot] = g
        self._decide(groups, choice, by_slot)

    def _step(self) -> None:
        """Queue a step, then decide on the one queued before it (if any). The host's feed is
        used when nothing is queued (after an admission or a beam search's step); otherwise
        the queued step's own picks, which are what the host would feed."""
        self._gather()
        if not self._active():  # the queued step decided on before a move ended every row
            return
        reorder = self._reorder_pending()
        self._length = self._length[self._source] + 1
        live = [slot for slot, g in enumerate(self._groups) if g is not None]
        beams = any(self._groups[slot].job.beam_search for slot in live)
        device = self._device()
        if device != self._slots_on:
            self._slots, self._slots_on = self.programs.place(self._slots, device), device
        feed = self._feed if self._queued is None else self._queued.tokens
        self._slots, choice = self.programs.step(self._slots, feed, self._source if reorder else None,
                                                 length=int(self._length[live].max()), candidates=beams,
                                                 rows=live[-1] + 1, device=device)
        self._source = np.arange(len(self._source), dtype=np.int32)
        self.stats.steps += 1
        self.stats.rows += len(live)
        if self._queued is not None:
            self._settle()
        self._queued = choice
        if beams or self._all_end_next():
            self._settle()  # beams: the host decides what the next step is fed

    def _reorder_pending(self) -> bool:
        """A beam search's rows take others' at the next step."""
        return bool((self._source != np.arange(len(self._source))).any())

    def _moves(self) -> list[tuple[int, int]]:
        """(from, to) slots: the live rows past the first n slots, n live rows in all, into the
        free slots among the first n, when steps then compute fewer blocks. None while a beam
        search's reordering is pending (it reads rows by slot)."""
        live = [slot for slot, g in enumerate(self._groups) if g is not None]
        if not live or self._reorder_pending():
            return []
        if self.programs.blocks_holding(live[-1] + 1) == self.programs.blocks_holding(len(live)):
            return []
        free = [slot for slot in range(len(live)) if self._groups[slot] is None]
        return list(zip([slot for slot in live if slot >= len(live)], free))

    def _gather(self) -> None:
        """Move the live rows into the first slots (see `_moves`). A move copies a row's caches
        once (for `base` on CPU a few milliseconds); each later step of the rows left in the
        first blocks saves more than that. The queued step is decided on first: its picks are
        fed by slot."""
        if not self._moves():
            return
        if self._queued is not None:
            self._settle()
        moves = self._moves()
        if not moves:
            return
        device = self._device()
        self._slots, self._slots_on = self.programs.move(self._slots, moves, device), device
        for old, new in moves:
            g = self._groups[old]
            g.slots[g.slots.index(old)] = new
            self._groups[new], self._groups[old] = g, None
            self._feed[new], self._length[new] = self._feed[old], self._length[old]

    def _settle(self) -> None:
        """Decide on the queued step's proposals."""
        choice, self._queued = self._queued.fetch(), None
        self._decide(self._live_groups(), choice, {slot: slot for slot in range(len(self._groups))})

    def _all_end_next(self) -> bool:
        """Every live row reaches its token limit with the step just queued: a step queued
        after it would be wasted."""
        for g in self._live_groups():
            if any(not seq.done and not self._at_limit(g.job, len(seq.tokens) + 1) for seq in g.sequences):
                return False
        return True

    def _decide(self, groups: list[_Group], choice, row_of: dict[int, int]) -> None:
        """Turn the programs' proposals into each group's next tokens, and end finished groups."""
        for g in groups:
            job = g.job
            if job.cancel is not None and job.cancel.is_set():
                self._release(g)
                job.future.set_exception(CancelledError())
            elif job.beam_search:
                self._beam_update(g, choice, row_of)
            else:
                for slot, seq in zip(g.slots, g.sequences):
                    if not seq.done:
                        row = row_of[slot]
                        self._extend(g, slot, seq, int(choice.tokens[row]), float(choice.logprobs[row]))
                if all(seq.done for seq in g.sequences):
                    self._release(g)
                    best = self._rank(job, [(tuple(s.tokens), s.sum_logprob) for s in g.sequences])
                    # Sequences of the same tokens end alike: an end-of-text comes before the limit.
                    ended = any(s.ended for s in g.sequences if tuple(s.tokens) == best[0])
                    job.future.set_result(DecodeOutput(list(best[0]), best[1], g.no_speech_prob, ended))

    def _at_limit(self, job: DecodeJob, sampled: int) -> bool:
        # As openai-whisper: at most sample_len tokens, and never past the text context.
        return sampled >= job.sample_len or len(job.prefix) + sampled > self.programs.dims.n_text_ctx

    def _extend(self, g: _Group, slot: int, seq: _Sequence, token: int, logprob: float) -> None:
        seq.sum_logprob += logprob
        if token == self.tokenizer.eot:
            seq.done = seq.ended = True
            return
        seq.tokens.append(token)
        if g.job.on_token is not None and len(g.slots) == 1:
            g.job.on_token(token)
        seq.done = self._at_limit(g.job, len(seq.tokens))
        self._feed[slot] = token

    def _beam_update(self, g: _Group, choice, row_of: dict[int, int]) -> None:
        """openai-whisper's BeamSearchDecoder.update: every beam offers its beam_size + 1 best
        continuations; the best beam_size that do not end become the new beams, those that end
        are kept as finished hypotheses."""
        job, eot = g.job, self.tokenizer.eot
        scores: dict[tuple[int, ...], float] = {}
        sources: dict[tuple[int, ...], int] = {}
        for j, (slot, seq) in enumerate(zip(g.slots, g.sequences)):
            row = row_of[slot]
            for logprob, token in zip(choice.top_logprobs[row][: job.beam_size + 1], choice.top_tokens[row]):
                candidate = (*seq.tokens, int(token))
                scores[candidate] = seq.sum_logprob + float(logprob)
                sources[candidate] = j
        beams, newly_finished = [], {}
        for candidate in sorted(scores, key=scores.get, reverse=True):
            if candidate[-1] == eot:
                newly_finished[candidate] = scores[candidate]
            else:
                beams.append(candidate)
                if len(beams) == job.beam_size:
                    break
        max_candidates = round(job.beam_size * job.patience)
        for candidate in sorted(newly_finished, key=newly_finished.get, reverse=True):
            if len(g.finished) >= max_candidates:
                break
            g.finished[candidate[:-1]] = newly_finished[candidate]
        for slot, candidate in zip(g.slots, beams):
            self._source[slot] = g.slots[sources[candidate]]
            self._feed[slot] = candidate[-1]
        g.sequences = [_Sequence(list(c), scores[c]) for c in beams]
        if len(g.finished) >= max_candidates or self._at_limit(job, len(beams[0])):
            self._release(g)
            finished = dict(g.finished)
            if len(finished) < job.beam_size:  # not enough ended: the best live beams count as ended
                for seq in sorted(g.sequences, key=lambda s: s.sum_logprob, reverse=True):
                    finished.setdefault(tuple(seq.tokens), seq.sum_logprob)
                    if len(finished) >= job.beam_size:
                        break
            best = self._rank(job, list(finished.items()))
            job.future.set_result(DecodeOutput(list(best[0]), best[1], g.no_speech_prob, best[0] in g.finished))

    @staticmethod
    def _rank(job: DecodeJob, hypotheses: list[tuple[tuple[int, ...], float]]) -> tuple[tuple[int, ...], float]:
        """openai-whisper's MaximumLikelihoodRanker: sum logprob over a length penalty."""
        def score(h: tuple[tuple[int, ...], float]) -> float:
            length = len(h[0])
            penalty = length if job.length_penalty is None else ((5 + length) / 6) ** job.length_penalty
            return h[1] / penalty if penalty else h[1]
        return max(hypotheses, key=score) if len(hypotheses) > 1 else hypotheses[0]

    def _release(self, g: _Group) -> None:
        for slot in g.slots:
            self._groups[slot] = None
            self._source[slot] = slot

    def _fail_rows(self, error: Exception, extra: list[DecodeJob]) -> None:
        for g in self._live_groups():
            if not g.job.future.done():
                g.job.future.set_exception(error)
            self._release(g)
        for job in extra:
            if not job.future.done():
                job.future.set_exception(error)

    def _fail_all(self, error: Exception) -> None:
        self._fail_rows(error, list(self._jobs))
        self._jobs.clear()
        for d in self._detections:
            if not d.future.done():
                d.future.set_exception(error)
        self._detections.clear()
