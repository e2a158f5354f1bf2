"""The status routes (Olla's names and shapes) against fake upstreams (`responses`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from app import __version__
from app import status as st
from app.config import Endpoint
from app.health import Probe, check_once
from app.registry import Status
from app.services import services_of
from app.upstream import UpstreamPool

from .conftest import CHAT_URL, EMBED_URL, add_llamacpp

CHAT_MODEL = "llama-3.1-8b-instruct-q4_k_m.gguf"
EMBED_MODEL = "nomic-embed-text-v1.5.Q4_K_M.gguf"
ROUTES = ["/internal/health", "/internal/status", "/internal/status/endpoints",
          "/internal/status/models", "/internal/stats/models", "/internal/stats/translators",
          "/internal/stats/sticky", "/internal/process",
          "/internal/ui/data", "/olla/models", "/version"]
ENDPOINT_FIELDS = {
    "id", "name", "url", "type", "priority", "status", "issues", "health_check",
    "health_check_at", "response_time", "response_time_ms", "next_check", "next_check_at",
    "model_count", "last_model_sync", "last_model_sync_at", "request_count", "success_rate",
    "min_latency_ms", "avg_latency_ms", "max_latency_ms", "active_connections",
    "total_slots", "n_ctx", "build_info", "slots_in_use", "slots_polled", "leases",
    "queued"}


def completion(predicted_per_second: float, ok: bool = True) -> dict[str, Any]:
    """A llama.cpp /completion answer with its timings."""
    return {"content": "hi", "stop": True,
            "timings": {"prompt_n": 4, "prompt_ms": 10.0, "predicted_n": 8,
                        "predicted_ms": 160.0, "predicted_per_second": predicted_per_second}}


def probes(outcomes: dict[str, Probe]) -> Callable[[UpstreamPool, Endpoint], Probe]:
    """A probe_fn for check_once: each endpoint's outcome by name."""
    return lambda pool, endpoint: outcomes[endpoint.name]


def by_name(endpoints: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in endpoints}


def get(client: FlaskClient, path: str) -> Any:
    response = client.get(path)
    assert response.status_code == 200, response.data
    assert response.mimetype == "application/json"
    return response.get_json()


