"""The per-app service objects, kept in ``app.extensions["olla"]``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, current_app

from .balancer import make_balancer
from .config import Settings
from .dispatch import Dispatcher
from .health import HealthLoop
from .logs import RequestLog
from .metrics import Metrics
from .registry import Registry
from .routing import Router
from .stats import Exchange, Stats
from .upstream import UpstreamPool


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

    @property
    def observers(self) -> tuple[Callable[[Exchange], None], ...]:
        """Told about every finished proxied request."""
        return (self.stats.record, self.metrics.record)

    @classmethod
    def build(cls, settings: Settings, version: str) -> Services:
        """Wire the services for one app."""
        pool = UpstreamPool(settings.endpoints, settings.proxy)
        registry = Registry(settings.endpoints, pool,
                            discovery_interval=settings.discovery_interval)
        router = Router(registry, settings.model_aliases,
                        make_balancer(settings.proxy.load_balancer))
        metrics = Metrics()
        dispatcher = Dispatcher(settings.proxy.queue, metrics)
        return cls(settings, version, pool, registry, router,
                   HealthLoop(registry, on_change=dispatcher.pump), Stats(), dispatcher,
                   metrics, RequestLog())

    def start_background(self) -> None:
        """Start this worker's health-check greenlet (call after gevent has patched)."""
        self.health.start()

    def close(self) -> None:
        """Stop the health loop and release pooled connections."""
        self.health.stop()
        self.pool.close()


def services_of(app: Flask) -> Services:
    """An app's services."""
    return app.extensions["olla"]  # type: ignore[no-any-return]


def services() -> Services:
    """The current app's services."""
    return services_of(current_app)  # type: ignore[arg-type]
