"""Streams reach the client event by event, through gunicorn's gevent worker, unbuffered."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from .gated_upstream import MODEL, GatedUpstream
from .procs import Proxy


@pytest.fixture
def gated() -> Iterator[GatedUpstream]:
    upstream = GatedUpstream(hold_seconds=20).start()
    try:
        yield upstream
    finally:
        upstream.stop()


def gated_config(gated: GatedUpstream) -> dict[str, object]:
    return {"endpoints": [{"url": gated.url, "name": "gated", "type": "llamacpp"}]}


def read_event(lines: Iterator[bytes], deadline: float) -> bytes:
    for line in lines:
        if line.startswith(b"data: "):
            return line
        if time.monotonic() > deadline:
            break
    raise AssertionError("no event before the deadline")


def test_first_event_arrives_while_upstream_still_generating(
        start_proxy: Callable[..., Proxy], gated: GatedUpstream) -> None:
    proxy = start_proxy(gated_config(gated))
    body = {"model": MODEL, "prompt": "hi", "stream": True, "n_probs": 1, "x_custom": [1]}
    with requests.post(f"{proxy.url}/olla/llamacpp/completion", json=body, stream=True,
                       timeout=(5, 10)) as response:
        assert response.status_code == 200
        lines = response.iter_lines(chunk_size=1)
        first = read_event(lines, time.monotonic() + 10)
        assert json.loads(first[6:]) == {"content": "first", "stop": False}
        assert not gated.gate.is_set()  # the upstream is still holding the rest back
        gated.release()
        rest = [line for line in lines if line.startswith(b"data: ")]
    assert json.loads(rest[-1][6:])["released"] is True
    assert gated.requests[0]["body"] == body


def test_long_stream_outlives_gunicorn_worker_timeout(start_proxy: Callable[..., Proxy],
                                                      gated: GatedUpstream) -> None:
    """gunicorn's --timeout is a heartbeat under gevent, never a limit on a stream."""
    proxy = start_proxy(gated_config(gated), extra_args=["--timeout", "2"])
    started = time.monotonic()
    with requests.post(f"{proxy.url}/olla/llamacpp/completion",
                       json={"prompt": "hi", "stream": True}, stream=True,
                       timeout=(5, 10)) as response:
        lines = response.iter_lines(chunk_size=1)
        read_event(lines, time.monotonic() + 10)
        time.sleep(5)  # two and a half worker timeouts pass while the stream is open
        gated.release()
        rest = [line for line in lines if line.startswith(b"data: ")]
    assert time.monotonic() - started > 5
    assert json.loads(rest[-1][6:])["released"] is True
    assert "WORKER TIMEOUT" not in proxy.log()


def test_upstream_dying_mid_stream_ends_with_an_error_event(
        start_proxy: Callable[..., Proxy], gated: GatedUpstream) -> None:
    proxy = start_proxy(gated_config(gated))
    with requests.post(f"{proxy.url}/olla/llamacpp/v1/completions",
                       json={"prompt": "hi", "stream": True}, stream=True,
                       timeout=(5, 10)) as response:
        lines = response.iter_lines(chunk_size=1)
        read_event(lines, time.monotonic() + 10)
        for open_socket in list(gated.open_sockets):
            open_socket.shutdown(socket.SHUT_RDWR)   # the upstream dies mid-stream
        rest = [line for line in lines if line.startswith(b"data: ")]
    assert rest[-1] == b"data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "upstream_error" and "gated" in error["message"]


