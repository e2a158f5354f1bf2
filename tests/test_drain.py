"""Draining endpoints: out of rotation by config or by the admin routes, shared by every
worker (a file of this proxy's, or Redis)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import responses
from flask import Flask

from app.config import Endpoint, StateSettings
from app.drain import Drains
from app.metrics_dir import MULTIPROC_ENV
from app.registry import EndpointState, Status
from tests.conftest import CHAT_URL, EMBED_URL, add_llamacpp

MODEL = "gemma-3-270m-q4_k_m.gguf"


def states(*names: str, drained: tuple[str, ...] = ()) -> dict[str, EndpointState]:
    made = {}
    for name in names:
        state = EndpointState(Endpoint(name=name, url=f"http://{name}.test",
                                       drain=name in drained))
        state.status = Status.HEALTHY
        made[name] = state
    return made


def test_a_drained_endpoint_accepts_nothing_and_says_so() -> None:
    found = states("a", "b", drained=("b",))
    assert found["a"].accepting and not found["b"].accepting and found["b"].routable
    assert found["b"].shown_status == "drained"
    found["b"].in_flight = 2
    assert found["b"].shown_status == "draining"   # requests in flight still finish there
    found["b"].fleet_in_use = 0
    assert found["b"].shown_status == "drained"    # fleet-wide, with shared state


@pytest.mark.parametrize("where", ["file", "redis"])
def test_a_drain_asked_of_one_worker_holds_for_all(where: str, tmp_path: Path,
                                                   request: pytest.FixtureRequest) -> None:
    settings = StateSettings()
    environ = {MULTIPROC_ENV: str(tmp_path)}
    if where == "redis":
        settings = StateSettings(redis_url=request.getfixturevalue("redis_url"))
        environ = {}
    one, two = states("a", "b"), states("a", "b", drained=("a",))
    changed: list[str] = []
    first = Drains(one, settings, environ)
    second = Drains(two, settings, environ, lambda s: changed.extend(x.endpoint.name for x in s))
    first.set("b", True)
    assert one["b"].draining and not two["b"].draining
    second.sync()
    assert two["b"].draining and changed == ["b"]
    assert two["a"].draining      # the config's drain holds where no override names it
    first.set("a", False)         # ...until one does
    second.sync()
    assert not two["a"].draining


def test_the_drain_routes(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, MODEL)
    add_llamacpp(fake, EMBED_URL, MODEL)
    fake.post(CHAT_URL + "/tokenize", json={"tokens": [1]})
    fake.post(EMBED_URL + "/tokenize", json={"tokens": [2]})
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "a", "priority": 100},
                                  {"url": EMBED_URL, "name": "b", "priority": 50}],
                    "server": {"internal_access": {"admin_key": "adm-0123456789"}}})
    client = app.test_client()
    admin = {"Authorization": "Bearer adm-0123456789"}

    def served_by() -> str:
        answer = client.post("/olla/llamacpp/tokenize", json={"content": "x"})
        return str(answer.headers["X-Olla-Endpoint"])

    for state in app.extensions["olla"].registry.states.values():
        state.status = Status.HEALTHY
    assert served_by() == "a"
    refused = client.post("/internal/endpoints/a/drain")  # loopback, but no admin key
    assert refused.status_code == 403 and refused.json["error"]["code"] == "forbidden"
    drained = client.post("/internal/endpoints/a/drain", headers=admin)
    assert drained.status_code == 200
    assert drained.json == {"name": "a", "draining": True, "status": "drained", "in_flight": 0}
    assert served_by() == "b"
    listed = {e["name"]: e["status"] for e in
              client.get("/internal/status/endpoints").json["endpoints"]}
    assert listed == {"a": "drained", "b": "healthy"}
    missing = client.post("/internal/endpoints/nope/drain", headers=admin)
    assert missing.status_code == 404 and missing.json["error"]["code"] == "endpoint_not_found"
    assert client.post("/internal/endpoints/a/undrain", headers=admin).json["draining"] is False
    assert served_by() == "a"


def test_drain_in_the_config() -> None:
    from app.config import settings_from_mapping

    settings = settings_from_mapping({"endpoints": [
        {"url": "http://a.test", "name": "a", "drain": True}]}, environ={})
    assert settings.endpoints[0].drain is True
