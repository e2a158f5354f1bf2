"""Hostile and odd clients over raw sockets, against the proxy under real gunicorn: every
answer in the spec's JSON envelope, bounded, and the worker still serves the next request."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from .gated_upstream import GatedUpstream
from .procs import Proxy

pytestmark = pytest.mark.integration

HEADER_LIMIT = 2048


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy]) -> Iterator[Proxy]:
    """A proxy with small request limits; its one endpoint is not there (no request here
    needs an upstream)."""
    yield start_proxy({
        "server": {"read_header_timeout": "1s", "read_timeout": "2s",
                   "request_limits": {"max_header_size": HEADER_LIMIT, "max_json_depth": 32,
                                      "max_list_items": 1000, "max_body_size": 1_000_000}},
        "endpoints": [{"url": "http://127.0.0.1:9", "name": "absent"}]})


def exchange(proxy: Proxy, raw: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes, or Content-Length says)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                length = int(headers.get("Content-Length", "-1"))
                if 0 <= length <= len(rest):
                    return int(lines[0].split()[1]), headers, rest[:length]
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return (int(lines[0].split()[1]),
            dict(line.split(": ", 1) for line in lines[1:] if ": " in line), rest)


def envelope(body: bytes) -> dict[str, str]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    return error  # type: ignore[no-any-return]


def still_serves(proxy: Proxy) -> None:
    assert requests.get(proxy.url + "/internal/health", timeout=5).status_code == 200


def test_a_header_over_the_limit_is_431_json(proxy: Proxy) -> None:
    raw = (b"GET /internal/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (HEADER_LIMIT + 100)
           + b"\r\n\r\n")
    status, headers, body = exchange(proxy, raw)
    assert status == 431 and headers["Content-Type"] == "application/json"
    assert envelope(body)["code"] == "headers_too_large"
    still_serves(proxy)


def test_a_request_line_over_the_limit_is_414_json(proxy: Proxy) -> None:
    raw = b"GET /olla/" + b"a" * (HEADER_LIMIT + 100) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    status, _, body = exchange(proxy, raw)
    assert status == 414 and envelope(body)["code"] == "request_line_too_long"
    still_serves(proxy)


@pytest.mark.parametrize("raw", [b"NOT A REQUEST\r\n\r\n", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
                                 b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"])
def test_a_malformed_request_is_400_json(proxy: Proxy, raw: bytes) -> None:
    status, headers, body = exchange(proxy, raw)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert envelope(body)["type"] == "invalid_request_error"
    still_serves(proxy)


@pytest.mark.parametrize(("path", "method", "status"), [
    ("/nowhere", "GET", 404), ("/internal/status", "POST", 405),
    ("/olla/llamacpp/completion", "GET", 405), ("/olla/nope/completion", "POST", 404)])
def test_flasks_own_errors_are_json(proxy: Proxy, path: str, method: str, status: int) -> None:
    response = requests.request(method, proxy.url + path, timeout=5)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    envelope(response.content)


def test_a_body_over_the_limit_is_413_json(proxy: Proxy) -> None:
    response = requests.post(proxy.url + "/olla/llamacpp/completion",
                             data=b'{"prompt": "' + b"x" * 1_100_000 + b'"}', timeout=10)
    assert response.status_code == 413
    assert envelope(response.content)["code"] == "request_too_large"
    still_serves(proxy)


@pytest.mark.parametrize(("body", "code"), [
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too_deep"),
    (b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", "too_deep"),
    (b'{"prompt": "x", "repeat_penalty": 1e400}', "invalid_parameter"),
    (b'{"prompt": "\\ud800"}', "invalid_parameter"),
    (b'{"prompt": "caf\xe9"}', "invalid_parameter"),
    (json.dumps({"prompt": list(range(1001))}).encode(), "too_many_items"),
])
def test_odd_bodies_are_400_json_without_reaching_upstream(proxy: Proxy, body: bytes,
                                                           code: str) -> None:
    response = requests.post(proxy.url + "/olla/llamacpp/completion", data=body, timeout=10)
    assert response.status_code == 400, response.text[:300]
    assert envelope(response.content)["code"] == code
    still_serves(proxy)


def trickle(sock: socket.socket, data: bytes, every: float, seconds: float) -> float:
    """Send ``data`` a byte every ``every`` s (each gap short) until the server ends the
    connection or ``seconds`` pass; when it ended, in seconds, or inf."""
    started = time.monotonic()
    for byte in data * 1000:
        if time.monotonic() - started > seconds:
            return float("inf")
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return time.monotonic() - started
        time.sleep(every)
    return float("inf")


def test_headers_not_complete_within_read_header_timeout_close_the_connection(
        proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /internal/health HTTP/1.1\r\nHost: x\r\n")
        # A header byte every 0.2 s: no gap is long, the whole is (1 s allowed).
        ended = trickle(sock, b"X-Slow: abcdefgh\r\n", 0.2, seconds=8)
        assert ended < 5, "the connection was kept open while its headers trickled in"
    still_serves(proxy)


def test_a_kept_alive_connection_may_stay_idle_longer_than_the_header_deadline(
        proxy: Proxy) -> None:
    request = b"GET /internal/health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, "the server closed a kept-alive connection"
                data += chunk
            assert data.startswith(b"HTTP/1.1 200")
            time.sleep(1.5)  # idle for longer than read_header_timeout (1 s)
        # Two requests sent at once: the second, already buffered, is answered too.
        sock.sendall(request * 2)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(65536)
            assert chunk, "the pipelined request was not answered"
            data += chunk


def test_a_body_not_complete_within_read_timeout_is_408_json(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /olla/llamacpp/completion HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"prompt": "')
        answered: list[bytes] = []

        def read() -> None:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            answered.append(data)

        reader = threading.Thread(target=read)
        reader.start()
        started = time.monotonic()
        trickle(sock, b"x", 0.2, seconds=6)  # ends when the server closes
        reader.join(10)
        took = time.monotonic() - started
    head, _, body = answered[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answered[0][:200]
    error = envelope(body)
    assert error["code"] == "request_timeout" and "server.read_timeout" in error["message"]
    assert took < 5  # 2 s allowed, then the connection is closed, not read on
    still_serves(proxy)


class Trickle:
    """An upstream that answers every request a byte every 0.4 s: each wait is short, the
    whole answer (~50 s) is not."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
        with conn:
            for byte in answer:
                if self.stopping:
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.4)  # always within the 1 s socket timeout

    def start(self) -> Trickle:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        self.server.close()


