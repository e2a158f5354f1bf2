"""HTTP/1.1 to plain-``http`` upstreams on (gevent) sockets, parsed by llhttp through
``httptools``: a ``requests`` transport adapter with keep-alive pools per host.

Under requests/urllib3/http.client an exchange with a local llama-server cost about 0.45 ms of
Python (BENCHMARKS.md, "Where the worker's CPU goes"); here it is one ``sendall``, one
``recv`` and a C parser for a small answer. What urllib3 gave and the proxy relies on is
kept: per-host pools of kept-alive connections, the (connect, read) timeouts, one retry of
a request whose reused connection died before any byte of the answer, and a socket the
caller may time out or shut down from another greenlet. Body chunks are coalesced: each
read hands over everything that has arrived (several SSE events, or part of one), never
waiting for more.

Errors are the standard library's (``OSError`` kinds, ``TimeoutError``,
``http.client.HTTPException`` kinds) plus the few below, so that ``upstream.py`` translates
them at its one boundary. ``https`` endpoints are not for this adapter (urllib3 does TLS).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator, Mapping
from http.client import HTTPException
from typing import Any
from urllib.parse import quote, urlsplit

import httptools
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.util.retry import Retry

READ_SIZE = 64 * 1024          # most bytes read from a socket at once
MAX_HEADERS = 99               # header fields in an answer (http.client's limit, kept)
MAX_LINE = 65536               # bytes of one header line (http.client's limit, kept)
_LINGER_RESET = struct.pack("ii", 1, 0)
_PATH_SAFE = "/:@!$&'()*+,;=%~"      # RFC 3986 pchar (and "%" of escapes already made)


class InvalidAnswer(HTTPException):
    """The upstream's bytes are not a valid HTTP/1.1 answer (or it ended too soon)."""


class InvalidChunk(InvalidAnswer):
    """The chunked framing of the body is broken."""


class UpstreamClosed(ConnectionError):
    """The upstream closed the connection without answering (not a stale kept-alive one)."""


class UpstreamReset(ConnectionError):
    """The upstream reset the connection before the answer's head was in."""


class ConnectFailed(OSError):
    """No connection could be made (refused, unresolvable, timed out): the request cannot
    have reached the upstream. The cause is chained."""


class _Answer:
    """httptools' callbacks for one answer: status, headers, and the body pieces parsed and
    not yet handed over. 1xx informational answers before the final one are skipped."""

    __slots__ = ("chunked", "complete", "dirty", "error", "head_done", "headers",
                 "keep_alive", "parser", "pieces", "status")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.pieces: list[bytes] = []
        self.status = 0
        self.head_done = False
        self.complete = False     # the final answer's end was parsed
        self.dirty = False        # bytes came after that end: the connection is unusable
        self.keep_alive = False
        self.chunked = False
        self.error: InvalidAnswer | None = None   # the body's, raised once it is read to

    def on_message_begin(self) -> None:
        if self.complete:
            self.dirty = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return                # a trailer field: dropped, as urllib3 drops them
        if len(self.headers) >= MAX_HEADERS or len(name) + len(value) + 4 > MAX_LINE:
            raise InvalidAnswer("too many or too long header lines")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.headers = []     # informational: the final answer is still to come
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.chunked = any(name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
                           for name, value in self.headers)
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        self.pieces.append(data)

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True


def _feed(answer: _Answer, data: bytes) -> None:
    """Parse ``data``: an error in the head is raised, one in the body is kept for when the
    body is read that far (what came before it is handed over first)."""
    try:
        answer.parser.feed_data(data)
        return
    except httptools.HttpParserCallbackError as exc:
        error = exc.__context__ if isinstance(exc.__context__, InvalidAnswer) \
            else InvalidAnswer(str(exc))
    except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
        error = InvalidChunk(str(exc)) if answer.head_done and answer.chunked \
            else InvalidAnswer(str(exc))
    if not answer.head_done:
        raise error
    if answer.complete:
        answer.dirty = True       # junk after a whole answer: only the connection is lost
        return
    answer.error = error


