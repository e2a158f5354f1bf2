"""Sticky sessions (app/sticky.py): keys, the session tables, and what the proxy does with
them (against fake upstreams; the real KV-cache figures are in the integration tests)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from app.config import ConfigError, StateSettings, StickySettings, settings_from_mapping
from app.leases import Lease
from app.registry import Status
from app.services import services_of
from app.shared import SharedTable
from app.sticky import (
    LocalSessions,
    Pin,
    RedisSessions,
    SessionKey,
    Sticky,
    conversation_start,
    session_key,
)

from .conftest import add_llamacpp

A_URL, B_URL = "http://a.test:8080", "http://b.test:8080"
MODEL = "gemma"
SYSTEM = {"role": "system", "content": "You answer questions about the weather."}


def turns(n: int, first: str = "Is it raining in Paris?") -> list[dict[str, str]]:
    """A conversation's messages at its n-th turn (1-based)."""
    messages = [SYSTEM, {"role": "user", "content": first}]
    for i in range(1, n):
        messages += [{"role": "assistant", "content": f"answer {i}"},
                     {"role": "user", "content": f"question {i + 1}"}]
    return messages


# ------------------------------------------------------------------------------------ keys

def test_a_conversation_keeps_its_start_from_turn_to_turn() -> None:
    starts = {conversation_start({"messages": turns(n)}, 512) for n in (1, 2, 6)}
    assert len(starts) == 1
    other = conversation_start({"messages": turns(3, first="And in Rome?")}, 512)
    assert other not in starts


def test_the_start_is_cut_to_prefix_hash_bytes() -> None:
    start = conversation_start({"messages": [{"role": "user", "content": "x" * 5000}]}, 64)
    assert start is not None and len(start) == 64


def test_the_start_of_anthropic_and_responses_and_completion_bodies() -> None:
    anthropic = conversation_start({"system": "Be brief.", "messages": turns(2)[1:]}, 512)
    assert anthropic is not None and anthropic.startswith(b'"Be brief."')
    responses_api = conversation_start({"instructions": "Be brief.",
                                        "input": [{"role": "user", "content": "hi"}]}, 512)
    assert responses_api == b'"Be brief."{"role":"user","content":"hi"}'
    assert conversation_start({"prompt": "Once upon a time"}, 512) == b'"Once upon a time"'
    assert conversation_start({"prompt": ""}, 512) is None
    assert conversation_start({"messages": []}, 512) is None


def settings(**values: Any) -> StickySettings:
    return StickySettings(enabled=True, **values)


def test_key_sources_are_tried_in_order_and_hashed() -> None:
    payload = {"messages": turns(1)}
    by_header = session_key(settings(), MODEL, "conv-7", payload, "10.0.0.1", "sk-1")
    assert by_header is not None and by_header.source == "session_header"
    by_prefix = session_key(settings(), MODEL, "", payload, "10.0.0.1", "sk-1")
    assert by_prefix is not None and by_prefix.source == "prefix_hash"
    by_auth = session_key(settings(), MODEL, "", {}, "10.0.0.1", "sk-1")
    assert by_auth is not None and by_auth.source == "auth_header"
    assert session_key(settings(), MODEL, "", {}, "10.0.0.1", None) is None
    by_ip = session_key(settings(key_sources=("ip",)), MODEL, "", payload, "10.0.0.1", None)
    assert by_ip is not None and by_ip.source == "ip"
    for found in (by_header, by_prefix, by_auth, by_ip):
        assert len(found.key) == 32 and "conv" not in found.key and "sk-1" not in found.key


def test_keys_are_scoped_per_model_and_source() -> None:
    payload = {"messages": turns(1)}
    one = session_key(settings(), "gemma", "conv-7", payload, "", None)
    same = session_key(settings(), "Gemma", "conv-7", payload, "", None)
    other_model = session_key(settings(), "qwen", "conv-7", payload, "", None)
    assert one is not None and same is not None and other_model is not None
    assert one.key == same.key != other_model.key
    as_ip = session_key(settings(key_sources=("ip",)), "gemma", "", {}, "conv-7", None)
    assert as_ip is not None and as_ip.key != one.key


