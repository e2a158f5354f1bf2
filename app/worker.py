"""The gunicorn worker: gevent's own, with the errors gunicorn answers by itself (a request
line or header over ``server.request_limits.max_header_size``, a malformed request) in the
spec's JSON envelope instead of gunicorn's HTML page, and a deadline on request headers.

gunicorn bounds the wait for a request's headers only by ``keepalive`` (75 s), once for the
idle wait and the headers together. Here a connection may stay idle that long between
requests, but once a request's first byte is there (or was sent with the one before), its
headers must be complete within ``server.read_header_timeout``, or the connection is closed.

``gunicorn.conf.py`` names it as ``worker_class``. Imported by gunicorn's master as gevent's
worker is (it imports nothing of the app's request path).
"""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from typing import Any

import gevent
from gevent.server import StreamServer
from gevent.socket import wait_read
from gunicorn import http, util
from gunicorn.workers import ggevent
from gunicorn.workers.ggevent import GeventWorker

from . import concurrency
from .config import ConfigError, load_settings

# gunicorn's own statuses -> the envelope's type and code.
CODES = {
    400: ("invalid_request_error", "bad_request"),
    403: ("invalid_request_error", "forbidden"),
    414: ("invalid_request_error", "request_line_too_long"),
    417: ("invalid_request_error", "expectation_failed"),
    431: ("invalid_request_error", "headers_too_large"),
    501: ("invalid_request_error", "not_implemented"),
}


def write_json_error(sock: Any, status: int, reason: str, message: str) -> None:
    """gunicorn's ``util.write_error`` with a JSON body."""
    type_, code = CODES.get(status, ("server_error", "internal_error"))
    text = message or reason
    if status == 431:
        text = f"Request header fields too large: {message}"
    elif status == 414:
        text = f"Request line too long: {message}"
    body = json.dumps({"error": {"message": text, "type": type_, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class Connection:
    """One client connection's socket, parser, and how many requests it has begun."""

    __slots__ = ("begun", "parser", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.parser: Any = None
        self.begun = 0


# The connection each handling greenlet serves (greenlets take no attributes of their own).
_connections: weakref.WeakKeyDictionary[Any, Connection] = weakref.WeakKeyDictionary()


def _get_parser(original: Any) -> Any:
    """gunicorn's ``http.get_parser``, noting the parser for the connection's deadline."""

    def get_parser(*args: Any, **kwargs: Any) -> Any:
        parser = original(*args, **kwargs)
        connection = _connections.get(gevent.getcurrent())
        if connection is not None:
            connection.parser = parser
        return parser

    return get_parser


class Listening(StreamServer):  # type: ignore[misc]
    """gevent's server, remembered, so that a worker retiring for a reload can stop
    accepting at once (gunicorn's loop would notice only at its next one-second tick)."""

    servers: weakref.WeakSet[Listening] = weakref.WeakSet()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        Listening.servers.add(self)
        concurrency.SERVERS.add(self)  # its pool's greenlets, for /internal/process


class HeaderDeadline:
    """What gunicorn's keep-alive loop reads each request's headers under: an idle wait of
    up to ``keepalive`` for the first byte, then ``header_timeout`` for the headers. Either
    running out ends the request loop silently (gunicorn then closes the connection)."""

    def __init__(self, connection: Connection | None, keepalive: float,
                 header_timeout: float) -> None:
        self.connection = connection
        self.keepalive = keepalive
        self.header_timeout = header_timeout
        self.timeout: Any = None

    def __enter__(self) -> HeaderDeadline:
        seconds = self.header_timeout
        connection = self.connection
        if connection is not None:
            connection.begun += 1
            parser = connection.parser
            buffered = parser is not None and parser.unreader.buf.seek(0, 2) > 0
            if connection.begun > 1 and not buffered:
                try:  # idle between requests: up to keepalive for the next one to begin
                    wait_read(connection.sock.fileno(), timeout=self.keepalive)
                except (TimeoutError, OSError):
                    seconds = 0.0  # nothing came: the loop ends at its first wait
        else:
            seconds = max(seconds, self.keepalive)
        self.timeout = gevent.Timeout(seconds, False)
        self.timeout.start()
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self.timeout.__exit__(*exc)  # type: ignore[no-any-return]


class Worker(GeventWorker):  # type: ignore[misc]
    """gevent's worker, answering its own errors in JSON, with a deadline on headers, and
    ending its streams cleanly when it stops.

    On SIGTERM gunicorn stops accepting and gives requests in flight ``graceful_timeout``
    (``server.shutdown_timeout``) before the master kills the worker. Just before that runs
    out, streams still running end with a ``server_shutting_down`` SSE event (then
    ``[DONE]`` on OpenAI routes) instead of being cut, and queued requests get 503 with
    Retry-After.
    """

    header_timeout = 10.0
    reload_grace = 600.0
    # Seconds before the graceful time runs out that streams are ended (at most a quarter
    # of it): time for their last events to reach the clients.
    STREAMS_END_BEFORE = 1.0

    def init_process(self) -> None:
        """In the worker process only: gunicorn's error writer becomes ours, and its parser
        factory tells the deadline which parser a connection has."""
        util.write_error = write_json_error
        http.get_parser = _get_parser(http.get_parser)
        ggevent.StreamServer = Listening
        with contextlib.suppress(ConfigError):  # the master checked it; else the default
            server = load_settings().server
            self.header_timeout = server.read_header_timeout
            self.reload_grace = server.reload_grace
        super().init_process()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        """One connection, known to its deadlines while it is served."""
        _connections[gevent.getcurrent()] = Connection(client)
        try:
            super().handle(listener, client, addr)
        finally:
            _connections.pop(gevent.getcurrent(), None)

    def handle_winch(self, sig: Any, frame: Any) -> None:
        """From the master on SIGHUP (``app.gunicorn_conf.on_reload``): this worker retires
        for a reload. It stops accepting now (new connections wait for the new workers,
        which follow the new config) and gives its requests server.reload_grace, not the
        shutdown timeout, to finish."""
        self.cfg.set("graceful_timeout", max(1, math.ceil(self.reload_grace)))
        gevent.spawn(self._stop_accepting)

    def _stop_accepting(self) -> None:
        for server in list(Listening.servers):
            server.close()
        self.alive = False

    def handle_exit(self, sig: Any, frame: Any) -> None:
        """SIGTERM: stop as gunicorn does, and end what is still running in time."""
        if self.alive:
            gevent.spawn(self._end_in_time, float(self.cfg.graceful_timeout))
        super().handle_exit(sig, frame)

    def _end_in_time(self, graceful: float) -> None:
        gevent.sleep(max(0.0, graceful - min(self.STREAMS_END_BEFORE, graceful / 4)))
        services = getattr(self.wsgi, "extensions", {}).get("olla")
        if services is None:
            return
        from .streaming import SHUTTING_DOWN

        SHUTTING_DOWN.set()
        services.dispatcher.close_queue()
        ended = 0
        for lease in services.dispatcher.book.live():
            if lease.interrupt is not None:
                lease.interrupt()
                ended += 1
        if ended:
            self.log.info("shutting down: ended %d stream(s) still running", ended)

    def timeout_ctx(self) -> HeaderDeadline:
        return HeaderDeadline(_connections.get(gevent.getcurrent()), self.cfg.keepalive,
                              self.header_timeout)
