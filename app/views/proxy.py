"""The llama.cpp routes under ``/olla/<prefix>/``: validate, then hand over to a Forward."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, request
from marshmallow import Schema

from .. import concurrency, disconnect, schemas
from ..access import may_use, presented_key
from ..dialect import ANTHROPIC, LLAMACPP, OPENAI, Dialect
from ..dispatch import ANYONE
from ..errors import (
    BodyTooLarge,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotAllowed,
    RequestTimeout,
    RouteNotFound,
)
from ..forward import BACKEND_TYPE, Forward
from ..forward import Request as ForwardRequest
from ..guard import FORWARD_KEY
from ..payload import parse
from ..services import services
from ..stats import Exchange, TranslatorStats
from ..sticky import SESSION_HEADER, SessionKey, session_key
from .gate import client_address

bp = Blueprint("proxy", __name__)

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
CLIENT_CREDENTIALS = frozenset({"authorization", "x-api-key"})
BODY_PIECE = 1 << 20  # bytes of a request body read at once
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
    # llama-server's newer APIs: the OpenAI Responses API, Anthropic Messages, rerank.
    "v1/responses": Route("POST", schemas.ResponsesSchema()),
    "v1/messages": Route("POST", schemas.MessagesSchema()),
    "v1/messages/count_tokens": Route("POST", schemas.CountTokensSchema(), watched=False),
    "v1/rerank": Route("POST", schemas.RerankSchema()),
    "rerank": Route("POST", schemas.RerankSchema()),
    "reranking": Route("POST", schemas.RerankSchema()),
}


# Olla's unified route, /olla/proxy/: the OpenAI routes, routed by model across every
# endpoint, with the same slots, queue, validation and headers as under a prefix.
UNIFIED = "proxy"
UNIFIED_ROUTES = frozenset({"v1/models", "v1/chat/completions", "v1/completions",
                            "v1/embeddings"})
# Olla's Anthropic routes, /olla/anthropic/: passed through to llama.cpp's own Messages API
# (translators.anthropic), with Anthropic's error shape.
ANTHROPIC_PREFIX = "anthropic"
ANTHROPIC_ROUTES = frozenset({"v1/messages", "v1/messages/count_tokens", "v1/models"})


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
            _account(response.status_code, response)
    return response


ERROR_BODY_READ = 64 * 1024  # bytes of an error answer read for its code, at most


def _error_code(response: Response) -> str | None:
    """The ``code`` of an error answer (Anthropic's ``type`` on its routes), if it has
    one. Only error answers are read, and only small ones: ours are, but an upstream's
    relayed error may be up to ``proxy.max_response_size``."""
    if (response.is_streamed or response.mimetype != "application/json"
            or (response.content_length or 0) > ERROR_BODY_READ):
        return None
    try:
        error = json.loads(response.get_data()).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code", error.get("type"))
    return str(code) if code is not None else None


def _account(status: int, response: Response) -> None:
    """Count the answer, and log it now unless a stream is still running (its exchange
    logs when it ends)."""
    svc = services()
    forward: Forward | None = g.get("forward")
    exchange = forward.exchange if forward is not None else None
    endpoint, model = (exchange.state.endpoint.name, exchange.model) if exchange else ("", "")
    route = request.view_args.get("subpath", "") if request.view_args else ""
    # Any path can be asked for: only known routes become metric labels, or a scan of
    # random paths would create a series each.
    known = route if route in ROUTES else "(other)"
    svc.metrics.answered(endpoint, model, known, status)
    if not model and status >= 400:
        payload_model = g.get("model")
        model = payload_model if isinstance(payload_model, str) else ""
    svc.history.answered(status, known, model,
                         _error_code(response) if status >= 400 else None)
    if "translator" in g:
        _count_translated(svc.stats.translators[g.translator], exchange, status)
    if exchange is None:
        svc.request_log.line(g.get("request_id", ""), "", "", route, status,
                             None, (time.perf_counter() - g.started) * 1000, None)
    elif exchange.finished:
        svc.request_log.exchange(exchange, g.get("request_id", ""), status)
    else:
        exchange.request_id = g.get("request_id", "")
        exchange.observers = [*exchange.observers, svc.request_log.stream_done]


def _count_translated(stats: TranslatorStats, exchange: Exchange | None, status: int) -> None:
    """Count a request through a translator's routes once it is over (a stream when it
    ends)."""
    streaming = g.get("streaming", False)
    if exchange is None or exchange.finished:
        ok = status < 400 and (exchange is None or exchange.ok)
        stats.record(ok, streaming, (time.perf_counter() - g.started) * 1000)
        return

    def ended(done: Exchange) -> None:
        stats.record(done.ok and status < 400, streaming, done.total_ms)

    exchange.observers = [*exchange.observers, ended]


def _elapsed_ms() -> str:
    return f"{round((time.perf_counter() - g.started) * 1000)}ms"


def _route(prefix: str, subpath: str) -> Route:
    if prefix == UNIFIED:
        if subpath not in UNIFIED_ROUTES:
            raise RouteNotFound(f"Not found: /olla/proxy/{subpath} (the unified route "
                                f"serves {', '.join(sorted(UNIFIED_ROUTES))})")
    elif prefix == ANTHROPIC_PREFIX:
        if not services().settings.anthropic.enabled:
            raise RouteNotFound("Not found: the Anthropic routes are off "
                                "(translators.anthropic.enabled)")
        if subpath not in ANTHROPIC_ROUTES:
            raise RouteNotFound(f"Not found: /olla/anthropic/{subpath} (the Anthropic routes "
                                f"are {', '.join(sorted(ANTHROPIC_ROUTES))})")
    elif prefix not in services().settings.prefixes:
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


@bp.route("/olla/<prefix>/", methods=_ALL_METHODS, defaults={"subpath": ""})
@bp.route("/olla/<prefix>/<path:subpath>", methods=_ALL_METHODS)
def proxy(prefix: str, subpath: str) -> Response:
    """Forward one llama.cpp route."""
    route = _route(prefix, subpath)
    anthropic = prefix == ANTHROPIC_PREFIX
    if route.schema is None:
        return _anthropic_models() if anthropic else _list_models()
    if anthropic:
        g.translator = "anthropic"
    body = _body()
    if anthropic:
        _check_message_size(body)
    payload = parse(body, services().settings.server.request_limits, concurrency.pause)
    errors = schemas.check(route.schema, payload)
    if errors:
        raise InvalidRequest(schemas.validation_message(errors))
    model = payload.get("model")
    model = model if isinstance(model, str) else None
    g.model = model
    g.streaming = payload.get("stream") is True
    key = g.get("api_key")
    if not may_use(key, model):
        raise ModelNotAllowed(
            f"API key {key.name} may not use model {model}" if model else
            f"API key {key.name} may use only some models: name one in the request's "
            "\"model\" field")
    dialect = ANTHROPIC if anthropic else OPENAI if route.openai else LLAMACPP
    return _forward(subpath, route, dialect, body, payload, model)


def _check_message_size(body: bytes) -> None:
    limit = services().settings.anthropic.max_message_size
    if len(body) > limit:
        raise BodyTooLarge(f"Request body too large: at most {limit} bytes are accepted on "
                           "the Anthropic routes (translators.anthropic.max_message_size)")


def _body() -> bytes:
    """The request's body, whole within ``server.read_timeout`` of its headers. Read a
    piece at a time, pausing in between: a large body the client has already sent is
    otherwise read in one go, without a wait that would let the other greenlets run."""
    limit = services().settings.server.read_timeout
    left = limit - (time.perf_counter() - g.started)
    stream = request.stream
    with concurrency.deadline(left, RequestTimeout(
            f"Request timeout: the body did not arrive within {limit:g} s "
            "(server.read_timeout)")):
        length = request.content_length
        if length is not None and length <= BODY_PIECE:
            return stream.read(length)  # all of it, or ClientDisconnected (400)
        pieces: list[bytes] = []
        while piece := stream.read(BODY_PIECE):
            if pieces:
                concurrency.pause()
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _visible_models() -> list[dict[str, Any]]:
    """The fleet's models (OpenAI list entries) that the request's API key may use."""
    svc = services()
    svc.registry.refresh(max_age=MODELS_MAX_AGE)
    key = g.get("api_key")
    return [m for m in svc.registry.models()
            if any(may_use(key, name) for name in (m.get("id"), *(m.get("aliases") or ())))]


def _list_models() -> Response:
    body = json.dumps({"object": "list", "data": _visible_models()})
    return Response(body, mimetype="application/json")


def _anthropic_models() -> Response:
    """Anthropic's model list (Olla's shape): ``created_at`` is when the model was seen
    first, as llama.cpp gives ``created``."""
    data = [{"type": "model", "id": m["id"], "display_name": m["id"],
             "created_at": _rfc3339(m.get("created"))} for m in _visible_models()]
    body = json.dumps({"data": data, "has_more": False,
                       "first_id": data[0]["id"] if data else None,
                       "last_id": data[-1]["id"] if data else None})
    return Response(body, mimetype="application/json")


def _rfc3339(created: Any) -> str:
    stamp = created if isinstance(created, (int, float)) and created > 0 else \
        services().stats.started
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _forward(subpath: str, route: Route, dialect: Dialect, body: bytes,
             payload: dict[str, Any], model: str | None) -> Response:
    """Hand the request to a Forward, which owns it from slot to last byte; the response
    gives everything back when it closes (also when its body is never iterated)."""
    svc = services()
    environ = request.environ
    session_id = request.headers.get(SESSION_HEADER, "")
    forward = Forward(svc, ForwardRequest(
        route=subpath, dialect=dialect,
        path="/" + subpath + (("?" + request.query_string.decode("latin-1"))
                              if request.query_string else ""),
        body=body, payload=payload, model=model, headers=_inbound_headers(),
        request_id=g.request_id, started=g.started,
        watch=disconnect.watch(environ) if route.watched else None,
        client_socket=environ.get("gunicorn.socket"), share=g.get("share", ANYONE),
        session=_session(model, payload, session_id), session_id=session_id))
    g.forward = forward
    environ[FORWARD_KEY] = forward  # for the WSGI guard, should anything escape Flask
    answer = forward.run()
    try:
        response = Response(answer.body, status=answer.status, headers=answer.headers,
                            direct_passthrough=answer.stream)
        response.call_on_close(forward.close)
    except BaseException:
        forward.close(ok=False)
        raise
    return response


def _session(model: str | None, payload: dict[str, Any],
             session_id: str) -> SessionKey | None:
    """The request's sticky session key, when sticky sessions are on."""
    sticky = services().sticky
    if sticky is None:
        return None
    return session_key(sticky.settings, model, session_id, payload, client_address(),
                       presented_key(request.headers))


def _inbound_headers() -> dict[str, str]:
    inbound = dict(request.headers)
    if services().access.keys.enabled:
        # The client's key is the proxy's to check, never an upstream's to see: the
        # endpoint's own configured credentials (or none) go instead.
        for name in [k for k in inbound if k.lower() in CLIENT_CREDENTIALS]:
            del inbound[name]
    inbound["X-Request-Id"] = g.request_id
    forwarded_for = request.headers.get("X-Forwarded-For")
    remote = request.remote_addr or ""
    inbound["X-Forwarded-For"] = f"{forwarded_for}, {remote}" if forwarded_for else remote
    inbound.setdefault("X-Forwarded-Proto", request.scheme)
    return inbound
