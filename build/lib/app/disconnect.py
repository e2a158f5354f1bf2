"""Noticing a client that went away while the proxy waits: in the queue, for llama.cpp to
answer, or for a stream's first token.

A write to a gone client fails at once, but while the proxy waits nothing is written. So an
I/O watcher on the event loop watches the client's socket; when it reads end-of-file it aborts the
upstream exchange (which makes llama.cpp stop and free the slot) or, before there is one,
interrupts the request's greenlet with ClientDisconnected. Only under gunicorn's gevent
worker, which hands the socket over in ``environ["gunicorn.socket"]``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ClientDisconnected


class Watch:
    """Watches one client connection until ``stop()``: an I/O watcher on the event loop,
    no greenlet (cheap enough for every request)."""

    def __init__(self, sock: socket.socket) -> None:
        import gevent

        # The real socket under gevent's wrapper: it is read from a loop callback, which
        # must never block or switch.
        self.sock: socket.socket = getattr(sock, "_sock", sock)
        self.gone = False
        self.owner = gevent.getcurrent()
        self._abort: Callable[[], None] | None = None
        self._watcher: Any = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self._watcher.start(self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # a spurious wake-up: keep watching
        except OSError:
            data = b""
        if self._watcher is not None:
            self._watcher.stop()
        if data:
            return  # the client sent more (a pipelined request): it is still there
        self.gone = True
        if self._abort is not None:
            self._abort()
        else:
            import gevent

            gevent.kill(self.owner, ClientDisconnected)

    def on_gone(self, abort: Callable[[], None] | None) -> None:
        """What to do when the client goes: abort this (an open upstream exchange); None:
        interrupt the request's greenlet instead."""
        self._abort = abort
        if self.gone and abort is not None:
            abort()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait for ``event``; ClientDisconnected if the client is gone (used in the queue)."""
        if self.gone:
            raise ClientDisconnected("the client closed the connection")
        return event.wait(timeout)

    def stop(self) -> None:
        """Stop watching (the answer is complete, or the request is over); idempotent."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None


def watch(environ: Mapping[str, Any]) -> Watch | None:
    """A Watch on this request's client, when running under gunicorn's gevent worker."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None
    try:
        from gevent import monkey
    except ImportError:
        return None
    if not monkey.is_module_patched("socket"):
        return None
    return Watch(sock)
