"""Sticky sessions on two real llama.cpp replicas of one model: a conversation's turns stay
on one replica, whose KV cache then serves most of each prompt (llama.cpp's own
``timings.cache_n``); one table for every worker through a real Redis. The figures for many
conversations, sticky against plain least-busy, come from ``python -m bench.sticky``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from .procs import LlamaServer, Proxy, running

pytestmark = pytest.mark.integration

ALIAS = "gemma-sticky"
SYSTEM = ("You are a patient tutor who explains the weather of European cities to "
          "children, in two short sentences, with one fact about clouds each time.")


@pytest.fixture(scope="module")
def replicas() -> Iterator[dict[str, LlamaServer]]:
    with running({name: LlamaServer(["--alias", ALIAS, "--n-parallel", "2", "--n-ctx",
                                     "4096", "--threads", "1"]) for name in ("r1", "r2")}
                 ) as servers:
        yield dict(servers)


def sticky_config(replicas: dict[str, LlamaServer], **extra: Any) -> dict[str, Any]:
    return {"endpoints": [{"url": server.url, "name": name}
                          for name, server in replicas.items()],
            "proxy": {"sticky_sessions": {"enabled": True}}, **extra}


def converse(proxy: Proxy, turns: int, opening: str) -> list[requests.Response]:
    """One conversation: each turn adds the reply and a new question."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]
    answers = []
    for turn in range(turns):
        answer = requests.post(proxy.url + "/olla/llamacpp/v1/chat/completions", timeout=60,
                               json={"model": ALIAS, "messages": messages, "max_tokens": 12,
                                     "temperature": 0})
        assert answer.status_code == 200, answer.text
        answers.append(answer)
        messages += [{"role": "assistant",
                      "content": answer.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"And what about day {turn + 2}?"}]
    return answers


def test_a_conversation_stays_on_one_replica_and_its_prompt_comes_from_the_cache(
        start_proxy: Callable[..., Proxy], replicas: dict[str, LlamaServer]) -> None:
    proxy = start_proxy(sticky_config(replicas))
    answers = converse(proxy, 4, "Is it raining in Oslo today?")
    outcomes = [a.headers["X-Olla-Sticky-Session"] for a in answers]
    assert outcomes == ["miss", "hit", "hit", "hit"]
    assert {a.headers["X-Olla-Sticky-Key-Source"] for a in answers} == {"prefix_hash"}
    assert len({a.headers["X-Olla-Endpoint"] for a in answers}) == 1
    for later in answers[1:]:
        timings = later.json()["timings"]
        # Everything up to the new question was read before, on this replica.
        assert timings["cache_n"] > timings["prompt_n"], timings
    stats = requests.get(proxy.url + "/internal/stats/sticky", timeout=10).json()
    assert stats["enabled"] and stats["active_sessions"] == 1
    assert stats["outcomes"]["hit"] == 3 and stats["cache_hit_rate"] > 50
    [row] = stats["cache"]
    assert row["endpoint"] == answers[0].headers["X-Olla-Endpoint"]


def test_a_stopped_replica_is_repinned(start_proxy: Callable[..., Proxy],
                                       replicas: dict[str, LlamaServer]) -> None:
    """Killed (as a crash) and asked at once, before a probe noticed: the request fails
    over and the session moves. (Once a probe sees it down its sessions are purged, and
    the next turn is a miss: tests/test_sticky.py.)"""
    config = sticky_config(replicas)
    for endpoint in config["endpoints"]:
        endpoint["check_interval"] = "30s"
    proxy = start_proxy(config)
    first = converse(proxy, 1, "Is it windy in Lisbon?")[0]
    pinned = first.headers["X-Olla-Endpoint"]
    replicas[pinned].kill()
    try:
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "Is it windy in Lisbon?"},
                    {"role": "assistant", "content": "Yes."},
                    {"role": "user", "content": "And tomorrow?"}]
        again = requests.post(proxy.url + "/olla/llamacpp/v1/chat/completions", timeout=60,
                              json={"model": ALIAS, "messages": messages, "max_tokens": 4})
        assert again.status_code == 200
        assert again.headers["X-Olla-Sticky-Session"] == "repin"
        assert again.headers["X-Olla-Endpoint"] != pinned
    finally:
        replicas[pinned].start().wait()


def test_workers_share_one_table_through_redis(
        start_proxy: Callable[..., Proxy], replicas: dict[str, LlamaServer],
        redis_url: str) -> None:
    proxy = start_proxy(sticky_config(replicas, state={"redis_url": redis_url}),
                        extra_args=["--workers", "2"])
    answers = converse(proxy, 6, "Will it snow in Vienna?")
    assert [a.headers["X-Olla-Sticky-Session"] for a in answers] == ["miss"] + ["hit"] * 5
    assert len({a.headers["X-Olla-Endpoint"] for a in answers}) == 1
    # Hits are counted in each worker and sent to Redis once a second.
    deadline = time.monotonic() + 5
    while True:
        stats = requests.get(proxy.url + "/internal/stats/sticky", timeout=10).json()
        if stats["outcomes"]["hit"] == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["shared"] is True and stats["active_sessions"] == 1
    assert stats["outcomes"] == {"hit": 5, "miss": 1, "repin": 0, "spill": 0,
                                 "disabled": 0}

