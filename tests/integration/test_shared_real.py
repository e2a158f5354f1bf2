"""Capacity you can trust, on real parts: a real redis-server, real llama.cpp, real gunicorn
with 2 and 4 workers, and two gunicorn masters sharing one Redis.

- 3x oversubscription with 4 workers on a 2-slot llama.cpp: all complete, first tokens in
  arrival order across workers, llama.cpp's ``requests_deferred`` stays 0;
- two proxies (two masters) sharing one Redis never oversubscribe the server either, and
  either one's status shows the whole fleet;
- a worker SIGKILLed with streams in flight: its slots come back within the lease TTL;
- Redis stopped mid-load and started again: no request lost, nothing leaked, it rejoins;
- requests failing in each phase (header, body, upstream garbage, client gone, client
  stalled): every one answered, idle ``slots_in_use`` back to 0, the next request served;
- a non-streamed request whose client leaves frees its llama.cpp slot within 1 s.

Run with ``-s`` to see SHARED FIGURES (for the closing note).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests

from .gated_upstream import MODEL as GATED_MODEL
from .gated_upstream import GatedUpstream
from .procs import LlamaServer, Proxy, RedisServer, running
from .test_slots import (
    Outcome,
    Sampler,
    hang_up,
    new_tracebacks,
    read_until,
    wait_until,
)

pytestmark = pytest.mark.integration

ALIAS = "shared-2"
SLOTS = 2
COMPLETION = "/olla/llamacpp/completion"
FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    with running({"s": LlamaServer(["--alias", ALIAS, "--n-parallel", str(SLOTS),
                                    "--n-ctx", "4096", "--threads", "1"])}) as started:
        yield started["s"]


@pytest.fixture
def store(redis_store: RedisServer) -> RedisServer:
    """The run's real redis-server, empty (see tests/conftest.py)."""
    return redis_store


@pytest.fixture(scope="module", autouse=True)
def report_figures() -> Iterator[None]:
    yield
    if FIGURES:
        print("\nSHARED FIGURES", json.dumps(FIGURES))


def shared_proxy(start_proxy: Callable[..., Proxy], server: LlamaServer, store: RedisServer,
                 workers: int, **proxy: Any) -> Proxy:
    """A proxy with ``workers`` gunicorn workers sharing ``store``, ready: the endpoint
    healthy with its slots known, in every worker (each has its own health loop)."""
    started = start_proxy({
        "state": {"redis_url": store.url},
        "proxy": {"queue": {"max_size": 32, "timeout": "60s"}, **proxy},
        "endpoints": [{"url": server.url, "name": "llama", "check_interval": "1s",
                       "check_timeout": "1s"}]},
        extra_args=["--workers", str(workers)])

    def ready() -> bool:
        seen = [endpoint(started) for _ in range(4 * workers)]
        return all(e["status"] == "healthy" and e["total_slots"] == SLOTS for e in seen)

    wait_until(ready, 30)
    return started


def status(proxy: Proxy) -> dict[str, Any]:
    response = requests.get(proxy.url + "/internal/status", timeout=5)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def endpoint(proxy: Proxy) -> dict[str, Any]:
    response = requests.get(proxy.url + "/internal/status/endpoints", timeout=5)
    response.raise_for_status()
    return response.json()["endpoints"][0]  # type: ignore[no-any-return]


def idle(proxy: Proxy, server: LlamaServer, timeout: float = 20) -> float:
    """Seconds until nothing is held or waiting on any endpoint, as every worker (each
    asked a few times) and llama.cpp see it."""
    def check() -> bool:
        views = [e for _ in range(6) for e in requests.get(
            proxy.url + "/internal/status/endpoints", timeout=5).json()["endpoints"]]
        return (server.busy_slots() == 0
                and all(v["slots_in_use"] == 0 and v["leases"] == 0 for v in views)
                and status(proxy)["queue"]["depth"] == 0)

    try:
        return wait_until(check, timeout, step=0.1)
    except AssertionError:
        views = requests.get(proxy.url + "/internal/status/endpoints", timeout=5).json()
        raise AssertionError(f"not idle after {timeout} s: " + json.dumps(
            [{k: e[k] for k in ("name", "slots_in_use", "leases", "active_connections",
                                "status")} for e in views["endpoints"]])) from None


