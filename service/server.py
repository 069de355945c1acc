"""`python -m service serve`: the gRPC server (grpc.aio) with health checking and reflection.

The server listens at once and reports NOT_SERVING on grpc.health.v1 while the model loads and
compiles on a background thread; SERVING once it is ready; NOT_SERVING again on SIGTERM or
SIGINT, when it refuses new calls, gives those in flight --grace-period seconds, and exits 0.

In-process use (tests, benchmarks): `SpeechServer.create(config, engine)` inside a running event
loop, or `ServerThread(config, engine)`, which runs one on its own loop and thread.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dragoman.v1 import speech_pb2_grpc

from . import allocator
from .servicer import SERVICE_NAME, SpeechServicer
from .settings import ServerConfig, add_server_arguments, config_from_args

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class SpeechServer:
    """A grpc.aio server with SpeechService, Health and reflection, bound to a port.
    Create it with `await SpeechServer.create(...)` inside the event loop that will run it."""

    def __init__(self, config: ServerConfig):
        self.config = config
        # Each call's transcribe() blocks a thread. Cancelled calls may hold theirs a moment
        # longer than their slot, so there are spare threads: the next call never waits.
        self.executor = ThreadPoolExecutor(max_workers=2 * config.max_concurrent_streams + 4,
                                           thread_name_prefix="speech-call")
        self.servicer = SpeechServicer(config, self.executor)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            # Dead peers (settings.py): a quiet connection is pinged every keepalive_time, and
            # closed when an answer takes longer than keepalive_timeout. gRPC's core waits for
            # the answer for ping_timeout (1 minute by default), not for keepalive_timeout.
            ("grpc.keepalive_time_ms", round(config.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout * 1000)),
            ("grpc.http2.ping_timeout_ms", round(config.keepalive_timeout * 1000)),
            # Keep pinging a connection that sends nothing (by default gRPC stops after two pings).
            ("grpc.http2.max_pings_without_data", 0),
            # Clients' own keepalive pings, every 10 s or more, even with no call open (by default
            # gRPC closes a connection pinged more often than every 5 minutes).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ])
        speech_pb2_grpc.add_SpeechServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.host}:{config.port}")
        self.metrics_server = None
        self.metrics_port: int | None = None  # where GET /metrics is served, when it is

    @classmethod
    async def create(cls, config: ServerConfig, engine=None) -> "SpeechServer":
        """Listening once this returns; SERVING at once when an engine is given, else after
        `set_engine`."""
        self = cls(config)
        await self._set_health(NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d", config.host, self.port)
        if config.metrics_port is not None:
            try:
                self.metrics_server = self.servicer.metrics.serve(config.host, config.metrics_port)
            except OSError as e:
                await self.server.stop(0)
                raise RuntimeError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {e}") from None
            self.metrics_port = self.metrics_server.server_port
            log.info("metrics on http://%s:%d/metrics", config.host, self.metrics_port)
        if engine is not None:
            await self.set_engine(engine)
        return self

    async def set_engine(self, engine) -> None:
        """The model is ready: serve it."""
        self.servicer.engine = engine
        await self._set_health(SERVING)
        log.info("serving %s", self.servicer.model_id)

    async def _set_health(self, status) -> None:
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, give calls in flight `grace` seconds, then cancel them."""
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_period if grace is None else grace)
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics_server is not None:  # scraped until the last call has ended
            await asyncio.to_thread(self.metrics_server.shutdown)  # waits up to its poll interval, 0.5 s
            self.metrics_server.server_close()


async def build_server(engine, config: ServerConfig) -> tuple[SpeechServer, int]:
    """(server, port): a started SpeechServer serving `engine` (None: NOT_SERVING until
    `server.set_engine`)."""
    server = await SpeechServer.create(config, engine)
    return server, server.port


class ServerThread:
    """A SpeechServer on its own event loop and thread, for tests, benchmarks and embedding:

        with ServerThread(ServerConfig(port=0), engine) as srv:
            channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    """

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-server", daemon=True)
        self.thread.start()
        try:
            self.server: SpeechServer = self._call(SpeechServer.create(config, engine))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()
            raise
        self.port = self.server.port

    def _call(self, coroutine, timeout: float | None = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def servicer(self) -> SpeechServicer:
        return self.server.servicer

    def set_engine(self, engine) -> None:
        self._call(self.server.set_engine(engine))

    def stop(self, grace: float | None = 0) -> None:
        if not self.loop.is_running():
            return
        self._call(self.server.stop(grace), timeout=None)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the command line ----------------------------------------------------------------------


def add_serve_parser(sub) -> argparse.ArgumentParser:
    from .cli import add_engine_arguments

    description = ("serve SpeechService (Translate, Transcribe, ListModels) over gRPC, with grpc.health.v1 and "
                   "server reflection; NOT_SERVING until the model is loaded and compiled")
    p = sub.add_parser("serve", help="run the gRPC server", description=description)
    add_engine_arguments(p)
    add_server_arguments(p)
    return p


def serve_from_args(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(config, args.model, max_batch=args.max_batch, dtype=args.dtype))


async def serve(config: ServerConfig, model: str, *, max_batch: int = 8, dtype: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT (exit status 0) or until the model fails to load (1)."""
    from .engine import Engine, enable_compilation_cache

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    try:
        server = await SpeechServer.create(config)
    except RuntimeError as e:
        log.error("%s", e)
        return 1

    def on_signal(sig: signal.Signals) -> None:
        # SIGTERM asks for a graceful stop however often it comes: a supervisor and the process
        # group (systemd's control-group kill, a script forwarding it) may each send one. A
        # SIGINT after the first signal (Ctrl-C twice) stops at once, cancelling calls in flight.
        if stopping.is_set() and sig == signal.SIGINT:
            log.warning("second interrupt: cancelling %d call(s) in flight", server.servicer.active)
            asyncio.ensure_future(server.server.stop(0))
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    ready: asyncio.Future = loop.create_future()

    def load() -> None:  # a daemon thread: a signal during loading does not wait for it
        try:
            enable_compilation_cache()
            t0 = time.perf_counter()
            engine = Engine.load(model, max_batch=max_batch, dtype=dtype)
            engine.warmup()
            log.info("model %s ready in %.1f s (malloc: %s)", model, time.perf_counter() - t0, allocator.in_use())
            loop.call_soon_threadsafe(_settle, ready, engine, None)
        except BaseException as e:
            loop.call_soon_threadsafe(_settle, ready, None, e)

    loader = threading.Thread(target=load, name="model-loader", daemon=True)
    loader.start()
    stop_wait = asyncio.ensure_future(stopping.wait())
    await asyncio.wait([ready, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    engine = None
    if ready.done():
        if ready.exception() is not None:
            log.error("cannot load model %s: %s", model, ready.exception())
            status = 1
        else:
            engine = ready.result()
            await server.set_engine(engine)
            await stop_wait
    log.info("shutting down: %d call(s) in flight get %g s", server.servicer.active, config.grace_period)
    await server.stop()
    if engine is not None:
        engine.close()
    stop_wait.cancel()
    if loader.is_alive():
        # Stopped while the model loads or compiles: the warm-up's compiler threads would keep the
        # process alive until every program is compiled (minutes for large-v3 on CPU).
        log.info("stopped before the model was ready")
        logging.shutdown()
        os._exit(status)
    return status


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
