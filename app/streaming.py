"""Relay an upstream SSE body to the client chunk by chunk, with timeouts by phase and
keepalive comments, closing the upstream on every path.

Under gevent a reader greenlet pulls chunks off the upstream into a queue, so the relay can
wait with a deadline: the first byte (which covers prompt processing), the silence between
chunks, the whole exchange, and the next keepalive comment while the first token is
awaited. Without gevent (tests, other servers) chunks are read in place with only the
socket's own timeout.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .concurrency import gevent_active
from .config import Timeouts
from .dialect import Dialect
from .errors import UpstreamError, UpstreamTimeout
from .stats import Exchange, find_timings
from .upstream import Upstream, reason

if TYPE_CHECKING:
    from .leases import Lease

log = logging.getLogger(__name__)

KEEPALIVE = b": keepalive\n\n"
# Set when this worker is about to stop (its graceful time runs out): a stream woken by
# ``Lease.interrupt`` ends with a server_shutting_down event instead of an upstream error.
SHUTTING_DOWN = threading.Event()
MAX_EVENT = 1 << 20  # bytes of an event read in pieces that are kept to find its timings
KEEPALIVE_DUE = object()  # time to send KEEPALIVE
END = object()       # the upstream body ended
TIMEOUT = object()   # nothing arrived before the wake-up time


def split_legacy_error(chunk: bytes) -> tuple[bytes, bytes | None]:
    """(what comes before, the JSON) of a bare ``error: {...}`` SSE field in ``chunk``, as
    older llama.cpp builds sent mid-stream errors; (chunk, None) when there is none."""
    if chunk.startswith(b"error:"):
        at = 0
    else:
        found = chunk.find(b"\nerror:")
        if found < 0:
            return chunk, None
        at = found + 1
    line = chunk[at:].split(b"\n", 1)[0]
    return chunk[:at], line[6:].strip()


def data_error_event(raw: bytes, dialect: Dialect) -> bytes:
    """A ``data: {"error": ...}`` event (and ``[DONE]`` on OpenAI routes) for the JSON an
    ``error:`` field carried, kept as llama.cpp gave it where it is an error object (on
    Anthropic routes, Anthropic's error event with its message)."""
    try:
        found = json.loads(raw)
    except ValueError:
        found = None
    if isinstance(found, dict) and isinstance(found.get("error"), dict):
        found = found["error"]
    if not isinstance(found, dict):
        found = {"message": raw.decode("utf-8", "replace")[:500], "type": "server_error",
                 "code": "upstream_error"}
    if dialect.anthropic:
        return dialect.stream_error(str(found.get("message", "upstream error")))
    out = b"data: " + json.dumps({"error": found}).encode() + b"\n\n"
    return out + dialect.stream_end


def merged_timings(first: bytes | None, last: bytes) -> dict[str, Any] | None:
    """The figures of a stream's last event with figures, completed by its first one's
    ``usage`` (Anthropic's message_start has the input tokens, its message_delta the output
    tokens; elsewhere the two are one event)."""
    found = find_timings(last)
    if first is None or first is last:
        return found
    earlier = find_timings(first)
    if not earlier or not isinstance(earlier.get("usage"), dict):
        return found
    found = dict(found or {})
    found["usage"] = {**earlier["usage"], **(found.get("usage") or {})}
    return found


class Source:
    """The upstream's chunks, readable with a timeout.

    A body whose reads can time out and go on (``Upstream.resumable``, the http transport)
    is read in place. Until its first chunk the socket's timeout is set to the relay's next
    wake-up, keepalives included. After it, under gevent, the socket waits without a
    timeout of its own and one timer per stream watches the relay's deadline: gevent would
    otherwise start and stop a timer for every wait, a fifth of what relaying an event
    costs. The timer fires about once per ``read_timeout``; a read still waiting past the
    deadline is then cut (the socket shut down) and reported as TIMEOUT.

    Otherwise (urllib3's reader, which a timeout leaves broken), under gevent a reader
    greenlet fetches the first chunk, so that the relay can wake up for keepalives while
    llama.cpp processes the prompt; after it, chunks are read in place with the socket's
    timeout set to the relay's deadline.
    """

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._resumable = upstream.resumable
        self._iterator = iter(()) if self._resumable else upstream.chunks()
        self._greenlet: Any = None
        self._watched = False      # reads are timed by the watchdog below
        self._watch: Any = None    # its timer
        self._until = 0.0          # the deadline of the read under way (perf_counter)
        self._reading = False
        self._timed_out = False
        if gevent_active() and not self._resumable:
            import gevent
            from gevent.queue import Queue

            self._queue: Any = Queue()
            self._greenlet = gevent.spawn(self._fetch_first)

    def _read(self) -> Any:
        """The next non-empty chunk, END or an UpstreamError."""
        try:
            if self._resumable:
                return self.upstream.next_chunk() or END
            for chunk in self._iterator:
                if chunk:
                    return chunk
            return END
        except UpstreamError as exc:
            return exc
        except Exception as exc:  # e.g. the response torn down under the reader
            return UpstreamError(f"upstream read failed: {reason(exc)}")

    def _fetch_first(self) -> None:
        self._queue.put(self._read())

    def next(self, timeout: float) -> Any:
        """A chunk, END, an UpstreamError, or TIMEOUT after ``timeout`` seconds."""
        if self._greenlet is not None:
            from gevent.queue import Empty

            try:
                item = self._queue.get(timeout=max(0.0, timeout))
            except Empty:
                return TIMEOUT
            self._greenlet = None  # it has finished: from now on, read in place
            return item
        if self._watched and math.isfinite(timeout):
            return self._next_watched(timeout)
        if math.isfinite(timeout):
            self.upstream.set_read_timeout(max(timeout, 0.001))
        item = self._read()
        if self._resumable and isinstance(item, bytes) and gevent_active():
            self._watched = True
            self.upstream.set_read_timeout(None)
        return TIMEOUT if isinstance(item, UpstreamTimeout) else item

    def _next_watched(self, timeout: float) -> Any:
        self._until = time.perf_counter() + timeout
        if self._watch is None or not self._watch.active:
            self._arm(max(timeout, 0.001))
        self._reading = True
        try:
            item = self._read()
        finally:
            self._reading = False
        if self._timed_out and isinstance(item, UpstreamError):
            return TIMEOUT
        return item

    def _arm(self, seconds: float) -> None:
        import gevent

        self._watch = gevent.get_hub().loop.timer(seconds)
        self._watch.start(self._check)

    def _check(self) -> None:
        """The watchdog's round (in the hub, so it never blocks): a read waiting past its
        deadline is cut; an earlier deadline has moved on (a chunk came): wait for it.
        Between reads it stops; the next read starts it again."""
        if not self._reading:
            return
        left = self._until - time.perf_counter()
        if left > 0:
            self._arm(left)
            return
        self._timed_out = True
        self.upstream.interrupt()

    def close(self) -> None:
        """Stop reading and close the upstream (a half-read stream is aborted). The reader
        must be gone first: closing a buffered reader another greenlet is inside fails."""
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=1.0)
            self._greenlet = None
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self.upstream.close()


