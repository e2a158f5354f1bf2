"""The per-app service objects, kept in ``app.extensions["olla"]``."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from .config import Settings
from .registry import Registry
from .routing import Router
from .upstream import UpstreamPool


@dataclass
class Services:
    """Everything a request needs beyond Flask itself."""

    settings: Settings
    version: str
    pool: UpstreamPool
    registry: Registry
    router: Router

    @classmethod
    def build(cls, settings: Settings, version: str) -> Services:
        """Wire the services for one app."""
        pool = UpstreamPool(settings.endpoints, settings.proxy)
        registry = Registry(settings.endpoints, pool)
        return cls(settings, version, pool, registry, Router(registry, settings.model_aliases))

    def close(self) -> None:
        """Release pooled connections."""
        self.pool.close()


def services_of(app: Flask) -> Services:
    """An app's services."""
    return app.extensions["olla"]  # type: ignore[no-any-return]


def services() -> Services:
    """The current app's services."""
    return services_of(current_app)  # type: ignore[arg-type]