class Body:
    """An answer's body as it arrives, on the connection it came on; what
    ``requests.Response.raw`` is for this adapter. Read it to the end to give the
    connection back to its pool; ``close()`` before that closes the connection."""

    def __init__(self, adapter: Transport, key: str, sock: socket.socket, answer: _Answer,
                 *, empty: bool) -> None:
        self._adapter = adapter
        self._key = key
        self.sock: socket.socket | None = sock
        self._answer = answer
        self._left = b""          # what read(amount) took from a piece and did not return
        if empty:                 # HEAD: whatever the headers say, nothing follows
            answer.pieces = []
            answer.complete = True
        self._length_known = answer.complete or answer.chunked or any(
            name.lower() == b"content-length" for name, value in answer.headers)

    def chunks(self) -> Iterator[bytes]:
        """Everything that has arrived at each read, until the body's end (``next_piece``)."""
        while piece := self.next_piece():
            yield piece

    def next_piece(self) -> bytes:
        """Everything of the body that has arrived, at most ``READ_SIZE`` bytes, waiting
        (up to the socket's timeout) only when nothing has; b"" at the body's end (a close
        ends a body with neither length nor chunked framing). An ``InvalidAnswer`` when the
        connection closes before the end. A timeout leaves the body as it was: it can be
        read on (a stream's relay waits for its first token in slices, with keepalives)."""
        answer = self._answer
        if self._left:
            left, self._left = self._left, b""
            return left
        while True:
            if answer.pieces:
                pieces, answer.pieces = answer.pieces, []
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            if answer.error is not None:
                self._finish(reusable=False)
                raise answer.error
            if answer.complete:
                self._finish(reusable=not answer.dirty and answer.keep_alive)
                return b""
            if self.sock is None:
                raise InvalidAnswer("the answer was closed before its end")
            data = self.sock.recv(READ_SIZE)
            if not data:
                if not self._length_known:
                    answer.complete = True      # a close-delimited body's end
                    answer.keep_alive = False
                    continue
                raise InvalidAnswer("the upstream closed the connection before the end")
            _feed(answer, data)

    def read(self, amount: int | None = None, **_: Any) -> bytes:
        """Up to ``amount`` bytes (the whole rest when None); b"" at the end."""
        parts: list[bytes] = []
        size = 0
        for piece in self.chunks():
            parts.append(piece)
            size += len(piece)
            if amount is not None and size >= amount:
                break
        data = b"".join(parts)
        if amount is not None and len(data) > amount:
            data, self._left = data[:amount], data[amount:]
        return data

    def _finish(self, *, reusable: bool) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if reusable:
            self._adapter.release(self._key, sock)
        else:
            sock.close()

    def release_conn(self) -> None:
        """requests calls this on close: nothing more to give back than ``close`` does."""

    def close(self) -> None:
        """Give the connection back when the whole body has arrived, else close it (with a
        reset: the upstream sees the abort at once)."""
        answer = self._answer
        self._finish(reusable=answer.complete and answer.keep_alive and not answer.dirty)


