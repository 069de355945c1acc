"""`python -m service translate|transcribe FILE...`: the engine on files, without a server."""
from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import threading
import termios

import av
import numpy as np
import pytest

from audio_signals import speechlike
from service.audio import decode_audio
from service.engine import TranscribeOptions

SEGMENT_FIELDS = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
                  "no_speech_prob"}


def write_audio(path, seconds: float, fmt: str, codec: str, rate: int = 44100):
    audio = speechlike(seconds, sample_rate=rate)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        stream = c.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([audio, audio]), format="fltp", layout="stereo")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="stereo", rate=rate)
        for f in resampler.resample(frame):
            for p in stream.encode(f):
                c.mux(p)
        for p in stream.encode(None):
            c.mux(p)
    path.write_bytes(buf.getvalue())
    return path


def run_cli(*args, **environ):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DRAGOMAN_COMPILATION_CACHE": "off", **environ}
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    return {
        "wav": write_audio(d / "short.wav", 4.0, "wav", "pcm_s16le"),
        "mp3": write_audio(d / "long.mp3", 35.0, "mp3", "libmp3lame"),
        "bad": d / "notes.txt",
        # A name that is not UTF-8 (Latin-1's é), as file systems allow.
        "latin1": write_audio(d / os.fsdecode(b"caf\xe9.wav"), 4.0, "wav", "pcm_s16le"),
    }


def test_json_output_has_one_object_per_file_and_bad_files_are_reported(tiny_model, files):
    files["bad"].write_text("not audio at all")
    r = run_cli("transcribe", str(files["wav"]), str(files["bad"]), str(files["mp3"]), str(files["latin1"]),
                "--model", str(tiny_model[0]), "--json", "--language", "en", "--temperature", "0", "--max-batch", "2")
    assert r.returncode == 1, r.stderr
    assert f"{files['bad']}: the audio could not be decoded" in r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines()]
    latin1 = os.fsencode(files["latin1"]).decode("utf-8", "backslashreplace")
    assert latin1.endswith("caf\\xe9.wav")
    assert [x["file"] for x in results] == [str(files["wav"]), str(files["mp3"]), latin1]
    for x, seconds in zip(results, (4.0, 35.0, 4.0), strict=True):
        assert x["language"] == "en"
        assert x["duration"] == pytest.approx(seconds, abs=0.05)
        assert x["segments"] and all(SEGMENT_FIELDS <= set(s) for s in x["segments"])
        assert x["text"] == "".join(s["text"] for s in x["segments"])
        assert all(s["temperature"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) for s in x["segments"])
    assert max(s["end"] for s in results[1]["segments"]) > 30.0  # the second window was decoded


def test_a_pipe_is_transcribed_as_it_decodes(tiny_model, files, tmp_path):
    """A named pipe (as `<(ffmpeg ...)` gives) is decoded once, as it is transcribed: its header
    cannot be read ahead of the audio, so the progress bar has no end, and the audio is whole."""
    fifo = tmp_path / "stream.mp3"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write(files["mp3"].read_bytes())

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    r = run_cli("transcribe", str(fifo), "--model", str(tiny_model[0]), "--json", "--language", "en",
                "--temperature", "0", "--max-new-tokens", "8")
    writer.join(10)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["duration"] == pytest.approx(35.0, abs=0.05) and max(s["end"] for s in result["segments"]) > 30.0


