"""Connections to llama.cpp servers: one pooled requests session per endpoint.

This is the only module that catches ``requests`` exceptions; everything above it sees
``UpstreamError`` subclasses.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import ssl
import struct
from collections.abc import Iterator, Mapping
from http.client import RemoteDisconnected
from typing import Any

import requests
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    InvalidChunkLength,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from .concurrency import deadline
from .config import CREDENTIAL_HEADERS, Endpoint, ProxySettings
from .errors import UpstreamError, UpstreamTimeout, UpstreamTooLarge
from .transport import (
    READ_SIZE,
    Body,
    ConnectFailed,
    InvalidChunk,
    Transport,
    UpstreamClosed,
    UpstreamReset,
    build_response,
)

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 7.6.1) are never relayed in either direction.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Not forwarded upstream: recomputed by requests or meaningless to the upstream; and the
# client's Accept-Encoding, since the proxy adds SSE comments and error events to streams
# and must read what it relays (upstream requests ask for identity encoding).
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect", "accept-encoding"}
# Not relayed back: recomputed by the WSGI server, or ours to set.
_NOT_RELAYED = HOP_BY_HOP | {"content-length", "server", "date"}
_NOT_RELAYED_PREFIXES = ("x-olla-", "access-control-")
POOL_SIZE = 1024
POLL_LIMIT = 16 * 1024 * 1024   # bytes of a probe's or poll's answer (/props, /slots...)


def _too_large(limit: int) -> UpstreamTooLarge:
    return UpstreamTooLarge(f"the upstream's answer is larger than {limit} bytes")


class UpstreamConnectError(UpstreamError):
    """The connection failed before the upstream answered (refused, reset, connect
    timeout): nothing reached the client, so the request may go to another endpoint.
    ``reached``: the connection was made (the request may have been read, and may be what
    broke it), as opposed to refused or never established."""

    def __init__(self, message: str, *, reached: bool = False) -> None:
        super().__init__(message)
        self.reached = reached


# A connection that was never made: the request cannot have reached the upstream.
_NOT_CONNECTED = (NewConnectionError, ConnectTimeoutError, requests.ConnectTimeout,
                  ConnectionRefusedError, socket.gaierror, ConnectFailed)
# What either transport raises for a failed exchange.
_FAILURES = (requests.RequestException, Urllib3HTTPError, http.client.HTTPException, OSError)


def request_headers(inbound: Mapping[str, str], endpoint: Endpoint) -> dict[str, str]:
    """Headers for the upstream request: the client's minus hop-by-hop, plus the endpoint's.

    When the config supplies the endpoint's credentials, the client's own Authorization and
    X-Api-Key are dropped: the OpenAI SDK always sends a placeholder bearer token, and
    llama.cpp checks Authorization before X-Api-Key.
    """
    connection_tokens = {t.strip().lower() for t in inbound.get("Connection", "").split(",")}
    drop = _NOT_FORWARDED | connection_tokens
    if endpoint.sends_credentials:
        drop = drop | CREDENTIAL_HEADERS
    out = {k: v for k, v in inbound.items() if k.lower() not in drop}
    out["Accept-Encoding"] = "identity"
    out.update(endpoint.headers)
    return out


def response_headers(upstream: Mapping[str, str]) -> list[tuple[str, str]]:
    """The upstream's response headers that are relayed to the client: not hop-by-hop, not
    ours (``X-Olla-*``), and no CORS: llama-server allows every origin itself, and whether a
    browser may read an answer is the proxy's ``server.cors`` to say."""
    connection_tokens = {t.strip().lower() for t in upstream.get("Connection", "").split(",")}
    drop = _NOT_RELAYED | connection_tokens
    return [(k, v) for k, v in upstream.items()
            if k.lower() not in drop and not k.lower().startswith(_NOT_RELAYED_PREFIXES)]


class _Urllib3Body:
    """What ``Upstream`` reads through for a urllib3 response (``https`` endpoints, and the
    fakes of the unit tests): its reads and its socket."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def read(self, at_most: int | None) -> bytes:
        return self.raw.read(at_most, decode_content=False)  # type: ignore[no-any-return]

    def chunks(self) -> Iterator[bytes]:
        raw = self.raw
        if raw.chunked:
            yield from raw.read_chunked(READ_SIZE, decode_content=False)
            return
        while data := raw.read1(READ_SIZE, decode_content=False):
            yield data

    @property
    def sock(self) -> Any:
        """The connection's socket, or, for an answer that will close its connection
        (close-delimited, or ``Connection: close``), which http.client detaches from the
        connection, the one under the response's own reader."""
        raw = self.raw
        sock = getattr(getattr(raw, "_connection", None), "sock", None)
        if sock is None:
            reader = getattr(getattr(raw, "_fp", None), "fp", None)   # a BufferedReader
            sock = getattr(getattr(reader, "raw", None), "_sock", None)  # its SocketIO's
        return sock

    def close(self) -> None:
        raw = self.raw
        if raw.closed:
            raw.release_conn()
        else:
            raw.close()