@pytest.fixture
def fleet(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> Flask:
    """Four endpoints (one per state the probes below give), two serving the chat model,
    an API key in the config, and an alias."""
    add_llamacpp(fake, CHAT_URL, CHAT_MODEL, f"/srv/models/{CHAT_MODEL}")
    add_llamacpp(fake, "http://twin.test:8080", f"/other/dir/{CHAT_MODEL}")
    add_llamacpp(fake, EMBED_URL, f"/srv/models/{EMBED_MODEL}")
    add_llamacpp(fake, "http://locked.test:8080", "locked.gguf")
    return make_app({
        "endpoints": [
            {"url": CHAT_URL, "name": "chat", "priority": 90,
             "headers": {"X-API-Key": "sekret-value-123"}},
            {"url": "http://twin.test:8080", "name": "twin", "priority": 90},
            {"url": EMBED_URL, "name": "embed", "priority": 80},
            {"url": "http://locked.test:8080", "name": "locked", "priority": 70},
        ],
        "model_aliases": {"my-chat": [CHAT_MODEL]},
    })


def drive_probes(app: Flask) -> float:
    """Discover every endpoint, then probe: chat healthy, twin offline, embed loading,
    locked auth_error. Returns the monotonic time the probes ran at."""
    registry = services_of(app).registry
    registry.discover_many(list(registry))
    now = time.monotonic()
    check_once(registry, now, probe_fn=probes({
        "chat": Probe(Status.HEALTHY, "", 12.0),
        "twin": Probe(Status.OFFLINE, "Connection refused"),
        "embed": Probe(Status.LOADING, "llama.cpp is loading its model", 3.0),
        "locked": Probe(Status.AUTH_ERROR, "health check answered 401: the API key in this "
                                           "endpoint's headers is missing or wrong", 2.0),
    }))
    return now


# ---------------------------------------------------------------------------- every route

@pytest.mark.parametrize("path", ROUTES)
def test_every_route_answers_json(fleet: Flask, path: str) -> None:
    response = fleet.test_client().get(path)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert isinstance(response.get_json(), dict)


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_405_json(fleet: Flask, path: str, method: str) -> None:
    response = fleet.test_client().open(path, method=method)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"
    body = response.get_json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "method_not_allowed"
    assert body["error"]["type"] == "invalid_request_error"
    assert method in body["error"]["message"] and path in body["error"]["message"]


def test_liveness_is_healthy_even_with_every_endpoint_down(fleet: Flask) -> None:
    registry = services_of(fleet).registry
    check_once(registry, time.monotonic(), probe_fn=probes(
        {s.endpoint.name: Probe(Status.OFFLINE, "refused") for s in registry}))
    response = fleet.test_client().get("/internal/health")
    assert (response.status_code, response.get_json()) == (200, {"status": "healthy"})


# ------------------------------------------------------------------------------ endpoints

def test_endpoints_before_any_probe_or_request(two_endpoints: FlaskClient) -> None:
    body = get(two_endpoints, "/internal/status/endpoints")
    assert set(body) == {"timestamp", "total_count", "healthy_count", "routable_count",
                         "endpoints", "queue"}
    assert body["queue"] == {"depth": 0, "max_size": 100, "timeout_s": 30.0,
                             "longest_wait_ms": 0.0, "by_model": {},
                             "scope": "worker"}
    assert body["timestamp"].endswith("Z")
    assert (body["total_count"], body["healthy_count"], body["routable_count"]) == (2, 0, 0)
    assert [e["name"] for e in body["endpoints"]] == ["chat", "embed"]  # priority order
    chat = body["endpoints"][0]
    assert set(chat) == ENDPOINT_FIELDS
    assert chat["url"] == CHAT_URL and chat["type"] == "llamacpp" and chat["priority"] == 90
    assert chat["status"] == "unknown"
    assert chat["health_check"] == "never" and chat["health_check_at"] is None
    assert chat["request_count"] == 0 and chat["success_rate"] is None
    assert chat["avg_latency_ms"] is None and chat["active_connections"] == 0


def test_endpoint_figures_after_two_completions(two_endpoints: FlaskClient,
                                                fake: responses.RequestsMock) -> None:
    fake.post(f"{CHAT_URL}/completion", json=completion(40.0))
    for _ in range(2):
        response = two_endpoints.post("/olla/llamacpp/completion",
                                      json={"model": CHAT_MODEL, "prompt": "x"})
        assert response.status_code == 200
    chat, embed = get(two_endpoints, "/internal/status/endpoints")["endpoints"]
    assert chat["request_count"] == 2
    assert chat["success_rate"] == 100.0
    assert 0 <= chat["min_latency_ms"] <= chat["avg_latency_ms"] <= chat["max_latency_ms"]
    assert chat["active_connections"] == 0
    assert chat["model_count"] == 1
    assert chat["last_model_sync"].endswith(" ago") and chat["last_model_sync_at"]
    assert (chat["total_slots"], chat["n_ctx"], chat["build_info"]) == (2, 4096, "b0-test")
    assert embed["request_count"] == 0


def test_endpoint_states_after_probes(fleet: Flask) -> None:
    now = drive_probes(fleet)
    body = get(fleet.test_client(), "/internal/status/endpoints")
    assert (body["total_count"], body["healthy_count"], body["routable_count"]) == (4, 1, 1)
    # Priority first, healthy first within a priority, then name.
    assert [e["name"] for e in body["endpoints"]] == ["chat", "twin", "embed", "locked"]
    endpoints = by_name(body["endpoints"])
    assert {n: e["status"] for n, e in endpoints.items()} == {
        "chat": "healthy", "twin": "offline", "embed": "loading", "locked": "auth_error"}
    assert endpoints["chat"]["issues"] == ""
    assert endpoints["twin"]["issues"] == "Connection refused"
    assert endpoints["embed"]["issues"] == "llama.cpp is loading its model"
    assert "API key" in endpoints["locked"]["issues"]
    chat = endpoints["chat"]
    assert chat["health_check"] == "0s ago" and chat["health_check_at"].endswith("Z")
    assert (chat["response_time"], chat["response_time_ms"]) == ("12ms", 12.0)
    # Next checks: the check interval (5s) ahead, backed off for failures, sooner while loading.
    state = services_of(fleet).registry.states["chat"]
    assert state.next_check == pytest.approx(now + 5)
    assert chat["next_check"] in ("in 4s", "in 5s")
    assert endpoints["embed"]["next_check"] in ("now", "in 0s", "in 1s")
    assert endpoints["twin"]["response_time"] is None


def test_next_check_is_converted_from_monotonic_time(fleet: Flask) -> None:
    svc = services_of(fleet)
    clock = st.Clock(wall=1_700_000_000.0, mono=500.0)
    state = svc.registry.states["chat"]
    state.next_check, state.checked_wall = 503.0, 1_699_999_998.0
    chat = by_name(st.endpoints_status(svc, clock)["endpoints"])["chat"]
    assert chat["next_check"] == "in 3s"
    assert chat["next_check_at"] == "2023-11-14T22:13:23.000Z"
    assert chat["health_check"] == "2s ago"
    assert chat["health_check_at"] == "2023-11-14T22:13:18.000Z"
    state.next_check = 499.0
    assert by_name(st.endpoints_status(svc, clock)["endpoints"])["chat"]["next_check"] == "now"


def test_endpoint_serializer_takes_new_field_groups(fleet: Flask) -> None:
    svc = services_of(fleet)
    view = st.EndpointView(svc.registry.states["chat"], "id1", st.Clock.now())

    def queue(view: st.EndpointView) -> dict[str, Any]:
        return {"queue_depth": 0}

    out = st.serialize_endpoint(view, (*st.ENDPOINT_FIELDS, queue))
    assert set(out) == ENDPOINT_FIELDS | {"queue_depth"}


def test_endpoint_ids_are_olla_style_and_distinct(fleet: Flask) -> None:
    svc = services_of(fleet)
    ids = st.endpoint_ids(svc.registry)
    assert len(set(ids.values())) == 4
    assert all(i.isalnum() and i == i.lower() for i in ids.values())
    assert st.endpoint_ids(svc.registry) == ids  # stable


def test_display_url_drops_credentials_query_and_fragment() -> None:
    assert st.display_url("http://user:pw@host:8080/v1?key=s#frag") == "http://host:8080/v1"
    assert st.display_url("http://[::1]:8080") == "http://[::1]:8080"
    assert st.display_url("http://host:notaport") == st.UNPARSEABLE_URL


# --------------------------------------------------------------------------- /internal/status

def test_status_summary(fleet: Flask, fake: responses.RequestsMock) -> None:
    drive_probes(fleet)
    fake.post(f"{CHAT_URL}/tokenize", json={"tokens": [1]})
    client = fleet.test_client()
    assert client.post("/olla/llamacpp/tokenize", json={"content": "x"}).status_code == 200
    body = get(client, "/internal/status")
    assert set(body) == {"timestamp", "endpoints", "proxy", "system", "queue",
                         "shared_state"}
    assert body["shared_state"] == {"backend": "local", "reachable": None, "workers": 1,
                                    "local_share": False, "lease_ttl_s": 8.0}
    assert body["proxy"] == {"engine": "olla-py", "profile": "streaming",
                             "balancer": "least-busy"}
    system = body["system"]
    assert system["status"] == "critical"  # 1 of 4 up
    assert system["endpoints_up"] == "1/4"
    assert (system["total_requests"], system["total_failures"]) == (1, 0)
    assert system["success_rate"] == 100.0 and system["has_traffic"] is True
    assert system["version"] == __version__ and system["start_time"].endswith("Z")
    chat = by_name(body["endpoints"])["chat"]
    assert {"id", "name", "url", "status", "priority", "success_rate", "avg_latency",
            "avg_latency_ms", "min_latency_ms", "max_latency_ms", "connections", "requests",
            "last_check", "health_check_at", "next_check", "next_check_at", "issues",
            "models", "total_slots", "n_ctx", "build_info", "slots_in_use", "slots_polled",
            "leases", "queued"} == set(chat)
    assert chat["requests"] == 1 and chat["avg_latency"].endswith(("ms", "s"))
    assert chat["models"]["count"] == 1


@pytest.mark.parametrize(("healthy", "total", "ok", "requests_", "verdict"), [
    (0, 0, 0, 0, "critical"), (4, 4, 0, 0, "healthy"), (3, 4, 0, 0, "degraded"),
    (4, 4, 93, 100, "degraded"), (4, 4, 80, 100, "critical"), (1, 4, 0, 0, "critical")])
def test_fleet_verdict_uses_olla_thresholds(healthy: int, total: int, ok: int,
                                            requests_: int, verdict: str) -> None:
    assert st.fleet_status(healthy, total, ok, requests_) == verdict


# ------------------------------------------------------------------------------ model stats

def test_model_stats_after_known_requests(two_endpoints: FlaskClient,
                                          fake: responses.RequestsMock) -> None:
    # Several answers for one URL are given in turn.
    fake.post(f"{CHAT_URL}/completion", json=completion(40.0))
    fake.post(f"{CHAT_URL}/completion", json=completion(50.0))
    fake.post(f"{CHAT_URL}/completion", json={"error": {"code": 500, "message": "boom"}},
              status=500)
    for _ in range(3):
        two_endpoints.post("/olla/llamacpp/completion",
                           json={"model": CHAT_MODEL, "prompt": "x"})
    body = get(two_endpoints,
               "/internal/stats/models?include_endpoints=true&include_summary=true")
    assert set(body) == {"timestamp", "models", "endpoints", "summary"}
    [model] = body["models"]
    assert model["name"] == CHAT_MODEL
    assert (model["total_requests"], model["successful_requests"],
            model["failed_requests"]) == (3, 2, 1)
    assert model["success_rate"] == 66.67
    for key in ("average_latency_ms", "p50_latency_ms", "p95_latency_ms", "p99_latency_ms"):
        assert isinstance(model[key], float)
    assert model["p50_latency_ms"] <= model["p95_latency_ms"] <= model["p99_latency_ms"]
    assert model["p95_latency"].endswith(("ms", "s"))
    assert model["tokens_per_second"] == 45.0  # from timings.predicted_per_second
    assert (model["prompt_tokens"], model["completion_tokens"]) == (8, 16)
    assert model["last_requested"] == "0s ago"
    assert model["endpoint_breakdown"] == {"chat": {"endpoint_name": "chat",
                                                    "request_count": 3}}
    assert body["endpoints"]["chat"]["request_count"] == 3
    assert body["summary"] == {"overall_success_rate": 66.67, "most_popular_model": CHAT_MODEL,
                               "least_popular_model": CHAT_MODEL, "total_models": 1,
                               "active_models": 1, "total_requests": 3}


def test_two_completions_through_the_proxy(two_endpoints: FlaskClient,
                                           fake: responses.RequestsMock) -> None:
    fake.post(f"{CHAT_URL}/completion", json=completion(42.5))
    for _ in range(2):
        two_endpoints.post("/olla/llamacpp/completion", json={"model": CHAT_MODEL,
                                                              "prompt": "x"})
    [model] = get(two_endpoints, "/internal/stats/models")["models"]
    assert model["total_requests"] == 2 and model["success_rate"] == 100.0
    assert model["tokens_per_second"] == 42.5
    assert all(model[f"p{q}_latency_ms"] is not None for q in (50, 95, 99))
    assert "endpoint_breakdown" not in model
    assert get(two_endpoints, "/internal/stats/models")["endpoints"] == {}
    chat = get(two_endpoints, "/internal/status/endpoints")["endpoints"][0]
    assert (chat["request_count"], chat["success_rate"]) == (2, 100.0)


def test_model_stats_empty(two_endpoints: FlaskClient) -> None:
    body = get(two_endpoints, "/internal/stats/models")
    assert body["models"] == []
    assert body["summary"]["overall_success_rate"] is None
    assert body["summary"]["most_popular_model"] == ""


# ------------------------------------------------------------------------ model catalogues

def test_unified_models_list_every_endpoint_and_state(fleet: Flask) -> None:
    drive_probes(fleet)
    body = get(fleet.test_client(), "/olla/models")
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert sorted(models) == [CHAT_MODEL, "locked.gguf", EMBED_MODEL]
    chat = models[CHAT_MODEL]
    assert (chat["object"], chat["owned_by"]) == ("model", "olla")
    assert isinstance(chat["created"], int)
    olla = chat["olla"]
    assert olla["availability"] == [
        {"endpoint": "chat", "state": "loaded", "status": "healthy"},
        {"endpoint": "twin", "state": "unavailable", "status": "offline"}]
    assert olla["aliases"] == ["my-chat"]
    assert olla["max_context_length"] == 32768
    assert olla["family"] == "llama" and olla["quantization"] == "Q4_K_M"
    assert "chat" in olla["capabilities"]
    embed = models[EMBED_MODEL]["olla"]
    assert embed["availability"] == [{"endpoint": "embed", "state": "loading",
                                      "status": "loading"}]
    assert "embeddings" in embed["capabilities"]
    assert "/srv" not in json.dumps(body) and "/other" not in json.dumps(body)


@pytest.mark.parametrize(("query", "ids"), [
    ("?available=true", [CHAT_MODEL]),
    ("?available=false", ["locked.gguf", EMBED_MODEL]),
    ("?endpoint=twin", [CHAT_MODEL]),
    ("?endpoint=embed&available=true", []),
    ("?endpoint=nope", []),
    ("?family=nomic", [EMBED_MODEL]),
    ("?capability=embeddings", [EMBED_MODEL]),
])
def test_unified_models_filters(fleet: Flask, query: str, ids: list[str]) -> None:
    drive_probes(fleet)
    body = get(fleet.test_client(), "/olla/models" + query)
    assert [m["id"] for m in body["data"]] == ids


def test_unified_models_openai_format(fleet: Flask) -> None:
    body = get(fleet.test_client(), "/olla/models?format=openai")
    assert all(set(m) == {"id", "object", "created", "owned_by"} for m in body["data"])


@pytest.mark.parametrize("query", ["?available=yes", "?format=ollama"])
def test_unified_models_bad_query_is_400(fleet: Flask, query: str) -> None:
    response = fleet.test_client().get("/olla/models" + query)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_parameter"


def test_unified_models_discover_on_first_call(two_endpoints: FlaskClient) -> None:
    ids = [m["id"] for m in get(two_endpoints, "/olla/models")["data"]]
    assert ids == [CHAT_MODEL, EMBED_MODEL]


def test_models_status(fleet: Flask) -> None:
    drive_probes(fleet)
    body = get(fleet.test_client(), "/internal/status/models?detailed=true&group=family")
    assert set(body) == {"timestamp", "total_models", "total_families", "total_endpoints",
                         "models_by_family", "recent_models", "model_groups"}
    assert (body["total_models"], body["total_endpoints"]) == (3, 4)
    assert body["models_by_family"] == {"llama": [CHAT_MODEL], "locked": ["locked.gguf"],
                                        "nomic": [EMBED_MODEL]}
    chat = next(m for m in body["recent_models"] if m["name"] == CHAT_MODEL)
    assert chat["endpoints"] == ["chat", "twin"]
    ids = st.endpoint_ids(services_of(fleet).registry)
    assert chat["endpoint_ids"] == [ids["chat"], ids["twin"]]
    assert chat["aliases"] == ["my-chat"] and chat["quant"] == "Q4_K_M"
    assert chat["last_seen"] == "0s ago" and chat["last_seen_at"].endswith("Z")
    assert [g["family"] for g in body["model_groups"]] == ["llama", "locked", "nomic"]
    assert "model_groups" not in get(fleet.test_client(), "/internal/status/models")


def test_server_aliases_and_file_name_are_aliases_never_paths(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "qwen-coder", model_path="/m/Qwen2.5-Coder-7B-Q4_K_M.gguf",
                 aliases=["qwen-coder", "coder"])
    client = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}]}).test_client()
    [model] = get(client, "/olla/models")["data"]
    assert model["id"] == "qwen-coder"
    assert model["olla"]["aliases"] == ["Qwen2.5-Coder-7B-Q4_K_M.gguf", "coder"]
    assert model["olla"]["quantization"] == "Q4_K_M"
    assert "code" in model["olla"]["capabilities"]
    assert "/m/" not in json.dumps(get(client, "/internal/status/models"))