def test_a_trickling_upstream_cannot_stall_the_health_checks(
        start_proxy: Callable[..., Proxy]) -> None:
    gated = GatedUpstream().start()
    trickle = Trickle().start()
    try:
        proxy = start_proxy({"endpoints": [
            {"url": gated.url, "name": "gated", "check_interval": "1s", "check_timeout": "1s"},
            {"url": trickle.url, "name": "trickle", "check_interval": "1s",
             "check_timeout": "1s"}]})

        def endpoints() -> dict[str, dict[str, object]]:
            body = requests.get(proxy.url + "/internal/status/endpoints", timeout=5).json()
            return {e["name"]: e for e in body["endpoints"]}

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and endpoints()["trickle"]["status"] != "offline":
            time.sleep(0.2)
        found = endpoints()
        assert found["trickle"]["status"] == "offline", found["trickle"]
        assert "no complete answer within 1 s" in str(found["trickle"]["issues"])
        # Meanwhile the other endpoint is probed on time (every second or so).
        first = found["gated"]["health_check_at"]
        time.sleep(2.5)
        assert endpoints()["gated"]["health_check_at"] != first
        assert endpoints()["gated"]["status"] == "healthy"
    finally:
        trickle.stop()
        gated.stop()


@pytest.mark.parametrize("request_id", [b"evil\xff\xfe", b"a b", b'x" onload=1', b"x" * 200,
                                        b"ok\tX-Injected: 1"])
def test_an_unsafe_request_id_is_replaced_never_echoed(proxy: Proxy, request_id: bytes) -> None:
    status, headers, _ = exchange(proxy, b"GET /olla/llamacpp/v1/models HTTP/1.1\r\nHost: x\r\n"
                                  b"X-Request-Id: " + request_id + b"\r\n\r\n")
    assert status == 200
    assert len(headers["X-Olla-Request-Id"]) == 32 and int(headers["X-Olla-Request-Id"], 16) >= 0
    assert "X-Injected" not in headers
    still_serves(proxy)


def test_a_folded_header_line_is_400_json(proxy: Proxy) -> None:
    status, _, body = exchange(proxy, b"GET /internal/health HTTP/1.1\r\nHost: x\r\n"
                               b"X-Request-Id: a\r\n X-Injected: 1\r\n\r\n")
    assert status == 400 and envelope(body)["type"] == "invalid_request_error"
    still_serves(proxy)


def test_a_model_name_with_a_line_break_is_never_a_header(proxy: Proxy) -> None:
    body = json.dumps({"model": "m\r\nSet-Cookie: x=1", "prompt": "hi"}).encode()
    status, headers, answer = exchange(proxy, b"POST /olla/llamacpp/completion HTTP/1.1\r\n"
                                       b"Host: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status == 404 and envelope(answer)["code"] == "model_not_found"
    assert "Set-Cookie" not in headers and "X-Olla-Model" not in headers
    still_serves(proxy)
