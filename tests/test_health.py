"""The health state machine, driven without sleeping: fake probes and a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests
import responses

from app.config import Endpoint, ProxySettings
from app.health import (
    BACKOFF_CAP,
    LOADING_RECHECK,
    Probe,
    backoff,
    check_once,
    classify,
    mark_failed,
    probe,
    record,
)
from app.registry import EndpointState, Registry, Status
from app.upstream import UpstreamPool

from .conftest import add_llamacpp

URL = "http://node.test:8080"


def registry_of(*endpoints: Endpoint) -> Registry:
    return Registry(endpoints, UpstreamPool(endpoints, ProxySettings()))


def scripted(*results: Probe) -> Callable[[UpstreamPool, Endpoint], Probe]:
    """A probe function answering with the given results in turn."""
    queue = list(results)

    def fake(pool: UpstreamPool, endpoint: Endpoint) -> Probe:
        return queue.pop(0)

    return fake


HEALTHY = Probe(Status.HEALTHY, "", 1.0)
OFFLINE = Probe(Status.OFFLINE, "connection refused")
LOADING = Probe(Status.LOADING, "llama.cpp is loading its model", 1.0)


@pytest.mark.parametrize(("code", "body", "expected"), [
    (200, b'{"status":"ok"}', Status.HEALTHY),
    (503, b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}',
     Status.LOADING),
    (401, b'{"error":{"message":"Invalid API Key"}}', Status.AUTH_ERROR),
    (403, b"forbidden", Status.AUTH_ERROR),
    (500, b"boom", Status.UNHEALTHY),
    (503, b"upstream overloaded", Status.UNHEALTHY),
    (404, b"not found", Status.UNHEALTHY),
])
def test_classify(code: int, body: bytes, expected: Status) -> None:
    status, detail = classify(code, body)
    assert status is expected
    assert (detail == "") == (expected is Status.HEALTHY)


def test_auth_error_says_the_key_is_the_problem() -> None:
    assert "API key" in classify(401, b"")[1]


def test_backoff_doubles_and_caps_at_60s() -> None:
    assert [backoff(5.0, n) for n in range(0, 7)] == [5.0, 5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert backoff(1.0, 20) == BACKOFF_CAP


def test_failures_back_off_and_one_good_probe_recovers() -> None:
    state = EndpointState(Endpoint(name="a", url=URL, check_interval=5.0))
    assert record(state, HEALTHY, now=0.0) is True          # unknown -> healthy
    assert state.routable and state.next_check == 5.0
    for n, expected_wait in enumerate([5.0, 10.0, 20.0, 40.0, 60.0, 60.0], start=1):
        assert record(state, OFFLINE, now=100.0) is False
        assert state.status is Status.OFFLINE and state.failures == n
        assert state.next_check == 100.0 + expected_wait
    assert record(state, HEALTHY, now=200.0) is True
    assert state.failures == 0 and state.routable and state.next_check == 205.0


def test_loading_is_not_routable_and_not_a_failure() -> None:
    state = EndpointState(Endpoint(name="a", url=URL, check_interval=5.0))
    record(state, LOADING, now=10.0)
    assert state.status is Status.LOADING and not state.routable
    assert state.failures == 0
    assert state.next_check == 10.0 + LOADING_RECHECK
    assert record(state, HEALTHY, now=11.0) is True


def test_check_once_probes_only_what_is_due() -> None:
    a = Endpoint(name="a", url="http://a.test:1", check_interval=5.0)
    b = Endpoint(name="b", url="http://b.test:1", check_interval=5.0)
    registry = registry_of(a, b)
    registry.discover = lambda state: True  # type: ignore[method-assign]
    probed: list[str] = []

    def fake(pool: UpstreamPool, endpoint: Endpoint) -> Probe:
        probed.append(endpoint.name)
        return HEALTHY if endpoint.name == "a" else OFFLINE

    assert sorted(check_once(registry, now=0.0, probe_fn=fake)) == ["a", "b"]
    assert check_once(registry, now=4.9, probe_fn=fake) == []
    # b failed once: probed again after the interval, then after twice the interval.
    assert sorted(check_once(registry, now=5.0, probe_fn=fake)) == ["a", "b"]
    assert check_once(registry, now=10.0, probe_fn=fake) == ["a"]
    assert check_once(registry, now=14.9, probe_fn=fake) == []
    assert sorted(check_once(registry, now=15.0, probe_fn=fake)) == ["a", "b"]
    assert probed.count("b") == 3
    assert registry.states["a"].routable and not registry.states["b"].routable


def test_check_once_rediscovers_on_recovery_and_when_stale() -> None:
    registry = registry_of(Endpoint(name="a", url=URL, check_interval=1.0))
    registry.discovery_interval = 30.0
    discovered: list[float] = []
    state = registry.states["a"]

    def discover(s: EndpointState) -> bool:
        discovered.append(clock)
        s.discovered_at = clock
        return True

    registry.discover = discover  # type: ignore[method-assign]
    fake = scripted(HEALTHY, HEALTHY, OFFLINE, HEALTHY, HEALTHY, HEALTHY)
    clock = 0.0
    check_once(registry, now=clock, probe_fn=fake)     # first healthy: discover
    clock = 1.0
    check_once(registry, now=clock, probe_fn=fake)     # fresh: no discovery
    clock = 2.0
    check_once(registry, now=clock, probe_fn=fake)     # offline
    clock = 3.0
    check_once(registry, now=clock, probe_fn=fake)     # recovered: discover
    clock = 4.0
    check_once(registry, now=clock, probe_fn=fake)
    clock = 40.0
    check_once(registry, now=clock, probe_fn=fake)     # stale (>30 s): discover
    assert discovered == [0.0, 3.0, 40.0]
    assert state.routable


def test_request_failure_marks_offline_until_next_probe() -> None:
    state = EndpointState(Endpoint(name="a", url=URL, check_interval=2.0))
    record(state, HEALTHY, now=0.0)
    mark_failed(state, Status.OFFLINE, "refused", now=1.0)
    assert state.status is Status.OFFLINE and not state.routable
    assert state.failures == 1 and state.next_check == 3.0
    mark_failed(state, Status.OFFLINE, "refused again", now=1.5)   # same outage: no escalation
    assert state.failures == 1
    record(state, HEALTHY, now=3.0)
    assert state.routable


def test_request_seeing_loading_rechecks_soon() -> None:
    state = EndpointState(Endpoint(name="a", url=URL, check_interval=5.0))
    record(state, HEALTHY, now=0.0)
    mark_failed(state, Status.LOADING, "loading", now=2.0)
    assert state.status is Status.LOADING and state.failures == 0
    assert state.next_check == 2.0 + LOADING_RECHECK


def test_probe_against_fake_http(fake: responses.RequestsMock) -> None:
    endpoint = Endpoint(name="a", url=URL, headers={"X-Api-Key": "k"})
    pool = UpstreamPool((endpoint,), ProxySettings())
    fake.get(URL + "/health", json={"status": "ok"})
    assert probe(pool, endpoint).status is Status.HEALTHY
    assert fake.calls[0].request.headers["X-Api-Key"] == "k"
    fake.replace(responses.GET, URL + "/health", status=503,
                 json={"error": {"code": 503, "message": "Loading model",
                                 "type": "unavailable_error"}})
    assert probe(pool, endpoint).status is Status.LOADING
    fake.replace(responses.GET, URL + "/health",
                 body=requests.ConnectionError(ConnectionRefusedError(111, "Connection refused")))
    assert probe(pool, endpoint).status is Status.OFFLINE
    fake.replace(responses.GET, URL + "/health", body=requests.ConnectTimeout("timed out"))
    assert probe(pool, endpoint).status is Status.OFFLINE


def test_custom_health_url_is_used(fake: responses.RequestsMock) -> None:
    endpoint = Endpoint(name="a", url=URL, health_check_url="/v1/health")
    pool = UpstreamPool((endpoint,), ProxySettings())
    fake.get(URL + "/v1/health", json={"status": "ok"})
    assert probe(pool, endpoint).status is Status.HEALTHY


def test_wrong_configured_key_is_auth_error_until_discovery_succeeds(
        fake: responses.RequestsMock) -> None:
    endpoint = Endpoint(name="a", url=URL, headers={"X-Api-Key": "wrong"})
    registry = registry_of(endpoint)
    fake.get(URL + "/v1/models", status=401,
             json={"error": {"message": "Invalid API Key", "type": "authentication_error"}})
    check_once(registry, now=0.0, probe_fn=scripted(HEALTHY, HEALTHY))
    state = registry.states["a"]
    assert state.status is Status.AUTH_ERROR and "API key" in state.detail
    assert not state.routable
    check_once(registry, now=100.0, probe_fn=scripted(HEALTHY))   # /health is open: still 401
    assert state.status is Status.AUTH_ERROR
    fake.replace(responses.GET, URL + "/v1/models", status=200,
                 json={"object": "list", "data": [{"id": "m", "object": "model"}]})
    fake.get(URL + "/props", json={"total_slots": 1})
    check_once(registry, now=200.0, probe_fn=scripted(HEALTHY, HEALTHY))
    check_once(registry, now=300.0, probe_fn=scripted(HEALTHY))
    assert state.routable and state.primary_model == "m"


def test_missing_key_in_config_keeps_routing(fake: responses.RequestsMock) -> None:
    """No key in the config: clients may bring their own, so the endpoint stays routable."""
    registry = registry_of(Endpoint(name="a", url=URL))
    fake.get(URL + "/v1/models", status=401, json={"error": {"message": "Invalid API Key"}})
    check_once(registry, now=0.0, probe_fn=scripted(HEALTHY))
    state = registry.states["a"]
    assert state.routable
    assert state.discovery_error is not None and "API key" in state.discovery_error


def test_restart_with_another_model_is_rediscovered(fake: responses.RequestsMock) -> None:
    registry = registry_of(Endpoint(name="a", url=URL, check_interval=1.0))
    add_llamacpp(fake, URL, "first.gguf")
    check_once(registry, now=0.0, probe_fn=scripted(HEALTHY))
    assert registry.states["a"].primary_model == "first.gguf"
    fake.replace(responses.GET, URL + "/v1/models",
                 json={"object": "list", "data": [{"id": "/m/second.gguf", "object": "model"}]})
    check_once(registry, now=1.0, probe_fn=scripted(OFFLINE))
    check_once(registry, now=2.0, probe_fn=scripted(HEALTHY))     # back: rediscovered
    assert registry.states["a"].primary_model == "second.gguf"


@pytest.mark.parametrize(("document", "busy"), [
    ([{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}], 1),
    ([{"id": 0, "state": 1}, {"id": 1, "state": 0}, {"id": 2, "state": 1}], 2),  # older builds
    ([], 0),
    ({"not": "a list"}, None),
    ([1, 2], None),
])
def test_busy_slots(document: object, busy: int | None) -> None:
    from app.health import busy_slots

    assert busy_slots(document) == busy


def test_slots_poll_counts_others_and_stops_when_refused(fake: responses.RequestsMock) -> None:
    from app.health import poll_slots

    endpoint = Endpoint(name="a", url=URL)
    pool = UpstreamPool((endpoint,), ProxySettings())
    state = EndpointState(endpoint)
    state.in_flight = 1
    fake.get(URL + "/slots", json=[{"id": 0, "is_processing": True},
                                   {"id": 1, "is_processing": True},
                                   {"id": 2, "is_processing": True}])
    poll_slots(pool, state)
    assert state.others_busy == 2 and state.slots_in_use == 3 and state.slots_polling
    fake.replace(responses.GET, URL + "/slots", status=501,
                 json={"error": {"code": 501, "message": "This server does not support slots",
                                 "type": "not_supported_error"}})
    poll_slots(pool, state)
    assert not state.slots_polling
    assert state.others_busy == 0 and state.slots_in_use == 1  # local counts alone
