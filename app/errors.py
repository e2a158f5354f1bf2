"""Proxy errors and the one place they become the spec's JSON error envelope."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, g, has_request_context, request
from werkzeug.exceptions import HTTPException

from .dialect import for_path

log = logging.getLogger(__name__)


class ProxyError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "code"}}``."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if code is not None:
            self.code = code


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_parameter"


class BodyTooLarge(ProxyError):
    """A body over a route's own limit (the server's is Werkzeug's 413)."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ProxyError):
    """The client did not send its whole body in time (``server.read_timeout``)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class NotAuthenticated(ProxyError):
    """No API key, or one the proxy does not know (``auth.api_keys``)."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="olla"'})


class ModelNotAllowed(ProxyError):
    """A model outside the API key's ``models``."""

    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class Forbidden(ProxyError):
    """A route the ``server.internal_access`` policy does not open to this client."""

    status = 403
    type = "permission_error"
    code = "forbidden"


class RateLimited(ProxyError):
    """Over a rate limit (``server.rate_limits`` or a key's); with ``Retry-After``."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class RouteNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "model_unavailable"


class SlotsExhausted(ProxyError):
    status = 503
    type = "server_error"
    code = "slots_exhausted"


class ClientDisconnected(Exception):
    """The client went away before its answer was complete."""


class NoEndpointAvailable(ProxyError):
    status = 503
    type = "server_error"
    code = "no_endpoints_available"


class UpstreamError(ProxyError):
    """The upstream could not be reached or broke before answering."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamTooLarge(UpstreamError):
    code = "upstream_too_large"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


def json_error(status: int, message: str, type_: str, code: str,
               headers: dict[str, str] | None = None) -> Response:
    """A Response carrying the error envelope: the spec's, or Anthropic's on the Anthropic
    routes."""
    if has_request_context():
        body = for_path(request.path).error_body(status, message, type_, code,
                                                 g.get("request_id", ""))
    else:
        body = json.dumps({"error": {"message": message, "type": type_, "code": code}}
                          ).encode()
    return Response(body, status=status, headers=headers, mimetype="application/json")


def _from_proxy_error(exc: ProxyError) -> Response:
    response = json_error(exc.status, exc.message, exc.type, exc.code, exc.headers)
    if isinstance(exc, RequestTimeout):
        stop_reading(request.environ, response)
    return response


LINGER = 1.0   # seconds a connection is drained after an answer that leaves a body unread


def stop_reading(environ: Mapping[str, Any], response: Response) -> None:
    """Read nothing more from this client once ``response`` is written: after a body that
    was not (or not all) read, the connection closes instead of gunicorn reading the rest
    of the body to reach a next request. The close lingers, as nginx's does: the answer is
    ended with a FIN, what the client still sends is read and dropped for up to ``LINGER``
    seconds (or until it closes), and only then is the socket closed. Closing at once, with
    the client's bytes unread, sends a reset that can destroy the answer before the client
    has read it."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        response.call_on_close(lambda: _linger(sock))


def _linger(sock: Any) -> None:
    deadline = time.monotonic() + LINGER
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                break
    except OSError:
        pass   # the client is gone, or LINGER ran out
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)   # gunicorn's next read ends the connection


_HTTP_CODES = {400: ("invalid_request_error", "invalid_parameter"),
               404: ("invalid_request_error", "not_found"),
               405: ("invalid_request_error", "method_not_allowed"),
               413: ("invalid_request_error", "request_too_large"),
               431: ("invalid_request_error", "headers_too_large")}


def _from_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    type_, code = _HTTP_CODES.get(status, ("server_error", "http_error"))
    message = exc.description or exc.name
    if status == 413:
        message = (f"Request body too large: at most {current_app.config['MAX_CONTENT_LENGTH']}"
                   " bytes are accepted (server.request_limits.max_body_size)")
    response = json_error(status, message, type_, code)
    if status == 413:
        stop_reading(request.environ, response)
    if status == 405 and exc.response is None:
        allow = getattr(exc, "valid_methods", None)
        if allow:
            response.headers["Allow"] = ", ".join(allow)
    return response


def _from_client_gone(exc: ClientDisconnected) -> Response:
    # Nobody is there to read it; 499 is nginx's "client closed request", for the logs.
    log.info("client went away: %s", exc)
    return Response(b"", status=499)


def _from_unexpected(exc: Exception) -> Response:
    log.exception("unhandled error: %s", exc)
    return json_error(500, "Internal proxy error", "server_error", "internal_error")


def register_error_handlers(app: Flask) -> None:
    """Map every error to the JSON envelope: ours, Werkzeug's, and anything unexpected."""
    app.register_error_handler(ProxyError, _from_proxy_error)
    app.register_error_handler(ClientDisconnected, _from_client_gone)
    app.register_error_handler(HTTPException, _from_http_exception)
    app.register_error_handler(Exception, _from_unexpected)
