"""Engine throughput on fixed work, beside the peers a user would run instead.

Work (the same as the peer benchmark's): N windows of 30 s log-mel features (seeded Gaussian
noise), greedy decoding of exactly T tokens per window after the 4-token prompt
<|startoftranscript|><|en|><|translate|><|notimestamps|>, end-of-text suppressed, at batch B.
The engine runs its real path: compiled programs driven by the continuous-batching scheduler.

  python bench/engine.py --model-dir /tmp/peer_base/hf --windows 8 --batch 8 --tokens 64 \
      [--peers-script PATH/peers.py --size base]

With --peers-script, the peer script is run first in the same invocation (it writes the random
model to --model-dir's parent, in Hugging Face layout) and a table of ratios is printed.

Several batch sizes (an accelerator's sweep) run one after the other, each in a process of its
own, so that each one's compile time and peak device memory are its own:

  python bench/engine.py --model-dir /tmp/large-v3 --size large-v3 --batch 1 8 32 64

The engine runs on tcmalloc where it is installed, as the server does (service/allocator.py); the
peers run on the C library's malloc, as they do out of the box, unless --peers-malloc tcmalloc.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.allocator import in_use, tcmalloc_library, use_tcmalloc  # noqa: E402


def features(n: int, n_mels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n_mels, 3000)).astype(np.float32) * 0.5


class EngineRun:
    """The engine loaded and warmed up once for the benchmark's work; `time()` runs the work `reps`
    times and returns the best."""

    def __init__(self, model_dir: str, windows: int, batch: int, tokens: int, dtype: str | None, reps: int,
                 beam_size: int = 1):
        import jax

        from service.engine import Engine
        from service.engine.programs import Programs
        from service.engine.rules import Vocabulary
        from service.engine.scheduler import DecodeJob, DecodeScheduler, Window

        self.windows, self.tokens, self.reps = windows, tokens, reps
        engine = Engine.load(model_dir, max_batch=batch * beam_size, dtype=dtype)  # a window takes beam_size rows
        engine.close()  # its own scheduler is not used: the benchmark's vocabulary suppresses end-of-text
        tok = engine.tokenizer
        vocab = Vocabulary.of(tok, engine.dims.n_vocab)
        suppress = vocab.suppress.copy()
        suppress[tok.eot] = True
        vocab = vocab._replace(suppress=suppress, blank=np.zeros_like(vocab.blank))
        programs = Programs(engine.programs.params, engine.dims, vocab, batch * beam_size,
                            list(tok.language_tokens.values()))
        self.scheduler = DecodeScheduler(programs, tok)
        prompt = [tok.sot, tok.language_tokens["en"], tok.translate, tok.no_timestamps]
        feats = features(windows, engine.dims.n_mels)
        self.jobs = lambda: [DecodeJob(Window(feats[i]), prompt, 0, timestamps=False, sample_len=tokens,
                                       beam_size=beam_size) for i in range(windows)]
        t0 = time.perf_counter()
        programs.warmup(tok.sot, tok.is_multilingual)  # every program at every bucket, as the server does
        self.info = {"compile_s": round(time.perf_counter() - t0, 1), "first_run_s": round(self._once(), 2),
                     "backend": jax.default_backend(), "device": jax.local_devices()[0].device_kind,
                     "dtype": str(engine.programs.dtype)}

    def _once(self) -> float:
        t0 = time.perf_counter()
        jobs = self.jobs()
        for job in jobs:
            self.scheduler.submit(job)
        outs = [job.future.result() for job in jobs]
        assert all(len(o.tokens) == self.tokens for o in outs), [len(o.tokens) for o in outs]
        return time.perf_counter() - t0

    def time(self) -> dict:
        best = min(self._once() for _ in range(self.reps))
        return {"seconds": round(best, 3), "windows_per_s": round(self.windows / best, 3),
                "tokens_per_s": round(self.windows * self.tokens / best, 1), **self.info, **device_memory()}

    def close(self) -> None:
        self.scheduler.close()


def device_memory() -> dict:
    """The device's peak memory in use so far and its capacity, in GiB, where the backend keeps
    count (accelerators do; the CPU does not)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return {name: round(stats[key] / 2**30, 2) for name, key in (("peak_gib", "peak_bytes_in_use"),
                                                                  ("limit_gib", "bytes_limit")) if key in stats}