def test_upstream_dying_mid_body_is_502_json(start_proxy: Callable[..., Proxy],
                                             gated: GatedUpstream) -> None:
    proxy = start_proxy(gated_config(gated))
    response = requests.post(f"{proxy.url}/olla/llamacpp/embedding", json={"content": "x"},
                             timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    assert response.headers["X-Olla-Request-Id"]


def sse_lines(response: requests.Response) -> list[bytes]:
    return [line for line in response.iter_lines(chunk_size=1) if line]


def test_first_byte_timeout_before_anything_sent_is_504(
        start_proxy: Callable[..., Proxy], gated: GatedUpstream) -> None:
    config = gated_config(gated)
    config["proxy"] = {"first_byte_timeout": "500ms", "sse_keepalive": "10s"}
    proxy = start_proxy(config)
    started = time.monotonic()
    response = requests.post(f"{proxy.url}/olla/llamacpp/completion", timeout=10,
                             json={"prompt": "x", "stream": True, "x_delay_first": 5})
    assert 0.4 < time.monotonic() - started < 3
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_keepalive_comments_while_the_first_token_is_awaited(
        start_proxy: Callable[..., Proxy], gated: GatedUpstream) -> None:
    config = gated_config(gated)
    config["proxy"] = {"sse_keepalive": "200ms"}
    proxy = start_proxy(config)
    with requests.post(f"{proxy.url}/olla/llamacpp/completion", stream=True, timeout=10,
                       json={"prompt": "x", "stream": True, "x_delay_first": 1.2}) as response:
        assert response.status_code == 200
        lines = response.iter_lines(chunk_size=1)
        seen: list[bytes] = []
        for line in lines:
            if line:
                seen.append(line)
            if line.startswith(b"data: "):
                break
        gated.release()
        seen += [line for line in lines if line]
    first_data = next(i for i, line in enumerate(seen) if line.startswith(b"data: "))
    assert seen[:first_data] and all(line == b": keepalive" for line in seen[:first_data])
    assert 3 <= first_data <= 7          # ~1.2 s / 0.2 s
    assert b": keepalive" not in seen[first_data:]   # only before the first token


def test_first_byte_timeout_after_keepalives_is_an_sse_error(
        start_proxy: Callable[..., Proxy], gated: GatedUpstream) -> None:
    config = gated_config(gated)
    config["proxy"] = {"sse_keepalive": "200ms", "first_byte_timeout": "700ms"}
    proxy = start_proxy(config)
    with requests.post(f"{proxy.url}/olla/llamacpp/v1/completions", stream=True, timeout=10,
                       json={"prompt": "x", "stream": True, "x_delay_first": 5}) as response:
        assert response.status_code == 200
        lines = sse_lines(response)
    assert lines[0] == b": keepalive"
    assert lines[-1] == b"data: [DONE]"
    assert json.loads(lines[-2][6:])["error"]["code"] == "upstream_timeout"


def test_silence_between_chunks_ends_with_an_sse_error(
        start_proxy: Callable[..., Proxy], gated: GatedUpstream) -> None:
    config = gated_config(gated)
    config["endpoints"][0]["read_timeout"] = "500ms"  # type: ignore[index]
    proxy = start_proxy(config)
    started = time.monotonic()
    with requests.post(f"{proxy.url}/olla/llamacpp/completion", stream=True, timeout=10,
                       json={"prompt": "x", "stream": True}) as response:
        lines = sse_lines(response)
    assert time.monotonic() - started < 5     # not the upstream's 20 s hold
    assert json.loads(lines[0][6:])["content"] == "first"
    error = json.loads(lines[-1][6:])["error"]
    assert error["code"] == "upstream_timeout"
    assert "nothing for 0.5 s" in error["message"]


def test_total_timeout_cuts_a_long_stream(start_proxy: Callable[..., Proxy],
                                          gated: GatedUpstream) -> None:
    config = gated_config(gated)
    config["proxy"] = {"response_timeout": "1s"}
    proxy = start_proxy(config)
    started = time.monotonic()
    with requests.post(f"{proxy.url}/olla/llamacpp/completion", stream=True, timeout=10,
                       json={"prompt": "x", "stream": True}) as response:
        lines = sse_lines(response)
    assert 0.9 < time.monotonic() - started < 4
    assert "longer than 1 s" in json.loads(lines[-1][6:])["error"]["message"]


def test_stream_broken_before_its_first_byte_fails_over(
        start_proxy: Callable[..., Proxy], gated: GatedUpstream) -> None:
    dying = GatedUpstream(die_first=True).start()
    try:
        proxy = start_proxy({"proxy": {"load_balancer": "priority"}, "endpoints": [
            {"url": dying.url, "name": "dies", "priority": 90},
            {"url": gated.url, "name": "works", "priority": 10}]})
        gated.release()
        with requests.post(f"{proxy.url}/olla/llamacpp/completion", stream=True, timeout=10,
                           json={"model": MODEL, "prompt": "x", "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["X-Olla-Endpoint"] == "works"
            lines = sse_lines(response)
        assert json.loads(lines[0][6:])["content"] == "first"
        assert len(dying.requests) == 1 and len(gated.requests) == 1
    finally:
        dying.stop()


def test_a_stream_longer_than_its_read_timeout_is_not_cut(
        start_proxy: Callable[..., Proxy]) -> None:
    """The gap deadline is watched by one timer per stream (app/streaming.py, Source): it
    fires while events keep coming, and must then wait on, not cut the stream."""
    from .scripted_upstream import MODEL as SCRIPTED_MODEL
    from .scripted_upstream import ScriptedUpstream

    upstream = ScriptedUpstream().start()
    try:
        proxy = start_proxy({"endpoints": [{"url": upstream.url, "name": "ticks",
                                            "read_timeout": "300ms"}]})
        started = time.monotonic()
        with requests.post(f"{proxy.url}/olla/llamacpp/v1/chat/completions", stream=True,
                           timeout=10, json={
                               "model": SCRIPTED_MODEL, "stream": True,
                               "messages": [{"role": "user", "content": "hi"}],
                               "x_script": "ticks", "x_n": 12, "x_interval": 0.1}) as response:
            assert response.status_code == 200
            events = [line for line in sse_lines(response) if line.startswith(b"data: ")]
        assert time.monotonic() - started >= 1.1        # 12 events 0.1 s apart
        assert events[-1] == b"data: [DONE]"
        assert not any(b'"error"' in event for event in events)
        assert len(events) >= 13
    finally:
        upstream.stop()