@dataclass
class Clock:
    """Deadlines for one stream (perf_counter seconds)."""

    limits: Timeouts
    keepalive: float
    started: float
    last_byte: float | None = None
    last_sent: float = 0.0

    def __post_init__(self) -> None:
        self.last_sent = self.started
        total = self.limits.response_timeout
        self.total_deadline = self.started + total if total > 0 else math.inf

    def limit(self) -> float:
        """When waiting must give up: first byte, then the silence between chunks."""
        if self.last_byte is None:
            phase = self.started + self.limits.first_byte_timeout
        else:
            phase = self.last_byte + self.limits.read_timeout
        return min(phase, self.total_deadline)

    def wake(self) -> float:
        """When to stop waiting: the limit, or the next keepalive before the first byte."""
        if self.last_byte is None and self.keepalive > 0:
            return min(self.limit(), self.last_sent + self.keepalive)
        return self.limit()

    def what_ran_out(self) -> str:
        if self.last_byte is None:
            return f"no first byte within {self.limits.first_byte_timeout:g} s"
        now = time.perf_counter()
        if now >= self.total_deadline:
            return f"the answer took longer than {self.limits.response_timeout:g} s"
        return f"nothing for {self.limits.read_timeout:g} s"


class _NoLease:
    """Where the relay marks its writes when no lease is given (tests)."""

    writing_since: float | None = None