class Upstream:
    """An open upstream response; iterate it for raw body chunks, always close it."""

    __slots__ = ("_body", "interrupted", "response")

    def __init__(self, response: requests.Response) -> None:
        self.response = response
        raw = response.raw
        self._body: Body | _Urllib3Body = raw if isinstance(raw, Body) else _Urllib3Body(raw)
        self.interrupted = False

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def headers(self) -> Mapping[str, str]:
        return self.response.headers

    @property
    def is_stream(self) -> bool:
        """True for SSE, relayed chunk by chunk; anything else from llama.cpp is one JSON
        document (or an error), read whole."""
        return self.response.headers.get("Content-Type", "").startswith("text/event-stream")

    def read(self, limit: int | None = None) -> bytes:
        """The whole body, as sent: not decompressed, since its Content-Encoding is relayed
        too. UpstreamTooLarge past ``limit`` bytes (the rest is never read)."""
        try:
            at_most = None
            if limit is not None:
                declared = self.response.headers.get("Content-Length", "")
                if not declared.isdigit():
                    at_most = limit + 1
                elif int(declared) > limit:
                    raise _too_large(limit)
                # else read as a whole: a body cut short of its length is an error then.
            body = self._body.read(at_most)
            if limit is not None and len(body) > limit:
                raise _too_large(limit)
            return body
        except _FAILURES as exc:
            raise _translate(exc) from exc
        finally:
            self.close()

    def chunks(self) -> Iterator[bytes]:
        """Raw body chunks as they arrive, undecoded: whatever has arrived at each read (a
        urllib3 response: one per upstream HTTP chunk), at most ``READ_SIZE`` bytes, never
        waiting to fill a buffer while a stream's events are ready to go on."""
        try:
            yield from self._body.chunks()
        except _FAILURES as exc:
            raise _translate(exc) from exc
        if self.interrupted:
            # A body ended by its connection's close looks complete when interrupt() shut
            # the socket down: it was cut, not finished.
            raise UpstreamError("upstream read interrupted")

    @property
    def resumable(self) -> bool:
        """Whether ``next_chunk`` may be called: the body's reads can time out and go on
        (``transport.Body``; urllib3's chunked reader cannot resume after a timeout)."""
        return isinstance(self._body, Body)

    def next_chunk(self) -> bytes:
        """What has arrived of the body (b"" at its end), waiting at most the read timeout:
        UpstreamTimeout then, and the body can be read on. Only when ``resumable``."""
        assert isinstance(self._body, Body)
        try:
            data = self._body.next_piece()
        except _FAILURES as exc:
            raise _translate(exc) from exc
        if not data and self.interrupted:
            raise UpstreamError("upstream read interrupted")
        return data

    def set_read_timeout(self, seconds: float | None) -> None:
        """The longest wait for the next bytes of this response from now on (None: no
        limit of the socket's own)."""
        sock = self._body.sock
        if sock is not None:
            sock.settimeout(seconds)

    def interrupt(self) -> None:
        """Wake whoever is reading this response with an error, from another greenlet: shut
        the socket down (closing the reader under it is not safe); the reader's own close
        then resets the connection."""
        self.interrupted = True
        sock = self._body.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the response: a fully read body returns its connection to the pool, a
        half-read one closes it, so the upstream sees the disconnect at once."""
        if self.response.raw is not None:
            self._body.close()
        self.response.close()


_STALE = (RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """An exception and everything it wraps (args, causes, contexts), each once."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [*current.args, current.__cause__, current.__context__,
                  getattr(current, "reason", None)]


def _closed_under_us(exc: BaseException) -> bool:
    """True when a pooled connection was closed by the peer before it answered."""
    return any(isinstance(e, _STALE) for e in _chain(exc))


# What a client is told about a failed upstream exchange: the kind of failure, never the
# upstream's host, port, path or query (those are in the log line, for the operator).
_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (UpstreamClosed, "the upstream closed the connection"),
    (UpstreamReset, "connection reset by the upstream"),
    (socket.gaierror, "host name not found"),
    (ssl.SSLError, "TLS handshake or certificate failed"),
    (RemoteDisconnected, "the upstream closed the connection"),
    (ConnectionResetError, "connection reset by the upstream"),
    (BrokenPipeError, "connection reset by the upstream"),
    (ConnectionAbortedError, "connection aborted"),
    (TimeoutError, "timed out"),
    (requests.Timeout, "timed out"),
    (Urllib3TimeoutError, "timed out"),
    (InvalidChunkLength, "invalid chunked encoding"),
    (InvalidChunk, "invalid chunked encoding"),
    (http.client.HTTPException, "invalid HTTP answer"),
    (ProtocolError, "invalid HTTP answer"),
    (OSError, "network error"),
)


def reason(exc: BaseException) -> str:
    """A short account of an upstream failure that reveals nothing of its address."""
    # requests' own exceptions are OSErrors too: what they wrap says what happened.
    found = [e for e in _chain(exc) if not isinstance(e, requests.RequestException)]
    for kind, text in _REASONS:
        if any(isinstance(e, kind) for e in found):
            return text
    return type(exc).__name__