def stream(proxy: Proxy, index: int, start_at: float, n_predict: int = 40) -> Outcome:
    """A stream sent at ``start_at``: when its first token came, every event."""
    time.sleep(max(0.0, start_at - time.monotonic()))
    outcome = Outcome(index, sent=time.monotonic())
    body = {"model": ALIAS, "prompt": f"Request {index}: a long poem about the sea.",
            "n_predict": n_predict, "ignore_eos": True, "stream": True}
    with requests.post(proxy.url + COMPLETION, json=body, stream=True, timeout=90) as response:
        outcome.status = response.status_code
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                if outcome.first_token is None:
                    outcome.first_token = time.monotonic()
                outcome.events.append(json.loads(line[6:]))
    outcome.done = time.monotonic()
    return outcome


def check_complete(outcomes: list[Outcome], n_predict: int) -> None:
    for outcome in outcomes:
        assert outcome.status == 200, (outcome.index, outcome.status)
        assert not any("error" in e for e in outcome.events), outcome.events[-1:]
        assert outcome.events[-1]["stop"] is True
        assert outcome.events[-1]["timings"]["predicted_n"] == n_predict


def test_four_workers_three_times_oversubscribed(start_proxy: Callable[..., Proxy],
                                                 server: LlamaServer,
                                                 store: RedisServer) -> None:
    proxy = shared_proxy(start_proxy, server, store, workers=4)
    idle(proxy, server)
    count, n_predict = 3 * SLOTS, 40
    with Sampler(server.metrics) as llama, \
            Sampler(lambda: status(proxy)["queue"]["depth"]) as depth:
        time.sleep(0.2)
        start = time.monotonic() + 0.1
        with ThreadPoolExecutor(max_workers=count) as pool:
            outcomes = list(pool.map(lambda k: stream(proxy, k, start + 0.15 * k, n_predict),
                                     range(count)))
    assert not llama.errors and not depth.errors
    check_complete(outcomes, n_predict)
    first = [o.first_token for o in outcomes]
    assert all(t is not None for t in first)
    for k in range(count - SLOTS):   # FIFO across the 4 workers: k starts before k + slots
        assert first[k] < first[k + SLOTS], [round(t - start, 2) for t in first]  # type: ignore[operator]
    deferred = max(s["requests_deferred"] for s in llama.samples)
    processing = max(s["requests_processing"] for s in llama.samples)
    assert deferred == 0, "llama.cpp queued requests itself: the workers oversubscribed it"
    assert processing == SLOTS
    assert max(depth.samples) > 0    # the fleet's queue, seen by whichever worker answered
    FIGURES["4_workers_3x"] = {
        "first_token_s": [round(t - start, 2) for t in first],  # type: ignore[operator]
        "max_requests_deferred": deferred, "max_queue_depth": max(depth.samples)}
    idle(proxy, server)
    proxy.stop()


def test_two_masters_share_one_redis(start_proxy: Callable[..., Proxy], server: LlamaServer,
                                     store: RedisServer) -> None:
    one = shared_proxy(start_proxy, server, store, workers=2)
    two = shared_proxy(start_proxy, server, store, workers=2)
    idle(one, server)
    count, n_predict = 8, 24
    seen_in_use: list[int] = []
    scraped: list[float] = []
    with Sampler(server.metrics) as llama, \
            Sampler(lambda: seen_in_use.append(endpoint(two)["slots_in_use"])), \
            Sampler(lambda: scraped.append(slots_in_use_metric(two))):
        start = time.monotonic() + 0.1
        with ThreadPoolExecutor(max_workers=count) as pool:
            outcomes = list(pool.map(
                lambda k: stream(one if k % 2 else two, k, start + 0.05 * k, n_predict),
                range(count)))
    check_complete(outcomes, n_predict)
    deferred = max(s["requests_deferred"] for s in llama.samples)
    assert deferred == 0, "two proxy hosts together oversubscribed llama.cpp"
    assert max(seen_in_use) == SLOTS   # `two` also counts the slots `one` holds
    assert max(scraped) == SLOTS       # and so does its /internal/metrics
    FIGURES["two_masters"] = {"requests": count, "max_requests_deferred": deferred}
    idle(one, server)
    idle(two, server)
    one.stop()
    two.stop()


def slots_in_use_metric(proxy: Proxy) -> float:
    """``olla_endpoint_slots_in_use`` as one scrape of ``proxy`` says."""
    text = requests.get(proxy.url + "/internal/metrics", timeout=5).text
    found = re.search(r'^olla_endpoint_slots_in_use\{endpoint="llama"\} (\S+)$', text, re.M)
    assert found is not None, text[-2000:]
    return float(found.group(1))


