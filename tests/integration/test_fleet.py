"""Many llama.cpp servers as one: three instances with different aliases, one of them
duplicated, behind the proxy; routing by model, balancing, failover and recovery."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from .procs import LlamaServer, Proxy, running

pytestmark = pytest.mark.integration

CHAT, CODE, EMBED = "fleet-chat", "fleet-code", "fleet-embed"
RESULTS: dict[str, Any] = {}  # figures for the closing note, printed at the end


@pytest.fixture(scope="module")
def fleet() -> Iterator[dict[str, LlamaServer]]:
    with running({
        "chat-1": LlamaServer(["--alias", CHAT, "--n-parallel", "2", "--threads", "1"]),
        "chat-2": LlamaServer(["--alias", CHAT, "--n-parallel", "2", "--threads", "1"]),
        "code": LlamaServer(["--alias", CODE, "--n-parallel", "1", "--threads", "1"]),
        "embed": LlamaServer(["--alias", EMBED, "--embedding", "--n-parallel", "1",
                              "--threads", "1"]),
    }) as servers:
        yield dict(servers)


@pytest.fixture(scope="module")
def fleet_proxy(fleet: dict[str, LlamaServer],
                start_proxy: Callable[..., Proxy]) -> Proxy:
    proxy = start_proxy({
        "proxy": {"load_balancer": "least-connections"},
        "endpoints": [{"url": server.url, "name": name, "type": "llamacpp", "priority": 50,
                       "check_interval": "1s", "check_timeout": "1s"}
                      for name, server in fleet.items()]})
    wait_until(lambda: all(e["status"] == "healthy" for e in endpoints(proxy)), 20)
    return proxy


def endpoints(proxy: Proxy) -> list[dict[str, Any]]:
    response = requests.get(f"{proxy.url}/internal/status/endpoints", timeout=5)
    response.raise_for_status()
    return response.json()["endpoints"]  # type: ignore[no-any-return]


def status_of(proxy: Proxy, name: str) -> str:
    return next(e["status"] for e in endpoints(proxy) if e["name"] == name)


def wait_until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition`` held; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def chat(proxy: Proxy, model: str, stream: bool) -> tuple[int, str, float]:
    """One chat request; (status, endpoint, seconds). A stream must end with [DONE]."""
    started = time.monotonic()
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "stream": stream}
    with requests.post(f"{proxy.url}/olla/llamacpp/v1/chat/completions", json=body,
                       stream=stream, timeout=60) as response:
        if stream and response.status_code == 200:
            events = [line for line in response.iter_lines() if line.startswith(b"data: ")]
            if not events or events[-1] != b"data: [DONE]" or any(b'"error"' in e
                                                                  for e in events):
                return 599, response.headers.get("X-Olla-Endpoint", ""), 0.0
        elif response.status_code == 200:
            assert json.loads(response.content)["choices"][0]["message"]
        return (response.status_code, response.headers.get("X-Olla-Endpoint", ""),
                time.monotonic() - started)


def test_requests_go_to_the_servers_of_their_model(fleet_proxy: Proxy) -> None:
    seen: dict[str, set[str]] = {CHAT: set(), CODE: set(), EMBED: set()}
    for _ in range(6):
        for model in (CHAT, CODE):
            status, endpoint, _ = chat(fleet_proxy, model, stream=False)
            assert status == 200
            seen[model].add(endpoint)
        response = requests.post(f"{fleet_proxy.url}/olla/llamacpp/v1/embeddings",
                                 json={"model": EMBED, "input": "x"}, timeout=30)
        assert response.status_code == 200
        seen[EMBED].add(response.headers["X-Olla-Endpoint"])
    assert seen == {CHAT: {"chat-1", "chat-2"}, CODE: {"code"}, EMBED: {"embed"}}


def test_unknown_model_and_listing(fleet_proxy: Proxy) -> None:
    ids = sorted(m["id"] for m in requests.get(
        f"{fleet_proxy.url}/olla/llamacpp/v1/models", timeout=5).json()["data"])
    assert ids == sorted([CHAT, CODE, EMBED])
    status, _, _ = chat(fleet_proxy, "nobody-serves-this", stream=False)
    assert status == 404


def test_killed_endpoint_fails_over_and_comes_back(fleet_proxy: Proxy,
                                                  fleet: dict[str, LlamaServer]) -> None:
    victim = fleet["chat-2"]
    victim.kill()
    killed_at = time.monotonic()
    with ThreadPoolExecutor(max_workers=51) as pool:
        # Watch the status route while the flood runs: when is the victim marked offline?
        marked = pool.submit(wait_until, lambda: status_of(fleet_proxy, "chat-2") == "offline",
                             15)
        results = list(pool.map(lambda i: chat(fleet_proxy, CHAT, stream=i % 2 == 0),
                                range(50)))
        marked_after = marked.result()
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 50}, statuses
    assert {endpoint for _, endpoint, _ in results} == {"chat-1"}
    RESULTS["failover"] = {"sent": 50, "failed": 50 - statuses[200],
                           "slowest_s": round(max(s for _, _, s in results), 2),
                           "flood_s": round(time.monotonic() - killed_at, 2),
                           "marked_offline_after_kill_s": round(marked_after, 2)}

    victim.start().wait()
    restarted_at = time.monotonic()
    back = wait_until(lambda: status_of(fleet_proxy, "chat-2") == "healthy", 20)

    def routed_again() -> bool:
        return chat(fleet_proxy, CHAT, stream=False)[1] == "chat-2"

    wait_until(routed_again, 5)
    RESULTS["recovery"] = {"healthy_after_restart_s": round(back, 2),
                           "routed_after_restart_s": round(time.monotonic() - restarted_at, 2)}
    assert back < 20
    print("\nFLEET FIGURES", json.dumps(RESULTS))
