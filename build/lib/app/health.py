"""Health checks: ``check_once()`` decides (pure enough to drive without sleeping), and a
background greenlet per worker calls it.

Unlike Olla, llama.cpp's ``503 Loading model`` is *loading*, not unhealthy: it is not
routed to, not counted as a failure, and checked again soon.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .concurrency import Repeating, each
from .config import Endpoint
from .errors import UpstreamError
from .registry import EndpointState, Registry, Status
from .upstream import UpstreamPool

log = logging.getLogger(__name__)

InUse = Callable[[EndpointState], int]
BACKOFF_CAP = 60.0      # seconds: the longest wait between probes of a failing endpoint
LOADING_RECHECK = 1.0   # seconds: how soon a loading endpoint is probed again


@dataclass(frozen=True)
class Probe:
    """The outcome of one probe."""

    status: Status
    detail: str
    latency_ms: float | None = None


def classify(status_code: int, body: bytes) -> tuple[Status, str]:
    """An endpoint's state from its health URL's answer."""
    if 200 <= status_code < 300:
        return Status.HEALTHY, ""
    text = body[:300].decode("utf-8", "replace")
    if status_code == 503 and ("Loading model" in text or "unavailable_error" in text):
        return Status.LOADING, "llama.cpp is loading its model"
    if status_code in (401, 403):
        return Status.AUTH_ERROR, (f"health check answered {status_code}: the API key in this "
                                   "endpoint's headers is missing or wrong")
    return Status.UNHEALTHY, f"health check answered {status_code}: {text.strip()[:200]}"


def probe(pool: UpstreamPool, endpoint: Endpoint) -> Probe:
    """GET the endpoint's health URL once, within its check_timeout."""
    started = time.perf_counter()
    try:
        code, body = pool.fetch(endpoint, endpoint.health_check_url, endpoint.check_timeout)
    except UpstreamError as exc:
        return Probe(Status.OFFLINE, exc.message)
    latency = (time.perf_counter() - started) * 1000
    status, detail = classify(code, body)
    return Probe(status, detail, latency)


def backoff(interval: float, failures: int) -> float:
    """Seconds to the next probe after ``failures`` consecutive failures (1, 2, 4... x)."""
    if failures <= 0:
        return interval
    return float(min(interval * 2 ** (failures - 1), max(BACKOFF_CAP, interval)))


def record(state: EndpointState, result: Probe, now: float) -> bool:
    """Apply a probe result; True when the endpoint just became routable."""
    was_routable = state.routable
    interval = state.endpoint.check_interval
    state.checked_wall = time.time()
    state.probe_ms = result.latency_ms
    if result.status is Status.HEALTHY and state.status is Status.AUTH_ERROR \
            and state.discovery_error:
        # /health needs no key; discovery said the key is wrong. Keep saying so until a
        # discovery with the key succeeds (the caller rediscovers on every healthy probe).
        state.next_check = now + backoff(interval, state.failures)
        return False
    state.status = result.status
    state.detail = result.detail
    if result.status is Status.HEALTHY:
        state.failures = 0
        state.next_check = now + interval
    elif result.status is Status.LOADING:
        state.next_check = now + min(interval, LOADING_RECHECK)
    else:
        state.failures += 1
        state.next_check = now + backoff(interval, state.failures)
    return state.routable and not was_routable


def mark_failed(state: EndpointState, status: Status, detail: str,
                now: float | None = None) -> None:
    """A request found the endpoint down or loading: stop routing to it until a probe."""
    now = time.monotonic() if now is None else now
    if status is Status.LOADING:
        state.status, state.detail = status, detail
        state.next_check = min(state.next_check, now + LOADING_RECHECK)
        return
    if state.status is not status or state.failures == 0:
        state.failures += 1
        state.next_check = now + backoff(state.endpoint.check_interval, state.failures)
    state.status, state.detail = status, detail


