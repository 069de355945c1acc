"""The Flask application: OpenAI's audio API in front of the gRPC SpeechService."""
from __future__ import annotations

import hmac
import logging
import tempfile
import threading
import time
import uuid
from typing import Iterator

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from . import render
from .backend import DECODING_FIELDS, Backend, Call, Delta, ModelInfo, Request, SegmentEvent, Summary
from .config import Config
from .errors import APIError, bad_request
from .forms import FieldEvent, FileData, FileEnd, FileStart, Params, _human, boundary_of, read_multipart
from .metrics import HttpMetrics
from .render import EventStream, Result
from service.model_names import short_name

log = logging.getLogger("http_shim")

FORM_OVERHEAD = 1 << 20  # bytes a form may hold beside the file (fields, part headers)
SPOOL_MEMORY = 1 << 20  # a file held back for the service stays in memory up to this, then goes to disk


class Catalog:
    """The served models, asked of the service and kept for a few seconds."""

    def __init__(self, backend: Backend, aliases: tuple[str, ...], ttl: float):
        self.backend = backend
        self.aliases = aliases
        self.ttl = ttl
        self._lock = threading.Lock()
        self._models: list[ModelInfo] = []
        self._at = -1e9

    def list(self, fresh: bool = False) -> list[ModelInfo]:
        with self._lock:
            if fresh or time.monotonic() - self._at > self.ttl or not self._models:
                self._models = self.backend.models()
                self._at = time.monotonic()
            return list(self._models)

    def resolve(self, name: str | None) -> str:
        """The served model a request names: its id, the id's last path part, an alias of it, or an
        alias of every served model (whisper-1). No name: the first served model."""
        models = self.list()
        if not models:
            raise APIError(503, "The speech service serves no model", code="service_unavailable")
        if name is None or name in self.aliases:
            return models[0].id
        for m in models:
            if name == m.id or name in m.aliases:
                return m.id
        for m in models:
            if name == short_name(m.id):
                return m.id
        raise APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")

    def entries(self) -> list[dict]:
        out, seen = [], set()
        for m in self.list(fresh=True):
            for name in [m.id, short_name(m.id), *m.aliases]:
                if name not in seen:
                    seen.add(name)
                    out.append({"id": name, "object": "model", "created": m.created, "owned_by": m.owned_by,
                                "root": m.id})
        first = out[0]["root"] if out else None
        for alias in self.aliases:
            if first is not None and alias not in seen:
                seen.add(alias)
                out.append({"id": alias, "object": "model", "created": out[0]["created"], "owned_by": "dragoman",
                            "root": first})
        return out


class State:
    def __init__(self, config: Config, backend: Backend):
        self.config = config
        self.backend = backend
        self.catalog = Catalog(backend, config.served_aliases, config.models_cache_seconds)
        self.metrics = HttpMetrics()


def create_app(config: Config | None = None, backend: Backend | None = None) -> Flask:
    """The WSGI application. `config` defaults to the environment (DRAGOMAN_* variables); `backend`
    to a gRPC client of `config.grpc_target`, connected on first use (after gunicorn forks)."""
    config = config or Config.from_env()
    if backend is None:
        from .grpc_backend import GrpcBackend

        backend = GrpcBackend(config.grpc_target)
    app = Flask("http_shim")
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    app.extensions["dragoman"] = State(config, backend)

    app.before_request(_before)
    app.after_request(_after)
    app.register_error_handler(APIError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)

    app.add_url_rule("/v1/audio/translations", "translations", lambda: _audio("translate"), methods=["POST"])
    app.add_url_rule("/v1/audio/transcriptions", "transcriptions", lambda: _audio("transcribe"), methods=["POST"])
    app.add_url_rule("/v1/models", "models", _models, methods=["GET"])
    app.add_url_rule("/v1/models/<path:model_id>", "model", _model, methods=["GET"])
    app.add_url_rule("/health", "health", _health, methods=["GET"])
    app.add_url_rule("/metrics", "metrics", lambda: _state().metrics.exposition(), methods=["GET"])
    app.wsgi_app = app.extensions["dragoman"].metrics.wrap(app.wsgi_app, app.url_map)
    return app


def _state() -> State:
    return current_app.extensions["dragoman"]


# ---- around every request: request id, CORS, API key ----------------------------------------------------


def _before():
    g.request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    cfg = _state().config
    sock = request.environ.get("gunicorn.socket")
    if sock is not None and cfg.upload_timeout:
        # A gunicorn thread waits on a request body for as long as the client takes: a stalled
        # upload would hold it for good. Reads time out instead (408); answers are written
        # without a timeout (_after).
        sock.settimeout(cfg.upload_timeout)
    if request.method == "OPTIONS" and cfg.cors_origins and request.headers.get("Origin"):
        return Response(status=204)  # a CORS preflight; _after adds the headers
    if cfg.api_key and request.path.startswith("/v1/"):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            _drain()
            raise APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            _drain()
            shown = token.strip()
            shown = f"{shown[:3]}...{shown[-4:]}" if len(shown) > 8 else "***"
            raise APIError(401, f"Incorrect API key provided: {shown}.", code="invalid_api_key")
    return None