def _response(adapter: BaseAdapter, request: requests.PreparedRequest, status: int,
              headers: CaseInsensitiveDict[str], raw: Any,
              reason: str | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers = headers
    response.raw = raw
    response.reason = reason  # type: ignore[assignment]  # requests types it narrowly
    response.url = request.url or ""
    response.request = request
    response.connection = adapter  # type: ignore[assignment]
    return response


def build_response(adapter: BaseAdapter, request: requests.PreparedRequest,
                   raw: Any) -> requests.Response:
    """A ``requests.Response`` for a urllib3-style response ``raw``: requests' own
    ``HTTPAdapter.build_response`` less the cookie parsing and charset guessing a proxy
    never uses (it relays raw bytes and headers)."""
    return _response(adapter, request, raw.status, CaseInsensitiveDict(raw.headers), raw,
                     raw.reason)


def _timeouts(timeout: Any) -> tuple[float | None, float | None]:
    if isinstance(timeout, tuple):
        return timeout[0], timeout[1]
    return timeout, timeout


def _head(method: str, target: str, host: str, headers: Mapping[str, str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()
              if name.lower() != "host"]
    if "Accept-Encoding" not in headers:
        # As http.client asks: the proxy relays (and reads) bodies as they are sent.
        lines.append("Accept-Encoding: identity")
    lines += ["", ""]
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        # As http.client refuses: a line break in a value would start a header of its own.
        raise ValueError("a request header holds a line break")
    return text.encode("latin-1")


class Transport(BaseAdapter):
    """A ``requests`` transport adapter for ``http://`` URLs (mount it on a Session, or call
    ``send`` directly), with one pool of kept-alive connections per host."""

    def __init__(self, pool_maxsize: int = 1024) -> None:
        super().__init__()
        self.pool_maxsize = pool_maxsize
        # requests' adapter convention (HTTPAdapter's default): no retries but the one of a
        # stale kept-alive connection, which ``send`` makes itself.
        self.max_retries = Retry(0, read=False)
        self._idle: dict[str, list[socket.socket]] = {}
        self._targets: dict[str, tuple[str, str, int, str]] = {}

    def _split(self, url: str) -> tuple[str, str, int, str]:
        """(netloc, host, port, request target) of a URL, remembered: a proxy sends to the
        same few URLs again and again."""
        found = self._targets.get(url)
        if found is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"not an http:// URL: {url!r}")
            # Characters a request target may not carry are percent-encoded, as urllib3
            # does: a client's decoded path may hold a space or non-ASCII text.
            target = quote(parts.path or "/", safe=_PATH_SAFE) + (
                f"?{quote(parts.query, safe=_PATH_SAFE + '?')}" if parts.query else "")
            # The Host header never carries a URL's user:password@ part.
            found = (parts.netloc.rpartition("@")[2], parts.hostname, parts.port or 80, target)
            if len(self._targets) < 4096:
                self._targets[url] = found
        return found

    def _connect(self, host: str, port: int, timeout: float | None) -> socket.socket:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectFailed(f"could not connect: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Closed with a reset: a half-read stream's upstream notices the abort at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        return sock

    def build_response(self, request: requests.PreparedRequest, raw: Any) -> requests.Response:
        """requests' adapter convention, which tools such as ``responses`` call with a
        urllib3 response."""
        return build_response(self, request, raw)

    def release(self, key: str, sock: socket.socket) -> None:
        """Keep a connection whose answer was read to its end for the next request."""
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.pool_maxsize:
            idle.append(sock)
        else:
            sock.close()

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Any = None) -> requests.Response:
        """Send ``request`` and return once the final answer's status and headers are in
        (its body follows through ``response.raw``, or is read first unless ``stream``)."""
        key, host, port, target = self._split(request.url or "")
        connect_timeout, read_timeout = _timeouts(timeout)
        body = request.body
        if isinstance(body, str):
            body = body.encode("utf-8")
        if body is not None and not isinstance(body, bytes):
            raise TypeError("this transport sends bodies given as bytes")
        method = request.method or "GET"
        head = _head(method, target, key, request.headers)
        message = head + body if body and len(body) <= READ_SIZE else head
        rest = body if body and message is head else b""
        idle = self._idle.get(key)
        while True:
            reused = bool(idle)
            sock = idle.pop() if idle else self._connect(host, port, connect_timeout)
            sock.settimeout(read_timeout)
            failed: ConnectionError | None = None
            try:
                answer = self._exchange(sock, message, rest)
                break
            except _Unanswered as exc:
                sock.close()
                if reused and not exc.received:
                    # A kept-alive connection the upstream closed (llama-server closes
                    # idle ones after 5 s) just as this request went out: nothing was
                    # answered, so it goes again, once, on a new connection.
                    idle = None
                    continue
                failed = (UpstreamReset if exc.reset else UpstreamClosed)(str(exc))
            except BaseException:
                sock.close()
                raise
            # Raised outside the handler, so that nothing above takes the cause for a
            # stale kept-alive connection and sends the request a third time.
            raise failed
        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
        for raw_name, raw_value in answer.headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        response = _response(self, request, answer.status, headers,
                             Body(self, key, sock, answer, empty=method == "HEAD"))
        if not stream:
            response._content = response.raw.read()
        return response

    def _exchange(self, sock: socket.socket, message: bytes, rest: bytes) -> _Answer:
        """Write the request, read until the final answer's head is parsed."""
        answer = _Answer()
        received = False
        try:
            sock.sendall(message)
            if rest:
                sock.sendall(rest)
            while not answer.head_done:
                data = sock.recv(READ_SIZE)
                if not data:
                    if received:
                        raise InvalidAnswer("the upstream closed the connection mid-answer")
                    raise _Unanswered("the upstream closed the connection without answering")
                received = True
                _feed(answer, data)
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as exc:
            raise _Unanswered(str(exc), reset=True, received=received) from exc
        return answer

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            while idle:
                with contextlib.suppress(OSError):
                    idle.pop().close()


class _Unanswered(Exception):
    """The connection closed or reset before the answer's head was in (``received``: after
    part of it)."""

    def __init__(self, why: str, *, reset: bool = False, received: bool = False) -> None:
        super().__init__(why)
        self.reset, self.received = reset, received
