"""Slots and the queue: a request is sent only to an endpoint with a free slot, or waits.

llama-server has ``total_slots`` slots and hides everything beyond them in an unbounded,
invisible queue. Here a request that finds every slot it could use busy waits in a
bounded FIFO per model instead, and is dispatched the moment a slot frees on any of its
candidates; a full queue or a long wait gets the spec's 503 ``slots_exhausted``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import QueueSettings
from .errors import SlotsExhausted
from .registry import EndpointState, Status

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)
SLOTS_EXHAUSTED = "All slots are busy. Please try again later."


@dataclass(eq=False)
class Waiter:
    """A request waiting for a slot."""

    key: str
    eligible: Sequence[EndpointState]
    arrived: float = field(default_factory=time.monotonic)
    event: threading.Event = field(default_factory=lambda: threading.Event())
    chosen: EndpointState | None = None


def _usable(state: EndpointState) -> bool:
    return state.routable or state.status is Status.UNKNOWN


class Dispatcher:
    """Hands out slots; FIFO per model, oldest waiter first across models."""

    def __init__(self, queue: QueueSettings, metrics: Metrics | None = None) -> None:
        self.settings = queue
        self.metrics = metrics
        self.queues: dict[str, deque[Waiter]] = {}
        self._lock = threading.Lock()

    def _take(self, eligible: Sequence[EndpointState]) -> EndpointState | None:
        """The first endpoint in ``eligible`` (the router's balanced order) with a free slot,
        its slot taken."""
        for state in eligible:
            if _usable(state) and state.has_free_slot:
                state.in_flight += 1
                if self.metrics is not None:
                    self.metrics.child(self.metrics.in_flight, state.endpoint.name).inc()
                return state
        return None

    def acquire(self, key: str, eligible: Sequence[EndpointState],
                wait: Callable[[threading.Event, float], bool] | None = None) -> EndpointState:
        """A slot on one of ``eligible`` (in preference order), waiting in the queue if
        none is free. Raises SlotsExhausted when the queue is full or the wait times out.
        ``wait(event, timeout)`` blocks until the event is set (the default) and may raise,
        e.g. when the client goes away; the waiter then leaves the queue at once."""
        with self._lock:
            queue = self.queues.setdefault(key, deque())
            if not queue:
                chosen = self._take(eligible)
                if chosen is not None:
                    return chosen
            if len(queue) >= self.settings.max_size:
                raise self._exhausted(f"the queue for {key or 'this route'} is full "
                                      f"({self.settings.max_size} waiting)")
            waiter = Waiter(key, eligible)
            queue.append(waiter)
            self._count(key, +1)
        try:
            (wait or _wait)(waiter.event, self.settings.timeout)
        except BaseException:
            # The client went away while waiting: leave the queue, or give back the slot
            # that was handed over just as it left.
            given = self._leave(waiter)
            if given is not None:
                self.release(given)
            raise
        chosen = self._leave(waiter)
        if chosen is None:
            raise self._exhausted(f"no slot freed within {self.settings.timeout:g} s")
        return chosen

    def _leave(self, waiter: Waiter) -> EndpointState | None:
        """Take a waiter out of its queue; the slot it was given, if any."""
        with self._lock:
            queue = self.queues.get(waiter.key)
            if waiter.chosen is None and queue is not None and waiter in queue:
                queue.remove(waiter)
                self._count(waiter.key, -1)
                self._drop_if_empty(waiter.key)
            return waiter.chosen

    def release(self, state: EndpointState) -> None:
        """A request on ``state`` is over: free its slot and dispatch whoever can use it."""
        with self._lock:
            state.in_flight -= 1
            if self.metrics is not None:
                self.metrics.child(self.metrics.in_flight, state.endpoint.name).dec()
        self.pump()

    def _count(self, key: str, change: int) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.queue_depth, key).inc(change)

    def pump(self) -> None:
        """Dispatch waiting requests while slots are free (also after health changes)."""
        with self._lock:
            while True:
                heads = sorted((q[0] for q in self.queues.values() if q),
                               key=lambda w: w.arrived)
                for waiter in heads:
                    chosen = self._take(waiter.eligible)
                    if chosen is not None:
                        self.queues[waiter.key].popleft()
                        self._count(waiter.key, -1)
                        self._drop_if_empty(waiter.key)
                        waiter.chosen = chosen
                        waiter.event.set()
                        break
                else:
                    return

    def _drop_if_empty(self, key: str) -> None:
        if not self.queues.get(key):
            self.queues.pop(key, None)

    def _exhausted(self, why: str) -> SlotsExhausted:
        log.info("slots exhausted: %s", why)
        return SlotsExhausted(SLOTS_EXHAUSTED,
                              headers={"Retry-After": str(self.settings.retry_after)})

    def depth(self) -> int:
        """Requests waiting now, all models."""
        return sum(len(q) for q in self.queues.values())

    def longest_wait(self, now: float | None = None) -> float:
        """Seconds the oldest waiter has waited (0 when nobody waits)."""
        now = time.monotonic() if now is None else now
        oldest = [q[0].arrived for q in self.queues.values() if q]
        return max(0.0, now - min(oldest)) if oldest else 0.0

    def waiting_for(self, state: EndpointState) -> int:
        """Waiters that could use a slot on ``state``."""
        return sum(1 for q in self.queues.values() for w in q if state in w.eligible)


def _wait(event: threading.Event, timeout: float) -> bool:
    return event.wait(timeout)