# -------------------------------------------------------------------------------- version

def test_version(two_endpoints: FlaskClient) -> None:
    body = get(two_endpoints, "/version")
    assert body["name"] == "olla-py" and body["version"] == __version__
    assert body["supported_backends"] == ["llamacpp"]
    assert "health_checking" in body["capabilities"]
    assert body["capabilities_experimental"] == []
    assert body["api"]["version"] == "v1"
    assert set(body["api"]["endpoints"].values()) == set(ROUTES)


# -------------------------------------------------------------------------------- secrets

def test_config_headers_never_appear(fake: responses.RequestsMock,
                                     make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, CHAT_MODEL)
    add_llamacpp(fake, EMBED_URL, EMBED_MODEL)
    # An upstream that echoes the key in its error body: the detail text carries it.
    fake.get(f"{CHAT_URL}/health", status=500, body="bad header X-Tenant-Token=sekret-value-123")
    fake.get(f"{EMBED_URL}/health",
             body=requests.ConnectionError(ConnectionRefusedError(111, "refused")))
    fake.post(f"{CHAT_URL}/completion", json=completion(10.0))
    app = make_app({"endpoints": [
        {"url": CHAT_URL, "name": "chat",
         "headers": {"X-API-Key": "sekret-value-123", "X-Tenant-Token": "tenant-99887766"}},
        {"url": EMBED_URL, "name": "embed",
         "headers": {"Authorization": "Bearer embed-token-abcdef"}}]})
    client = app.test_client()
    client.post("/olla/llamacpp/completion", json={"model": CHAT_MODEL, "prompt": "x"})
    check_once(services_of(app).registry, time.monotonic())
    chat = by_name(get(client, "/internal/status/endpoints")["endpoints"])["chat"]
    assert chat["status"] == "unhealthy" and st.REDACTED in chat["issues"]
    secrets = ["sekret-value-123", "tenant-99887766", "embed-token-abcdef", "x-tenant-token"]
    for path in [*ROUTES, "/internal/status/models?detailed=true&group=family",
                 "/internal/stats/models?include_endpoints=true&include_summary=true"]:
        text = client.get(path).get_data(as_text=True).lower()
        for secret in secrets:
            assert secret not in text, (path, secret)


