"""What a route's clients expect of errors and of a stream's end: the spec's OpenAI-style
envelope (every route but one family), or Anthropic's (the ``/olla/anthropic/`` routes).

The spec's shape is ``{"error": {"message", "type", "code"}}``; OpenAI streams end with
``data: [DONE]``. Anthropic clients expect ``{"type": "error", "error": {"type",
"message"}}`` with Anthropic's error types, and a stream that fails after its headers ends
with an ``event: error`` carrying the same object. Flask-free: the error handlers, the
forwarder and the relay all ask the request's ``Dialect``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Anthropic's error type for an HTTP status (its API's own table; any other 4xx is
# invalid_request_error, any other 5xx api_error).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 504: "timeout_error",
                    529: "overloaded_error"}


def anthropic_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500
                                else "api_error")


@dataclass(frozen=True)
class Dialect:
    """One family of clients' error bodies and stream ends."""

    name: str
    stream_end: bytes = b""              # after a final error event: [DONE] for OpenAI
    anthropic: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # on every answer relayed

    def error_document(self, status: int, message: str, type_: str, code: str,
                       request_id: str = "") -> dict[str, Any]:
        """The error body for a status, in this dialect."""
        if self.anthropic:
            document: dict[str, Any] = {
                "type": "error",
                "error": {"type": anthropic_type(status), "message": message}}
            if request_id:
                document["request_id"] = request_id
            return document
        return {"error": {"message": message, "type": type_, "code": code}}

    def error_body(self, status: int, message: str, type_: str, code: str,
                   request_id: str = "") -> bytes:
        return json.dumps(self.error_document(status, message, type_, code,
                                              request_id)).encode()

    def stream_error(self, message: str, code: str = "upstream_error",
                     status: int = 502) -> bytes:
        """The final event(s) of a stream that failed after its headers went out."""
        if self.anthropic:
            body = self.error_body(status, message, "server_error", code)
            return b"event: error\ndata: " + body + b"\n\n"
        body = self.error_body(status, message, "server_error", code)
        return b"data: " + body + b"\n\n" + self.stream_end

    def upstream_error(self, raw: bytes, status: int) -> bytes | None:
        """llama.cpp's own error body (``{"error": {"code", "message", "type"}}``) in this
        dialect; None when it needs no change (or is not one)."""
        if not self.anthropic or status < 400:
            return None
        try:
            document = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(document, dict) or document.get("type") == "error":
            return None  # not an error body, or already Anthropic's
        error = document.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if not isinstance(message, str):
            return None
        return self.error_body(status, message, "", "")


OPENAI = Dialect("openai", stream_end=b"data: [DONE]\n\n")
LLAMACPP = Dialect("llamacpp")
# Olla's header for a request passed through to a backend's own Anthropic API.
ANTHROPIC = Dialect("anthropic", anthropic=True, headers=(("X-Olla-Mode", "passthrough"),))

ANTHROPIC_PATH = "/olla/anthropic/"


def for_path(path: str) -> Dialect:
    """The dialect of errors on a request path: Anthropic's under ``/olla/anthropic/``,
    the spec's everywhere else."""
    return ANTHROPIC if path.startswith(ANTHROPIC_PATH) else OPENAI
