"""Slots and the queue: a request is sent only to an endpoint with a free slot, or waits.

llama-server has ``total_slots`` slots and hides everything beyond them in an unbounded,
invisible queue. Here a request that finds every slot it could use busy waits in a
bounded queue per model instead, and is dispatched the moment a slot frees on any of its
candidates; a full queue or a long wait gets the spec's 503 ``slots_exhausted``. Every slot
handed out is a ``Lease`` (``app.leases``).

Whose turn it is (``Turns``): each API key is a ``Share``; a freed slot goes to the share
with the least service so far (each slot it is given adds 1/weight; a share that waited
idle starts level with the last one served, never with credit saved up), ties to the
share served longest ago, then to the oldest request; FIFO within a share and model. A
share holding its ``max_concurrent`` slots waits while the others are served. Without
keys every request is one share: oldest first, as a plain FIFO.

This ``Dispatcher`` keeps slots and the queue in this worker. With several workers and no
shared state each worker takes an equal share of every endpoint's slots; with Redis
(``app.shared.SharedDispatcher``) the whole fleet shares one table and one queue, and this
class is what it falls back to while Redis is unreachable.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import QueueSettings
from .errors import SlotsExhausted
from .leases import Held, Lease, LeaseBook, new_id
from .registry import EndpointState, Status

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)
SLOTS_EXHAUSTED = "All slots are busy. Please try again later."


Wait = Callable[[threading.Event, float], bool]


@dataclass(frozen=True, slots=True)
class Share:
    """Whose request it is, for fair shares: an API key's name, its weight, and the slots
    it may hold at once (0: no limit)."""

    name: str = ""
    weight: float = 1.0
    max_concurrent: int = 0


ANYONE = Share()


@dataclass(eq=False)
class Waiter:
    """A request waiting for a slot."""

    key: str
    eligible: Sequence[EndpointState]
    request_id: str = ""
    share: Share = ANYONE
    arrived: float = field(default_factory=time.monotonic)
    event: threading.Event = field(default_factory=lambda: threading.Event())
    chosen: Lease | None = None


class Turns:
    """Whose turn it is among shares (see the module's docstring): service counted in
    1/weight steps against a virtual clock."""

    def __init__(self) -> None:
        self.clock = 0.0                        # the service of the share served last
        self.service: dict[str, float] = {}
        self.last: dict[str, int] = {}          # share -> turn it was last served at
        self.turn = 0

    def standing(self, share: Share) -> tuple[float, int]:
        """How a share ranks now: lower goes first."""
        return max(self.service.get(share.name, 0.0), self.clock), self.last.get(share.name, 0)

    def served(self, share: Share) -> None:
        """A share was given a slot."""
        level = max(self.service.get(share.name, 0.0), self.clock)
        self.clock = level
        self.service[share.name] = level + 1.0 / share.weight
        self.turn += 1
        self.last[share.name] = self.turn


@dataclass(frozen=True)
class QueueView:
    """Slots and the queue at one instant: this worker's, or the fleet's with Redis."""

    depth: int
    longest_wait: float                        # seconds
    by_model: dict[str, int]
    waiting_for: dict[str, int]                # endpoint name -> waiters that could use it
    in_use: dict[str, int]                     # endpoint name -> leases held
    shared: bool = False
    longest_by_model: dict[str, float] = field(default_factory=dict)  # seconds


def _usable(state: EndpointState) -> bool:
    return (state.routable or state.status is Status.UNKNOWN) and not state.draining


class Dispatcher:
    """Hands out slots as leases; FIFO per model, oldest waiter first across models."""

    def __init__(self, queue: QueueSettings, metrics: Metrics | None = None,
                 workers: int = 1, lease_ttl: float = 8.0) -> None:
        self.settings = queue
        self.metrics = metrics
        # Workers of this proxy that split each endpoint's slots between them (no shared
        # state): each takes floor(total_slots / workers), at least 1; and each share's
        # max_concurrent likewise.
        self.workers = max(1, workers)
        self.book = LeaseBook(lease_ttl)
        self.queues: dict[str, deque[Waiter]] = {}
        self.turns = Turns()
        self.holding: dict[str, int] = {}       # share name -> leases held here
        self.closing = False                    # the worker stops: nobody waits any more
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------ capacity

    def capacity(self, state: EndpointState) -> float:
        """Slots this worker may fill on an endpoint (infinite when unknown). One worker:
        ``total_slots`` less those seen busy for others in /slots; several: its share."""
        total = state.total_slots
        if total is None:
            return math.inf
        if self.workers > 1:
            return max(1, total // self.workers)
        return total - state.others_busy

    def in_use(self, state: EndpointState) -> int:
        """Slots leased on an endpoint, as far as this dispatcher knows (this worker's)."""
        return state.in_flight

    def room(self, share: Share) -> bool:
        """Whether a share may take one more slot here (its max_concurrent, split between
        the workers when they do not share state)."""
        if not share.max_concurrent:
            return True
        limit = share.max_concurrent
        if self.workers > 1:
            limit = max(1, limit // self.workers)
        return self.holding.get(share.name, 0) < limit

    def _take(self, eligible: Sequence[EndpointState], request_id: str,
              share: Share = ANYONE) -> Lease | None:
        """A lease on the first endpoint in ``eligible`` (the router's balanced order) with
        a free slot."""
        for state in eligible:
            if _usable(state) and state.in_flight < self.capacity(state):
                self.turns.served(share)
                return self._adopt(Lease(new_id(), request_id, state, share.name))
        return None

    def _adopt(self, lease: Lease) -> Lease:
        """Count a lease as held by this worker."""
        lease.state.in_flight += 1
        self.holding[lease.share] = self.holding.get(lease.share, 0) + 1
        self.book.add(lease)
        if self.metrics is not None:
            self.metrics.child(self.metrics.in_flight, lease.endpoint).inc()
        return lease

    def _drop(self, state: EndpointState, share: str = "") -> None:
        """Un-count a lease of this worker (given back or reclaimed)."""
        state.in_flight -= 1
        left = self.holding.get(share, 0) - 1
        if left > 0:
            self.holding[share] = left
        else:
            self.holding.pop(share, None)
        if self.metrics is not None:
            self.metrics.child(self.metrics.in_flight, state.endpoint.name).dec()

    # ------------------------------------------------------------------ taking, giving

    def has_room(self, state: EndpointState) -> bool:
        """Whether a request for this endpoint would find a free slot there now."""
        return _usable(state) and self.in_use(state) < self.capacity(state)

    def acquire(self, key: str, eligible: Sequence[EndpointState], request_id: str = "",
                wait: Wait | None = None, share: Share = ANYONE) -> Lease:
        """A lease on one of ``eligible`` (in preference order), waiting in the queue if
        none is free (or ``share`` holds all it may). Raises SlotsExhausted when the queue
        is full or the wait times out. ``wait(event, timeout)`` blocks until the event is
        set (the default) and may raise, e.g. when the client goes away; the waiter then
        leaves the queue at once."""
        with self._lock:
            queue = self.queues.setdefault(key, deque())
            if not queue and self.room(share):
                chosen = self._take(eligible, request_id, share)
                if chosen is not None:
                    return chosen
            if self.closing:
                self._drop_if_empty(key)
                raise self._shutting_down()
            if len(queue) >= self.settings.max_size:
                self._drop_if_empty(key)
                raise self._exhausted(f"the queue for {key or 'this route'} is full "
                                      f"({self.settings.max_size} waiting)")
            waiter = Waiter(key, eligible, request_id, share)
            queue.append(waiter)
            self._count(key, +1)
            # Those queued before may be held back by their keys' max_concurrent while a
            # slot is free for this one.
            free_now = len(queue) > 1
        if free_now:
            self.pump()
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
            if self.closing:
                raise self._shutting_down()
            raise self._exhausted(f"no slot freed within {self.settings.timeout:g} s")
        return chosen

    def close_queue(self) -> None:
        """The worker is about to stop: every waiter is answered now (503 with
        Retry-After), and nobody queues from now on."""
        with self._lock:
            self.closing = True
            for queue in self.queues.values():
                for waiter in queue:
                    waiter.event.set()

    def _shutting_down(self) -> SlotsExhausted:
        return SlotsExhausted("The proxy is shutting down: retry the request",
                              headers={"Retry-After": str(self.settings.retry_after)},
                              code="server_shutting_down")

    def _leave(self, waiter: Waiter) -> Lease | None:
        """Take a waiter out of its queue; the lease it was given, if any."""
        with self._lock:
            queue = self.queues.get(waiter.key)
            if waiter.chosen is None and queue is not None and waiter in queue:
                queue.remove(waiter)
                self._count(waiter.key, -1)
                self._drop_if_empty(waiter.key)
            return waiter.chosen

    def release(self, lease: Lease) -> None:
        """A request is over: give its lease back (once; later calls do nothing) and
        dispatch whoever can use the slot."""
        with self._lock:
            if lease.released:
                return
            lease.released = True
            if self.book.remove(lease.id) is None:
                return  # reclaimed already: counted back then
            self._drop(lease.state, lease.share)
        self._give_back(lease.id, lease.state)
        self.pump()

    def _give_back(self, lease_id: str, state: EndpointState) -> None:
        """Where a shared table lives, tell it a lease ended (nothing to do here)."""

    def _count(self, key: str, change: int) -> None:
        if self.metrics is not None and self.metrics.queue_depth is not None:
            self.metrics.child(self.metrics.queue_depth, key).inc(change)

    def pump(self) -> None:
        """Dispatch waiting requests while slots are free (also after health changes): to
        whose turn it is, among the first waiter of each share and model that its share's
        limit lets go; one that finds no free slot holds back its share's later waiters
        for that model."""
        with self._lock:
            blocked: set[tuple[str, str]] = set()
            while True:
                heads = self._heads(blocked)
                if not heads:
                    return
                waiter = min(heads, key=lambda w: (*self.turns.standing(w.share), w.arrived))
                chosen = self._take(waiter.eligible, waiter.request_id, waiter.share)
                if chosen is None:
                    blocked.add((waiter.share.name, waiter.key))
                    continue
                self.queues[waiter.key].remove(waiter)
                self._count(waiter.key, -1)
                self._drop_if_empty(waiter.key)
                waiter.chosen = chosen
                waiter.event.set()

    def _heads(self, blocked: set[tuple[str, str]]) -> list[Waiter]:
        """The first waiter of each share in each model's queue that may go now."""
        heads = []
        for key, queue in self.queues.items():
            seen: set[str] = set()
            for waiter in queue:
                name = waiter.share.name
                if name in seen:
                    continue
                seen.add(name)
                if (name, key) not in blocked and self.room(waiter.share):
                    heads.append(waiter)
        return heads

    def refresh(self, states: Iterable[EndpointState]) -> None:
        """Endpoints were probed (capacity or health may have changed): dispatch."""
        self.pump()

    def _drop_if_empty(self, key: str) -> None:
        if not self.queues.get(key):
            self.queues.pop(key, None)

    def _exhausted(self, why: str) -> SlotsExhausted:
        log.info("slots exhausted: %s", why)
        return SlotsExhausted(SLOTS_EXHAUSTED,
                              headers={"Retry-After": str(self.settings.retry_after)})

    # ---------------------------------------------------------------- the renewing tick

    def tick(self, write_timeout: float | None = None) -> list[Held]:
        """The renewing greenlet's round: renew held leases, reclaim those dropped without
        being given back, and end requests whose client write has been blocked longer than
        ``write_timeout``. Returns what was reclaimed."""
        with self._lock:
            lost = self.book.sweep()
            for held in lost:
                self._drop(held.state, held.share)
        for held in lost:
            self._reclaimed(held, "its request ended without giving it back")
            self._give_back(held.id, held.state)
        if write_timeout is not None:
            now = time.monotonic()
            for lease in self.book.live():
                since = lease.writing_since
                if since is not None and now - since > write_timeout \
                        and lease.abort is not None:
                    log.warning("request %s: client write blocked for over %g s: closing "
                                "the connection", lease.request_id, write_timeout)
                    lease.abort()
        if lost:
            self.pump()
        return lost

    def _reclaimed(self, held: Held | Any, why: str) -> None:
        """Log and count one reclaimed lease."""
        log.warning("slot lease %s of request %s on %s reclaimed: %s", held.id,
                    held.request_id or "-", held.endpoint, why)
        if self.metrics is not None:
            self.metrics.child(self.metrics.leases_reclaimed, held.endpoint).inc()

    # ---------------------------------------------------------------------- for status

    def snapshot(self) -> QueueView:
        """Slots and the queue now, for the status routes and metrics."""
        with self._lock:
            waiters = [w for q in self.queues.values() for w in q]
            now = time.monotonic()
            waiting: dict[str, int] = {}
            for waiter in waiters:
                for state in waiter.eligible:
                    name = state.endpoint.name
                    waiting[name] = waiting.get(name, 0) + 1
            in_use = self.book.by_endpoint()
            return QueueView(
                depth=len(waiters),
                longest_wait=max((now - w.arrived for w in waiters), default=0.0),
                by_model={k: len(q) for k, q in self.queues.items() if q},
                waiting_for=waiting, in_use=in_use,
                longest_by_model={k: now - min(w.arrived for w in q)
                                  for k, q in self.queues.items() if q})

    def describe(self) -> dict[str, Any]:
        """The ``shared_state`` object of /internal/status."""
        return {"backend": "local", "reachable": None, "workers": self.workers,
                "local_share": self.workers > 1, "lease_ttl_s": self.book.ttl}

    def depth(self) -> int:
        """Requests waiting now, all models."""
        return self.snapshot().depth

    def longest_wait(self) -> float:
        """Seconds the oldest waiter has waited (0 when nobody waits)."""
        return self.snapshot().longest_wait

    def waiting_for(self, state: EndpointState) -> int:
        """Waiters that could use a slot on ``state``."""
        return self.snapshot().waiting_for.get(state.endpoint.name, 0)

    def settle(self) -> None:
        """Wait until every lease given back is given back everywhere (nothing to wait for
        here; the shared dispatcher tells Redis off the request's path)."""

    def start(self) -> None:
        """Start background work (the shared dispatcher's listener; nothing here)."""

    def stop(self) -> None:
        """Stop background work."""


def _wait(event: threading.Event, timeout: float) -> bool:
    return event.wait(timeout)
