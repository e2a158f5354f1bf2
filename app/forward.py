"""One proxied request from slot to last byte, without Flask.

A ``Forward`` owns everything a request takes: its slot lease, the upstream connection,
the stream reader, the client watch and the accounting ``Exchange``. It takes the slot,
sends, relays, moves on to the next candidate while that is safe, and gives everything back
on every path out: success, an upstream error, a client that left or stalled, and any
exception anywhere (``close()`` is idempotent, called by the response when it closes, by the
view or the WSGI guard when anything raised, and, as a last backstop, the lease book
reclaims a lease whose holder is gone).
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from . import assemble
from .config import Timeouts
from .dialect import Dialect
from .dispatch import ANYONE, Share, _wait
from .errors import ClientDisconnected, NoEndpointAvailable, UpstreamError, UpstreamTimeout
from .health import mark_failed
from .leases import Lease
from .registry import EndpointState, Status, name_key
from .routing import STRATEGY
from .stats import Exchange, find_timings
from .sticky import Pin, SessionKey
from .streaming import END, TIMEOUT, Clock, Source, first_item, relay
from .upstream import Upstream, UpstreamConnectError, request_headers, response_headers

if TYPE_CHECKING:
    from .disconnect import Watch
    from .routing import Candidate
    from .services import Services

BACKEND_TYPE = "llamacpp"
ROOM_POLL = 0.02  # seconds between looks at a pinned endpoint's slots while a turn waits
STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
# An assembled answer carries the headers llama.cpp's own non-streamed one does: JSON, and
# none of the stream's.
ASSEMBLED_HEADERS = {"Content-Type": assemble.CONTENT_TYPE}
NOT_ASSEMBLED = frozenset({"x-accel-buffering"})
# What a header value may hold as it is: visible ASCII and spaces inside.
_HEADER_SAFE = frozenset(chr(c) for c in range(0x20, 0x7F))


def header_value(text: str) -> str:
    """``text`` as a valid header value: as it is when it is visible ASCII, otherwise
    percent-encoded (control and non-Latin-1 characters are never sent raw)."""
    if text and text == text.strip() and _HEADER_SAFE.issuperset(text):
        return text
    return quote(text.strip(), safe="".join(sorted(_HEADER_SAFE - {"%", " "})))


@dataclass(slots=True)
class Request:
    """What the view hands over: a validated request, ready to forward."""

    route: str                       # the path under the prefix: "v1/chat/completions"
    dialect: Dialect                 # errors and stream ends the client expects
    path: str                        # upstream path with query string
    body: bytes                      # the client's bytes, forwarded as they are
    payload: dict[str, Any]          # the parsed body
    model: str | None
    headers: Mapping[str, str]       # inbound headers, plus X-Request-Id and X-Forwarded-*
    request_id: str
    started: float                   # perf_counter at arrival
    watch: Watch | None = None       # the client's socket, watched while waiting
    client_socket: Any = None        # to close it when a write to the client stalls
    share: Share = ANYONE            # whose request: the API key, for fair shares
    session: SessionKey | None = None  # its sticky session, when sticky sessions are on
    session_id: str = ""             # the client's X-Olla-Session-ID, echoed


@dataclass(slots=True)
class Answer:
    """What goes back to the client: status, headers and a body (bytes, or chunks for a
    stream); ``Forward.close`` must run once it is written or abandoned."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes | Iterable[bytes]
    stream: bool = False


