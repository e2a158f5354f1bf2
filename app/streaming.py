"""Relay an upstream body to the client chunk by chunk, closing the upstream on every path."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

from .errors import UpstreamError
from .stats import Exchange, find_timings
from .upstream import Upstream

log = logging.getLogger(__name__)


def sse_error_event(message: str, openai: bool) -> bytes:
    """The final SSE event(s) a client gets when the upstream breaks mid-stream."""
    event = {"error": {"message": message, "type": "server_error", "code": "upstream_error"}}
    out = b"data: " + json.dumps(event).encode() + b"\n\n"
    if openai:
        out += b"data: [DONE]\n\n"
    return out


def relay(upstream: Upstream, exchange: Exchange, *, openai: bool) -> Iterator[bytes]:
    """Yield the upstream's raw chunks as they arrive.

    The WSGI server closes this generator when the client goes away (its next write
    fails); ``finally`` then closes the upstream connection, which is what makes
    llama.cpp stop generating and free the slot. The last event carrying ``timings`` or
    ``usage`` is kept (a byte search per chunk) and parsed once at the end.
    """
    sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    endpoint = exchange.state.endpoint.name
    last_stats: bytes | None = None
    ok = True
    try:
        # An empty first write makes gunicorn send the status and headers now, before the
        # first token: clients see the stream open at once.
        yield b""
        for chunk in upstream.chunks():
            if chunk:
                if b'"timings"' in chunk or b'"usage"' in chunk:
                    last_stats = chunk
                yield chunk
    except UpstreamError as exc:
        ok = False
        log.warning("upstream %s broke mid-stream: %s", endpoint, exc.message)
        if sse:
            yield sse_error_event(f"upstream {endpoint} failed mid-stream: {exc.message}", openai)
    finally:
        upstream.close()
        if last_stats is not None:
            exchange.timings = find_timings(last_stats)
        exchange.finish(ok=ok)