# ------------------------------------------------------------------------------ formatting

@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (9.9, "9s"), (59, "59s"), (60, "1m"), (150, "2m"), (3600, "1h"),
    (86400 * 3, "3d")])
def test_spans_as_olla_writes_them(seconds: float, text: str) -> None:
    assert st.span(seconds) == text


def test_relative_and_absolute_times() -> None:
    clock = st.Clock(wall=1000.0, mono=0.0)
    assert st.ago(None, clock) == "never"
    assert st.ago(998.0, clock) == "2s ago"
    assert st.until(1003.0, clock) == "in 3s"
    assert st.until(None, clock) == "unknown"
    assert st.iso(0.0) == "1970-01-01T00:00:00.000Z"
    assert [st.uptime(s) for s in (42, 300, 3 * 3600 + 720, 2 * 86400 + 4 * 3600)] == [
        "42s", "5m", "3h 12m", "2d 4h"]
    assert [st.latency_text(v) for v in (None, 85.4, 1234.0)] == ["0ms", "85ms", "1.2s"]
    assert [st.size_text(v) for v in (512, 2048, 4_920_000_000)] == [
        "512 B", "2.00 KB", "4.58 GB"]


def test_refused_key_at_discovery_is_auth_error_once(fake: responses.RequestsMock,
                                                     make_app: Callable[..., Flask]) -> None:
    fake.get(f"{CHAT_URL}/v1/models", status=401, json={"error": {"code": 401}})
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat",
                                   "headers": {"Authorization": "Bearer wrong-key-42"}}]})
    registry = services_of(app).registry
    registry.discover_many(list(registry))
    [chat] = get(app.test_client(), "/internal/status/endpoints")["endpoints"]
    assert chat["status"] == "auth_error"
    assert chat["issues"].count("answered 401") == 1
    assert chat["model_count"] == 0


def test_one_model_of_the_unified_catalogue_by_id_or_alias(fleet: Flask) -> None:
    drive_probes(fleet)
    client = fleet.test_client()
    listed = {m["id"]: m for m in get(client, "/olla/models")["data"]}
    for name in (CHAT_MODEL, CHAT_MODEL.upper(), "my-chat"):
        one = get(client, f"/olla/models/{name}")
        assert one["id"] == CHAT_MODEL
        assert one["olla"] == listed[CHAT_MODEL]["olla"]
    missing = client.get("/olla/models/no-such-model")
    assert missing.status_code == 404
    assert missing.json["error"] == {"message": "Model not found: no-such-model",
                                     "type": "invalid_request_error",
                                     "code": "model_not_found"}