@dataclass(eq=False, slots=True)
class Forward:
    """One request's trip: take a slot, send, relay, fail over, give everything back."""

    svc: Services
    request: Request
    exchange: Exchange | None = None
    lease: Lease | None = None
    _source: Source | None = None
    _closed: bool = False
    _failures: list[str] = field(default_factory=list)
    _died_after_sending: int = 0
    _pin: Pin | None = None
    _pin_was_candidate: bool = False

    # ------------------------------------------------------------------------ the loop

    def run(self) -> Answer:
        """Forward the request and return the answer to relay; on any exception
        everything taken is given back before it propagates."""
        try:
            answer = self._attempts()
        except UpstreamError as exc:
            if self._client_gone():
                # The watch cut the upstream because the client left: not the upstream's fault.
                self.close(ok=True)
                raise ClientDisconnected("the client closed the connection") from exc
            self.close(ok=False)
            raise
        except BaseException as exc:
            self.close(ok=isinstance(exc, ClientDisconnected))
            raise
        # A stream keeps this Forward (for close()) as long as it runs: let go of the
        # request's body, payload and headers now, a few KB that 1000 streams would hold.
        self.request.body, self.request.payload, self.request.headers = b"", {}, {}
        return answer

    def _attempts(self) -> Answer:
        """Take a slot on a candidate (waiting in the queue if all are busy), send the
        request, relay the answer; move on to the next candidate while that is safe.

        Moving on is safe only while nothing reached the client and nothing ran upstream:
        the connection failed (refused, reset or timed out before any answer, or a stream
        broke before its first byte), llama.cpp answered 503 "Loading model", or it answered
        501 (it lacks the feature). Each endpoint is tried at most once; after the first
        byte reaches the client there is no retry.
        """
        svc, req = self.svc, self.request
        streamed = req.payload.get("stream") is True
        assembled = (svc.settings.proxy.assemble_non_streamed
                     and assemble.applies(req.route, req.payload))
        remaining = svc.router.candidates(req.model, req.route)
        if svc.sticky is not None and req.session is not None:
            self._pin = svc.sticky.pin(req.session)
        while remaining:
            candidate = self._take_slot(remaining)
            remaining = [c for c in remaining if c is not candidate]
            last = not remaining
            state = candidate.state
            payload = req.payload
            out_body = req.body
            if candidate.model is not None and candidate.model != req.model:
                payload = {**payload, "model": candidate.model}
                out_body = json.dumps(payload).encode()
            if assembled:
                out_body = json.dumps(assemble.upstream_payload(req.route, payload)).encode()
            exchange = self.exchange
            assert exchange is not None
            limits = state.endpoint.limits
            exchange.sending()
            try:
                upstream = svc.pool.open(state.endpoint, "POST", req.path, body=out_body,
                                         headers=request_headers(req.headers, state.endpoint),
                                         timeout=_socket_timeouts(limits,
                                                                  streamed or assembled))
            except UpstreamConnectError as exc:
                if not exc.reached:  # refused, or never connected: the endpoint is down
                    self._pass_over(exc.message, Status.OFFLINE)
                    continue
                # The connection died after the request went out: the request itself may
                # be what kills servers. One more endpoint may try it; none is marked down
                # by it (the health probes decide whether a server is really gone).
                self._died_after_sending += 1
                if self._died_after_sending > 1 or last:
                    raise UpstreamError(f"{exc.message} (after the request was sent, on "
                                        f"{self._died_after_sending} endpoints)") from exc
                self._pass_over(exc.message, None)
                continue
            exchange.answered(upstream.status)
            if req.watch is not None:
                req.watch.on_gone(upstream.interrupt)
            if upstream.is_stream:
                source = self._source = Source(upstream)
                clock = Clock(limits, 0.0 if assembled else svc.settings.proxy.sse_keepalive,
                              req.started)
                first = first_item(source, clock)
                if isinstance(first, bytes):
                    exchange.first_byte()
                if isinstance(first, UpstreamError) and not last and not self._client_gone():
                    # Broke before its first byte: nothing reached the client.
                    self._close_source()
                    self._pass_over(first.message, Status.OFFLINE)
                    continue
                if assembled:
                    return self._assembled(upstream, source, clock, first, candidate)
                return self._stream(upstream, source, clock, first, candidate)
            content = upstream.read(svc.settings.proxy.max_response_size)
            if not last and upstream.status == 503 and b"Loading model" in content:
                self._pass_over("llama.cpp is loading its model", Status.LOADING, ok=True)
                continue
            if not last and upstream.status == 501:
                # This server lacks the feature (embeddings off, no FIM tokens) and nothing
                # was generated: another candidate (same model, or any when none is named)
                # may have it.
                state.unsupported.add(req.route)
                self._pass_over(f"does not support /{req.route}", None, ok=True)
                continue
            return self._whole(upstream.status, upstream.headers, content, candidate)
        raise NoEndpointAvailable("No llama.cpp endpoint could take the request"
                                  + (f" ({'; '.join(self._failures)})"
                                     if self._failures else ""))

    def _take_slot(self, remaining: list[Candidate]) -> Candidate:
        """Wait for a lease on one of the candidates; start this attempt's Exchange."""
        svc, req = self.svc, self.request
        waiting = time.perf_counter()
        lease = self._acquire([c.state for c in remaining])
        self.lease = lease
        if req.client_socket is not None:
            # Not a bound method of this Forward: a lease -> forward -> lease cycle would
            # leave every request to the cyclic garbage collector.
            lease.abort = functools.partial(shut_down, req.client_socket)
        queue_wait = time.perf_counter() - waiting
        candidate = next(c for c in remaining if c.state is lease.state)
        state = lease.state
        self.exchange = Exchange(state, candidate.served, req.route, req.started,
                                 lambda: svc.dispatcher.release(lease), svc.observers,
                                 queue_wait_ms=queue_wait * 1000, request_id=req.request_id,
                                 client=req.share.name)
        svc.metrics.child(svc.metrics.queue_wait, self.exchange.model).observe(queue_wait)
        return candidate

    def _acquire(self, eligible: list[EndpointState]) -> Lease:
        """A lease on one of ``eligible`` (the balancer's order). A sticky session's pinned
        endpoint goes first, on the first attempt; when it has no free slot while another
        has one, the request first waits up to ``spill_after`` for the pinned one to have
        room (outside the queue, so that nobody waits behind it), then takes whichever
        is free ("spill")."""
        svc, req = self.svc, self.request
        wait = req.watch.wait if req.watch else None
        pin, self._pin_was_candidate = self._pin, False
        pinned = None
        if pin is not None and pin.pinned is not None:  # nothing to look for otherwise
            pinned = next((s for s in eligible if s.endpoint.name == pin.pinned), None)
        if pinned is not None and svc.sticky is not None:
            self._pin_was_candidate = True
            eligible = [pinned, *(s for s in eligible if s is not pinned)]
            dispatcher = svc.dispatcher
            if not dispatcher.has_room(pinned) and any(dispatcher.has_room(s)
                                                       for s in eligible[1:]):
                self._wait_for_room(pinned, svc.sticky.settings.spill_after, wait)
        return svc.dispatcher.acquire(name_key(req.model) if req.model else "", eligible,
                                      req.request_id, wait=wait, share=req.share)

    def _wait_for_room(self, state: EndpointState, seconds: float, wait: Any) -> None:
        """Until ``state`` has a free slot, at most ``seconds``; raises ClientDisconnected
        when the client leaves meanwhile."""
        dispatcher = self.svc.dispatcher
        deadline = time.monotonic() + seconds
        nap = threading.Event()  # never set: each wait is a nap the watch can cut short
        while (left := deadline - time.monotonic()) > 0 and not dispatcher.has_room(state):
            (wait or _wait)(nap, min(left, ROOM_POLL))

    def _pass_over(self, why: str, mark: Status | None, ok: bool = False) -> None:
        """An attempt the request moves on from: not counted as the client's request, the
        endpoint marked (down or loading) where that applies, the reason kept for the 503."""
        exchange = self.exchange
        assert exchange is not None
        exchange.finish(ok=ok, counted=False)
        if mark is not None:
            mark_failed(exchange.state, mark, why)
        self._failures.append(f"{exchange.state.endpoint.name}: {why}")
        self.exchange = None
        self.lease = None

    # ---------------------------------------------------------------------- the answers

    def _headers(self, upstream_headers: Mapping[str, str], candidate: Candidate,
                 ours: Mapping[str, str], drop: frozenset[str] = frozenset()
                 ) -> list[tuple[str, str]]:
        """The upstream's relayed headers less ``drop``, with ``ours`` and the X-Olla-* set
        over them."""
        exchange = self.exchange
        assert exchange is not None
        replaced = drop | {k.lower() for k in ours}
        headers = [(k, v) for k, v in response_headers(upstream_headers)
                   if k.lower() not in replaced]
        headers += ours.items()
        headers += self.request.dialect.headers
        headers += [
            ("X-Olla-Endpoint", header_value(exchange.state.endpoint.name)),
            # The fleet's name for the model, in one form however the client spelled it.
            ("X-Olla-Model", header_value(candidate.served)),
            ("X-Olla-Backend-Type", BACKEND_TYPE),
            # Non-streamed: the whole upstream exchange. Streams: to the first byte of the
            # body (or the first keepalive), when the headers go out.
            ("X-Olla-Response-Time",
             f"{round((time.perf_counter() - self.request.started) * 1000)}ms"),
        ]
        sticky = self.svc.sticky
        if sticky is not None:
            session = self.request.session
            outcome = sticky.served(self._pin, exchange.state.endpoint.name,
                                    self._pin_was_candidate)
            # As Olla: no source header without a key, the client's session id echoed when
            # it was the key.
            headers.append(("X-Olla-Sticky-Session", outcome))
            if session is not None:
                headers.append(("X-Olla-Sticky-Key-Source", session.source))
                if session.source == "session_header":
                    headers.append(("X-Olla-Session-ID",
                                    header_value(self.request.session_id)))
        if candidate.reason:
            headers += [("X-Olla-Routing-Strategy", STRATEGY),
                        ("X-Olla-Routing-Decision", "routed"),
                        ("X-Olla-Routing-Reason", header_value(candidate.reason))]
        return headers

    def _whole(self, status: int, upstream_headers: Mapping[str, str], content: bytes,
               candidate: Candidate, ours: Mapping[str, str] | None = None,
               drop: frozenset[str] = frozenset()) -> Answer:
        """A complete answer: the slot is given back before the body is written."""
        exchange = self.exchange
        assert exchange is not None
        if b'"timings"' in content or b'"usage"' in content:
            exchange.timings = find_timings(content)
        translated = self.request.dialect.upstream_error(content, status)
        if translated is not None:
            content = translated
            ours = {**(ours or {}), "Content-Type": "application/json"}
        headers = self._headers(upstream_headers, candidate, ours or {}, drop)
        exchange.status = status
        exchange.finish()
        self._stop_watch()
        return Answer(status, headers, content)

    def _stream(self, upstream: Upstream, source: Source, clock: Clock, first: Any,
                candidate: Candidate) -> Answer:
        """A stream, relayed chunk by chunk; ``close()`` ends it whatever happens."""
        exchange, lease = self.exchange, self.lease
        assert exchange is not None and lease is not None
        headers = self._headers(upstream.headers, candidate, STREAM_HEADERS)
        lease.interrupt = upstream.interrupt  # the Upstream's, not this Forward's: no cycle
        body = relay(source, exchange, clock, first, dialect=self.request.dialect,
                     client_gone=self._client_gone, lease=lease)
        return Answer(upstream.status, headers, body, stream=True)

    def _assembled(self, upstream: Upstream, source: Source, clock: Clock, first: Any,
                   candidate: Candidate) -> Answer:
        """A non-streamed request sent upstream as a stream: read it to its end, with the
        stream's deadlines, and answer what llama.cpp would have answered at once."""
        assembler = assemble.Assembler(self.request.route, self.request.payload)
        item = first
        while item is not END and not assembler.done:
            if isinstance(item, UpstreamError):
                raise item
            if item is TIMEOUT:
                if time.perf_counter() >= clock.limit():
                    raise UpstreamTimeout(f"upstream timed out: {clock.what_ran_out()}")
            elif isinstance(item, bytes):
                clock.last_byte = time.perf_counter()
                assembler.feed(item)
            item = source.next(clock.wake() - time.perf_counter())
        self._close_source()
        try:
            status, content = assembler.result()
        except assemble.IncompleteStream as exc:
            raise UpstreamError(f"upstream stream ended early: {exc}") from exc
        return self._whole(status, upstream.headers, content, candidate, ASSEMBLED_HEADERS,
                           NOT_ASSEMBLED)

    # ------------------------------------------------------------------- giving it back

    def _client_gone(self) -> bool:
        watch = self.request.watch
        return watch is not None and watch.gone

    def _close_source(self) -> None:
        if self._source is not None:
            source, self._source = self._source, None
            source.close()

    def _stop_watch(self) -> None:
        if self.request.watch is not None:
            self.request.watch.stop()

    def close(self, ok: bool | None = None) -> None:
        """Give back everything this request holds: the upstream connection, the stream
        reader, the client watch and the slot lease. Idempotent; safe on every path."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close_source()
        finally:
            try:
                self._stop_watch()
            finally:
                if self.exchange is not None:
                    self.exchange.finish(ok=ok)
                elif self.lease is not None:
                    self.svc.dispatcher.release(self.lease)


def shut_down(sock: Any) -> None:
    """End a request from outside by closing its client's connection: its blocked write
    fails, the relay closes, and with it the upstream and the lease. The real socket under
    gevent's wrapper: shutting that down makes the write fail with EPIPE (which gunicorn
    ignores quietly), where the wrapper's own shutdown would cancel it with EBADF and a
    logged traceback."""
    with contextlib.suppress(OSError):
        getattr(sock, "_sock", sock).shutdown(socket.SHUT_RDWR)


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

