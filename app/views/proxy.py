"""The llama.cpp routes under ``/olla/<prefix>/``: validate, choose an endpoint, relay."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, request
from marshmallow import Schema
from werkzeug.datastructures import Headers

from .. import disconnect, schemas
from ..config import Timeouts
from ..errors import (
    ClientDisconnected,
    InvalidRequest,
    MethodNotAllowed,
    NoEndpointAvailable,
    RouteNotFound,
    UpstreamError,
)
from ..health import mark_failed
from ..registry import Status, name_key
from ..services import Services, services
from ..stats import Exchange, find_timings
from ..streaming import Clock, Source, first_item, relay
from ..upstream import Upstream, UpstreamConnectError, request_headers, response_headers

bp = Blueprint("proxy", __name__)

BACKEND_TYPE = "llamacpp"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
MODELS_MAX_AGE = 5.0  # seconds a discovered model list is trusted when listing models
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True)
class Route:
    """One forwarded llama.cpp route."""

    method: str
    schema: Schema | None = None
    openai: bool = False
    # Watch the client while waiting (queue, generation): routes that can take long.
    watched: bool = True


ROUTES: dict[str, Route] = {
    "v1/models": Route("GET", openai=True),
    "completion": Route("POST", schemas.CompletionSchema()),
    "v1/completions": Route("POST", schemas.OpenAICompletionSchema(), openai=True),
    "v1/chat/completions": Route("POST", schemas.ChatCompletionSchema(), openai=True),
    "embedding": Route("POST", schemas.EmbeddingSchema()),
    "v1/embeddings": Route("POST", schemas.OpenAIEmbeddingSchema(), openai=True),
    "tokenize": Route("POST", schemas.TokenizeSchema(), watched=False),
    "detokenize": Route("POST", schemas.DetokenizeSchema(), watched=False),
    "infill": Route("POST", schemas.InfillSchema()),
}


@bp.before_app_request
def _start() -> None:
    g.started = time.perf_counter()
    inbound = request.headers.get("X-Request-Id", "")
    # 128 random bits as 32 hex digits, like uuid4().hex at a fraction of its cost.
    g.request_id = inbound if _SAFE_REQUEST_ID.match(inbound) else os.urandom(16).hex()


@bp.after_app_request
def _stamp(response: Response) -> Response:
    """Headers every response under the proxy carries, errors included."""
    if request.path.startswith("/olla/"):
        headers = response.headers
        headers["X-Olla-Request-Id"] = g.get("request_id", "")
        headers["Via"] = f"1.1 olla/{services().version}"
        if request.blueprint == bp.name:
            headers.setdefault("X-Olla-Backend-Type", BACKEND_TYPE)
            if "X-Olla-Response-Time" not in headers and "started" in g:
                headers["X-Olla-Response-Time"] = _elapsed_ms()
            _account(response.status_code)
    return response


def _account(status: int) -> None:
    """Count the answer, and log it now unless a stream is still running (its exchange
    logs when it ends)."""
    svc = services()
    exchange: Exchange | None = g.get("exchange")
    endpoint, model = (exchange.state.endpoint.name, exchange.model) if exchange else ("", "")
    route = request.view_args.get("subpath", "") if request.view_args else ""
    # Any path can be asked for: only known routes become metric labels, or a scan of
    # random paths would create a series each.
    svc.metrics.answered(endpoint, model, route if route in ROUTES else "(other)", status)
    if exchange is None:
        svc.request_log.line(g.get("request_id", ""), "", "", route, status,
                             None, (time.perf_counter() - g.started) * 1000, None)
    elif exchange.finished:
        svc.request_log.exchange(exchange, g.get("request_id", ""), status)
    else:
        exchange.request_id = g.get("request_id", "")
        exchange.observers = [*exchange.observers, svc.request_log.stream_done]


def _elapsed_ms() -> str:
    return f"{round((time.perf_counter() - g.started) * 1000)}ms"


def _route(prefix: str, subpath: str) -> Route:
    if prefix not in services().settings.prefixes:
        raise RouteNotFound(f"Unknown or disabled prefix: /olla/{prefix}")
    route = ROUTES.get(subpath)
    if route is None:
        raise RouteNotFound(
            f"Not found: /olla/{prefix}/{subpath} is not a llama.cpp route this proxy serves")
    allowed = {route.method, "HEAD"} if route.method == "GET" else {route.method}
    if request.method not in allowed:
        raise MethodNotAllowed(f"Method {request.method} not allowed on /olla/{prefix}/{subpath}",
                               headers={"Allow": ", ".join(sorted(allowed))})
    return route


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(body: bytes) -> dict[str, Any]:
    """The JSON object in the body, whatever the Content-Type (as llama.cpp does)."""
    if not body.strip():
        raise InvalidRequest("Invalid request: the body must be a JSON object")
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"Invalid JSON body: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("Invalid request: the body must be a JSON object, not "
                             f"{type(payload).__name__ if payload is not None else 'null'}")
    return payload


@bp.route("/olla/<prefix>/", methods=_ALL_METHODS, defaults={"subpath": ""})
@bp.route("/olla/<prefix>/<path:subpath>", methods=_ALL_METHODS)
def proxy(prefix: str, subpath: str) -> Response:
    """Forward one llama.cpp route."""
    route = _route(prefix, subpath)
    if route.schema is None:
        return _list_models()
    body = request.get_data(cache=False)
    payload = _parse(body)
    errors = schemas.check(route.schema, payload)
    if errors:
        raise InvalidRequest(schemas.validation_message(errors))
    model = payload.get("model")
    return _forward(subpath, route, body, payload, model if isinstance(model, str) else None)


def _list_models() -> Response:
    svc = services()
    svc.registry.refresh(max_age=MODELS_MAX_AGE)
    body = json.dumps({"object": "list", "data": svc.registry.models()})
    return Response(body, mimetype="application/json")


def _forward(subpath: str, route: Route, body: bytes, payload: dict[str, Any],
             model: str | None) -> Response:
    """Take a slot on a candidate (waiting in the queue if all are busy), send the request,
    relay the answer; move on to the next candidate while that is safe.

    Moving on is safe only while nothing reached the client and nothing ran upstream: the
    connection failed (refused, reset or timed out before any answer, or a stream broke
    before its first byte), llama.cpp answered 503 "Loading model", or it answered 501 (it
    lacks the feature). Each endpoint is tried at most once; after the first byte reaches
    the client there is no retry.
    """
    svc = services()
    watch = disconnect.watch(request.environ) if route.watched else None
    try:
        return _attempts(svc, subpath, route, body, payload, model, watch)
    except BaseException:
        if watch is not None:
            watch.stop()
        raise


def _attempts(svc: Services, subpath: str, route: Route, body: bytes,
              payload: dict[str, Any], model: str | None,
              watch: disconnect.Watch | None) -> Response:
    inbound = _inbound_headers()
    path = "/" + subpath + (("?" + request.query_string.decode("latin-1"))
                            if request.query_string else "")
    streamed = payload.get("stream") is True
    failures: list[str] = []
    remaining = svc.router.candidates(model, subpath)
    while remaining:
        waiting = time.perf_counter()
        state = svc.dispatcher.acquire(name_key(model) if model else "",
                                       [c.state for c in remaining],
                                       wait=watch.wait if watch else None)
        queue_wait = time.perf_counter() - waiting
        candidate = next(c for c in remaining if c.state is state)
        remaining = [c for c in remaining if c is not candidate]
        last = not remaining
        endpoint = state.endpoint
        out_body = body
        if candidate.model is not None and candidate.model != model:
            out_body = json.dumps({**payload, "model": candidate.model}).encode()
        exchange = Exchange(state, model or candidate.model or state.primary_model or "",
                            subpath, g.started, svc.dispatcher.release, svc.observers,
                            queue_wait_ms=queue_wait * 1000)
        g.exchange = exchange
        svc.metrics.child(svc.metrics.queue_wait, exchange.model).observe(queue_wait)
        limits = endpoint.limits
        source: Source | None = None
        try:
            exchange.sending()
            try:
                upstream = svc.pool.open(endpoint, "POST", path, body=out_body,
                                         headers=request_headers(inbound, endpoint),
                                         timeout=_socket_timeouts(limits, streamed))
            except UpstreamConnectError as exc:
                _pass_over(exchange, failures, exc.message, Status.OFFLINE)
                continue
            exchange.answered(upstream.status)
            if watch is not None:
                watch.on_gone(upstream.interrupt)
            if upstream.is_stream:
                source = Source(upstream)
                clock = Clock(limits, svc.settings.proxy.sse_keepalive, g.started)
                first = first_item(source, clock)
                if isinstance(first, bytes):
                    exchange.first_byte()
                if isinstance(first, UpstreamError) and not last and not (watch and watch.gone):
                    # Broke before its first byte: nothing reached the client.
                    source.close()
                    _pass_over(exchange, failures, first.message, Status.OFFLINE)
                    continue
                return _stream_response(upstream, source, clock, first, route, exchange,
                                        model, watch)
            content = upstream.read()
        except BaseException as exc:
            # A failure past the point of moving on (or the client left): this attempt is over.
            if source is not None:
                source.close()
            exchange.finish(ok=isinstance(exc, ClientDisconnected))
            raise
        if not last and upstream.status == 503 and b"Loading model" in content:
            _pass_over(exchange, failures, "llama.cpp is loading its model", Status.LOADING,
                       ok=True)
            continue
        if not last and upstream.status == 501:
            # This server lacks the feature (embeddings off, no FIM tokens) and nothing was
            # generated: another candidate (same model, or any when none is named) may have it.
            state.unsupported.add(subpath)
            _pass_over(exchange, failures, f"does not support /{subpath}", None, ok=True)
            continue
        if watch is not None:
            watch.stop()
        return _response(upstream, content, exchange, model)
    raise NoEndpointAvailable("No llama.cpp endpoint could take the request"
                              + (f" ({'; '.join(failures)})" if failures else ""))


def _pass_over(exchange: Exchange, failures: list[str], why: str, mark: Status | None,
               ok: bool = False) -> None:
    """An attempt the request moves on from: not counted as the client's request, the
    endpoint marked (down or loading) where that applies, the reason kept for the 503."""
    exchange.finish(ok=ok, counted=False)
    if mark is not None:
        mark_failed(exchange.state, mark, why)
    failures.append(f"{exchange.state.endpoint.name}: {why}")


def _inbound_headers() -> dict[str, str]:
    inbound = dict(request.headers)
    inbound["X-Request-Id"] = g.request_id
    forwarded_for = request.headers.get("X-Forwarded-For")
    remote = request.remote_addr or ""
    inbound["X-Forwarded-For"] = f"{forwarded_for}, {remote}" if forwarded_for else remote
    inbound.setdefault("X-Forwarded-Proto", request.scheme)
    return inbound


def _socket_timeouts(limits: Timeouts, streamed: bool) -> tuple[float, float]:
    """(connect, read) for the socket. A non-streamed answer comes whole once generated, so
    its read timeout is the first-byte (and total) limit; a stream's deadlines are kept by
    the relay, the socket's only backs them up."""
    read = limits.first_byte_timeout
    if streamed:
        read = max(read, limits.read_timeout)
    elif limits.response_timeout > 0:
        read = min(read, limits.response_timeout)
    return limits.connection_timeout, read


