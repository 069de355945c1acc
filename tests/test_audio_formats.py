"""Every audio format the API accepts, synthesised with NumPy and encoded with PyAV here, sent
through the gRPC service: each decodes to its full length and is transcribed."""
from __future__ import annotations

import pytest

from grpc_support import call, config, encode, seconds, start_server, stub, tone

DURATION = 2.0
# name: (sample rate, channels, PyAV container, codec)
FORMATS = {
    "flac": (16000, 1, "flac", "flac"),
    "mp3": (44100, 2, "mp3", "libmp3lame"),
    "mp4": (48000, 2, "mp4", "aac"),
    "mpeg": (48000, 2, "mpeg", "mp2"),  # MPEG program stream, MPEG-1 Layer II audio
    "mpga": (22050, 1, "mp3", "libmp3lame"),  # an MPEG audio elementary stream
    "m4a": (44100, 1, "ipod", "aac"),
    "ogg": (48000, 1, "ogg", "libopus"),
    "ogg-vorbis": (44100, 2, "ogg", "vorbis"),  # FFmpeg's native Vorbis encoder (no libvorbis here)
    "wav": (16000, 1, "wav", "pcm_s16le"),
    "wav-stereo-44k": (44100, 2, "wav", "pcm_s16le"),
    "wav-48k-float": (48000, 1, "wav", "pcm_f32le"),
    "webm": (48000, 2, "webm", "libopus"),
}


@pytest.fixture(scope="module")
def client(tiny_engine):
    srv = start_server(tiny_engine)
    yield stub(srv.port)
    srv.stop()


@pytest.mark.parametrize("name", list(FORMATS))
def test_format(client, name):
    rate, channels, container, codec = FORMATS[name]
    data = encode(tone(DURATION, rate, channels, seed=len(name)), rate, container, codec)
    r = call(client, "transcribe", config(), data)
    assert r.summary is not None and r.events[-1] == "summary"
    assert r.segments and [s.id for s in r.segments] == list(range(len(r.segments)))
    # Lossy codecs pad the stream by a frame or two (AAC's priming samples, for one).
    assert seconds(r.summary.duration) == pytest.approx(DURATION, abs=0.05)
    assert r.summary.usage.audio_seconds == pytest.approx(DURATION, abs=0.05)
    assert r.summary.text == "".join(s.text for s in r.segments)