def test_standard_input_is_read_as_a_file_named_dash(tiny_model, files):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DRAGOMAN_COMPILATION_CACHE": "off"}
    with open(files["mp3"], "rb") as stdin:
        r = subprocess.run([sys.executable, "-m", "service", "transcribe", "-", "--model", str(tiny_model[0]), "--json",
                            "--language", "en", "--temperature", "0", "--max-new-tokens", "8"],
                           stdin=stdin, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["file"] == "-" and result["duration"] == pytest.approx(35.0, abs=0.05)
    r = run_cli("transcribe", "-", "-", "--model", str(tiny_model[0]))
    assert r.returncode == 2 and "standard input (-) can be read once; it was given 2 times" in r.stderr


def test_translate_prints_timed_lines(tiny_model, files):
    r = run_cli("translate", str(files["wav"]), "--model", str(tiny_model[0]), "--temperature", "0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("[00:00:0") and " --> " in line for line in lines)


def test_unknown_language_and_missing_model_are_clear_errors(tiny_model, files):
    r = run_cli("translate", str(files["wav"]), "--model", str(tiny_model[0]), "--language", "klingon")
    assert r.returncode == 2 and "unknown language 'klingon'" in r.stderr
    r = run_cli("translate", str(files["wav"]), "--model", "/nonexistent/model")
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.parametrize("name, value, message", [
    ("DRAGOMAN_CPU_LANES", "maybe", "DRAGOMAN_CPU_LANES='maybe' is not one of on, off"),
    ("DRAGOMAN_MALLOC", "jemalloc", "DRAGOMAN_MALLOC='jemalloc' is not one of tcmalloc, system"),
    ("DRAGOMAN_MAX_BATCH", "eight", "DRAGOMAN_MAX_BATCH='eight' is not an integer"),
    ("DRAGOMAN_MAX_BATCH", "0", "DRAGOMAN_MAX_BATCH='0' is not a positive integer"),
    ("DRAGOMAN_DTYPE", "float16", "DRAGOMAN_DTYPE='float16' is not one of float32, bfloat16"),
])
def test_a_bad_setting_is_named_before_a_model_loads(files, name, value, message):
    r = run_cli("translate", str(files["wav"]), "--model", "/nonexistent/model", **{name: value})
    assert r.returncode == 2 and message in r.stderr and "does not exist" not in r.stderr


def test_decoding_controls_reach_the_engine(tiny_model, files):
    r = run_cli("transcribe", str(files["wav"]), "--model", str(tiny_model[0]), "--json", "--language", "en",
                "--beam-size", "3", "--no-temperature-fallback", "--word-timestamps")
    assert r.returncode == 0, r.stderr
    x = json.loads(r.stdout)
    assert {s["temperature"] for s in x["segments"]} == {0.0}  # random weights would fail over without the switch
    assert any(s["words"] for s in x["segments"])
    assert all({"word", "start", "end", "probability"} <= set(w) for s in x["segments"] for w in s["words"])
    r = run_cli("transcribe", str(files["wav"]), "--model", str(tiny_model[0]), "--beam-size", "11")
    assert r.returncode == 2 and "beam_size must be in [1, 10], got 11" in r.stderr
    r = run_cli("transcribe", str(files["wav"]), "--model", str(tiny_model[0]), "--top-p", "0")
    assert r.returncode == 2 and "top_p must be in (0, 1], got 0" in r.stderr


def test_sampling_controls_give_what_the_engine_gives(tiny_model, tiny_engine, files, tmp_path):
    """--mode, --seed, --temperature, --max-new-tokens and the sampling filters reach the engine:
    the command line's segments are those of the engine given the same options (a seed of its
    own, or no filters, draws others).
    The compilation cache is kept where DRAGOMAN_COMPILATION_CACHE says."""
    cache = tmp_path / "jax-cache"
    r = run_cli("transcribe", str(files["mp3"]), "--model", str(tiny_model[0]), "--json", "--language", "en",
                "--mode", "sequential", "--seed", "3", "--temperature", "0.6", "--no-temperature-fallback",
                "--max-new-tokens", "5", "--top-k", "3", "--top-p", "0.9", "--min-p", "0.01",
                DRAGOMAN_COMPILATION_CACHE=str(cache))
    assert r.returncode == 0, r.stderr
    got = [(s["seek"], s["tokens"], s["temperature"]) for s in json.loads(r.stdout)["segments"]]
    audio = decode_audio(str(files["mp3"]))
    options = dict(language="en", mode="sequential", temperatures=(0.6,), max_new_tokens=5)
    filters = dict(top_k=3, top_p=0.9, min_p=0.01)
    for seed, kw, same in ((3, filters, True), (4, filters, False), (3, {}, False)):
        want = tiny_engine.transcribe(audio, TranscribeOptions(seed=seed, **options, **kw))
        assert (got == [(s.seek, s.tokens, s.temperature) for s in want.segments]) is same, (seed, kw)
    assert all(len(tokens) <= 5 for _, tokens, _ in got)
    assert any(cache.iterdir()), "compiled programs are kept in the cache"


def test_every_decoding_flag_becomes_its_option():
    """The flags map one to one onto the engine's options (the runs above show the engine then
    gives what it gives for those options)."""
    import argparse

    from service.cli import add_file_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_file_arguments(parser)
    args = parser.parse_args([
        "a.wav", "--language", "Italian", "--prompt", "Roma", "--temperature", "0.2", "--seed", "9",
        "--repetition-penalty", "1.25", "--mode", "sequential", "--max-new-tokens", "7", "--without-timestamps",
        "--word-timestamps", "--beam-size", "3", "--best-of", "4", "--patience", "2", "--length-penalty", "0.5",
        "--top-k", "5", "--top-p", "0.8", "--min-p", "0.05", "--compression-ratio-threshold", "2.0",
        "--logprob-threshold", "-2", "--no-speech-threshold", "0.5"])
    assert options_from_args(args, "translate") == TranscribeOptions(
        task="translate", language="it", prompt="Roma", temperatures=(0.2, 0.4, 0.6, 0.8, 1.0), seed=9,
        repetition_penalty=1.25, mode="sequential", max_new_tokens=7, timestamps=False, word_timestamps=True,
        beam_size=3, best_of=4, patience=2.0, length_penalty=0.5, top_k=5, top_p=0.8, min_p=0.05,
        compression_ratio_threshold=2.0, logprob_threshold=-2.0, no_speech_threshold=0.5)
    defaults = options_from_args(parser.parse_args(["a.wav"]), "transcribe")
    assert defaults == TranscribeOptions(task="transcribe", mode="batched")


def test_a_long_file_shows_progress_on_a_terminal(tiny_model, files):
    primary, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal of 100 columns
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "DRAGOMAN_COMPILATION_CACHE": "off"}
    with subprocess.Popen([sys.executable, "-m", "service", "transcribe", str(files["mp3"]), str(files["wav"]),
                           "--model", str(tiny_model[0]), "--language", "en", "--temperature", "0"],
                          stdout=subprocess.DEVNULL, stderr=terminal, env=env) as process:
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=600) == 0
    os.close(primary)
    text = shown.decode(errors="replace")
    assert "long.mp3:" in text and "/35.0" in text  # the bar of the 35 s file
    assert "short.wav:" not in text  # a file of one window has none
