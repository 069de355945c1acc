"""gRPC service throughput: audio seconds served per wall-clock second, for N concurrent
Translate calls of 30 s each against the same N calls one after another.

Everything goes through the real path: an in-process grpc.aio server (service.server), a
gRPC client per call streaming a WAV file in 32 KiB messages, container decoding, the engine's
shared continuous-batching scheduler, and the streamed results. The model has random weights
(tests/random_models.py, 2 encoder and 2 decoder layers) at the width --size picks, unless
--model-dir names a real one; it is warmed up (every program compiled) before timing.

Random weights never pass Whisper's quality thresholds, so at temperature 0 every window would
be decoded six times (the fallback schedule). The default --temperature 1.0 decodes each window
once, like real speech that passes at the first temperature; --max-new-tokens bounds the
tokens per window. Both runs send the same audio with the same seeds, so they do the same work.

  .venv/bin/python bench/grpc_throughput.py [--size test|tiny|base] [--calls 8] [--seconds 30]

Prints one JSON object: audio seconds per wall second one after another and concurrently,
and the ratio.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("DRAGOMAN_COMPILATION_CACHE", "off")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

# --size: width of the random model (d_model, attention heads); layers are 2 + 2 throughout.
SIZES = {"test": (64, 2), "tiny": (384, 6), "base": (512, 8)}


def wav_bytes(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.clip(np.round(audio * 32768), -32768, 32767).astype("<i2").tobytes())
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="test",
                    help="random model width: test (d_model 64, the tests' model), tiny (384), base (512)")
    ap.add_argument("--model-dir", help="a model directory or checkpoint to use instead of a random model")
    ap.add_argument("--calls", type=int, default=8, help="calls, run at once and one after another (default 8)")
    ap.add_argument("--seconds", type=float, default=30.0, help="audio per call (default 30)")
    ap.add_argument("--max-batch", type=int, default=8, help="engine batch (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens per 30 s window (default 64)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, see above)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"))
    args = ap.parse_args()

    import jax

    from audio_signals import speechlike
    from dragoman.v1 import speech_pb2 as pb
    from dragoman.v1 import speech_pb2_grpc
    import grpc
    from service.engine import Engine
    from service.server import ServerThread
    from service.settings import ServerConfig

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_dir
        if model is None:
            from random_models import build_model

            d_model, heads = SIZES[args.size]
            model = str(Path(tmp) / args.size)
            build_model(Path(model), "tiny", d_model=d_model, heads=heads)
        t0 = time.perf_counter()
        engine = Engine.load(model, max_batch=args.max_batch, dtype=args.dtype)
        engine.warmup()
        warmup_s = time.perf_counter() - t0

    server = ServerThread(ServerConfig(port=0, max_concurrent_streams=max(16, args.calls)), engine)
    clips = [wav_bytes(speechlike(args.seconds, seed=i)) for i in range(args.calls)]
    config = pb.Config(temperature=args.temperature, seed=1, max_new_tokens=args.max_new_tokens, language="en")

    def one(i: int) -> tuple[float, int]:
        stub = speech_pb2_grpc.SpeechServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))

        def messages():
            yield pb.TranslateRequest(config=config)
            for j in range(0, len(clips[i]), 32 * 1024):
                yield pb.TranslateRequest(audio=clips[i][j : j + 32 * 1024])

        summary = [r.summary for r in stub.Translate(messages(), timeout=3600) if r.HasField("summary")][0]
        return summary.usage.audio_seconds, summary.usage.completion_tokens

    one(0)  # first call through the server: connection, decoder, anything not yet warm
    t0 = time.perf_counter()
    sequential = [one(i) for i in range(args.calls)]
    sequential_s = time.perf_counter() - t0
    with ThreadPoolExecutor(args.calls) as pool:
        t0 = time.perf_counter()
        concurrent = list(pool.map(one, range(args.calls)))
        concurrent_s = time.perf_counter() - t0
    server.stop()
    engine.close()

    audio = sum(a for a, _ in sequential)
    result = {
        "size": None if args.model_dir else args.size, "model": args.model_dir, "backend": jax.default_backend(),
        "cpus": os.cpu_count(), "calls": args.calls, "audio_seconds_per_call": args.seconds,
        "max_batch": args.max_batch, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "warmup_s": round(warmup_s, 1),
        "one_after_another": {"wall_s": round(sequential_s, 2), "audio_s_per_s": round(audio / sequential_s, 2),
                              "completion_tokens": sum(t for _, t in sequential)},
        "concurrent": {"wall_s": round(concurrent_s, 2), "audio_s_per_s": round(audio / concurrent_s, 2),
                       "completion_tokens": sum(t for _, t in concurrent)},
        "speedup": round(sequential_s / concurrent_s, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
