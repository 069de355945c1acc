"""`python -m service translate|transcribe FILE...`: the engine on files, without a server."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

from tqdm import tqdm

from .audio import AudioError, audio_pieces, declared_seconds
from .engine import DEFAULT_TEMPERATURES, MODES, CheckpointError, Engine, TranscribeOptions, enable_compilation_cache
from .engine.lanes import lanes_wanted
from .flags import check_environment, env_flag, positive_integer
from .languages import language_code

DEFAULT_MODEL = "openai/whisper-large-v3"


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by the command line and the server: which model, how to run it."""
    env_flag(p, "--model", "DRAGOMAN_MODEL", default=DEFAULT_MODEL,
             help="Hugging Face hub id, local model directory, or OpenAI .pt checkpoint")
    env_flag(p, "--max-batch", "DRAGOMAN_MAX_BATCH", type=positive_integer, default=8,
             help="windows decoded together on the device")
    env_flag(p, "--dtype", "DRAGOMAN_DTYPE", choices=("float32", "bfloat16"), default=None,
             shown="float32 on CPU, bfloat16 on GPU/TPU", help="parameter and compute type")


def add_file_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="audio or video files in any format FFmpeg reads; - reads standard input")
    add_engine_arguments(p)
    p.add_argument("--language", help="spoken language (code or English name); default: detected")
    p.add_argument("--prompt", help="text that precedes the audio: names, spellings, style")
    p.add_argument("--temperature", type=float, help="sampling temperature; default: 0 with fallback up to 1.0")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (default %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens (default 1)")
    p.add_argument("--mode", choices=MODES, default="batched",
                   help="long-form: batched (all 30 s windows at once) or sequential (openai-whisper's loop)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per 30 s window (default 224)")
    p.add_argument("--without-timestamps", action="store_true", help="one segment per window, no timestamps")
    p.add_argument("--word-timestamps", action="store_true", help="a start and end time for every word")
    p.add_argument("--beam-size", type=int, help="beam search with this many beams (1..10) when decoding at temperature 0")
    p.add_argument("--best-of", type=int, help="at temperatures above 0, sample this many (1..10) and keep the best")
    p.add_argument("--patience", type=float, help="beam search: stop once beam size x patience hypotheses ended (default 1)")
    p.add_argument("--length-penalty", type=float,
                   help="rank hypotheses by log-probability / ((5 + length) / 6) ** alpha, alpha in [0, 1] "
                        "(default: divide by the length)")
    p.add_argument("--top-k", type=int, help="at temperatures above 0, sample only among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="at temperatures above 0, sample only among the fewest likeliest tokens whose probabilities "
                        "sum to this, in (0, 1] (default: any)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="at temperatures above 0, sample only tokens at least this times as likely as the likeliest, "
                        "in [0, 1] (default: any)")
    p.add_argument("--no-temperature-fallback", action="store_true",
                   help="decode at exactly --temperature, once, instead of stepping up by 0.2 to 1.0 on failure")
    p.add_argument("--compression-ratio-threshold", type=float, default=2.4,
                   help="a window whose text compresses more than this is decoded again hotter (default %(default)s)")
    p.add_argument("--logprob-threshold", type=float, default=-1.0,
                   help="a window whose average log-probability is below this is decoded again hotter (default %(default)s)")
    p.add_argument("--no-speech-threshold", type=float, default=0.6,
                   help="a window with a no-speech probability above this and a low log-probability is silence "
                        "(default %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per file on stdout")


def options_from_args(args: argparse.Namespace, task: str) -> TranscribeOptions:
    language = None
    if args.language:
        language = language_code(args.language)
        if language is None:
            raise ValueError(f"unknown language {args.language!r}; give a code such as 'it' or a name such as 'Italian'")
    start = args.temperature if args.temperature is not None else 0.0
    if args.no_temperature_fallback:
        temperatures = (start,)
    else:
        temperatures = (start,) + tuple(t for t in DEFAULT_TEMPERATURES if t > start)
    return TranscribeOptions(task=task, language=language, prompt=args.prompt, temperatures=temperatures,
                             seed=args.seed, repetition_penalty=args.repetition_penalty,
                             max_new_tokens=args.max_new_tokens, timestamps=not args.without_timestamps,
                             mode=args.mode, word_timestamps=args.word_timestamps, beam_size=args.beam_size,
                             best_of=args.best_of, patience=args.patience, length_penalty=args.length_penalty,
                             top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                             compression_ratio_threshold=args.compression_ratio_threshold,
                             logprob_threshold=args.logprob_threshold, no_speech_threshold=args.no_speech_threshold)


STDIN = "-"


def run_files(args: argparse.Namespace, task: str) -> int:
    try:
        if args.files.count(STDIN) > 1:
            raise ValueError(f"standard input ({STDIN}) can be read once; it was given {args.files.count(STDIN)} times")
        options = options_from_args(args, task)
        options.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    enable_compilation_cache()
    try:
        engine = Engine.load(args.model, max_batch=args.max_batch, dtype=args.dtype)
        engine.validate(options)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = 0
    try:
        for path in args.files:
            # Decoded as it is transcribed (an hour of audio is never held whole); the bar's
            # length is what the file's header says (none for a pipe: a bar without an end).
            source = "pipe:0" if path == STDIN else path  # FFmpeg's name for standard input
            duration = declared_seconds(source)
            with tqdm(total=None if duration is None else round(duration, 1), unit="s", desc=path, file=sys.stderr,
                      leave=False, disable=None if duration is None or duration > 30 else True) as bar:
                lock = threading.Lock()

                def progress(done: float) -> None:
                    with lock:
                        bar.update(round(done, 1) - bar.n)

                try:
                    result = engine.transcribe(audio_pieces(source), options, on_progress=progress)
                except AudioError as e:
                    bar.close()
                    print(f"error: {path}: {e}", file=sys.stderr)
                    status = 1
                    continue
            if args.json:
                # A file name that is not UTF-8 (its bytes kept as surrogates) is shown escaped.
                shown = os.fsencode(path).decode("utf-8", "backslashreplace")
                print(json.dumps({"file": shown, **result.to_dict()}, ensure_ascii=False), flush=True)
            else:
                for s in result.segments:
                    print(f"[{_clock(s.start)} --> {_clock(s.end)}]{s.text}", flush=True)
    finally:
        engine.close()
    return status


def _clock(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    h, m = divmod(int(m), 60)
    return f"{h:02d}:{m:02d}:{s:06.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="Dragoman: Whisper speech translation on JAX")
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="WARNING",
                        help="how much to log (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    for task, help_text in (("translate", "translate speech in files into English text"),
                            ("transcribe", "transcribe speech in files in its own language")):
        add_file_arguments(sub.add_parser(task, help=help_text, description=help_text))
    from . import server  # the gRPC service adds its own subcommand

    server.add_serve_parser(sub)
    args = parser.parse_args(argv)
    check_environment(parser, args)
    try:
        lanes_wanted()  # a bad setting is named before a model loads
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return server.serve_from_args(args)
    return run_files(args, args.command)
