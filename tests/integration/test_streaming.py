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
