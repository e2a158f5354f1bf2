"""API keys, model scopes, rate limits, CORS and the /internal policy, through the app
(fake upstreams)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import CHAT_URL, add_llamacpp

MODEL = "gemma-3-270m-q4_k_m.gguf"
ANSWER = {"object": "chat.completion", "choices": [{"index": 0, "message": {
    "role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}
KEYS = [{"name": "alice", "key": "sk-alice-0123456789"},
        {"name": "bob", "key": "sk-bob-9876543210", "models": ["gemma*"],
         "requests_per_minute": 3},
        {"name": "carol", "key": "sk-carol-555555555", "tokens_per_minute": 20}]


def chat(client: FlaskClient, key: str | None = None, model: str | None = MODEL,
         header: str = "Authorization", **kwargs: Any) -> Any:
    headers = dict(kwargs.pop("headers", {}))
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    return client.post("/olla/llamacpp/v1/chat/completions", json=body, headers=headers,
                       **kwargs)


@pytest.fixture
def keyed(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> FlaskClient:
    add_llamacpp(fake, CHAT_URL, MODEL)
    fake.post(CHAT_URL + "/v1/chat/completions", json=ANSWER)
    app = make_app({"auth": {"api_keys": KEYS}, "proxy": {"assemble_non_streamed": False},
                    "endpoints": [{"url": CHAT_URL, "name": "chat",
                                   "headers": {"Authorization": "Bearer upstream-own"}}]})
    return app.test_client()


def error(response: Any) -> dict[str, str]:
    body = json.loads(response.data)["error"]
    assert set(body) == {"message", "type", "code"}
    return body  # type: ignore[no-any-return]


def test_a_missing_or_wrong_key_is_401_with_www_authenticate(keyed: FlaskClient) -> None:
    for key in (None, "sk-nobody"):
        response = chat(keyed, key)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert error(response)["type"] == "authentication_error"
        assert error(response)["code"] == "invalid_api_key"
    assert keyed.get("/olla/llamacpp/v1/models").status_code == 401
    assert keyed.get("/olla/models").status_code == 401


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_a_good_key_is_served_and_never_forwarded(keyed: FlaskClient,
                                                  fake: responses.RequestsMock,
                                                  header: str) -> None:
    response = chat(keyed, "sk-alice-0123456789", header=header)
    assert response.status_code == 200
    sent = [c for c in fake.calls if c.request.url.endswith("/chat/completions")][-1]
    assert sent.request.headers["Authorization"] == "Bearer upstream-own"
    assert "X-API-Key" not in sent.request.headers
    assert "sk-alice" not in json.dumps(dict(sent.request.headers))
    assert "sk-alice" not in json.dumps(dict(response.headers))


def test_a_model_outside_the_keys_scope_is_403(keyed: FlaskClient, fake: responses.RequestsMock,
                                               ) -> None:
    calls = len(fake.calls)
    response = chat(keyed, "sk-bob-9876543210", model="llama-3.1-8b")
    assert response.status_code == 403 and error(response)["code"] == "model_not_allowed"
    assert "bob" in error(response)["message"] and "sk-bob" not in error(response)["message"]
    no_model = chat(keyed, "sk-bob-9876543210", model=None)
    assert no_model.status_code == 403 and "name one" in error(no_model)["message"]
    assert len(fake.calls) == calls  # nothing went upstream
    assert chat(keyed, "sk-bob-9876543210").status_code == 200


def test_models_lists_only_what_the_key_may_use(fake: responses.RequestsMock,
                                                make_app: Callable[..., Flask]) -> None:
    other = "http://other.test:8080"
    add_llamacpp(fake, CHAT_URL, MODEL)
    add_llamacpp(fake, other, "llama-3.1-8b-instruct.gguf")
    client = make_app({"auth": {"api_keys": KEYS}, "endpoints": [
        {"url": CHAT_URL, "name": "chat"}, {"url": other, "name": "other"}]}).test_client()
    for path, ids in (("/olla/llamacpp/v1/models", lambda b: [m["id"] for m in b["data"]]),
                      ("/olla/models", lambda b: [m["id"] for m in b["data"]])):
        bob = client.get(path, headers={"Authorization": "Bearer sk-bob-9876543210"})
        alice = client.get(path, headers={"X-API-Key": "sk-alice-0123456789"})
        assert ids(bob.json) == [MODEL]
        assert sorted(ids(alice.json)) == sorted([MODEL, "llama-3.1-8b-instruct.gguf"])


def test_a_keys_requests_per_minute_is_429_with_retry_after(keyed: FlaskClient) -> None:
    answers = [chat(keyed, "sk-bob-9876543210") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["X-RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert answers[0].headers["X-RateLimit-Limit"] == "3"
    limited = answers[-1]
    assert error(limited)["code"] == "rate_limit_exceeded"
    assert error(limited)["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "requests_per_minute" in error(limited)["message"]
    assert chat(keyed, "sk-alice-0123456789").status_code == 200  # other keys unaffected


def test_a_keys_tokens_per_minute_counts_what_its_answers_used(keyed: FlaskClient) -> None:
    # 12 tokens an answer, 20 a minute: the second answer goes over, the third is refused.
    assert chat(keyed, "sk-carol-555555555").status_code == 200
    assert chat(keyed, "sk-carol-555555555").status_code == 200
    refused = chat(keyed, "sk-carol-555555555")
    assert refused.status_code == 429 and "tokens_per_minute" in error(refused)["message"]


def test_per_ip_limits_and_trusted_proxies(fake: responses.RequestsMock,
                                           make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, MODEL)
    fake.post(CHAT_URL + "/v1/chat/completions", json=ANSWER)
    client = make_app({"server": {"rate_limits": {
        "per_ip_requests_per_minute": 2, "trust_proxy_headers": True,
        "trusted_proxy_cidrs": ["127.0.0.0/8"]}},
        "proxy": {"assemble_non_streamed": False},
        "endpoints": [{"url": CHAT_URL, "name": "chat"}]}).test_client()
    behind = {"headers": {"X-Forwarded-For": "198.51.100.1"}}
    assert [chat(client, **behind).status_code for _ in range(3)] == [200, 200, 429]
    # Another client behind the same (trusted) proxy has its own count.
    other = {"headers": {"X-Forwarded-For": "198.51.100.2"}}
    assert chat(client, **other).status_code == 200
    # From an untrusted peer the header is ignored: the peer is the client.
    spoofing = {"environ_base": {"REMOTE_ADDR": "203.0.113.5"},
                "headers": {"X-Forwarded-For": "198.51.100.3"}}
    assert [chat(client, **spoofing).status_code for _ in range(3)] == [200, 200, 429]


def test_the_health_route_has_its_own_limit(make_app: Callable[..., Flask]) -> None:
    client = make_app({"server": {"rate_limits": {"health_requests_per_minute": 2}}}
                      ).test_client()
    codes = [client.get("/internal/health").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert client.get("/internal/status").status_code == 200  # not rate-limited


def test_internal_routes_follow_the_access_policy(make_app: Callable[..., Flask]) -> None:
    client = make_app({"server": {"internal_access": {
        "admin_key": "adm-0123456789", "metrics_key": "prom-0123456789"}}}).test_client()
    outside = {"environ_base": {"REMOTE_ADDR": "192.0.2.44"}}
    for path in ("/internal/status", "/internal/status/endpoints", "/internal/metrics",
                 "/version", "/internal/stats/models"):
        assert client.get(path).status_code == 200, path  # from loopback
        refused = client.get(path, **outside)
        assert refused.status_code == 403 and error(refused)["code"] == "forbidden", path
        admin = client.get(path, headers={"Authorization": "Bearer adm-0123456789"},
                           **outside)
        assert admin.status_code == 200, path
    assert client.get("/internal/health", **outside).status_code == 200
    prom = {"X-API-Key": "prom-0123456789"}
    assert client.get("/internal/metrics", headers=prom, **outside).status_code == 200
    assert client.get("/internal/status", headers=prom, **outside).status_code == 403


def test_keys_do_not_open_internal_routes(keyed: FlaskClient) -> None:
    outside = {"environ_base": {"REMOTE_ADDR": "192.0.2.44"}}
    response = keyed.get("/internal/status",
                         headers={"Authorization": "Bearer sk-alice-0123456789"}, **outside)
    assert response.status_code == 403


def test_cors_preflight_needs_no_key_and_never_reaches_upstream(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, MODEL)
    fake.post(CHAT_URL + "/v1/chat/completions", json=ANSWER)
    client = make_app({"auth": {"api_keys": KEYS}, "proxy": {"assemble_non_streamed": False},
                       "server": {"cors": {"enabled": True,
                                           "allowed_origins": ["http://app.example"]}},
                       "endpoints": [{"url": CHAT_URL, "name": "chat"}]}).test_client()
    calls = len(fake.calls)
    preflight = client.options("/olla/llamacpp/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert preflight.headers["Access-Control-Max-Age"] == "300"
    assert len(fake.calls) == calls
    answer = chat(client, "sk-alice-0123456789", headers={"Origin": "http://app.example"})
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == "http://app.example"
    exposed = {h.strip() for h in answer.headers["Access-Control-Expose-Headers"].split(",")}
    # Olla's default list: every X-Olla-* header the proxy sets, sticky and routing ones too.
    assert exposed >= {"X-Olla-Request-Id", "X-Olla-Endpoint", "X-Olla-Model",
                       "X-Olla-Backend-Type", "X-Olla-Response-Time",
                       "X-Olla-Routing-Strategy", "X-Olla-Routing-Decision",
                       "X-Olla-Routing-Reason", "X-Olla-Mode", "X-Olla-Sticky-Session",
                       "X-Olla-Sticky-Key-Source", "X-Olla-Session-ID", "X-RateLimit-Limit"}
    elsewhere = client.options("/olla/llamacpp/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in elsewhere.headers


@pytest.mark.parametrize(("cors", "field"), [
    ({"enabled": True, "allowed_origins": []}, "allowed_origins"),
    ({"allow_credentials": True, "allowed_origins": ["*"]}, "allowed_origins"),
])
def test_incoherent_cors_stops_start_up(cors: dict[str, Any], field: str) -> None:
    from app.config import ConfigError, settings_from_mapping

    with pytest.raises(ConfigError, match=field):
        settings_from_mapping({"server": {"cors": cors}}, environ={})
