"""Decoding audio files to 16 kHz mono: the mixdown, damaged and cut-short files, and streams
whose format changes midway."""
from __future__ import annotations

import io
import os
import threading
from concurrent.futures import CancelledError

import av
import numpy as np
import pytest

from service.audio import PIECE_SAMPLES, SAMPLE_RATE, AudioError, AudioLimits, audio_pieces, decode_audio


def encode(channels: np.ndarray, rate: int, container: str = "wav", codec: str = "pcm_s16le") -> bytes:
    """[channels, samples] float32 encoded with PyAV."""
    layout = "mono" if len(channels) == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels, np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        for piece in av.AudioResampler(format=stream.format.name, layout=layout, rate=rate).resample(frame):
            out.mux(stream.encode(piece))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def sine(seconds: float, rate: int, amplitude: float = 0.4, hz: float = 220.0) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def mp3(seconds: float, kbps: int, hz: float = 220.0) -> bytes:
    """A constant-bitrate mp3 of a tone at 8 kHz."""
    x = sine(seconds, 8000, hz=hz)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=8000)
        stream.layout, stream.bit_rate = "mono", kbps * 1000
        frame = av.AudioFrame.from_ndarray(x[None], format="fltp", layout="mono")
        frame.sample_rate = 8000
        for piece in av.AudioResampler(format=stream.format.name, layout="mono", rate=8000).resample(frame):
            out.mux(stream.encode(piece))
        out.mux(stream.encode(None))
    return buffer.getvalue()


@pytest.mark.parametrize("right", [1.0, 0.5, 0.0])
def test_stereo_is_mixed_to_the_mean_of_its_channels(right):
    """As openai-whisper's `ffmpeg -ac 1` into 16-bit samples, and as headerless stereo PCM is:
    not FFmpeg's float mixdown, which is 3 dB louder."""
    left = sine(2.0, SAMPLE_RATE)
    mixed = decode_audio(encode(np.stack([left, right * left]), SAMPLE_RATE))
    np.testing.assert_allclose(mixed, (1 + right) / 2 * left, atol=2e-4)  # 16-bit quantisation


