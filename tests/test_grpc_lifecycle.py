"""The server's life: health while the model loads and when it shuts down, reflection,
cancellation and deadlines, and `python -m service serve` under SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dragoman.v1 import speech_pb2 as pb
from grpc_support import (FAST, call, channel, config, encode, error_details, held_pcm, requests, scrape, start_server,
                          stub, tone, wait_for)

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "dragoman.v1.SpeechService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def wav():
    return encode(tone(1.0), 16000, "wav", "pcm_s16le")


def health_of(port: int, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel(port)).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=10).status


def test_health_follows_the_model(tiny_engine, wav):
    srv = start_server()  # no engine yet: as while the model loads and compiles
    try:
        assert health_of(srv.port) == NOT_SERVING
        assert health_of(srv.port, SERVICE) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(stub(srv.port).Translate(requests("translate", config(), wav), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in error_details(info.value)
        with pytest.raises(grpc.RpcError) as info:
            stub(srv.port).ListModels(pb.ListModelsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        srv.set_engine(tiny_engine)
        assert health_of(srv.port) == SERVING
        assert health_of(srv.port, SERVICE) == SERVING
        assert call(stub(srv.port), "translate", config(), wav).summary is not None
    finally:
        srv.stop()


def test_shutdown_drains(tiny_engine, wav):
    """Stopping: NOT_SERVING, new calls refused, the call in flight completes within the grace period."""
    srv = start_server(tiny_engine, grace_period=60)
    watch = health_pb2_grpc.HealthStub(channel(srv.port)).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    assert next(watch).status == SERVING
    release = threading.Event()

    def held():
        yield pb.TranslateRequest(config=config())
        release.wait(30)
        yield pb.TranslateRequest(audio=wav)

    in_flight = stub(srv.port).Translate(held(), timeout=120)
    wait_for(lambda: srv.servicer.active == 1)
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 60})
    stopper.start()
    try:
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as info:
            list(stub(srv.port).Translate(requests("translate", config(), wav), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
    assert list(in_flight)[-1].WhichOneof("event") == "summary"
    stopper.join(60)
    assert not stopper.is_alive()


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = start_server(tiny_engine, max_concurrent_streams=1)
    yield srv
    srv.stop()


def test_reflection(server):
    client = reflection_pb2_grpc.ServerReflectionStub(channel(server.port))
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    services = [s.name for r in client.ServerReflectionInfo(iter(ask), timeout=10)
                for s in r.list_services_response.service]
    assert SERVICE in services and "grpc.health.v1.Health" in services
    ask = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
    (response,) = client.ServerReflectionInfo(iter(ask), timeout=10)
    assert response.file_descriptor_response.file_descriptor_proto


def test_cancelled_call_frees_its_slot(server, tiny_engine, wav):
    release = threading.Event()
    try:
        # 31 s: the first window is complete and decoding (224 tokens at each temperature: long).
        first = stub(server.port).Translate(held_pcm(31.0, release, temperature=0), timeout=120)
        wait_for(lambda: server.servicer.active == 1)
        time.sleep(1.0)
        first.cancel()
        wait_for(lambda: server.servicer.active == 0, timeout=2.0)
        t0 = time.monotonic()
        r = call(stub(server.port), "translate", config(), wav)
        assert r.summary is not None
        assert time.monotonic() - t0 < 30
        assert first.code() == grpc.StatusCode.CANCELLED
        wait_for(lambda: tiny_engine.scheduler.queued == 0, timeout=5.0)
    finally:
        release.set()


def test_deadline_exceeded(server, tiny_engine, wav):
    release = threading.Event()
    try:
        with pytest.raises(grpc.RpcError) as info:
            list(stub(server.port).Translate(held_pcm(31.0, release, temperature=0), timeout=1.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: server.servicer.active == 0, timeout=5.0)
        assert call(stub(server.port), "translate", config(), wav).summary is not None
    finally:
        release.set()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_command_loads_serves_and_stops_on_a_signal(tiny_model, wav, sig):
    """`python -m service serve`: NOT_SERVING while the model loads and compiles, SERVING after.
    SIGTERM, sent twice (a supervisor and the process group each send one): the call in flight
    completes, new calls are refused, and it exits 0. SIGINT twice (Ctrl-C, Ctrl-C): the second
    cancels the call in flight, and it exits 0 at once, not after the grace period."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "DRAGOMAN_MALLOC")},
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DRAGOMAN_GRACE_PERIOD": "60", "DRAGOMAN_COMPILATION_CACHE": "off", "JAX_PLATFORMS": "cpu",
           "DRAGOMAN_MAX_CONCURRENT_STREAMS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "INFO", "serve", "--model",
                             str(tiny_model[0]), "--max-batch", "1", "--port", "0", "--metrics-port", "0"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    port = metrics_port = None
    try:
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"listening on \S+:(\d+)", line):
                port = int(m.group(1))
            if m := re.search(r"metrics on http://\S+:(\d+)/metrics", line):
                metrics_port = int(m.group(1))
                break
        assert port and metrics_port, "".join(lines)
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        assert health_of(port) == NOT_SERVING  # warm-up compiles for a while
        assert scrape(metrics_port)[("dragoman_ready", ())] == 0
        wait_for(lambda: health_of(port) == SERVING, timeout=300, interval=0.2)
        assert scrape(metrics_port)[("dragoman_ready", ())] == 1
        assert any(re.search(r"ready in .* \(malloc: \S*libtcmalloc", line) for line in lines), "".join(lines)

        release = threading.Event()

        def held():
            yield pb.TranscribeRequest(config=pb.Config(**FAST))
            release.wait(60)
            yield pb.TranscribeRequest(audio=wav)

        # Held once the server's one stream is taken by it: a probing call is refused then. A probe
        # that comes first takes the stream itself, and the held call, refused, is made again.
        in_flight = stub(port).Transcribe(held(), timeout=120)
        deadline = time.monotonic() + 30
        while True:
            try:
                list(stub(port).Transcribe(requests("transcribe", config(), wav), timeout=10))
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
                raise
            if in_flight.done():
                in_flight = stub(port).Transcribe(held(), timeout=120)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        samples = scrape(metrics_port)
        assert samples[("dragoman_calls_total", (("code", "RESOURCE_EXHAUSTED"), ("method", "transcribe")))] >= 1
        assert samples[("dragoman_calls_active", ())] == 1
        proc.send_signal(sig)
        wait_for(lambda: any("shutting down" in line for line in lines), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stub(port).Transcribe(requests("transcribe", config(), wav), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Draining: not ready, and still scraped while the call in flight goes on.
        samples = scrape(metrics_port)
        assert samples[("dragoman_ready", ())] == 0 and samples[("dragoman_calls_active", ())] == 1
        proc.send_signal(sig)
        if sig == signal.SIGTERM:
            release.set()
            assert list(in_flight)[-1].WhichOneof("event") == "summary"
            assert proc.wait(60) == 0, "".join(lines)
        else:
            with pytest.raises(grpc.RpcError):  # cancelled while it waits on its audio
                list(in_flight)
            assert proc.wait(20) == 0, "".join(lines)  # well within the grace period of 60 s
            assert any("second interrupt: cancelling 1 call(s) in flight" in line for line in lines), "".join(lines)
            release.set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_the_warm_up_stops_at_once(tiny_model):
    """A supervisor stopping the service while it compiles (a rollout, a scale-down): the process
    ends at once, not after the warm-up's remaining compiles."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DRAGOMAN_COMPILATION_CACHE": "off", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--log-level", "INFO", "serve", "--model",
                             str(tiny_model[0]), "--max-batch", "8", "--port", "0"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        wait_for(lambda: any(" loaded " in line for line in lines), timeout=120, interval=0.1)  # warm-up begins
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(30) == 0, "".join(lines)
        assert time.monotonic() - started < 10, "".join(lines)
        assert not any("warm-up compiled" in line for line in lines), "".join(lines)
        assert any("stopped before the model was ready" in line for line in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_flags_take_their_environment_twins(monkeypatch, capsys):
    import argparse

    from service.flags import check_environment
    from service.settings import ServerConfig, add_server_arguments, config_from_args

    monkeypatch.setenv("DRAGOMAN_RECEIVE_TIMEOUT", "5")
    monkeypatch.setenv("DRAGOMAN_GRACE_PERIOD", "7")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    parser.add_argument("--model")
    assert (config_from_args(parser.parse_args([])).receive_timeout,
            config_from_args(parser.parse_args([])).grace_period) == (5.0, 7.0)
    assert config_from_args(parser.parse_args(["--receive-timeout", "0"])).receive_timeout == 0.0  # no limit
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="receive_timeout must be 0 .no limit. or positive"):
            ServerConfig(receive_timeout=bad)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_audio_seconds must be a positive number of seconds"):
            ServerConfig(max_audio_seconds=bad)
    assert config_from_args(parser.parse_args([])).metrics_port is None  # off unless asked
    assert config_from_args(parser.parse_args(["--metrics-port", "9464"])).metrics_port == 9464
    monkeypatch.setenv("DRAGOMAN_MAX_UPLOAD_BYTES", "1GB")
    monkeypatch.setenv("DRAGOMAN_METRICS_PORT", "0")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    parser.add_argument("--model")
    assert parser.parse_args([]).max_upload_bytes == 1 << 30
    assert config_from_args(parser.parse_args([])).metrics_port == 0
    monkeypatch.delenv("DRAGOMAN_METRICS_PORT")
    # argparse checks neither the type nor the choices of a default: a variable is read as its flag
    # is, and named once the command line is parsed, unless the flag was given there.
    for var, flag, value, message in [
            ("DRAGOMAN_MAX_UPLOAD_BYTES", "--max-upload-bytes=1", "lots", "'lots' is not a size"),
            ("DRAGOMAN_DEFAULT_MODE", "--default-mode=batched", "fast", "'fast' is not one of batched, sequential"),
            ("DRAGOMAN_MAX_CONCURRENT_STREAMS", "--max-concurrent-streams=1", "0", "'0' is not a positive integer"),
            ("DRAGOMAN_GRACE_PERIOD", "--grace-period=1", "nan", "'nan' is not 0 or a positive number of seconds"),
            ("DRAGOMAN_PORT", "--port=1", "70000", "'70000' is not a port"),
            ("DRAGOMAN_METRICS_PORT", "--metrics-port=9464", "on", "'on' is not an integer")]:
        monkeypatch.setenv(var, value)
        parser = argparse.ArgumentParser()
        add_server_arguments(parser)
        with pytest.raises(SystemExit):
            check_environment(parser, parser.parse_args([]))
        assert f"{var}={message}" in capsys.readouterr().err
        check_environment(parser, parser.parse_args([flag]))  # the flag's value wins over the variable
        monkeypatch.delenv(var)


class FreezableProxy:
    """A TCP proxy to a local port that can stop passing bytes on, both ways, without closing
    anything: what a client whose machine or network vanished looks like to the server."""

    def __init__(self, target_port: int):
        import socket

        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        while True:
            try:
                data = src.recv(65536)
                while self.frozen.is_set() and not self.closed.is_set():  # held, never passed on
                    time.sleep(0.05)
                if not data or self.closed.is_set():
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for s in [self.listener, *self.sockets]:
            s.close()


def test_a_vanished_client_is_found_by_keepalive_and_frees_its_stream(tiny_engine, wav):
    """The server pings a quiet connection and closes it when no answer comes: the call of a
    client that vanished (its bytes stop, its connection stays open) is cancelled, its stream
    freed. The receive timeout is off here, so only the keepalive can find it."""
    srv = start_server(tiny_engine, max_concurrent_streams=1, receive_timeout=0, keepalive_time=0.5,
                       keepalive_timeout=0.5)
    proxy = FreezableProxy(srv.port)
    release = threading.Event()

    def upload():
        yield pb.TranslateRequest(config=config())
        release.wait(30)

    try:
        responses = stub(proxy.port).Translate(upload(), timeout=60)
        wait_for(lambda: srv.servicer.active == 1)
        proxy.frozen.set()
        wait_for(lambda: srv.servicer.active == 0, timeout=20)
        assert call(stub(srv.port), "translate", config(), wav).summary is not None
    finally:
        release.set()
        proxy.close()
        responses.cancel()
        srv.stop()