def _after(response: Response) -> Response:
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(None)
    response.headers.setdefault("X-Request-Id", getattr(g, "request_id", ""))
    cfg = _state().config
    origin = request.headers.get("Origin")
    if cfg.cors_origins and origin:
        allowed = "*" in cfg.cors_origins or origin.rstrip("/") in cfg.cors_origins
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in cfg.cors_origins else origin
            if "*" not in cfg.cors_origins:
                response.headers.add("Vary", "Origin")
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = (
                    request.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
                response.headers["Access-Control-Max-Age"] = "600"
    return response


def _error_response(err: APIError) -> Response:
    response = Response(err.to_json(), status=err.status, mimetype="application/json")
    for k, v in err.headers().items():
        response.headers[k] = v
    return response


def _api_error(err: APIError) -> Response:
    if err.status >= 500:
        log.warning("%s %s: %d %s", request.method, request.path, err.status, err.message)
    else:
        log.info("%s %s: %d %s (param %s)", request.method, request.path, err.status, err.message, err.param)
    return _error_response(err)


def _http_error(err: HTTPException) -> Response:
    if err.code == 413:
        return _error_response(APIError(413, "The request is too large", code="request_too_large"))
    status = err.code or 500
    message = {404: f"Unknown request URL: {request.method} {request.path}. Please check the URL for typos.",
               405: f"Method {request.method} is not allowed on {request.path}."}.get(status, err.description or "")
    return _error_response(APIError(status, message, code="unknown_url" if status == 404 else None))


def _unexpected_error(err: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.path)
    return _error_response(APIError(500, "The server had an error while processing your request.",
                                    code="internal_error"))


def _drain(limit: int | None = None) -> None:
    """Read what is left of the request body (up to a limit), so the client can read our answer."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    limit = limit if limit is not None else 2 * _state().config.max_upload_bytes + FORM_OVERHEAD
    stream = request.stream
    read = 0
    try:
        while read < limit:
            data = stream.read(64 * 1024)
            if not data:
                return
            read += len(data)
    except Exception:
        return


# ---- GET endpoints ----------------------------------------------------------------------------------------


def _models():
    return jsonify({"object": "list", "data": _state().catalog.entries()})


def _model(model_id: str):
    for entry in _state().catalog.entries():
        if entry["id"] == model_id:
            return jsonify(entry)
    raise APIError(404, f"The model '{model_id}' does not exist or you do not have access to it.",
                   param="model", code="model_not_found")


def _health():
    status = _state().backend.health()
    return jsonify({"status": status}), (200 if status == "SERVING" else 503)


# ---- the audio endpoints ----------------------------------------------------------------------------------


def _audio(task: str):
    state = _state()
    cfg = state.config
    length = request.content_length
    if length is not None and length > cfg.max_upload_bytes + FORM_OVERHEAD:
        _drain()
        raise APIError(413, f"The request is {length} bytes; files up to {_human(cfg.max_upload_bytes)} are accepted",
                       param="file", code="file_too_large")
    try:
        upload = Upload(state, task)
        upload.run()
    except APIError as e:
        if e.status != 408:  # a stalled client would only stall the drain too
            _drain()
        raise
    except BaseException:
        _drain()
        raise
    return upload.respond()


class Upload:
    """One audio request: reads the form as it arrives and passes the file on to the service.

    When fields come before the file (as OpenAI's Python SDK sends them), the call to the service
    starts with the file's first bytes and each chunk goes on as it is read. When the file comes
    first (OpenAI's Node SDK, `curl -F file=@... -F model=...`), it is held in a spooled temporary
    file (memory, then disk) until the form ends. A copy is kept in both cases, so that a field
    after the file that changes the request can start the call over.
    """

    def __init__(self, state: State, task: str):
        self.state = state
        self.cfg = state.config
        self.params = Params(task)
        self.call: Call | None = None
        self.sent: Request | None = None
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)
        self.file_seen = False
        self.file_done = False
        self.size = 0

    def run(self) -> None:
        boundary = boundary_of(request.headers.get("Content-Type"))
        fields_before_file = False
        try:
            for event in read_multipart(request.stream, boundary, max_file_bytes=self.cfg.max_upload_bytes):
                if isinstance(event, FieldEvent):
                    if event.name == "file":
                        raise bad_request("'file' must be a file upload (a part with a filename), not a text field",
                                          "file", "invalid_type")
                    self.params.set_field(event.name, event.value)
                    fields_before_file = fields_before_file or not self.file_seen
                elif isinstance(event, FileStart):
                    if self.file_seen:
                        raise bad_request("Only one 'file' may be sent", "file")
                    self.file_seen = True
                    if fields_before_file and self._complete():
                        self.call, self.sent = self._start()
                elif isinstance(event, FileData):
                    self.spool.write(event.data)
                    if self.call is not None:
                        self.call.send(event.data)
                elif isinstance(event, FileEnd):
                    self.size = event.size
                    self.file_done = True
                    if event.size == 0:
                        raise bad_request("The audio file is empty", "file", "empty_file")
            if not self.file_seen:
                raise bad_request("You must provide a 'file' to transcribe or translate (multipart/form-data)",
                                  "file", "missing_required_parameter")
            self.params.check()
            wanted = self._request()
            if self.call is not None and wanted != self.sent:
                log.info("a field after the file changed the request; starting the call over")
                self.call.cancel()
                self.call = None
            if self.call is None:
                self.call, self.sent = self._start(wanted)
                self.spool.seek(0)
                while chunk := self.spool.read(256 * 1024):
                    self.call.send(chunk)
            self.spool.close()
            self.call.close_send()
        except BaseException:
            if self.call is not None:
                self.call.cancel()
            self.spool.close()
            raise

    def _request(self) -> Request:
        p = self.params
        model = self.state.catalog.resolve(p.model)
        beam_size, beam_field = p.beam()
        decoding = {name: getattr(p, name) for name in DECODING_FIELDS}
        decoding["length_penalty"] = p.ranking_penalty()
        return Request(task=p.task, model=model, language=p.language, prompt=p.prompt, temperature=p.temperature,
                       seed=p.seed, repetition_penalty=p.repetition_penalty, max_new_tokens=p.max_completion_tokens,
                       word_timestamps=p.word_timestamps, stream_deltas=p.stream, beam_size=beam_size,
                       beam_field=beam_field, **decoding)

    def _complete(self) -> bool:
        """Whether the fields so far make a request the service can take: patience waits for its beam
        width, which may come after the file (the call starts at the end of the form then)."""
        return self.params.patience is None or self.params.beam()[0] is not None

    def _start(self, wanted: Request | None = None) -> tuple[Call, Request]:
        wanted = wanted or self._request()
        return self.state.backend.start(wanted, self.cfg.request_timeout), wanted

    # ---- the answer ----

    def respond(self) -> Response:
        p = self.params
        events = self.call.events()
        headers = {"X-Request-Id": g.request_id}
        if not p.stream:
            try:
                result = collect(events)
            finally:
                self.call.cancel()
            body = render.render(result, p.response_format, p.task, p.timestamp_granularities)
            # content_type, not mimetype: Flask adds a second charset to a text/* mimetype that has one.
            return Response(body, content_type=render.MIMETYPES[p.response_format], headers=headers)
        return self._stream(events, headers)

    def _stream(self, events: Iterator, headers: dict) -> Response:
        p = self.params
        out = EventStream(p.task, p.model or self.sent.model, p.stream_include_usage,
                          p.stream_include_usage and p.stream_continuous_usage_stats)
        call = self.call
        first: list[str] = []
        # Wait for the service's first answer before the 200 goes out, so that a failure the service finds
        # at once (bad audio, an unknown language, load shedding) still gets its own HTTP status.
        try:
            gen = _sse(events, out)
            first.append(next(gen))
        except StopIteration:
            gen = iter(())
        except BaseException:
            call.cancel()
            raise

        def body() -> Iterator[str]:
            try:
                yield from first
                yield from gen
            finally:
                call.cancel()

        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return Response(body(), mimetype="text/event-stream", headers=headers)


def _sse(events: Iterator, out: EventStream) -> Iterator[str]:
    """SSE events from the service's answer. Text comes from deltas when the service sends them, from
    segments otherwise. A failure after the first event is sent as an error event."""
    use_deltas = False
    result: Result | None = None
    started = False
    try:
        for event in events:
            chunk = None
            if isinstance(event, Delta):
                use_deltas = True
                chunk = out.delta(event.text, (event.prompt_tokens, event.completion_tokens))
            elif isinstance(event, SegmentEvent) and not use_deltas:
                chunk = out.delta(event.segment.text)
            elif isinstance(event, Summary):
                result = event.result
            if chunk is not None:
                started = True
                yield chunk
    except APIError as e:
        if not started:
            raise
        log.warning("stream failed after it started: %d %s", e.status, e.message)
        yield out.error(e.body())
        yield out.DONE
        return
    if result is None:
        result = Result(text=out.text, language="", duration=0.0)
    yield out.done(result.prompt_tokens, result.completion_tokens, result.truncated)
    if out.include_usage:
        yield out.usage(result.prompt_tokens, result.completion_tokens, result.duration)
    yield out.DONE


def collect(events: Iterator) -> Result:
    """The whole result of a call: the summary, with the segments that came before it."""
    segments = []
    result = None
    deltas = []
    for event in events:
        if isinstance(event, SegmentEvent):
            segments.append(event.segment)
        elif isinstance(event, Delta):
            deltas.append(event.text)
        elif isinstance(event, Summary):
            result = event.result
    if result is None:
        raise APIError(502, "The speech service ended the call without a result", code="bad_gateway")
    if not result.segments:
        result.segments = segments
    return result