def test_damaged_packets_are_skipped_and_the_rest_decoded():
    data = bytearray(encode(sine(10.0, 44100)[None], 44100, "mp3", "libmp3lame"))
    data[len(data) // 2 : len(data) // 2 + 400] = np.random.default_rng(0).integers(0, 256, 400, np.uint8).tobytes()
    audio = decode_audio(bytes(data))
    assert 9.5 <= len(audio) / SAMPLE_RATE <= 10.1


def test_a_file_cut_short_gives_what_it_holds():
    data = encode(sine(10.0, 44100)[None], 44100, "mp3", "libmp3lame")
    audio = decode_audio(data[: len(data) * 2 // 3])
    assert 6.0 <= len(audio) / SAMPLE_RATE <= 7.0


def test_a_stream_whose_sample_rate_changes_midway_is_decoded_whole():
    """Two MP3 files joined: 4 s at 44.1 kHz, then 3 s at 22.05 kHz, each tone at its own pitch."""
    first = encode(sine(4.0, 44100, hz=220.0)[None], 44100, "mp3", "libmp3lame")
    second = encode(sine(3.0, 22050, hz=440.0)[None], 22050, "mp3", "libmp3lame")
    audio = decode_audio(first + second)
    assert len(audio) / SAMPLE_RATE == pytest.approx(7.0, abs=0.15)

    def pitch(piece: np.ndarray) -> float:
        return float(np.argmax(np.abs(np.fft.rfft(piece)))) * SAMPLE_RATE / len(piece)

    assert pitch(audio[SAMPLE_RATE : 3 * SAMPLE_RATE]) == pytest.approx(220.0, abs=1.0)
    assert pitch(audio[5 * SAMPLE_RATE : 6 * SAMPLE_RATE]) == pytest.approx(440.0, abs=1.0)


def test_a_file_of_which_nothing_decodes_is_refused():
    data = bytearray(encode(sine(2.0, 44100)[None], 44100, "mp3", "libmp3lame"))
    data[200:] = np.random.default_rng(1).integers(0, 256, len(data) - 200, np.uint8).tobytes()
    with pytest.raises(AudioError, match="could not be decoded"):
        decode_audio(bytes(data))


def test_decoding_stops_once_cancelled():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        decode_audio(encode(sine(2.0, 44100)[None], 44100, "mp3", "libmp3lame"), cancel=cancel)


def test_a_long_file_is_handed_on_in_pieces_as_it_decodes():
    data = encode(sine(35.0, 44100)[None], 44100, "mp3", "libmp3lame")
    cancel = threading.Event()
    pieces = audio_pieces(data, cancel=cancel)
    first = next(pieces)
    assert PIECE_SAMPLES <= len(first) < PIECE_SAMPLES + SAMPLE_RATE  # a piece, not the whole file
    rest = list(pieces)
    assert len(rest) == 3 and all(len(p) >= PIECE_SAMPLES for p in rest[:-1])
    assert np.array_equal(np.concatenate([first, *rest]), decode_audio(data))
    lazy = audio_pieces(data, cancel=cancel)
    next(lazy)
    cancel.set()  # decoding goes on only as pieces are asked for
    with pytest.raises(CancelledError):
        next(lazy)


def test_audio_longer_than_allowed_is_refused_before_any_of_it_decodes():
    data = encode(sine(45.0, 16000)[None], 16000, "mp3", "libmp3lame")
    pieces = audio_pieces(data, AudioLimits(max_seconds=25.0))
    with pytest.raises(AudioError, match="longer than the 25 s allowed"):
        next(pieces)  # decoding alone would hand on two pieces of 10 s first
    assert len(decode_audio(data, AudioLimits(max_seconds=46.0))) == 45 * SAMPLE_RATE


def test_a_header_that_overstates_the_duration_does_not_refuse_the_audio():
    """Two mp3s back to back, the first at a low bitrate: FFmpeg estimates the duration from the
    first frames' rate and the file's size, and is far off. The packets tell the true one."""
    data = mp3(4.0, kbps=8) + mp3(20.0, kbps=64, hz=440.0)
    with av.open(io.BytesIO(data)) as container:
        assert container.duration / av.time_base > 100  # the header's estimate
    audio = decode_audio(data, AudioLimits(max_seconds=60.0))
    assert len(audio) / SAMPLE_RATE == pytest.approx(24.0, abs=0.2)
    with pytest.raises(AudioError, match="longer than the 20 s allowed"):
        next(audio_pieces(data, AudioLimits(max_seconds=20.0)))  # the packets tell, before a piece decodes


def test_a_pipe_is_read_once(tmp_path):
    """A pipe is not read a second time to check its length: that would drain it, and what is
    decoded would be cut short (or wait for a writer that never comes)."""
    data = encode(sine(300.0, 16000)[None], 16000, "adts", "aac")  # no duration in it
    fifo = tmp_path / "audio.aac"
    os.mkfifo(fifo)

    def write():
        with open(fifo, "wb") as f:
            f.write(data)

    outcome = []

    def read():
        try:
            outcome.append(sum(map(len, audio_pieces(fifo, AudioLimits(max_seconds=310.0)))) / SAMPLE_RATE)
        except AudioError as e:
            outcome.append(str(e))

    threads = [threading.Thread(target=f, daemon=True) for f in (write, read)]
    for t in threads:
        t.start()
    threads[1].join(20)
    assert outcome == [pytest.approx(300.0, abs=0.1)]


def test_only_bytes_or_a_path_are_taken():
    with pytest.raises(TypeError, match="bytes or a path"):
        decode_audio(io.BytesIO(encode(sine(1.0, 16000)[None], 16000)))
