"""Which endpoints a request may go to, by model name and endpoint state."""

from __future__ import annotations

import pytest
import responses

from app.balancer import priority
from app.config import Endpoint, ProxySettings
from app.errors import ModelNotFound, ModelUnavailable, NoEndpointAvailable
from app.registry import Registry, Status, parse_models
from app.routing import Router
from app.upstream import UpstreamPool


def router(aliases: dict[str, tuple[str, ...]] | None = None) -> Router:
    endpoints = (Endpoint(name="chat-1", url="http://c1.test", priority=90),
                 Endpoint(name="chat-2", url="http://c2.test", priority=90),
                 Endpoint(name="code", url="http://code.test", priority=50))
    registry = Registry(endpoints, UpstreamPool(endpoints, ProxySettings()))
    served = {"chat-1": "/m/llama-3.1-8b-instruct-q4_k_m.gguf",
              "chat-2": "/other/llama-3.1-8b-instruct-q4_k_m.gguf", "code": "qwen-coder"}
    for name, model_id in served.items():
        state = registry.states[name]
        state.models = parse_models({"data": [{"id": model_id}]}, None)
        state.names = frozenset().union(*(m["_keys"] for m in state.models))
        state.discovered_at = 0.0
        state.status = Status.HEALTHY
    return Router(registry, aliases or {}, priority())


def test_named_model_goes_only_to_routable_endpoints_serving_it() -> None:
    r = router()
    r.registry.states["chat-1"].status = Status.OFFLINE
    picked = [c.state.endpoint.name for c in r.candidates("llama-3.1-8b-instruct-q4_k_m.gguf")]
    assert picked == ["chat-2"]


def test_nobody_serves_it_is_model_not_found() -> None:
    with pytest.raises(ModelNotFound, match=r"Model not found: mystery\.gguf"):
        router().candidates("mystery.gguf")


def test_only_unroutable_servers_is_model_unavailable_naming_states() -> None:
    r = router()
    r.registry.states["chat-1"].status = Status.LOADING
    r.registry.states["chat-2"].status = Status.OFFLINE
    with pytest.raises(ModelUnavailable) as raised:
        r.candidates("llama-3.1-8b-instruct-q4_k_m.gguf")
    assert raised.value.status == 503 and raised.value.code == "model_unavailable"
    assert "chat-1 (loading)" in raised.value.message
    assert "chat-2 (offline)" in raised.value.message
    assert raised.value.headers["X-Olla-Routing-Decision"] == "rejected"
    assert raised.value.headers["X-Olla-Routing-Reason"] == "model_unavailable"


def test_no_model_goes_to_any_routable_endpoint() -> None:
    r = router()
    r.registry.states["chat-1"].status = Status.UNHEALTHY
    assert sorted(c.state.endpoint.name for c in r.candidates(None)) == ["chat-2", "code"]


def test_no_routable_endpoint_at_all_is_503() -> None:
    r = router()
    for state in r.registry:
        state.status = Status.OFFLINE
    with pytest.raises(NoEndpointAvailable):
        r.candidates(None)


def test_not_yet_probed_endpoints_come_after_routable_ones() -> None:
    r = router()
    r.registry.states["chat-1"].status = Status.UNKNOWN
    assert [c.state.endpoint.name for c in r.candidates(
        "llama-3.1-8b-instruct-q4_k_m.gguf")] == ["chat-2", "chat-1"]


def test_alias_spans_endpoints_and_names_each_ones_model() -> None:
    r = router({"assistant": ("llama-3.1-8b-instruct-q4_k_m.gguf", "qwen-coder")})
    chosen = {c.state.endpoint.name: c.model for c in r.candidates("assistant")}
    assert chosen == {"chat-1": "llama-3.1-8b-instruct-q4_k_m.gguf",
                      "chat-2": "llama-3.1-8b-instruct-q4_k_m.gguf", "code": "qwen-coder"}


def test_endpoint_lacking_the_route_goes_last() -> None:
    r = router()
    r.registry.states["chat-1"].unsupported.add("embedding")
    r.registry.states["chat-2"].unsupported.add("embedding")
    assert r.candidates(None, "embedding")[0].state.endpoint.name == "code"


@pytest.mark.parametrize(("url", "shown"), [
    ("/v1/models?api_key=sk-1", "/v1/models"),
    ("http://user:pw@host:8080/v1/models?key=x#f", "/v1/models"),
    ("/v1/models", "/v1/models"),
    ("", "/"),
])
def test_status_texts_show_configured_urls_without_secrets(url: str, shown: str) -> None:
    from app.registry import path_shown

    assert path_shown(url) == shown


def test_a_discovery_failure_names_no_query_string(fake: responses.RequestsMock) -> None:
    endpoint = Endpoint(name="a", url="http://a.test:8080",
                        model_url="/v1/models?api_key=sk-secret-123")
    fake.get("http://a.test:8080/v1/models", status=404, json={})
    registry = Registry((endpoint,), UpstreamPool((endpoint,), ProxySettings()))
    assert not registry.discover(registry.states["a"])
    error = registry.states["a"].discovery_error or ""
    assert error == "/v1/models answered 404" and "sk-secret" not in error


def test_props_over_the_poll_cap_is_an_issue_and_the_models_are_still_served(
        fake: responses.RequestsMock) -> None:
    from app.upstream import POLL_LIMIT

    endpoint = Endpoint(name="a", url="http://a.test:8080")
    fake.get("http://a.test:8080/v1/models", json={"object": "list", "data": [{"id": "m"}]})
    fake.get("http://a.test:8080/props", body=b'{"filler": "' + b"x" * POLL_LIMIT + b'"}')
    registry = Registry((endpoint,), UpstreamPool((endpoint,), ProxySettings()))
    state = registry.states["a"]
    assert registry.discover(state)
    assert "m" in state.names and state.props == {}
    assert state.discovery_error == (
        f"/props: the upstream's answer is larger than {POLL_LIMIT} bytes")


def test_a_request_waits_for_a_first_discovery_already_running(
        fake: responses.RequestsMock) -> None:
    import threading
    import time

    endpoint = Endpoint(name="a", url="http://a.test:8080")
    started = threading.Event()

    def slow_models(request: object) -> tuple[int, dict[str, str], str]:
        started.set()
        time.sleep(0.2)
        return 200, {}, '{"object": "list", "data": [{"id": "m"}]}'

    fake.add_callback(responses.GET, "http://a.test:8080/v1/models", callback=slow_models)
    fake.get("http://a.test:8080/props", json={})
    registry = Registry((endpoint,), UpstreamPool((endpoint,), ProxySettings()))
    # The health loop's first discovery, under way as the worker starts...
    first = threading.Thread(target=registry.discover, args=(registry.states["a"],))
    first.start()
    started.wait(5)
    # ...when a request comes: it waits for that answer instead of a 404.
    found = Router(registry, {}, priority()).candidates("m")
    assert [c.state.endpoint.name for c in found] == ["a"]
    first.join(5)