# --------------------------------------------------------------------------- the tables

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_local_sessions_slide_their_idle_ttl() -> None:
    clock = FakeClock()
    table = LocalSessions(settings(idle_ttl_seconds=10), clock)
    table.record("k", "a", "miss")
    clock.now = 9
    assert table.lookup("k") == "a"            # used: its 10 s start again
    clock.now = 18
    assert table.lookup("k") == "a"
    clock.now = 29
    assert table.lookup("k") is None
    figures = table.figures()
    assert (figures["hits"], figures["misses"], figures["evictions"]) == (2, 1, 1)
    assert figures["insertions"] == 1 and figures["active_sessions"] == 0


def test_local_sessions_drop_the_least_recently_used_beyond_max_sessions() -> None:
    table = LocalSessions(settings(max_sessions=2), FakeClock())
    table.record("one", "a", "miss")
    table.record("two", "a", "miss")
    assert table.lookup("one") == "a"          # "two" is now the least recently used
    table.record("three", "b", "miss")
    assert table.lookup("two") is None
    assert table.lookup("one") == "a" and table.lookup("three") == "b"
    assert table.figures()["evictions"] == 1


def test_purging_an_endpoint_forgets_only_its_sessions() -> None:
    table = LocalSessions(settings(), FakeClock())
    table.record("one", "a", "miss")
    table.record("two", "b", "miss")
    assert table.purge("a") == 1
    assert table.lookup("one") is None and table.lookup("two") == "b"


def test_outcomes() -> None:
    sticky = Sticky(settings(), LocalSessions(settings(), FakeClock()))
    session = SessionKey("k", "prefix_hash")
    assert sticky.served(None, "a", False) == "disabled"
    assert sticky.served(sticky.pin(session), "a", False) == "miss"
    assert sticky.served(sticky.pin(session), "a", True) == "hit"
    assert sticky.served(Pin(session, "a"), "b", True) == "spill"
    assert sticky.pin(session).pinned == "b"   # the session follows the freshest cache
    assert sticky.served(Pin(session, "b"), "a", False) == "repin"
    assert sticky.store.figures()["outcomes"] == {"hit": 1, "miss": 1, "repin": 1,
                                                  "spill": 1, "disabled": 1}


def test_redis_sessions_are_one_table_for_every_worker(redis_url: str) -> None:
    state = StateSettings(redis_url=redis_url)
    config = settings(idle_ttl_seconds=600, max_sessions=2)
    one = RedisSessions(config, SharedTable(state, "w1"), LocalSessions(config))
    two = RedisSessions(config, SharedTable(state, "w2"), LocalSessions(config))
    one.record("k1", "a", "miss")
    assert two.lookup("k1") == "a"
    two.record("k1", "b", "spill")
    assert one.lookup("k1") == "b"
    one.record("k2", "a", "miss")
    one.record("k3", "a", "miss")              # over max_sessions: the oldest goes
    assert two.lookup("k1") is None
    assert one.purge("a") == 2
    figures = two.figures()
    assert figures["shared"] is True and figures["active_sessions"] == 0
    assert figures["insertions"] == 3 and figures["evictions"] == 3
    assert figures["outcomes"]["spill"] == 1 and figures["outcomes"]["miss"] == 3
    # Outcomes that change no pin are counted in the worker, sent once a second.
    one.count("hit")
    one.count("hit")
    assert one.figures()["outcomes"]["hit"] == 2 and two.figures()["outcomes"]["hit"] == 0
    one.flush()
    assert two.figures()["outcomes"]["hit"] == 2 and one.figures()["outcomes"]["hit"] == 2


