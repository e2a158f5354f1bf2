"""The per-app service objects, kept in ``app.extensions["olla"]``."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask, current_app

from .access import Access
from .balancer import make_balancer
from .concurrency import Repeating, gevent_active, spawn
from .config import WORKER_COUNT_ENV, Settings
from .dispatch import Dispatcher
from .drain import Drains
from .health import HealthLoop
from .history import History
from .logs import RequestLog
from .metrics import Metrics
from .process import gc_timer
from .ratelimit import Limiter
from .registry import EndpointState, Registry
from .routing import Router
from .stats import Exchange, Stats
from .sticky import LocalSessions, RedisSessions, Sticky, Store
from .upstream import UpstreamPool

if TYPE_CHECKING:
    from .shared import SharedTable


@dataclass
class Services:
    """Everything a request needs beyond Flask itself."""

    settings: Settings
    version: str
    pool: UpstreamPool
    registry: Registry
    router: Router
    health: HealthLoop
    stats: Stats
    dispatcher: Dispatcher
    metrics: Metrics
    request_log: RequestLog
    renewer: Repeating
    access: Access
    limiter: Limiter
    drains: Drains
    history: History = field(default_factory=History)  # the dashboard's last 15 minutes
    sticky: Sticky | None = None         # proxy.sticky_sessions, when enabled
    observers: tuple[Callable[[Exchange], None], ...] = ()

    def __post_init__(self) -> None:
        # Told about every finished proxied request.
        observers: list[Callable[[Exchange], None]] = [self.stats.record, self.metrics.record,
                                                       self.history.exchange]
        if self.limiter.counts_tokens:
            observers.append(self._count_tokens)
        self.observers = tuple(observers)

    def _count_tokens(self, exchange: Exchange) -> None:
        prompt, completion, _ = exchange.usage()
        if exchange.client:
            used = (prompt or 0) + (completion or 0)
            if self.limiter.shared and gevent_active():  # a Redis round trip: off the path
                spawn(lambda: self.limiter.used_tokens(exchange.client, used))
            else:
                self.limiter.used_tokens(exchange.client, used)

    @classmethod
    def build(cls, settings: Settings, version: str, workers: int | None = None) -> Services:
        """Wire the services for one app. ``workers``: gunicorn workers of this proxy
        (default ``$OLLA_WORKER_COUNT``, which gunicorn.conf.py sets in each worker)."""
        if workers is None:
            workers = int(os.environ.get(WORKER_COUNT_ENV) or 1)
        gc_timer()  # /internal/process reports the collector's time from the start
        pool = UpstreamPool(settings.endpoints, settings.proxy)
        registry = Registry(settings.endpoints, pool,
                            discovery_interval=settings.discovery_interval)
        router = Router(registry, settings.model_aliases,
                        make_balancer(settings.proxy.load_balancer))
        shared = settings.state.redis_url is not None
        metrics = Metrics(shared=shared)
        dispatcher: Dispatcher
        # One set of Redis connections per worker, for the slot table, the rate limits and
        # the drains.
        table: SharedTable | None = None
        if shared:
            from .shared import SharedDispatcher

            dispatcher = SharedDispatcher(settings.proxy.queue, settings.state,
                                          registry.states, metrics, workers)
            table = dispatcher.table
        else:
            dispatcher = Dispatcher(settings.proxy.queue, metrics, workers,
                                    settings.state.lease_ttl)
        sticky: Sticky | None = None
        sticky_settings = settings.proxy.sticky_sessions
        if sticky_settings.enabled:
            local = LocalSessions(sticky_settings)
            store: Store = local if table is None else RedisSessions(sticky_settings, table,
                                                                     local)
            sticky = Sticky(sticky_settings, store)

        def health_changed(states: list[EndpointState]) -> None:
            if sticky is not None:
                sticky.health_changed(states)
            dispatcher.refresh(states)

        health = HealthLoop(registry, on_change=health_changed, in_use=dispatcher.in_use)
        # The renewing greenlet: renews this worker's leases (in Redis too), reclaims
        # dropped ones, cuts off clients whose writes stalled.
        write_timeout = settings.proxy.write_timeout
        drains = Drains(registry.states, settings.state, on_change=dispatcher.refresh,
                        table=table)

        history = History(table)

        def round_() -> None:
            drains.sync()
            dispatcher.tick(write_timeout)
            if sticky is not None:
                sticky.store.flush()
            history.queue_depth(dispatcher.depth())
            history.flush()

        renewer = Repeating(round_, min(1.0, settings.state.lease_ttl / 4), "lease renewal")
        server = settings.server
        access = Access.of(settings.auth.api_keys, server.rate_limits, server.internal_access)
        limiter = Limiter(server.rate_limits, settings.auth.api_keys, settings.state, table)
        return cls(settings, version, pool, registry, router, health, Stats(), dispatcher,
                   metrics, RequestLog(), renewer, access, limiter, drains, history, sticky)

    def start_background(self) -> None:
        """Start this worker's health-check and lease-renewing greenlets, and the shared
        state's grant listener (call after gevent has patched)."""
        self.health.start()
        self.dispatcher.start()
        self.renewer.start()

    def close(self) -> None:
        """Stop the background work and release pooled connections."""
        self.renewer.stop()
        self.dispatcher.stop()
        self.health.stop()
        self.pool.close()


def services_of(app: Flask) -> Services:
    """An app's services."""
    return app.extensions["olla"]  # type: ignore[no-any-return]


def services() -> Services:
    """The current app's services."""
    return services_of(current_app)  # type: ignore[arg-type]