def first_item(source: Source, clock: Clock) -> Any:
    """Wait for the first chunk before any byte goes to the client: a chunk, END, an
    UpstreamError, or KEEPALIVE_DUE when the first keepalive is due first. Raises
    UpstreamTimeout (504, no byte sent yet) when the first-byte limit runs out."""
    item = source.next(clock.wake() - time.perf_counter())
    if item is TIMEOUT:
        if time.perf_counter() >= clock.limit():
            raise UpstreamTimeout(f"upstream timed out: {clock.what_ran_out()}")
        clock.last_sent = time.perf_counter()
        return KEEPALIVE_DUE
    if isinstance(item, bytes):
        clock.last_byte = clock.last_sent = time.perf_counter()
    return item


def relay(source: Source, exchange: Exchange, clock: Clock, first: Any, *, dialect: Dialect,
          client_gone: Any = lambda: False, lease: Lease | None = None) -> Iterator[bytes]:
    """Yield what ``first_item`` returned, then the upstream's raw chunks as they arrive.

    The WSGI server closes this generator when the client goes away (its next write
    fails); ``finally`` then aborts the upstream connection, which is what makes llama.cpp
    stop generating and free the slot. The last event carrying ``timings`` or ``usage`` is
    kept (a byte search per chunk) and parsed once at the end. While the WSGI server
    writes a chunk (between a ``yield`` and the next resumption) ``lease.writing_since``
    says since when, so that a client that stopped reading can be cut off
    (``proxy.write_timeout``).
    """
    marks = lease if lease is not None else _NoLease()
    endpoint = exchange.state.endpoint.name
    first_stats: bytes | None = None  # Anthropic's stream has its input tokens first
    last_stats: bytes | None = None
    begun = b""  # the start of an event whose end is still to come
    ok = True
    item = first
    try:
        while True:
            if item is END:
                break
            if isinstance(item, UpstreamError) and SHUTTING_DOWN.is_set():
                ok = False
                log.info("stream on %s ended: the proxy is shutting down", endpoint)
                marks.writing_since = time.monotonic()
                yield dialect.stream_error("The proxy is shutting down: the stream was "
                                           "ended before its end; retry it",
                                           code="server_shutting_down", status=503)
                break
            if isinstance(item, UpstreamError):
                ok = client_gone()
                if not ok:
                    log.warning("upstream %s broke mid-stream: %s", endpoint, item.message)
                    marks.writing_since = time.monotonic()
                    yield dialect.stream_error(
                        f"upstream {endpoint} failed mid-stream: {item.message}")
                break
            if item is TIMEOUT:
                if time.perf_counter() >= clock.limit():
                    ok = False
                    why = clock.what_ran_out()
                    log.warning("upstream %s timed out mid-stream: %s", endpoint, why)
                    marks.writing_since = time.monotonic()
                    yield dialect.stream_error(f"upstream {endpoint} timed out: {why}",
                                               code="upstream_timeout", status=504)
                    break
                clock.last_sent = time.perf_counter()
                item = KEEPALIVE_DUE
            if item is KEEPALIVE_DUE:
                marks.writing_since = time.monotonic()
                yield KEEPALIVE
            else:
                # An event may arrive in pieces (a body without chunked framing is read
                # as the socket has it): what the last piece began is looked at again.
                seen = begun + item if begun else item
                if b"error" in seen:
                    before, legacy = split_legacy_error(item)
                    if legacy is not None:
                        # An older llama.cpp's bare `error:` field, which OpenAI SDKs drop
                        # silently: relayed as the data event newer builds send.
                        ok = False
                        log.warning("upstream %s reported an error mid-stream", endpoint)
                        marks.writing_since = time.monotonic()
                        yield before + data_error_event(legacy, dialect)
                        break
                    if b'data: {"error"' in seen:
                        ok = False  # relayed as it is, counted as what it is
                if b'"timings"' in seen or b'"usage"' in seen:
                    if last_stats is None:
                        first_stats = seen
                    last_stats = seen
                if item.endswith(b"\n\n"):
                    begun = b""
                else:
                    cut = seen.rfind(b"\n\n")
                    begun = seen[cut + 2:] if cut >= 0 else seen
                    if len(begun) > MAX_EVENT:
                        begun = b""  # too long to be one event worth parsing
                clock.last_byte = clock.last_sent = time.perf_counter()
                marks.writing_since = time.monotonic()
                yield item
            marks.writing_since = None
            item = source.next(clock.wake() - time.perf_counter())
    finally:
        marks.writing_since = None
        source.close()
        if last_stats is not None:
            exchange.timings = merged_timings(first_stats, last_stats)
        exchange.finish(ok=ok)
