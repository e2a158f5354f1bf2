"""A real nginx running deploy/nginx.conf in front of the proxy (gunicorn, gevent worker).

The gated upstream sends one SSE event and then holds the stream open until the test has
read that event *through nginx and the proxy*. If nginx buffered the stream, the first event
would not arrive while the upstream holds, and the test fails after a bounded wait.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from .gated_upstream import GatedUpstream
from .procs import (
    Proxy,
    free_port,
    nginx_binary,
    nginx_main_config,
    nginx_site_config,
    wait_http,
)

FIRST_EVENT_WAIT = 10.0  # seconds the first event may take through nginx and the proxy
COMPLETION = "/olla/llamacpp/completion"


def nginx() -> str:
    """The nginx executable; fail (do not skip) without one: CI installs nginx."""
    found = nginx_binary()
    if found is None:
        pytest.fail("nginx is not installed (not on PATH, no /usr/sbin/nginx): install nginx "
                    "to run this test (e.g. apt-get install nginx)", pytrace=False)
    return found


def stop_nginx(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGTERM: the master stops its workers), then kill the whole group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # Killing only the master would orphan its workers: kill the group we started.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def logs(prefix: Path) -> str:
    parts = []
    for name in ("error.log", "stderr.log"):
        path = prefix / name
        if path.exists():
            parts.append(f"--- nginx {name}:\n{path.read_text()[-4000:]}")
    return "\n".join(parts)


@dataclass
class Stack:
    gated: GatedUpstream
    proxy: Proxy
    prefix: Path
    url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Gated upstream <- proxy under gunicorn <- nginx with deploy/nginx.conf."""
    nginx_path = nginx()
    prefix = tmp_path_factory.mktemp("nginx")
    gated = GatedUpstream().start()
    proxy = Proxy({"endpoints": [{"url": gated.url, "name": "gated", "type": "llamacpp"}]})
    process: subprocess.Popen[bytes] | None = None
    try:
        proxy.start()
        port = free_port()
        (prefix / "site.conf").write_text(nginx_site_config(proxy.port, port))
        (prefix / "nginx.conf").write_text(nginx_main_config(prefix))
        command = [nginx_path, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                   "-e", str(prefix / "error.log")]
        check = subprocess.run([*command, "-t"], capture_output=True, timeout=30, check=False)
        assert check.returncode == 0, (
            f"nginx -t rejected the config:\n{check.stderr.decode(errors='replace')}")
        with open(prefix / "stderr.log", "wb") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=stderr,
                                       start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/olla/llamacpp/v1/models", process, timeout=15, ok=(200, 503))
        except RuntimeError as exc:
            pytest.fail(f"nginx did not come up: {exc}\n{logs(prefix)}", pytrace=False)
        yield Stack(gated, proxy, prefix, url)
    finally:
        if process is not None:
            stop_nginx(process)
        # Release a held stream first, so gunicorn's graceful stop does not wait for it.
        gated.stop()
        proxy.stop()


def header(headers: dict[str, str], name: str) -> str | None:
    """A header from the upstream's record of a request, whatever its case."""
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def test_stream_is_not_buffered_by_nginx(stack: Stack) -> None:
    gated = stack.gated
    gated.reset()
    received = b""
    with contextlib.ExitStack() as cleanup:
        session = cleanup.enter_context(requests.Session())
        deadline = time.monotonic() + FIRST_EVENT_WAIT
        try:
            # A buffering nginx may hold back the headers too, so they count in the wait.
            response = cleanup.enter_context(session.post(
                stack.url + COMPLETION, json={"prompt": "hi", "stream": True},
                headers={"X-Request-Id": "nginx-test-1"}, stream=True,
                timeout=(5, FIRST_EVENT_WAIT)))
            assert response.status_code == 200, response.text
            chunks = response.iter_content(chunk_size=None)
            while b"\n\n" not in received:
                if time.monotonic() > deadline:
                    raise TimeoutError("first event not complete in time")
                received += next(chunks)
        except (requests.RequestException, TimeoutError, StopIteration) as exc:
            pytest.fail(f"no first SSE event within {FIRST_EVENT_WAIT} s while the upstream "
                        f"held the stream: nginx (or the proxy) buffers it ({exc!r}); "
                        f"got {received!r}\n{logs(stack.prefix)}", pytrace=False)
        held = not gated.gate.is_set()
        assert held, "the upstream was released before the first event arrived"
        first, _, rest = received.partition(b"\n\n")
        assert first.startswith(b"data: ")
        assert b'"content":"first"' in first
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Olla-Endpoint"] == "gated"
        assert response.headers["X-Olla-Request-Id"] == "nginx-test-1"

        gated.release()
        deadline = time.monotonic() + FIRST_EVENT_WAIT
        for chunk in chunks:
            rest += chunk
            assert time.monotonic() < deadline, "the rest of the stream took too long"
        events = [e for e in rest.split(b"\n\n") if e.strip()]
        assert events, f"no event after the first: {rest!r}"
        assert b'"released":true' in events[-1], events[-1]
        assert b'"stop":true' in events[-1], events[-1]

    # What nginx forwarded, as the upstream saw it through the proxy.
    sent = gated.requests[-1]
    assert sent["path"] == "/completion"
    assert header(sent["headers"], "X-Request-Id") == "nginx-test-1"
    assert header(sent["headers"], "X-Forwarded-Proto") == "http"
    # nginx adds the client, the proxy adds nginx: both loopback here.
    assert header(sent["headers"], "X-Forwarded-For") == "127.0.0.1, 127.0.0.1"


def test_validation_error_is_relayed_as_json(stack: Stack) -> None:
    with requests.Session() as session, session.post(
            stack.url + COMPLETION, json={"prompt": "x", "temperature": 5},
            timeout=10) as response:
        assert response.status_code == 400, response.text
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.json()["error"]["code"] == "invalid_parameter"
        # No client id: nginx sends its $request_id (32 hex digits), which the proxy keeps.
        request_id = response.headers["X-Olla-Request-Id"]
        assert len(request_id) == 32
        assert all(c in "0123456789abcdef" for c in request_id)


def get_from(source: str, url: str) -> tuple[int, str, bytes]:
    """GET ``url`` with the connection's source address ``source`` (another loopback
    address stands for a host that is not this one)."""
    host, port = url.removeprefix("http://").split("/", 1)[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    with socket.create_connection((host, int(port)), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    content_type = next((line.split(": ", 1)[1] for line in lines[1:]
                         if line.lower().startswith("content-type:")), "")
    return int(lines[0].split()[1]), content_type, body


@pytest.mark.parametrize("path", ["/internal/status", "/internal/metrics",
                                  "/internal/status/endpoints"])
def test_internal_routes_are_for_this_host_only(stack: Stack, path: str) -> None:
    assert get_from("127.0.0.1", stack.url + path)[0] == 200
    status, content_type, body = get_from("127.0.0.2", stack.url + path)
    assert status == 403 and content_type == "application/json"
    assert json.loads(body)["error"]["code"] == "forbidden"
    # The proxy's own routes stay open to other hosts.
    assert get_from("127.0.0.2", stack.url + "/olla/llamacpp/v1/models")[0] == 200