def test_redis_sessions_fall_back_to_this_worker_while_redis_is_down() -> None:
    state = StateSettings(redis_url="redis://127.0.0.1:1/0")
    config = settings()
    table = RedisSessions(config, SharedTable(state, "w1"), LocalSessions(config))
    table.record("k", "a", "miss")
    assert table.lookup("k") == "a"
    table.count("hit")
    table.flush()
    figures = table.figures()
    assert figures["shared"] is False and figures["outcomes"]["hit"] == 1


# ------------------------------------------------------------------------------- config

def test_config_keys_and_defaults() -> None:
    default = settings_from_mapping({}, environ={}).proxy.sticky_sessions
    assert (default.enabled, default.idle_ttl_seconds, default.max_sessions,
            default.key_sources, default.prefix_hash_bytes, default.spill_after) == (
        False, 600, 10000, ("session_header", "prefix_hash", "auth_header"), 512, 5.0)
    given = settings_from_mapping({"proxy": {"sticky_sessions": {
        "enabled": True, "key_sources": ["ip"], "spill_after": "250ms"}}},
        environ={}).proxy.sticky_sessions
    assert given.enabled and given.key_sources == ("ip",) and given.spill_after == 0.25
    with pytest.raises(ConfigError, match="key_sources"):
        settings_from_mapping({"proxy": {"sticky_sessions": {"key_sources": ["cookie"]}}},
                              environ={})


# ------------------------------------------------------------------------ through the app

