"""Upstreams that misbehave, scripted on raw sockets, behind the proxy under real gunicorn
(one worker): every answer is what the spec says, idle ``slots_in_use`` returns to 0, and the
worker serves the next request."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .procs import Proxy
from .scripted_upstream import MODEL, ScriptedUpstream

pytestmark = pytest.mark.integration

CHAT = "/olla/llamacpp/v1/chat/completions"


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[ScriptedUpstream]]:
    started = [ScriptedUpstream().start() for _ in range(3)]
    yield started
    for upstream in started:
        upstream.stop()


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy], upstreams: list[ScriptedUpstream]) -> Proxy:
    return start_proxy({
        "proxy": {"write_timeout": "2s"},
        "endpoints": [{"url": u.url, "name": f"scripted-{i}", "check_interval": "1s"}
                      for i, u in enumerate(upstreams)]})


@pytest.fixture(autouse=True)
def fresh(upstreams: list[ScriptedUpstream]) -> None:
    for upstream in upstreams:
        upstream.gate.clear()
        upstream.posts = 0


def endpoints(proxy: Proxy) -> list[dict[str, Any]]:
    response = requests.get(proxy.url + "/internal/status/endpoints", timeout=5)
    response.raise_for_status()
    return response.json()["endpoints"]  # type: ignore[no-any-return]


def settled(proxy: Proxy, timeout: float = 10) -> list[dict[str, Any]]:
    """The endpoints once nothing is held (slots, leases) and every one is healthy; the
    worker answered a real request on the way."""
    deadline = time.monotonic() + timeout
    while True:
        found = endpoints(proxy)
        if all(e["slots_in_use"] == 0 and e["leases"] == 0 and e["status"] == "healthy"
               for e in found):
            break
        assert time.monotonic() < deadline, json.dumps(found)
        time.sleep(0.1)
    answer = requests.post(proxy.url + CHAT, json={"model": MODEL, "messages": [
        {"role": "user", "content": "hi"}]}, timeout=10)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    return found


def chat(script: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}],
            "x_script": script, **extra}


def data_events(lines: Iterator[bytes], until: bytes) -> list[bytes]:
    """The ``data:`` payloads read until one equals ``until`` (inclusive)."""
    found = []
    for line in lines:
        if line.startswith(b"data: "):
            found.append(line[6:])
            if found[-1] == until:
                return found
    raise AssertionError(f"the stream ended before {until!r}: {found[-3:]}")


def gate_of(upstreams: list[ScriptedUpstream]) -> Callable[[], None]:
    def release() -> None:
        for upstream in upstreams:
            upstream.release()
    return release


def stats(proxy: Proxy) -> dict[str, Any]:
    body = requests.get(proxy.url + "/internal/stats/models", timeout=5).json()
    return {m["name"]: m for m in body["models"]}.get(  # type: ignore[no-any-return]
        MODEL, {"successful_requests": 0, "completion_tokens": 0})


def test_a_close_delimited_stream_is_relayed_as_it_arrives(
        proxy: Proxy, upstreams: list[ScriptedUpstream]) -> None:
    before = stats(proxy)
    with requests.post(proxy.url + CHAT, json=chat("close_delimited"), stream=True,
                       timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = response.iter_lines()
        # The upstream sends the rest only once this event has come through the proxy.
        for line in lines:
            if line.startswith(b"data: "):
                assert json.loads(line[6:])["choices"][0]["delta"]["content"] == "first"
                break
        gate_of(upstreams)()
        rest = data_events(lines, until=b"[DONE]")
    assert json.loads(rest[0])["choices"][0]["delta"]["content"] == "second"
    settled(proxy)
    after = stats(proxy)
    # One success more (and one for settled's request), and the timings of the last
    # event were found although the body had no chunk framing.
    assert after["successful_requests"] == before["successful_requests"] + 2
    assert after["completion_tokens"] == before["completion_tokens"] + 10


def test_a_stream_sent_in_one_write_is_relayed_event_by_event(
        proxy: Proxy, upstreams: list[ScriptedUpstream]) -> None:
    with requests.post(proxy.url + CHAT, json=chat("one_write", x_n=300), stream=True,
                       timeout=10) as response:
        assert response.status_code == 200
        # All of them arrive while the upstream's body is still open (nothing waits for
        # more), each a whole JSON event, in order.
        events = data_events(response.iter_lines(), until=b"[DONE]")
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]] == [
            f"e{i}" for i in range(300)]
        gate_of(upstreams)()
    settled(proxy)


def test_an_older_llamacpps_bare_error_field_is_a_data_event_and_a_failure(
        proxy: Proxy) -> None:
    before = stats(proxy)
    with requests.post(proxy.url + CHAT, json=chat("legacy_error"), stream=True,
                       timeout=10) as response:
        assert response.status_code == 200
        events = data_events(response.iter_lines(), until=b"[DONE]")
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "one"
    assert json.loads(events[1]) == {"error": {"code": 500, "message": "boom",
                                               "type": "server_error"}}
    settled(proxy)
    after = stats(proxy)
    assert after.get("failed_requests", 0) == before.get("failed_requests", 0) + 1


@pytest.mark.parametrize("path", ["/olla/anthropic/v1/messages", CHAT])
def test_a_stream_that_breaks_ends_with_its_clients_error_event(proxy: Proxy,
                                                                 path: str) -> None:
    body = chat("break_mid_stream", max_tokens=8)
    with requests.post(proxy.url + path, json=body, stream=True, timeout=10) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert json.loads(lines[0].removeprefix(b"data: "))["choices"][0]["delta"] == {
        "content": "one"}
    if path == CHAT:
        error = json.loads(lines[1].removeprefix(b"data: "))["error"]
        assert error["code"] == "upstream_error" and lines[2:] == [b"data: [DONE]"]
    else:  # Anthropic's error event, and no [DONE]
        assert lines[1] == b"event: error"
        error = json.loads(lines[2].removeprefix(b"data: "))
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert "mid-stream" in error["error"]["message"] and len(lines) == 3
    settled(proxy)


def test_a_request_whose_upstreams_reset_after_its_body_is_502_and_marks_none_down(
        proxy: Proxy, upstreams: list[ScriptedUpstream]) -> None:
    settled(proxy)
    for upstream in upstreams:
        upstream.posts = 0
    response = requests.post(proxy.url + CHAT, json={**chat("reset_after_body"),
                                                     "stream": False}, timeout=10)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_error"
    assert "127.0.0.1" not in error["message"]
    # Sent to two of the three (on each, once more on a fresh connection when the kept-alive
    # one it went out on was reset, as a connection the server had dropped would be), and
    # none of them is taken out by it.
    assert sorted(u.posts for u in upstreams) in ([0, 1, 1], [0, 1, 2], [0, 2, 2])
    assert all(e["status"] == "healthy" for e in endpoints(proxy))
    settled(proxy)


def test_a_client_that_stops_reading_is_cut_off_and_frees_its_slot(proxy: Proxy) -> None:
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", proxy.port))
    body = json.dumps(chat("ticks", x_n=100000, x_size=4000, x_interval=0)).encode()
    stalled.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        deadline = time.monotonic() + 10
        while not any(e["slots_in_use"] for e in endpoints(proxy)):
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        deadline = time.monotonic() + 20  # proxy.write_timeout is 2 s
        while any(e["slots_in_use"] for e in endpoints(proxy)):
            assert time.monotonic() < deadline, "the stalled stream still holds its slot"
            time.sleep(0.2)
    finally:
        stalled.close()
    settled(proxy)


def test_a_stream_keeps_its_pace_while_a_huge_body_is_parsed_on_the_same_worker(
        proxy: Proxy) -> None:
    """The issue's case: a 50 MiB body of tiny chat messages froze a running stream on the
    same worker for 6 s. Now its reading and parsing pause for the other greenlets every
    2 ms or every MiB."""
    arrivals: list[float] = []

    def run_stream() -> None:
        with requests.post(proxy.url + CHAT, json=chat("ticks", x_n=150, x_interval=0.02),
                           stream=True, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    arrivals.append(time.perf_counter())

    message = b'{"role":"user","content":"a"},'
    bodies = {
        "tiny messages": b'{"model":"' + MODEL.encode() + b'","messages":['
                         + message * (50 * 2**20 // len(message)) + b'{"role":"user"}]}',
        "nested lists": b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user"}],'
                        b'"x":[' + (b"[" + b"[]," * 5000 + b"[]],") * 3000 + b"[]]}",
    }
    streamer = threading.Thread(target=run_stream)
    streamer.start()
    while len(arrivals) < 10:
        time.sleep(0.01)
    answers = {}
    for name, body in bodies.items():
        started = time.perf_counter()
        response = requests.post(proxy.url + CHAT, data=body, timeout=60,
                                 headers={"Content-Type": "application/json"})
        answers[name] = (response.status_code, response.json()["error"]["code"],
                         round(time.perf_counter() - started, 2))
    streamer.join(30)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    print(f"\nhuge bodies: {answers}; stream events {len(arrivals)}, gaps ms: "
          f"median {sorted(gaps)[len(gaps) // 2] * 1000:.1f}, max {max(gaps) * 1000:.1f}")
    assert answers["tiny messages"][:2] == (400, "too_many_values")
    assert answers["nested lists"][:2] == (400, "too_many_values")
    assert len(arrivals) == 151  # every token and [DONE]
    # Before: one gap of 6 s. Now a few tens of ms at the most (the copies of a 50 MiB body
    # that cannot be cut: reading it whole, decoding it).
    assert max(gaps) < 0.5
    settled(proxy)


def test_polls_over_the_cap_are_an_issue_on_the_endpoint_not_a_worker_blown_up(
        start_proxy: Callable[..., Proxy]) -> None:
    huge = ScriptedUpstream(huge_polls=True).start()
    try:
        proxy = start_proxy({"endpoints": [{"url": huge.url, "name": "huge",
                                            "check_interval": "1s"}]})
        deadline = time.monotonic() + 15
        while True:
            found = endpoints(proxy)[0]
            issues = json.dumps(found.get("issues", []))
            if "larger than" in issues:
                break
            assert time.monotonic() < deadline, found
            time.sleep(0.2)
        # /health and /v1/models are small: the endpoint still serves.
        assert found["status"] == "healthy", found
        settled(proxy)
        rss_kib = int(next(line.split()[1] for line in Path(
            f"/proc/{proxy.worker_pids()[0]}/status").read_text().splitlines()
            if line.startswith("VmRSS:")))
        assert rss_kib < 200 * 1024, f"worker RSS {rss_kib} KiB after 20 MiB polls"
    finally:
        huge.stop()
