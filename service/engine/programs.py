"""The compiled programs of the engine, over a fixed number of batch slots.

A slot holds one window being decoded. The state of all slots (self-attention cache,
cross-attention keys/values, row state and options, write positions) lives on the device as
one `Slots` tuple that each program takes and returns (donated, so updated in place):

- `encode`: mel windows -> audio features (batch buckets).
- `detect_language`: audio features -> probabilities of the language tokens.
- `admit`: put new windows into free slots: cross keys/values, prefill of the prefix, and the
  choice of the first token (and the no-speech probability, read at <|startoftranscript|>). A
  window decoded in several slots (a beam search's beams, best-of's samples) is admitted as one
  row whose caches (cross keys/values, prefilled self-attention) are also written into its
  other slots: computed once, not per slot. Each copy gets its own options and first token
  (a best-of sample draws it with its own key).
- `move`: slots take over others' caches, state and options (live rows gather in the first
  blocks when the slots before them have been freed).
- `step`: feed every slot the token the host decided for it and choose the next: the one
  compiled decode step. For beam search, a program of its own first reorders the rows (a beam
  takes over the hypothesis it continues).

The slots' caches are cut into blocks of 1, 3, 12, ... rows (model.py), and a step is
compiled for each number of leading blocks: it computes the rows of the blocks that hold live
slots, and the host fills the lowest free slots first, so a lone window costs a one-row step,
not a step for every slot (on CPU, base: 12 ms against 37 ms for 8 rows). When rows before a
live one end, the host moves it into a free lower slot if its steps then need fewer blocks.

The programs propose tokens; the host decides (a sampled row takes its choice, beam search
picks among each row's top candidates), and the next step feeds the decision in.
- `align`: teacher-forced tokens of one window -> cross-attention scores of the alignment heads
  and token probabilities, for word timestamps.

On CPU each program runs on one of the lanes of lanes.py (the caller says which); elsewhere on
JAX's default device, or split over a mesh of local devices.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import model
from .dims import N_FRAMES, ModelDimensions
from .lanes import cpu_lanes
from .rules import RowOptions, RowState, Vocabulary, choose_tokens, commit_tokens

# How many windows an admission or a language detection computes at once, at most (see
# `Programs._group`): the most bytes of their cross-attention keys and values, and the most
# windows. On CPU one: a window's keys/values are large matrix products already, and a group
# costs as much as its windows whether they are windows or padding (base, 2 cores: one window
# admitted in 80 ms, eight in 0.61-0.64 s one at a time, 0.56 s eight at once). An accelerator
# wants several, to fill it.
GROUP_BYTES = 1 << 30
GROUP_WINDOWS = 8
GROUP_WINDOWS_CPU = 1


class Choice(NamedTuple):
    """What a program proposes for each row: its pick and the top candidates."""
    tokens: np.ndarray  # [rows] argmax, or a sample when the row's temperature is above 0
    logprobs: np.ndarray  # [rows] of those tokens
    top_logprobs: np.ndarray  # [rows, TOP_K], best first
    top_tokens: np.ndarray  # [rows, TOP_K]

    def fetch(self) -> "Choice":
        """The proposals on the host (waits for the program that computes them)."""
        return Choice(*(np.asarray(x) for x in self))


class Call(NamedTuple):
    """One run of a compiled program: the program and the arguments serving passes it. Called,
    it runs; `compile` only compiles it, for exactly these arguments (their shapes, types and
    placements), which is what the warm-up does."""
    program: Any  # a jax.jit function
    args: tuple
    static: dict

    def __call__(self):
        return self.program(*self.args, **self.static)

    def compile(self) -> None:
        self.program.lower(*self.args, **self.static).compile()


class Slots(NamedTuple):
    cache: model.KVCache
    state: RowState
    options: RowOptions
    position: jax.Array  # [slots] where the next fed token is written


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    """The smallest size that holds n."""
    for s in sizes:
        if s >= n:
            return s
    raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")


def slot_blocks(n_slots: int) -> tuple[int, ...]:
    """The sizes of the blocks the slots are cut into: 1, 3, 12, 48, ..., each three times as
    large as all before it (the last smaller where the slots run out), so that k live slots at
    the front lie in blocks of fewer than 4k rows, with few blocks (a step is compiled for each
    number of them)."""
    sizes = [1]
    while sum(sizes) < n_slots:
        sizes.append(min(3 * sum(sizes), n_slots - sum(sizes)))
    return tuple(sizes)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to max_batch, and max_batch itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return tuple(sorted(set(sizes + [max_batch])))


class Programs:
    def __init__(self, params: dict, dims: ModelDimensions, vocab: Vocabulary, n_slots: int, language_ids: list[int],
                 alignment_heads: list[tuple[int, int]] = (), *, accelerator: bool | None = None):
        """`accelerator`: lay the encoder out for an accelerator (windows encoded together, all
        heads of attention at once, in chunks of queries) or for CPU cores; by default as JAX's
        backend wants. Either layout computes the same numbers on any backend."""
        devices = jax.local_devices()
        # Several local accelerators: the batch slots are split across them, the weights copied
        # to each; XLA partitions every program from these placements (one process drives all).
        self.mesh = Mesh(np.array(devices), ("batch",)) if len(devices) > 1 and n_slots % len(devices) == 0 else None
        if self.mesh is not None:
            params = jax.device_put(params, NamedSharding(self.mesh, PartitionSpec()))
        # On CPU: the encoder on cores of its own, the decoder's programs beside it (lanes.py).
        self.lanes = lanes = cpu_lanes() if self.mesh is None else None
        self.params = params
        # The devices each side may run on (None: JAX's default device, or the mesh), and the
        # parameters on each (on CPU, aliases of one copy). Encoder outputs rest on `home` (on a
        # mesh, whole on every device), placed there explicitly, and so are the warm-up's
        # stand-ins for them: a program compiled for arrays with no placement of their own, or
        # another one, is compiled again for theirs.
        self.encode_devices = (None,) if lanes is None else (lanes.encode, lanes.decode, lanes.wide)
        self.decode_devices = (None,) if lanes is None else (lanes.decode, lanes.wide)
        self.home = (lanes.wide if lanes is not None else NamedSharding(self.mesh, PartitionSpec())
                     if self.mesh is not None else devices[0])
        # On a mesh, what is split over the devices row by row: the slots, a step's tokens, the
        # windows to encode.
        self.split = NamedSharding(self.mesh, PartitionSpec("batch")) if self.mesh is not None else None
        self._params_on = {None: params}
        if lanes is not None:
            self._params_on.update({d: jax.device_put(params, d) for d in (lanes.decode, lanes.encode, lanes.wide)})
        self.dims = dims
        self.vocab = vocab
        self.n_slots = n_slots
        # On a mesh the slots are split over the devices: one block.
        self.blocks = slot_blocks(n_slots) if self.mesh is None else (n_slots,)
        self.dtype = params["decoder"]["token_embedding"]["kernel"].dtype
        batch_sizes = batch_buckets(n_slots)
        # On CPU the encoder is fastest one window at a time and its attention one head at a time
        # (activations and scores stay in cache: a sixth less time than all eight heads of base).
        if accelerator is None:
            accelerator = jax.default_backend() != "cpu"
        if self.mesh is not None:  # windows split over the devices, each encoding its own share
            self.encode_sizes = tuple(n for n in batch_sizes if n % self.mesh.size == 0)
        else:
            self.encode_sizes = batch_sizes if accelerator else (1,)
        chunks = model.Chunks() if accelerator else model.Chunks(heads=1, queries=None)
        self.prefix_sizes = (8, 64, dims.n_text_ctx // 2 + 8)
        # How much of the self-attention cache a step reads: the longest live sequence, rounded up.
        self.kv_sizes = tuple(sorted({n for n in (64, 128, 256) if n < dims.n_text_ctx} | {dims.n_text_ctx}))
        self.language_ids = jnp.asarray(language_ids, jnp.int32)
        # A stand-in for the features of a batch's padding rows (see `_rows`).
        self._blank = jax.device_put(np.zeros((dims.n_audio_ctx, dims.n_audio_state), self.dtype), self.home)
        self._chunks = chunks
        self.group_bytes = GROUP_BYTES
        self.group_windows = GROUP_WINDOWS if accelerator else GROUP_WINDOWS_CPU
        self._encode = jax.jit(self._encode_impl)
        self._detect = jax.jit(self._detect_impl)
        self._admit = jax.jit(self._admit_impl, donate_argnums=(1,))
        self._step = jax.jit(self._step_impl, donate_argnums=(2,), static_argnames=("kv_len",))
        self._reorder = jax.jit(self._reorder_impl, donate_argnums=(0,), static_argnames=("kv_len",))
        self._move = jax.jit(self._move_impl, donate_argnums=(0,))
        self.alignment_heads = list(alignment_heads)
        self.align_sizes = (64, dims.n_text_ctx // 2 + 8, dims.n_text_ctx)
        self._align = jax.jit(self._align_impl)

    # ---- the programs ----------------------------------------------------------------------

    def _encode_impl(self, params, mel: jax.Array) -> tuple[jax.Array, ...]:
        """Each window's features an array of its own: windows part ways after encoding."""
        return tuple(model.encode(params, mel, self.dims, self._chunks))

    def _detect_impl(self, params, rows: tuple[jax.Array, ...], windows: jax.Array, sot: jax.Array) -> jax.Array:
        """The first `windows` of the rows (the others are padding, not computed), a group at a
        time (see `_group`)."""
        features = jnp.stack(rows)
        b, g = features.shape[0], self._group()

        def detect(j, probs):  # the rows of group j
            ck, cv = model.cross_kv(params, jax.lax.dynamic_slice_in_dim(features, j * g, g), self.dims)
            sk, sv = model.empty_self_cache(self.dims, g, self.dtype, length=1)
            tokens = jnp.full((g, 1), sot, jnp.int32)
            logits, _ = model.decode(params, tokens, jnp.zeros(g, jnp.int32), model.KVCache(sk, sv, ck, cv),
                                     jnp.zeros((g, 1), jnp.int32), self.dims)
            return jax.lax.dynamic_update_slice_in_dim(probs, jax.nn.softmax(logits[:, 0, self.language_ids], axis=-1),
                                                       j * g, 0)

        return jax.lax.fori_loop(0, (windows + g - 1) // g, detect,
                                 jnp.zeros((b, len(self.language_ids)), jnp.float32))

    def _group(self) -> int:
        """How many windows an admission or a language detection computes at once: the most
        that divides the slots, is at most `group_windows` and whose cross-attention keys and
        values fit in `group_bytes` (at least one). Computed all at once, a batch's would be
        the size of the slots' again, and more while XLA computes them (large-v3 in float32:
        9.4 GB for 8 windows). Both programs take a row for every slot, the windows first: the
        number of windows decides how many groups they compute, not which program runs, so
        one program serves every number of windows."""
        d = self.dims
        per_row = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state * jnp.dtype(self.dtype).itemsize
        most = max(1, min(self.group_windows, self.group_bytes // per_row))
        return max(g for g in range(1, min(self.n_slots, most) + 1) if self.n_slots % g == 0)

    def _admit_impl(self, params, slots: Slots, rows: tuple[jax.Array, ...], windows, prefix, length, sot_index,
                    pair_rows, targets, options: RowOptions, no_speech):
        """The first `windows` rows are windows, the others padding. Each pair i writes the
        caches of row pair_rows[i] into slot targets[i] (past the last slot: none), which starts
        as that row does, with options[i], and draws its first token: a window's own slot, and
        those of its copies (beams, best-of's samples). The choices are the pairs'. The rows are
        computed a group at a time (see `_group`), each group's caches written into their slots
        before the next group's are computed; padding rows past the last group that holds a
        window are not computed."""
        features = jnp.stack(rows)
        k, g = features.shape[0], self._group()
        logit_index = jnp.stack([sot_index, length - 1], axis=1)

        def admit(j, carry):  # the rows of group j
            cache, logits = carry
            at = lambda x: jax.lax.dynamic_slice_in_dim(x, j * g, g)  # noqa: E731
            ck, cv = model.cross_kv(params, at(features), self.dims)
            sk, sv = model.empty_self_cache(self.dims, g, self.dtype)
            group_logits, new = model.decode(params, at(prefix), jnp.zeros(g, jnp.int32),
                                             model.KVCache(sk, sv, ck, cv), at(logit_index), self.dims)
            # This group's pairs first, in slot order; the others' targets past the last slot.
            mine = jnp.where((pair_rows >= j * g) & (pair_rows < (j + 1) * g), targets, self.n_slots)
            order = jnp.argsort(mine)
            sources, group_targets = pair_rows[order] - j * g, mine[order]
            new_rows = [blocks[0] for blocks in (*new.self_k, *new.self_v, *ck, *cv)]  # one block of g rows each
            cache = self._write_rows(cache, group_targets, lambda i, _: tuple(
                jax.lax.dynamic_index_in_dim(r, sources[i], keepdims=False) for r in new_rows))
            return cache, jax.lax.dynamic_update_slice_in_dim(logits, group_logits, j * g, 0)

        cache, logits = jax.lax.fori_loop(0, (windows + g - 1) // g, admit, (
            slots.cache, jnp.zeros((k, 2, self.dims.n_vocab), jnp.float32)))
        no_speech_prob = jax.nn.softmax(logits[:, 0], axis=-1)[:, no_speech]
        valid = jnp.arange(prefix.shape[1])[None, :] < length[:, None]
        seen = jnp.zeros((k, self.dims.n_vocab), jnp.int32).at[jnp.arange(k)[:, None], prefix].add(valid) > 0
        state = RowState(
            last_token=jnp.full(k, -1, jnp.int32),
            prev_token=jnp.full(k, -1, jnp.int32),
            last_timestamp=jnp.full(k, -1, jnp.int32),
            n_sampled=jnp.zeros(k, jnp.int32),
            seen=seen,
        )
        state = RowState(*(x[pair_rows] for x in state))
        choice = choose_tokens(logits[pair_rows, 1], state, options, self.vocab)
        put = lambda big, small: big.at[targets].set(small, mode="drop")  # noqa: E731
        slots = Slots(cache, RowState(*map(put, slots.state, state)), RowOptions(*map(put, slots.options, options)),
                      put(slots.position, length[pair_rows]))
        return slots, choice, no_speech_prob

    def _write_rows(self, cache: model.KVCache, targets: jax.Array, row) -> model.KVCache:
        """`cache` with, for each i in order, row(i, blocks) written into slot targets[i] of every
        cache of every layer (targets in increasing order; past the last slot: none). `blocks`
        are the cache's blocks as they are at that point ([block][cache], caches in KVCache order).
        Each block loops over its targets and writes in place (scattering each cache into each
        block separately would make the programs many times longer to compile)."""
        layers = self.dims.n_text_layer
        blocks = [list(b) for b in zip(*(*cache.self_k, *cache.self_v, *cache.cross_k, *cache.cross_v))]
        start = 0
        for b in range(len(blocks)):
            n = blocks[b][0].shape[0]

            def write(i, caches, b=b, start=start):
                values = row(i, blocks[:b] + [caches] + blocks[b + 1:])  # this block as the loop has it
                return tuple(jax.lax.dynamic_update_index_in_dim(c, v, targets[i] - start, 0)
                             for c, v in zip(caches, values))

            lo, hi = jnp.searchsorted(targets, start), jnp.searchsorted(targets, start + n)
            blocks[b] = list(jax.lax.fori_loop(lo, hi, write, tuple(blocks[b])))
            start += n
        by_cache = [tuple(block[c] for block in blocks) for c in range(4 * layers)]  # [cache][block]
        return model.KVCache(*(tuple(by_cache[i * layers:(i + 1) * layers]) for i in range(4)))

    def _move_impl(self, slots: Slots, sources, targets):
        """Slot targets[i] takes over slot sources[i]: its caches, state, options and position
        (past the last slot: no move). Targets are free slots and no source is a target, so
        the moves may be made in any order."""
        order = jnp.argsort(targets)
        sources, targets = sources[order], targets[order]
        starts = np.cumsum((0,) + self.blocks[:-1])

        def read(i, blocks):  # slot sources[i] of each cache
            values = []
            for c in range(len(blocks[0])):
                value = None
                for block, start in zip(blocks, starts):
                    at = jnp.clip(sources[i] - start, 0, block[c].shape[0] - 1)
                    here = jax.lax.dynamic_index_in_dim(block[c], at, keepdims=False)
                    value = here if value is None else jnp.where(sources[i] >= start, here, value)
                values.append(value)
            return tuple(values)

        take = lambda x: x.at[targets].set(x[jnp.minimum(sources, self.n_slots - 1)], mode="drop")  # noqa: E731
        return Slots(self._write_rows(slots.cache, targets, read), RowState(*map(take, slots.state)),
                     RowOptions(*map(take, slots.options)), take(slots.position))

    def _reorder_impl(self, moving, source, kv_len: int):
        """Row i takes the self-attention cache, state, options and position of row source[i]
        (a beam takes over the hypothesis it continues; beams of one window share its audio,
        so the cross cache needs no reordering). `moving` is donated and updated in place. Only
        the first kv_len cache positions are moved: no live row has keys past them, and every
        later position is written before it is read. A program of its own rather than a
        variant of each step: each compiled program holds its XLA module in memory, and a
        step's is several times this one's."""
        self_k, self_v, state, options, position = moving
        sizes = [blk.shape[0] for blk in self_k[0]]
        take = lambda x: jnp.take(x, source, axis=0)  # noqa: E731

        def take_rows(blocks):
            moved = model.split_rows(take(model.join_rows([b[:, :, :kv_len] for b in blocks])), sizes)
            return tuple(b.at[:, :, :kv_len].set(m) for b, m in zip(blocks, moved))

        return (tuple(map(take_rows, self_k)), tuple(map(take_rows, self_v)), RowState(*map(take, state)),
                RowOptions(*map(take, options)), take(position))

    def _step_impl(self, params, cross, moving, tokens, candidates, kv_len: int):
        """`cross` (keys/values) is only read; `moving` (self-attention cache, row state and
        options, positions) is donated and updated in place. Passing the large cross cache
        through as an output would make XLA copy it at every step. The caches given are the
        first blocks: the step computes their rows (the first r), the others keep their state,
        and the proposals of rows past r are zeros. Self-attention reads the first kv_len cache
        positions."""
        (cross_k, cross_v), (self_k, self_v, state, options, position) = cross, moving
        r = sum(blk.shape[0] for blk in self_k[0])
        head = lambda x: x[:r]  # noqa: E731
        live_state, live_options, live_position = RowState(*map(head, state)), RowOptions(*map(head, options)), position[:r]
        live_state = commit_tokens(live_state, tokens[:r], self.vocab)
        cache = model.KVCache(self_k, self_v, cross_k, cross_v)
        logits, cache = model.decode(params, tokens[:r, None], live_position, cache, jnp.zeros((r, 1), jnp.int32),
                                     self.dims, kv_len=kv_len)
        choice = choose_tokens(logits[:, 0], live_state, live_options, self.vocab, candidates)
        put = lambda full, live: live if r == self.n_slots else full.at[:r].set(live)  # noqa: E731
        pad = lambda x: jnp.pad(x, [(0, self.n_slots - r)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
        state = RowState(*map(put, state, live_state))
        options = RowOptions(*map(put, options, live_options))
        return (cache.self_k, cache.self_v, state, options, put(position, live_position + 1)), tuple(map(pad, choice))

    def _align_impl(self, params, features, tokens):
        ck, cv = model.cross_kv(params, features[None], self.dims)
        sk, sv = model.empty_self_cache(self.dims, 1, self.dtype)
        scores: list = []
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        logits, _ = model.decode(params, tokens, jnp.zeros(1, jnp.int32), model.KVCache(sk, sv, ck, cv), positions,
                                 self.dims, cross_scores=scores)
        heads = jnp.stack([scores[layer][0, head] for layer, head in self.alignment_heads])
        return heads, jax.nn.softmax(logits[0], axis=-1)

    # ---- host-side entry points -----------------------------------------------------------

    def warmup(self, sot: int, detect_language: bool) -> None:
        """Compile every program at every bucket, on every device it may run on, for the very
        arguments serving passes (see `Call`), without running any. Running each once cost
        minutes of computing for large models on CPU, and memory: each device's warm-up held
        slots and cross keys/values of its own (large-v3 at 8 slots on CPU ran out of 24 GB).
        One set of stand-in slots serves every call, as nothing is donated. Programs compile
        side by side, a few at a time: compiling is most of the time, and each compile of a
        large model's program takes gigabytes of memory."""
        d = self.dims
        slots = self.empty_slots()
        calls = [self._encode_call(np.zeros((size, d.n_mels, N_FRAMES), np.float32), device)
                 for device in self.encode_devices for size in self.encode_sizes]
        for device in self.decode_devices:
            on_device = self.place(slots, device)
            if detect_language:
                calls.append(self._detect_call([self._blank], sot, device))
            for width in self.prefix_sizes:
                prefixes = [[sot] * min(width, d.n_text_ctx)]
                calls.append(self._admit_call(on_device, [self._blank], prefixes, [0], [0], RowOptions.off(1), 0,
                                              device))
            calls.append(self._move_call(on_device, []))
            tokens = np.zeros(self.n_slots, np.int32)
            for rows in np.cumsum(self.blocks)[:-1]:  # fewer blocks than all: one length
                calls.append(self._step_call(on_device, tokens, rows=int(rows), device=device)[0])
            for length in self.kv_sizes:  # all blocks, and beam search's reordering
                calls.append(self._step_call(on_device, tokens, length=length, device=device)[0])
                calls.append(self._reorder_call(on_device, np.arange(self.n_slots), length))
        if self.alignment_heads:  # word timestamps
            calls += [self._align_call(self._blank, [sot] * width) for width in self.align_sizes]
        with ThreadPoolExecutor(min(len(calls), os.cpu_count() or 1, 4), thread_name_prefix="warmup") as pool:
            for done in [pool.submit(call.compile) for call in calls]:
                done.result()

    def empty_slots(self) -> Slots:
        n, d = self.n_slots, self.dims
        sk, sv = model.empty_self_cache(d, self.blocks, self.dtype)
        cross_shape = (d.n_text_head, d.n_audio_ctx, d.n_text_state // d.n_text_head)
        cross = lambda: tuple(tuple(jnp.zeros((rows, *cross_shape), self.dtype) for rows in self.blocks)  # noqa: E731
                              for _ in range(d.n_text_layer))
        state = RowState(*(jnp.full(n, -1, jnp.int32) for _ in range(3)), jnp.zeros(n, jnp.int32),
                         jnp.zeros((n, d.n_vocab), bool))
        slots = Slots(model.KVCache(sk, sv, cross(), cross()), state, RowOptions.off(n),
                      jnp.full(n, d.n_text_ctx, jnp.int32))
        if self.mesh is not None:
            return jax.device_put(slots, self.split)
        return self.place(slots, self.home)  # placed, as every program's outputs are

    def encode(self, mel: np.ndarray, device: jax.Device | None = None) -> list[jax.Array]:
        """Log-mel windows [k, n_mels, 3000] (on the host) -> each window's features
        [n_audio_ctx, state], in batch buckets, computed on `device` (one of `encode_devices`;
        default the first) and left on `home`."""
        largest = self.encode_sizes[-1]
        features = []
        for i in range(0, mel.shape[0], largest):
            chunk = mel[i : i + largest]
            features += self._encode_call(chunk, device)()[: chunk.shape[0]]
        return self.place(features, self.home)

    def _encode_call(self, mel: np.ndarray, device: jax.Device | None) -> Call:
        device = device or self.encode_devices[0]
        size = bucket(mel.shape[0], self.encode_sizes)
        # Placed, even where `device` is None: a host array and a device one would each get a program.
        chunk = jax.device_put(self._pad_rows(np.asarray(mel, np.float32), size), self.split or device)
        return Call(self._encode, (self._params_on[device], chunk), {})

    def detect_language(self, features: list[jax.Array], sot: int, device: jax.Device | None = None) -> np.ndarray:
        """Language probabilities [len(features), languages] of windows' features."""
        return np.asarray(self._detect_call(features, sot, device)())[: len(features)]

    def _detect_call(self, features: list[jax.Array], sot: int, device: jax.Device | None) -> Call:
        rows = self.place(self._rows(features, self.n_slots), device)
        return Call(self._detect, (self._params_on[device], rows, np.int32(len(features)), np.int32(sot)), {})

    def admit(self, slots: Slots, features: list[jax.Array], prefixes: list[list[int]], sot_index: list[int],
              slot_ids: list[int], options: RowOptions, no_speech: int, device: jax.Device | None = None,
              copies: list[tuple[int, int]] = (), copy_options: RowOptions | None = None):
        """Returns (slots, Choice of the first tokens, no-speech probabilities) for the k rows.
        `copies`: (row, slot) pairs: the slot also gets the row's caches (cross keys/values and
        prefilled self-attention cache) and starts as the row does, with the options of
        `copy_options` (one per copy); their first tokens follow the k rows' in the Choice."""
        call = self._admit_call(slots, features, prefixes, sot_index, slot_ids, options, no_speech, device, copies,
                                copy_options)
        slots, choice, no_speech_prob = call()
        pairs = len(prefixes) + len(copies)
        return slots, Choice(*(np.asarray(c)[:pairs] for c in choice)), np.asarray(no_speech_prob)[: len(prefixes)]

    def _admit_call(self, slots: Slots, features: list[jax.Array], prefixes: list[list[int]], sot_index: list[int],
                    slot_ids: list[int], options: RowOptions, no_speech: int, device: jax.Device | None,
                    copies: list[tuple[int, int]] = (), copy_options: RowOptions | None = None) -> Call:
        """The admission's Call: a row for every slot, the windows' first, and a pair for every
        slot: the windows' own, then the copies' (the others write nowhere)."""
        k, n = len(prefixes), self.n_slots
        width = bucket(max(map(len, prefixes)), self.prefix_sizes)
        prefix = np.zeros((n, width), np.int32)
        for i, p in enumerate(prefixes):
            prefix[i, : len(p)] = p
        length = np.ones(n, np.int32)
        length[:k] = [len(p) for p in prefixes]
        sot = np.zeros(n, np.int32)
        sot[:k] = sot_index
        pair_rows = np.zeros(n, np.int32)
        targets = np.full(n, n, np.int32)  # past the last slot: none
        pair_rows[:k], targets[:k] = np.arange(k), slot_ids
        if copies:
            pair_rows[k : k + len(copies)], targets[k : k + len(copies)] = np.asarray(copies, np.int32).T
        if copy_options is None:
            copy_options = RowOptions.off(len(copies))
        # Pairs that write nowhere draw with every option off (a filter would search for them).
        options = RowOptions(*(np.concatenate([np.asarray(o), np.asarray(c), p]) for o, c, p in
                               zip(options, copy_options, RowOptions.off(n - k - len(copies)))))
        return Call(self._admit, (
            self._params_on[device], self.place(slots, device), self.place(self._rows(features, n), device),
            np.int32(k), prefix, length, sot, pair_rows, targets, options, np.int32(no_speech)), {})

    def move(self, slots: Slots, moves: list[tuple[int, int]], device: jax.Device | None = None) -> Slots:
        """`moves`: (from, to) pairs of slots: each `to` (a free slot) takes over its `from`'s
        caches, state, options and position, so that live rows may gather in the first blocks.
        `device`: where the slots are (see `place`)."""
        return self._move_call(self.place(slots, device), moves)()

    def _move_call(self, slots: Slots, moves: list[tuple[int, int]]) -> Call:
        pairs = self._slot_pairs(moves)
        return Call(self._move, (slots, pairs[0], pairs[1]), {})

    def _slot_pairs(self, pairs: list[tuple[int, int]]) -> np.ndarray:
        """[2, n_slots]: the pairs' first and second members, padded past the last slot (none)."""
        out = np.full((2, self.n_slots), self.n_slots, np.int32)
        out[:, : len(pairs)] = np.asarray(pairs, np.int32).reshape(-1, 2).T
        return out

    def blocks_holding(self, rows: int) -> int:
        """How many leading blocks hold the first `rows` slots: the blocks a step for them computes."""
        return int(np.searchsorted(np.cumsum(self.blocks), rows)) + 1

    def align(self, features: jax.Array, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Cross-attention scores of the alignment heads [heads, len(tokens), n_audio_ctx] and the
        next-token probabilities [len(tokens), vocab] of one window's teacher-forced tokens."""
        n = min(len(tokens), self.dims.n_text_ctx)
        scores, probs = self._align_call(features, tokens)()
        return np.asarray(scores)[:, :n], np.asarray(probs)[:n]

    def _align_call(self, features: jax.Array, tokens: list[int]) -> Call:
        tokens = tokens[: self.dims.n_text_ctx]
        padded = np.zeros((1, bucket(len(tokens), self.align_sizes)), np.int32)
        padded[0, : len(tokens)] = tokens
        return Call(self._align, (self.params, features, padded), {})

    @staticmethod
    def place(tree, device: jax.Device | NamedSharding | None):
        """Arrays (slots, features) on `device` (on a mesh, a sharding), or where they are for
        None (JAX's default). CPU lanes share memory: nothing is copied."""
        return tree if device is None else jax.device_put(tree, device)

    def step(self, slots: Slots, tokens: np.ndarray, source: np.ndarray | None = None,
             length: int | None = None, candidates: bool = True, rows: int | None = None,
             device: jax.Device | None = None) -> tuple[Slots, "Choice"]:
        """Feed `tokens` [slots] (after taking row source[i] into row i, when given: see
        `_reorder_impl`). `length`: the longest sequence of a live row once these tokens are in
        (default: the context). `candidates`: also propose each row's top tokens (beam search
        needs them). `rows`: the slots below it are the live ones (default: all); the step
        computes the blocks that hold them. Fewer blocks than all read the whole
        self-attention cache, whatever `length`: for a few rows it is little beside the weights
        and the cross-attention caches, and lengths for each number of blocks would multiply
        the programs to compile. `device`: one of `decode_devices`, where the slots are (see
        `place`).

        Returns at once: the Choice holds device arrays, `fetch()` waits for them. `tokens` may
        be the device array of the previous step's choice, so the next step can be queued
        before the host has seen the last one's tokens."""
        if source is not None:
            self_k, self_v, state, options, position = self._reorder_call(slots, source, length)()
            slots = Slots(slots.cache._replace(self_k=self_k, self_v=self_v), state, options, position)
        call, n = self._step_call(slots, tokens, length, candidates, rows, device)
        (self_k, self_v, state, options, position), choice = call()
        c = slots.cache
        rest = lambda new, old: tuple(a + b[n:] for a, b in zip(new, old))  # noqa: E731
        slots = Slots(model.KVCache(rest(self_k, c.self_k), rest(self_v, c.self_v), c.cross_k, c.cross_v),
                      state, options, position)
        return slots, Choice(*choice)

    def _kv_len(self, length: int | None) -> int:
        """The cache positions a step over every block reads: `length` (default: the context),
        rounded up to a bucket."""
        return bucket(min(length or self.dims.n_text_ctx, self.dims.n_text_ctx), self.kv_sizes)

    def _reorder_call(self, slots: Slots, source: np.ndarray, length: int | None = None) -> Call:
        c = slots.cache
        return Call(self._reorder, ((c.self_k, c.self_v, slots.state, slots.options, slots.position),
                                    np.asarray(source, np.int32)), dict(kv_len=self._kv_len(length)))

    def _step_call(self, slots: Slots, tokens: np.ndarray | jax.Array, length: int | None = None,
                   candidates: bool = True, rows: int | None = None,
                   device: jax.Device | None = None) -> tuple[Call, int]:
        """The step's Call, and the number of blocks it computes."""
        c = slots.cache
        n = len(self.blocks) if rows is None else self.blocks_holding(rows)
        first = lambda layers: tuple(blocks[:n] for blocks in layers)  # noqa: E731
        moving = (first(c.self_k), first(c.self_v), slots.state, slots.options, slots.position)
        kv_len = self.kv_sizes[-1] if n < len(self.blocks) else self._kv_len(length)
        return Call(self._step, (self._params_on[device], (first(c.cross_k), first(c.cross_v)), moving,
                                 self._feed(tokens, device), np.bool_(candidates)), dict(kv_len=kv_len)), n

    def _feed(self, tokens: np.ndarray | jax.Array, device: jax.Device | None) -> jax.Array:
        """A step's tokens, placed as the last step's choice is (which a queued step is fed):
        the host's feed then runs the same compiled program, and a warm-up compiles it."""
        if isinstance(tokens, jax.Array):
            return self.place(tokens, device)
        where = device or self.split or jax.local_devices()[0]
        return jax.device_put(np.asarray(tokens, np.int32), where)

    @staticmethod
    def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
        """Host arrays, zero-padded to `size` rows: JAX would compile a program to pad them."""
        k = x.shape[0]
        if k == size:
            return x
        return np.concatenate([x, np.zeros((size - k, *x.shape[1:]), x.dtype)])

    def _rows(self, features: list[jax.Array], size: int) -> tuple[jax.Array, ...]:
        """Windows' features as a batch's rows, padded to `size`. The programs stack them:
        stacking them beforehand would compile a program for each number of windows."""
        return tuple(features) + (self._blank,) * (size - len(features))