@pytest.fixture
def replicas(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> Flask:
    """Two fake servers of one model (2 slots each), sticky sessions on."""
    for url in (A_URL, B_URL):
        add_llamacpp(fake, url, MODEL)
        fake.post(url + "/v1/chat/completions", json={
            "choices": [], "usage": {"prompt_tokens": 40,
                                     "prompt_tokens_details": {"cached_tokens": 30}},
            "timings": {"cache_n": 30, "prompt_n": 10}})
    return make_app({
        "endpoints": [{"url": A_URL, "name": "a"}, {"url": B_URL, "name": "b"}],
        "proxy": {"assemble_non_streamed": False,
                  "sticky_sessions": {"enabled": True, "spill_after": "50ms"}}})


def chat(client: FlaskClient, n: int, **headers: str) -> Any:
    return client.post("/olla/llamacpp/v1/chat/completions", headers=headers,
                       data=json.dumps({"model": MODEL, "messages": turns(n)}))


def hold(app: Flask, endpoint: str, count: int) -> list[Lease]:
    """Take ``count`` slots on an endpoint, as other requests would."""
    svc = services_of(app)
    state = svc.registry.states[endpoint]
    return [svc.dispatcher.acquire(MODEL, [state]) for _ in range(count)]


def test_the_next_turn_goes_where_the_last_one_went(replicas: Flask) -> None:
    client = replicas.test_client()
    first = chat(client, 1)
    assert first.status_code == 200
    assert first.headers["X-Olla-Sticky-Session"] == "miss"
    assert first.headers["X-Olla-Sticky-Key-Source"] == "prefix_hash"
    pinned = first.headers["X-Olla-Endpoint"]
    hold(replicas, pinned, 1)  # least-busy alone would now pick the other one
    for n in (2, 3):
        answer = chat(client, n)
        assert answer.headers["X-Olla-Sticky-Session"] == "hit"
        assert answer.headers["X-Olla-Endpoint"] == pinned
    stats = client.get("/internal/stats/sticky").get_json()
    assert (stats["enabled"], stats["active_sessions"], stats["insertions"]) == (True, 1, 1)
    assert stats["outcomes"]["hit"] == 2 and stats["outcomes"]["miss"] == 1
    assert stats["cache_hit_rate"] == 75.0     # 30 of 40 prompt tokens, as llama.cpp said
    assert {row["endpoint"] for row in stats["cache"]} == {pinned}


def test_a_busy_pinned_endpoint_spills_to_a_free_one_after_spill_after(
        replicas: Flask) -> None:
    client = replicas.test_client()
    pinned = chat(client, 1).headers["X-Olla-Endpoint"]
    hold(replicas, pinned, 2)  # both its slots
    answer = chat(client, 2)
    assert answer.headers["X-Olla-Sticky-Session"] == "spill"
    assert answer.headers["X-Olla-Endpoint"] != pinned
    moved = chat(client, 3)  # the session followed the freshest cache
    assert moved.headers["X-Olla-Sticky-Session"] == "hit"
    assert moved.headers["X-Olla-Endpoint"] == answer.headers["X-Olla-Endpoint"]


def test_a_turn_waiting_for_its_busy_endpoint_takes_the_slot_freed_there(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    for url in (A_URL, B_URL):
        add_llamacpp(fake, url, MODEL)
        fake.post(url + "/v1/chat/completions", json={"choices": []})
    app = make_app({
        "endpoints": [{"url": A_URL, "name": "a"}, {"url": B_URL, "name": "b"}],
        "proxy": {"assemble_non_streamed": False,
                  "sticky_sessions": {"enabled": True, "spill_after": "30s"}}})
    client = app.test_client()
    pinned = chat(client, 1).headers["X-Olla-Endpoint"]
    held = hold(app, pinned, 2)
    svc = services_of(app)
    threading.Timer(0.2, svc.dispatcher.release, [held[0]]).start()
    answer = chat(client, 2)  # would spill after 30 s; the slot frees long before
    assert answer.headers["X-Olla-Sticky-Session"] == "hit"
    assert answer.headers["X-Olla-Endpoint"] == pinned
    svc.dispatcher.release(held[1])


def test_an_endpoint_that_stops_being_routable_is_repinned_and_purged(
        replicas: Flask) -> None:
    client = replicas.test_client()
    pinned = chat(client, 1).headers["X-Olla-Endpoint"]
    svc = services_of(replicas)
    state = svc.registry.states[pinned]
    state.status = Status.OFFLINE
    answer = chat(client, 2)
    assert answer.headers["X-Olla-Sticky-Session"] == "repin"
    assert answer.headers["X-Olla-Endpoint"] != pinned
    other = chat(client, 1, **{"X-Olla-Session-ID": "conv-9"})
    assert other.headers["X-Olla-Session-ID"] == "conv-9"
    assert other.headers["X-Olla-Sticky-Key-Source"] == "session_header"
    assert svc.sticky is not None
    svc.sticky.health_changed([svc.registry.states[answer.headers["X-Olla-Endpoint"]]])
    assert svc.sticky.store.figures()["active_sessions"] == 2
    new = svc.registry.states[answer.headers["X-Olla-Endpoint"]]
    new.status = Status.OFFLINE
    svc.sticky.health_changed([new])           # routable -> not: its sessions go
    assert svc.sticky.store.figures()["active_sessions"] == 0


def test_no_key_is_disabled_and_sticky_off_sends_no_headers(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, A_URL, MODEL)
    fake.post(A_URL + "/v1/chat/completions", json={"choices": []})
    header_only = make_app({
        "endpoints": [{"url": A_URL, "name": "a"}],
        "proxy": {"assemble_non_streamed": False,
                  "sticky_sessions": {"enabled": True, "key_sources": ["session_header"]}}})
    answer = chat(header_only.test_client(), 1)
    assert answer.status_code == 200
    assert answer.headers["X-Olla-Sticky-Session"] == "disabled"
    assert "X-Olla-Sticky-Key-Source" not in answer.headers
    assert "X-Olla-Session-ID" not in answer.headers
    off = make_app({"endpoints": [{"url": A_URL, "name": "a"}],
                    "proxy": {"assemble_non_streamed": False}}).test_client()
    plain = chat(off, 1)
    assert plain.status_code == 200
    assert not [k for k, _ in plain.headers if k.startswith("X-Olla-Sticky")]
    assert off.get("/internal/stats/sticky").get_json() == {"enabled": False}