def lease_owners(store: RedisServer) -> list[int]:
    """The pids of the workers holding leases now (from the shared table itself)."""
    client = redis.Redis.from_url(store.url, decode_responses=True)
    try:
        infos = client.hgetall("olla:lease_info")
    finally:
        client.close()
    return [int(info.split("\t")[1].split(":")[1]) for info in infos.values()]


def test_sigkilled_worker_gives_its_slots_back_within_the_ttl(
        start_proxy: Callable[..., Proxy], server: LlamaServer, store: RedisServer) -> None:
    proxy = shared_proxy(start_proxy, server, store, workers=2)
    idle(proxy, server)
    body = {"model": ALIAS, "prompt": "A very long story.", "n_predict": 2000,
            "ignore_eos": True, "stream": True}
    socks = []
    for _ in range(SLOTS):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        payload = json.dumps(body).encode()
        sock.sendall((f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
                     + payload)
        read_until(sock, b"data: ")
        socks.append(sock)
    owners = lease_owners(store)
    assert len(owners) == SLOTS
    victim = owners[0]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    for sock in socks:          # the survivor's stream ends with its client; the victim's
        hang_up(sock, "close")  # leases stay in Redis until they expire
    back = wait_until(lambda: not lease_owners(store), 20, step=0.05)
    assert back <= 8.0 + 1.5, f"slots back only {back:.1f} s after the SIGKILL (TTL 8 s)"
    assert victim not in lease_owners(store)
    FIGURES["sigkill_slots_back_after_s"] = round(back, 2)
    after = requests.post(proxy.url + COMPLETION, json={"model": ALIAS, "prompt": "hi",
                                                         "n_predict": 4}, timeout=30)
    assert after.status_code == 200  # the master's new worker, or the survivor, serves
    idle(proxy, server)
    assert time.monotonic() - killed < 30
    proxy.stop()


def test_redis_restart_mid_load_loses_nothing(start_proxy: Callable[..., Proxy],
                                              server: LlamaServer,
                                              store: RedisServer) -> None:
    proxy = shared_proxy(start_proxy, server, store, workers=2)
    idle(proxy, server)
    log_from = len(proxy.log())
    results: list[tuple[str, int, bool]] = []
    stop_at = time.monotonic() + 7.0

    def client(k: int) -> None:
        while time.monotonic() < stop_at:
            streamed = k % 2 == 0
            body = {"model": ALIAS, "prompt": f"client {k}", "n_predict": 8,
                    "ignore_eos": True, "stream": streamed}
            try:
                response = requests.post(proxy.url + COMPLETION, json=body, timeout=60)
                complete = (b'"stop":true' in response.content if streamed
                            else response.json().get("tokens_predicted") == 8)
                results.append(("stream" if streamed else "whole", response.status_code,
                                complete))
            except requests.RequestException as exc:
                results.append((f"error {exc!r}", 0, False))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    store.stop()
    down = time.monotonic()
    time.sleep(2.0)
    seen_down = status(proxy)["shared_state"]
    store.start()
    for thread in threads:
        thread.join(60)
    lost = [r for r in results if r[1] != 200 or not r[2]]
    assert not lost, lost[:5]
    assert len(results) > 10
    assert seen_down["reachable"] is False and seen_down["backend"] == "redis"
    rejoined = wait_until(lambda: all(status(proxy)["shared_state"]["reachable"]
                                      for _ in range(4)), 10, step=0.1)
    idle(proxy, server)
    assert not new_tracebacks(proxy, log_from)
    metrics = requests.get(proxy.url + "/internal/metrics", timeout=5).text
    assert "olla_shared_state_up 1.0" in metrics
    FIGURES["redis_restart"] = {"requests": len(results), "lost": len(lost),
                                "down_for_s": 2.0,
                                "rejoined_after_restart_s": round(rejoined, 2),
                                "since_stop_s": round(time.monotonic() - down, 1)}
    proxy.stop()


def test_failures_in_each_phase_leave_nothing_held(start_proxy: Callable[..., Proxy],
                                                   server: LlamaServer,
                                                   store: RedisServer) -> None:
    gated = GatedUpstream(hold_seconds=5).start()
    proxy = start_proxy({
        "state": {"redis_url": store.url},
        "proxy": {"write_timeout": "2s"},
        "endpoints": [
            {"url": server.url, "name": "llama", "check_interval": "1s"},
            {"url": gated.url, "name": "gated", "check_interval": "1s"}]},
        extra_args=["--workers", "2"])
    try:
        wait_until(lambda: all(e["status"] == "healthy" for e in requests.get(
            proxy.url + "/internal/status/endpoints", timeout=5).json()["endpoints"]), 20)
        log_from = len(proxy.log())
        answers: dict[str, Any] = {}
        # Header: a name with a control character routes, and is never echoed raw.
        odd = requests.post(proxy.url + COMPLETION, timeout=30, json={
            "model": "\u000b" + ALIAS, "prompt": "hi", "n_predict": 4, "stream": True})
        answers["header"] = (odd.status_code, odd.headers.get("X-Olla-Model"))
        assert odd.status_code == 200 and odd.headers["X-Olla-Model"] == ALIAS
        # Body: not JSON.
        bad = requests.post(proxy.url + COMPLETION, data=b"{nope", timeout=10)
        answers["body"] = (bad.status_code, bad.json()["error"]["code"])
        assert bad.status_code == 400
        # Upstream garbage mid-stream, and before any byte of a non-streamed answer.
        garbage = requests.post(proxy.url + COMPLETION, timeout=30, json={
            "model": GATED_MODEL, "prompt": "hi", "stream": True, "x_garbage": True})
        assert garbage.status_code == 200 and b'"code": "upstream_error"' in garbage.content
        whole = requests.post(proxy.url + COMPLETION, timeout=30, json={
            "model": GATED_MODEL, "prompt": "hi", "x_garbage": True})
        answers["garbage"] = (garbage.status_code, whole.status_code)
        assert whole.status_code == 502 and whole.json()["error"]["code"] == "upstream_error"
        # Client gone mid-stream.
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        payload = json.dumps({"model": ALIAS, "prompt": "long", "n_predict": 2000,
                              "ignore_eos": True, "stream": True}).encode()
        sock.sendall((f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode()
                     + payload)
        read_until(sock, b"data: ")
        hang_up(sock, "reset")
        wait_until(lambda: server.busy_slots() == 0, 5, step=0.05)
        # Client stalled: reads nothing (a zero TCP window) while a big stream runs (100
        # probabilities a token: the kernel's buffers, ~3 MB on loopback, fill in ~15 s).
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", proxy.port))
        payload = json.dumps({"model": ALIAS, "prompt": "long", "n_predict": 4000,
                              "n_probs": 100, "ignore_eos": True, "stream": True}).encode()
        stalled.sendall((f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                         ).encode() + payload)
        started = time.monotonic()
        wait_until(lambda: server.busy_slots() == 1, 10, step=0.05)
        cut = wait_until(lambda: server.busy_slots() == 0, 60, step=0.1)
        answers["stalled_cut_after_s"] = round(time.monotonic() - started, 1)
        stalled.close()
        assert cut < 60
        idle(proxy, server)
        assert "client write blocked" in proxy.log()[log_from:]
        after = requests.post(proxy.url + COMPLETION, timeout=30,
                              json={"model": ALIAS, "prompt": "hi", "n_predict": 4})
        assert after.status_code == 200
        FIGURES["phases"] = answers
        assert not new_tracebacks(proxy, log_from)
    finally:
        proxy.stop()
        gated.stop()


def test_a_non_streamed_client_that_leaves_frees_its_slot_within_1s(
        start_proxy: Callable[..., Proxy], server: LlamaServer, store: RedisServer) -> None:
    proxy = shared_proxy(start_proxy, server, store, workers=2)
    idle(proxy, server)
    payload = json.dumps({"model": ALIAS, "prompt": "A long story.", "n_predict": 2000,
                          "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall((f"POST {COMPLETION} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload)
    wait_until(lambda: server.busy_slots() == 1, 10, step=0.05)
    time.sleep(1.0)                  # generating; /slots polled meanwhile, as in real life
    gone = time.monotonic()
    hang_up(sock, "close")
    freed = wait_until(lambda: server.busy_slots() == 0, 10, step=0.02)
    assert freed <= 1.0, f"llama.cpp kept generating {freed:.2f} s after the client left"
    FIGURES["non_streamed_gone_slot_free_after_s"] = round(freed, 3)
    idle(proxy, server)
    assert time.monotonic() - gone < 30
    proxy.stop()


def test_several_workers_without_redis_say_so(start_proxy: Callable[..., Proxy],
                                              server: LlamaServer) -> None:
    proxy = start_proxy({"endpoints": [{"url": server.url, "name": "llama"}]},
                        extra_args=["--workers", "2"])
    assert "set state.redis_url (or OLLA_REDIS_URL)" in proxy.log()
    shared = status(proxy)["shared_state"]
    assert shared["backend"] == "local" and shared["workers"] == 2 and shared["local_share"]
    proxy.stop()
