"""Shared fixtures for unit tests: an app built from settings, with fake upstreams."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.config import settings_from_mapping
from app.services import services_of
from tests.integration.procs import RedisServer

CHAT_URL = "http://chat.test:8080"
EMBED_URL = "http://embed.test:8080"


def models_doc(model_id: str, aliases: list[str] | None = None) -> dict[str, Any]:
    """A llama.cpp /v1/models body."""
    entry: dict[str, Any] = {"id": model_id, "object": "model", "created": 1,
                             "owned_by": "llamacpp", "meta": {"n_ctx_train": 32768}}
    if aliases is not None:
        entry["aliases"] = aliases
    return {"object": "list", "data": [entry], "models": [{"name": model_id}]}


def props_doc(model_path: str, total_slots: int = 2) -> dict[str, Any]:
    """A llama.cpp /props body."""
    return {"total_slots": total_slots, "model_path": model_path,
            "default_generation_settings": {"n_ctx": 4096}, "build_info": "b0-test"}


@pytest.fixture
def fake() -> Iterator[responses.RequestsMock]:
    """`responses` faking the upstreams: it stands in for the transport adapter the pool
    sends through (``app.transport.Transport``; urllib3's would be ``HTTPAdapter.send``)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False,
                                target="app.transport.Transport.send") as mock:
        yield mock


def add_llamacpp(mock: responses.RequestsMock, url: str, model_id: str,
                 model_path: str | None = None, aliases: list[str] | None = None) -> None:
    """Register discovery answers for a fake llama.cpp endpoint."""
    mock.get(url + "/v1/models", json=models_doc(model_id, aliases))
    mock.get(url + "/props", json=props_doc(model_path or f"/models/{model_id}"))


@pytest.fixture
def make_app() -> Iterator[Callable[..., Flask]]:
    """Factory: an app from a config mapping (the YAML's structure); every app made is
    closed (its pooled connections, background work) after the test."""
    made: list[Flask] = []

    def make(config: dict[str, Any] | None = None) -> Flask:
        app = create_app(settings_from_mapping(config or {}, environ={}))
        app.config["TESTING"] = True
        made.append(app)
        return app

    yield make
    for app in made:
        services_of(app).close()


@pytest.fixture
def two_endpoints(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> FlaskClient:
    """A client for an app in front of a fake chat and a fake embedding endpoint."""
    add_llamacpp(fake, CHAT_URL, "llama-3.1-8b-instruct-q4_k_m.gguf",
                 "/srv/models/llama-3.1-8b-instruct-q4_k_m.gguf")
    add_llamacpp(fake, EMBED_URL, "/srv/models/nomic-embed-text-v1.5.Q4_K_M.gguf")
    app = make_app({"endpoints": [
        {"url": CHAT_URL, "name": "chat", "priority": 90},
        {"url": EMBED_URL, "name": "embed", "priority": 80},
    ]})
    return app.test_client()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the whole run (stopped at the end)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_store(redis_server: RedisServer) -> RedisServer:
    """The run's redis-server, running and with nothing in it yet."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()  # a test stopped it
    redis_server.flush()
    return redis_server


@pytest.fixture
def redis_url(redis_store: RedisServer) -> str:
    """A Redis URL with nothing in it yet."""
    return redis_store.url