def _translate(exc: BaseException, answered: bool = True) -> UpstreamError:
    """Map the transports' errors to ours. Before the upstream answered (``answered``
    False), a refused, reset or timed-out connection is an UpstreamConnectError: nothing
    reached the client, so another endpoint may take the request."""
    log.debug("upstream exchange failed: %r", exc)
    why = reason(exc)
    if isinstance(exc, (requests.ReadTimeout, ReadTimeoutError, TimeoutError)) \
            and not isinstance(exc, requests.ConnectTimeout):
        return UpstreamTimeout("upstream did not answer in time")
    if not answered and isinstance(exc, (requests.ConnectionError, ProtocolError, OSError,
                                         http.client.HTTPException)):
        reached = not any(isinstance(e, _NOT_CONNECTED) for e in _chain(exc))
        return UpstreamConnectError(f"upstream is not reachable: {why}", reached=reached)
    return UpstreamError(f"upstream connection failed: {why}")


class _Adapter(HTTPAdapter):
    """Upstream sockets without Nagle's delay, closed with a reset (SO_LINGER 0).

    A stream's next write then fails at once. A non-streamed request is another matter:
    llama-server looks for a closed connection only when its 1 s wait for the result times
    out, and every other result on that server (another stream's tokens, a /slots answer)
    restarts the wait, so on a busy server it may generate to the end whatever the proxy
    does. The reset costs nothing and was noticed in cases where a plain close was not.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = [
            *HTTPConnection.default_socket_options,
            (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
        ]
        super().init_poolmanager(*args, **kwargs)

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        """requests' own, less what a proxy never uses (``transport.build_response``)."""
        return build_response(self, req, resp)


def _prepare(method: str, url: str, headers: Mapping[str, str] | None,
             body: bytes | None) -> requests.PreparedRequest:
    """A PreparedRequest built directly: the proxy's URL, headers and body are final, and
    Session.prepare_request's merging (of session headers, cookies, auth, hooks) would only
    cost time on every request."""
    prepared = requests.PreparedRequest()
    prepared.method = method
    prepared.url = url
    prepared.headers = CaseInsensitiveDict(headers or {})
    prepared.body = body
    if body is not None:
        prepared.headers["Content-Length"] = str(len(body))
    prepared.hooks = {"response": []}
    return prepared


class UpstreamPool:
    """One pool of keep-alive connections per endpoint, with explicit (connect, read)
    timeouts, behind requests' transport adapter interface (called directly: no
    session-level cookies, default headers or environment proxies, which a proxy shared by
    every client must not have). ``http`` endpoints go through ``transport.Transport``;
    ``https`` ones (and every one with ``via_urllib3``, as before it) through urllib3."""

    def __init__(self, endpoints: tuple[Endpoint, ...], proxy: ProxySettings, *,
                 via_urllib3: bool = False) -> None:
        self.timeout = (proxy.connection_timeout, proxy.read_timeout)
        self._adapters: dict[str, BaseAdapter] = {
            e.name: _Adapter(pool_connections=1, pool_maxsize=POOL_SIZE, max_retries=0)
            if via_urllib3 or not e.url.startswith("http://") else Transport(POOL_SIZE)
            for e in endpoints}

    def open(self, endpoint: Endpoint, method: str, path: str, *, body: bytes | None = None,
             headers: Mapping[str, str] | None = None,
             timeout: tuple[float, float] | None = None) -> Upstream:
        """Send a request and return once the upstream's status and headers have arrived."""
        adapter = self._adapters[endpoint.name]
        prepared = _prepare(method, endpoint.join(path), headers, body)
        for attempt in (1, 2):
            try:
                response = adapter.send(prepared, stream=True, timeout=timeout or self.timeout)
            except _FAILURES as exc:
                if attempt == 1 and _closed_under_us(exc):
                    # llama-server closes idle keep-alive connections (after 5 s); one can
                    # close just as a request is sent on it, before any answer. Nothing ran:
                    # send it again on a fresh connection. (``Transport`` does this itself,
                    # for reused connections only, and raises nothing this matches.)
                    continue
                raise _translate(exc, answered=False) from exc
            return Upstream(response)
        raise AssertionError("unreachable")

    def fetch(self, endpoint: Endpoint, path: str, timeout: float,
              limit: int = POLL_LIMIT) -> tuple[int, bytes]:
        """GET a probe or poll (status, body): the whole exchange within ``timeout``, the
        body within ``limit`` bytes, so that no endpoint can stall or swell the health loop
        that checks every endpoint."""
        with deadline(timeout, UpstreamTimeout(f"no complete answer within {timeout:g} s")):
            upstream = self.open(endpoint, "GET", path, headers=endpoint.headers,
                                 timeout=(min(timeout, self.timeout[0]), timeout))
            return upstream.status, upstream.read(limit)

    def get_json(self, endpoint: Endpoint, path: str, timeout: float) -> tuple[int, Any]:
        """GET a small JSON document from an endpoint (status, parsed body or None)."""
        status, body = self.fetch(endpoint, path, timeout)
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None

    def close(self) -> None:
        """Close every pooled connection."""
        for adapter in self._adapters.values():
            adapter.close()
