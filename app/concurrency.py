"""Run a few blocking calls at once: greenlets under gevent, threads otherwise.

(``concurrent.futures`` must not be used in a gevent worker: its queue blocks the hub.)
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_AT_ONCE = 16
PAUSE = 0.0001  # seconds: a timer this short makes the loop look at sockets, then come back
# For /internal/process: the servers whose pools hold a greenlet per client connection
# (the worker registers them), and the greenlets or threads started here.
SERVERS: weakref.WeakSet[Any] = weakref.WeakSet()
BACKGROUND: weakref.WeakSet[Any] = weakref.WeakSet()


def running_counts() -> tuple[int, int]:
    """(greenlets serving a client connection, background greenlets or threads alive)."""
    connections = sum(len(server.pool) for server in list(SERVERS)
                      if getattr(server, "pool", None) is not None)
    return connections, sum(1 for task in list(BACKGROUND) if _alive(task))


def _alive(task: Any) -> bool:
    dead = getattr(task, "dead", None)  # a greenlet's; a thread has is_alive()
    return not dead if dead is not None else bool(task.is_alive())


def gevent_active() -> bool:
    """True inside a gevent-patched process (gunicorn's gevent worker)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


def pause() -> None:
    """Let the other greenlets run for a moment, their sockets and timers included (under
    gevent; elsewhere nothing to do). Not ``sleep(0)``: that only queues a callback, and
    the loop runs up to 50 callbacks before it looks at sockets and timers again, so a
    long task pausing with it every 2 ms would still hold them off for 100 ms."""
    if gevent_active():
        import gevent

        gevent.sleep(PAUSE)


def each(function: Callable[[T], Any], items: Sequence[T]) -> None:
    """Call ``function`` on every item concurrently and wait for all of them."""
    if len(items) <= 1:
        for item in items:
            function(item)
        return
    if gevent_active():
        from gevent.pool import Pool

        Pool(min(MAX_AT_ONCE, len(items))).map(function, items)
        return
    with ThreadPoolExecutor(max_workers=min(MAX_AT_ONCE, len(items))) as executor:
        list(executor.map(function, items))


def spawn(function: Callable[[], Any]) -> Any:
    """Run ``function`` in the background: a greenlet under gevent, else a daemon thread."""
    if gevent_active():
        import gevent

        greenlet = gevent.spawn(function)
        BACKGROUND.add(greenlet)
        return greenlet
    import threading

    thread = threading.Thread(target=function, daemon=True)
    thread.start()
    BACKGROUND.add(thread)
    return thread


def later(seconds: float, function: Callable[[], Any]) -> None:
    """Call ``function`` once, ``seconds`` from now, in the background."""
    if gevent_active():
        import gevent

        gevent.spawn_later(seconds, function)
        return
    import threading

    timer = threading.Timer(seconds, function)
    timer.daemon = True
    timer.start()


class Repeating:
    """Calls ``function`` every ``interval`` seconds in a greenlet of its own until
    stopped; one round that raises is logged, and the next one runs as usual."""

    def __init__(self, function: Callable[[], Any], interval: float, what: str) -> None:
        self.function = function
        self.interval = interval
        self.what = what
        self._greenlet: Any = None

    def start(self) -> None:
        """Spawn the loop (from wsgi.py or a gunicorn hook, after gevent patched)."""
        import gevent

        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
            BACKGROUND.add(self._greenlet)

    def _run(self) -> None:
        import gevent

        while True:
            try:
                self.function()
            except Exception:  # the loop must outlive any one bad round
                log.exception("%s failed", self.what)
            gevent.sleep(self.interval)

    def stop(self) -> None:
        """Kill the loop."""
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None


@contextmanager
def deadline(seconds: float, error: BaseException) -> Iterator[None]:
    """Raise ``error`` in this greenlet if the block runs longer than ``seconds`` in all
    (under gevent; elsewhere only the sockets' own timeouts bound it). A socket timeout
    bounds each wait, not the whole: an upstream that trickles a byte a second never
    trips it."""
    if not gevent_active():
        yield
        return
    import gevent

    timeout = gevent.Timeout(seconds, error)
    timeout.start()
    try:
        yield
    finally:
        timeout.close()