def check_once(registry: Registry, now: float | None = None,
               probe_fn: Callable[[UpstreamPool, Endpoint], Probe] = probe,
               in_use: InUse | None = None) -> list[str]:
    """Probe every endpoint whose check is due, then rediscover those that just recovered,
    whose discovery is stale, or whose key was refused. Returns the names probed.
    ``in_use(state)``: slots the proxy holds there (default: this worker's requests)."""
    now = time.monotonic() if now is None else now
    due = [s for s in registry if s.next_check <= now]
    if not due:
        return []

    def check(state: EndpointState) -> None:
        result = probe_fn(registry.pool, state.endpoint)
        previous = state.status
        recovered = record(state, result, now)
        if state.status is not previous:
            log.info("endpoint %s: %s -> %s %s", state.endpoint.name, previous.value,
                     state.status.value, state.detail)
        stale = state.discovered_at is None or (
            now - state.discovered_at >= registry.discovery_interval)
        if result.status is Status.HEALTHY and (recovered or stale or state.discovery_error):
            registry.discover(state)
        if state.routable and state.slots_polling:
            poll_slots(registry.pool, state, in_use)
        if state.routable and state.metrics_polling:
            poll_metrics(registry.pool, state)

    each(check, due)
    return [s.endpoint.name for s in due]


def busy_slots(document: Any) -> int | None:
    """How many slots a /slots answer shows busy (``is_processing``, or the older ``state``)."""
    if not isinstance(document, list):
        return None
    busy = 0
    for slot in document:
        if not isinstance(slot, dict):
            return None
        if "is_processing" in slot:
            busy += bool(slot["is_processing"])
        else:
            busy += slot.get("state", 0) != 0
    return busy


def poll_metrics(pool: UpstreamPool, state: EndpointState) -> None:
    """Keep the endpoint's own Prometheus text (llama-server's --metrics) for re-export.
    An endpoint without it (501), or refusing it, is not asked again."""
    endpoint = state.endpoint
    try:
        status, body = pool.fetch(endpoint, "/metrics", endpoint.check_timeout)
    except UpstreamError:
        return
    if status == 200:
        state.metrics_text = body.decode("utf-8", "replace")
    elif status in (401, 403, 404, 501):
        state.metrics_polling = False
        state.metrics_text = None
        log.info("endpoint %s: /metrics not available (%s)", endpoint.name, status)


def poll_slots(pool: UpstreamPool, state: EndpointState, in_use: InUse | None = None) -> None:
    """Reconcile slot use with llama.cpp's /slots: slots busy beyond the proxy's own
    requests (``in_use``: this worker's, or the fleet's leases with shared state) belong
    to others. An endpoint that disables /slots or refuses it is not asked again; local
    counts then stand alone."""
    endpoint = state.endpoint
    count = in_use or _own_requests
    in_flight_before = count(state)
    try:
        status, document = pool.get_json(endpoint, "/slots", endpoint.check_timeout)
    except UpstreamError:
        return
    # A request that started or ended during the poll may or may not show in it; count it
    # as ours, not another's: overcounting others would hold requests back until the next
    # poll, undercounting only lets llama.cpp queue one briefly.
    in_flight = max(in_flight_before, count(state))
    busy = busy_slots(document) if status == 200 else None
    if busy is None:
        if status in (401, 403, 404, 501) or status == 200:
            state.slots_polling = False
            state.others_busy = 0  # from now on local counts alone
            log.info("endpoint %s: /slots not available (%s); counting slots locally",
                     endpoint.name, status)
        return
    state.others_busy = max(0, busy - in_flight)


def _own_requests(state: EndpointState) -> int:
    return state.in_flight


class HealthLoop(Repeating):
    """Runs ``check_once`` forever in a gevent greenlet (one per gunicorn worker).
    ``on_change(states)`` hears of every round that probed something (capacity or health
    may have changed: waiters can be dispatched)."""

    def __init__(self, registry: Registry, tick: float = 0.25,
                 on_change: Callable[[list[EndpointState]], None] | None = None,
                 in_use: InUse | None = None) -> None:
        super().__init__(self.round, tick, "health check")
        self.registry = registry
        self.on_change = on_change
        self.in_use = in_use

    def round(self) -> None:
        """Probe what is due; tell ``on_change`` what was probed."""
        probed = check_once(self.registry, in_use=self.in_use)
        if probed and self.on_change is not None:
            self.on_change([self.registry.states[name] for name in probed])