def _headers(upstream: Upstream, exchange: Exchange, model: str | None) -> Headers:
    headers = Headers(response_headers(upstream.headers))
    headers.set("X-Olla-Endpoint", exchange.state.endpoint.name)
    headers.set("X-Olla-Model", model or exchange.model)
    headers.set("X-Olla-Backend-Type", BACKEND_TYPE)
    # Non-streamed: the whole upstream exchange. Streams: to the first byte of the body
    # (or the first keepalive), when the headers go out.
    headers.set("X-Olla-Response-Time", _elapsed_ms())
    return headers


def _response(upstream: Upstream, content: bytes, exchange: Exchange,
              model: str | None) -> Response:
    if b'"timings"' in content or b'"usage"' in content:
        exchange.timings = find_timings(content)
    exchange.finish()
    return Response(content, status=upstream.status, headers=_headers(upstream, exchange, model))


def _stream_response(upstream: Upstream, source: Source, clock: Clock, first: Any,
                     route: Route, exchange: Exchange, model: str | None,
                     watch: disconnect.Watch | None) -> Response:
    headers = _headers(upstream, exchange, model)
    headers.set("X-Accel-Buffering", "no")
    headers.set("Cache-Control", "no-cache")
    gone = (lambda: watch.gone) if watch is not None else (lambda: False)
    response = Response(relay(source, exchange, clock, first, openai=route.openai,
                              client_gone=gone),
                        status=upstream.status, headers=headers, direct_passthrough=True)
    # Also when the body is never iterated (the client left before it started).
    response.call_on_close(source.close)
    response.call_on_close(exchange.finish)
    if watch is not None:
        response.call_on_close(watch.stop)
    return response