def sweep(a) -> None:
    """Each batch size in a process of its own; one table of all."""
    rows = {}
    for batch in a.batch:
        cmd = [sys.executable, __file__, "--model-dir", a.model_dir, "--size", a.size, "--batch", str(batch),
               "--tokens", str(a.tokens), "--reps", str(a.reps), "--beam-size", str(a.beam_size)]
        cmd += ["--windows", str(a.windows)] if a.windows else []
        cmd += ["--dtype", a.dtype] if a.dtype else []
        text = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # its stderr: ours
        result = json.loads(text[text.index("{"):text.rindex("}") + 1])
        rows[batch] = {"windows": result["windows"], **next(iter(result["results"].values()))}
        print(json.dumps({"batch": batch, **rows[batch]}), flush=True)
    print(f"\n{'batch':>6}{'windows':>9}{'windows/s':>11}{'tokens/s':>10}{'compile s':>11}{'first run s':>13}"
          f"{'peak GiB':>10}")
    for batch, r in rows.items():
        print(f"{batch:>6}{r['windows']:>9}{r['windows_per_s']:>11.2f}{r['tokens_per_s']:>10.0f}{r['compile_s']:>11.1f}"
              f"{r['first_run_s']:>13.2f}{r.get('peak_gib', float('nan')):>10.2f}")
    first = next(iter(rows.values()))
    print(f"{first['device']}, {first['dtype']}, {a.tokens} tokens per window")


def run_engine(model_dir: str, windows: int, batch: int, tokens: int, dtype: str | None, reps: int,
               beam_size: int = 1) -> dict:
    run = EngineRun(model_dir, windows, batch, tokens, dtype, reps, beam_size)
    try:
        return run.time()
    finally:
        run.close()


def run_peers(script: str, a, peers: str) -> dict:
    """The peer benchmark's results ({peer: {seconds, windows_per_s, tokens_per_s}}), run as a
    subprocess on the allocator asked for."""
    cmd = [sys.executable, script, "--size", a.size, "--windows", str(a.windows), "--batch", str(a.batch),
           "--tokens", str(a.tokens), "--out", str(Path(a.model_dir).parent), "--peers", peers]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if a.peers_malloc == "system":  # whatever this process was started with
        env.pop("LD_PRELOAD", None)
    elif (library := tcmalloc_library()) is None:
        sys.exit("--peers-malloc tcmalloc: tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    else:
        env["LD_PRELOAD"] = library
    text = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(text[text.index("{"):])["peers"]


PEER_FLAGS = {"hf-torch-fp32": "hf", "ct2-float32": "ct2", "ct2-int8": "ct2-int8", "openai-whisper-torch": "openai"}

SIZES = {  # name: (d_model, encoder layers, decoder layers, heads, n_mels, vocab)
    "tiny": (384, 4, 4, 6, 80, 51865),
    "base": (512, 6, 6, 8, 80, 51865),
    "small": (768, 12, 12, 12, 80, 51865),
    "medium": (1024, 24, 24, 16, 80, 51865),
    "large-v3": (1280, 32, 32, 20, 128, 51866),
    "large-v3-turbo": (1280, 32, 4, 20, 128, 51866),
}


def build_random_model(out: str, size: str) -> None:
    """A seeded random Whisper of an official architecture, with Whisper's real vocabulary."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from random_models import save_random_whisper

    d, enc, dec, heads, mels, vocab = SIZES[size]
    save_random_whisper(Path(out), n_mels=mels, vocab=vocab, encoder_layers=enc, decoder_layers=dec, d_model=d,
                        heads=heads)


def run_ct2(hf_dir: str, windows: int, batch: int, tokens: int, beam_size: int, compute_type: str, reps: int) -> dict:
    """CTranslate2 on the same weights and work (converted from the Hugging Face directory)."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    ct_dir = str(Path(hf_dir).parent / "ct2")
    if not (Path(ct_dir) / "model.bin").exists():
        TransformersConverter(hf_dir).convert(ct_dir, force=True)
    model = ctranslate2.models.Whisper(ct_dir, device="cpu", compute_type=compute_type, intra_threads=os.cpu_count())
    feats = features(windows, model.n_mels if hasattr(model, "n_mels") else 80)
    prompt = [50258, 50259, 50358, 50363]

    def once() -> float:
        t0 = time.perf_counter()
        for i in range(0, windows, batch):
            x = ctranslate2.StorageView.from_array(feats[i : i + batch])
            r = model.generate(x, [prompt] * min(batch, windows - i), beam_size=beam_size, max_length=2 * tokens,
                               suppress_tokens=[-1, 50257], suppress_blank=False)
            assert len(r[0].sequences_ids[0]) == tokens
        return time.perf_counter() - t0

    once()
    best = min(once() for _ in range(reps))
    return {"seconds": round(best, 3), "windows_per_s": round(windows / best, 3), "tokens_per_s": round(windows * tokens / best, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="Hugging Face Whisper directory (peers.py writes OUT/hf)")
    ap.add_argument("--windows", type=int, help="windows to decode (default: 8, or the batch size where larger)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8],
                    help="batch size; several: each in a process of its own, one table of all")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--peers-script", help="peer benchmark to run first, in this same invocation")
    ap.add_argument("--size", default="base", choices=SIZES,
                    help="architecture of the random model (built when --model-dir has none) and of the peers")
    ap.add_argument("--peers", default="hf,ct2,ct2-int8,openai")
    ap.add_argument("--peers-malloc", choices=("system", "tcmalloc"), default="system",
                    help="the peers' allocator: the C library's, as they run out of the box (default), or tcmalloc, "
                         "as the engine runs (CTranslate2 gains much from it)")
    ap.add_argument("--beam-size", type=int, default=1,
                    help="> 1: time beam search (the engine's greedy run and CTranslate2's beam search beside it)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --peers-script, > 1: time the engine and the fastest peer again, one after the other, "
                         "this many times in all, and report the ratio of each round and their median (on a "
                         "machine whose speed drifts, paired rounds compare like with like)")
    a = ap.parse_args()
    if a.rounds > 1 and (not a.peers_script or a.beam_size > 1):
        ap.error("--rounds needs --peers-script and greedy decoding")
    if len(a.batch) > 1 and (a.peers_script or a.rounds > 1):
        ap.error("several batch sizes: the engine alone, without --peers-script or --rounds")
    use_tcmalloc()  # as the server runs

    peers = {}
    if not a.peers_script and not (Path(a.model_dir) / "config.json").exists():
        build_random_model(a.model_dir, a.size)
    if len(a.batch) > 1:
        return sweep(a)
    a.batch = a.batch[0]
    a.windows = a.windows or max(8, a.batch)
    if a.peers_script:
        peers = run_peers(a.peers_script, a, a.peers)
    engine = EngineRun(a.model_dir, a.windows, a.batch, a.tokens, a.dtype, a.reps, a.beam_size)
    ours = engine.time()
    rounds = []
    if a.rounds > 1 and peers:
        fastest = max(peers, key=lambda k: peers[k]["windows_per_s"])
        rounds.append({"dragoman": ours["windows_per_s"], fastest: peers[fastest]["windows_per_s"]})
        for _ in range(a.rounds - 1):
            peer = run_peers(a.peers_script, a, PEER_FLAGS[fastest])[fastest]["windows_per_s"]
            rounds.append({"dragoman": engine.time()["windows_per_s"], fastest: peer})
        for r in rounds:
            r["ratio"] = round(r["dragoman"] / r[fastest], 3)
    engine.close()
    name = "dragoman-jax" if a.beam_size == 1 else f"dragoman-jax-beam{a.beam_size}"
    rows = {name: ours, **peers}
    if a.beam_size > 1:
        rows["dragoman-jax-greedy"] = run_engine(a.model_dir, a.windows, a.batch, a.tokens, a.dtype, a.reps)
        for compute_type in ("float32", "int8"):
            rows[f"ct2-{compute_type}-beam{a.beam_size}"] = run_ct2(a.model_dir, a.windows, a.batch, a.tokens,
                                                                    a.beam_size, compute_type, a.reps)
    peers = {k: v for k, v in rows.items() if not k.startswith("dragoman")}
    fastest_peer = max((v["windows_per_s"] for v in peers.values()), default=None)
    print(json.dumps({"windows": a.windows, "batch": a.batch, "tokens": a.tokens, "cpus": os.cpu_count(),
                      "malloc": in_use(), "peers_malloc": a.peers_malloc if peers else None,
                      "results": rows, **({"rounds": rounds} if rounds else {})}, indent=1))
    print(f"\n{'':24}{'windows/s':>12}{'tokens/s':>12}{'dragoman x':>12}")
    for name, r in rows.items():
        ratio = ours["windows_per_s"] / r["windows_per_s"]
        print(f"{name:24}{r['windows_per_s']:>12.3f}{r['tokens_per_s']:>12.1f}{ratio:>12.2f}")
    if fastest_peer:
        print(f"\ndragoman / fastest peer: {ours['windows_per_s'] / fastest_peer:.2f}x")
    if rounds:
        each = ", ".join(f"{r['ratio']:.2f}x" for r in rounds)
        print(f"dragoman / {fastest} by round: {each}; median {statistics.median(r['ratio'] for r in rounds):.2f}x")


if __name__ == "__main__":
    main()
