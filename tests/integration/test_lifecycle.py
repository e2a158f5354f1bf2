"""Stopping and running for months, with real gunicorn and real llama.cpp: SIGTERM lets
requests finish within server.shutdown_timeout, then ends the streams still running with a
server_shutting_down event and answers the queued ones 503."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import yaml

from .conftest import CHAT_ALIAS
from .procs import LlamaServer, Proxy

pytestmark = pytest.mark.integration

CHAT = "/olla/llamacpp/v1/chat/completions"


def long_stream(proxy: Proxy, out: dict[str, Any]) -> None:
    """A stream far longer than the shutdown allows: what it ends with."""
    events: list[bytes] = []
    try:
        with requests.post(proxy.url + CHAT, timeout=60, stream=True, json={
                "model": CHAT_ALIAS, "stream": True, "max_tokens": 4000,
                "messages": [{"role": "user", "content": "Write a very long story."}]}
                ) as response:
            out["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        out["first_at"] = time.monotonic()
    except requests.RequestException as exc:
        out["error"] = repr(exc)
    out["events"] = events
    out["ended_at"] = time.monotonic()


def test_sigterm_ends_streams_with_an_event_and_answers_the_queue(
        start_proxy: Callable[..., Proxy], llama_chat: LlamaServer) -> None:
    proxy = start_proxy({"server": {"shutdown_timeout": "4s"},
                         "endpoints": [{"url": llama_chat.url, "name": "chat"}]})
    streams = [{} for _ in range(2)]  # the chat server's two slots
    threads = [threading.Thread(target=long_stream, args=(proxy, s)) for s in streams]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while not all("first_at" in s for s in streams):
        assert time.monotonic() < deadline, streams
        time.sleep(0.05)
    queued: dict[str, Any] = {}

    def wait_in_queue() -> None:
        response = requests.post(proxy.url + CHAT, timeout=60, json={
            "model": CHAT_ALIAS, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        queued.update(status=response.status_code, body=response.json(),
                      retry_after=response.headers.get("Retry-After"))

    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    deadline = time.monotonic() + 10
    while requests.get(proxy.url + "/internal/status", timeout=5).json()["queue"]["depth"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert proxy.process is not None
    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    for thread in [*threads, waiter]:
        thread.join(30)
    proxy.process.wait(30)
    exited = time.monotonic() - signalled
    for stream in streams:
        assert stream["status"] == 200 and "error" not in stream, stream.get("error")
        *tokens, last_event, done = stream["events"]
        assert done == b"[DONE]" and len(tokens) > 5
        assert json.loads(last_event)["error"]["code"] == "server_shutting_down"
        took = stream["ended_at"] - signalled
        assert 2.0 < took < 4.5, took  # ran on until just before the 4 s were up
    assert queued["status"] == 503 and queued["retry_after"]
    assert queued["body"]["error"]["code"] == "server_shutting_down"
    assert exited < 8, exited
    print(f"\nSIGTERM with shutdown_timeout 4 s: streams ended after "
          f"{[round(s['ended_at'] - signalled, 2) for s in streams]} s, master exited after "
          f"{exited:.2f} s")
    deadline = time.monotonic() + 10
    while llama_chat.busy_slots():  # llama.cpp was told: the slots are free again
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.fixture(scope="module")
def replica() -> Any:
    """A second chat server serving the same model as conftest's, for draining."""
    server = LlamaServer(["--alias", CHAT_ALIAS, "--n-parallel", "2", "--n-ctx", "2048"])
    server.start().wait()
    yield server
    server.stop()


class Load:
    """A few clients sending short chats back to back; what each got."""

    def __init__(self, proxy: Proxy, clients: int = 3) -> None:
        self.proxy = proxy
        self.stopping = threading.Event()
        self.results: list[tuple[int, float, str]] = []  # status, seconds, endpoint
        self.threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with requests.Session() as session:
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    answer = session.post(self.proxy.url + CHAT, timeout=60, json={
                        "model": CHAT_ALIAS, "max_tokens": 6,
                        "messages": [{"role": "user", "content": "Say something"}]})
                    status, endpoint = answer.status_code, answer.headers.get(
                        "X-Olla-Endpoint", "")
                except requests.RequestException:
                    status, endpoint = 0, ""
                self.results.append((status, time.monotonic() - started, endpoint))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


def test_drain_a_replica_under_load_stop_restart_undrain_without_a_failure(
        start_proxy: Callable[..., Proxy], llama_chat: LlamaServer,
        replica: LlamaServer) -> None:
    proxy = start_proxy({"endpoints": [
        {"url": llama_chat.url, "name": "one", "check_interval": "1s"},
        {"url": replica.url, "name": "two", "check_interval": "1s"}]})

    def status(name: str) -> str:
        found = requests.get(proxy.url + "/internal/status/endpoints", timeout=5).json()
        return str(next(e["status"] for e in found["endpoints"] if e["name"] == name))

    def until(condition: Callable[[], bool], seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.1)

    with Load(proxy) as load:
        until(lambda: {e for _, _, e in load.results} == {"one", "two"})
        drained = requests.post(proxy.url + "/internal/endpoints/two/drain", timeout=5)
        assert drained.status_code == 200 and drained.json()["draining"] is True
        until(lambda: status("two") == "drained")
        mark = len(load.results)
        replica.stop()                    # an upgrade: nobody is sent there meanwhile
        time.sleep(1.5)
        replica.start().wait()
        assert {e for _, _, e in load.results[mark:]} == {"one"}
        assert requests.post(proxy.url + "/internal/endpoints/two/undrain",
                             timeout=5).json()["draining"] is False
        back = len(load.results)
        until(lambda: "two" in {e for _, _, e in load.results[back:]})
        time.sleep(1)
    failed = [r for r in load.results if r[0] != 200]
    slowest = max(seconds for _, seconds, _ in load.results)
    print(f"\ndrain under load: {len(load.results)} requests, {len(failed)} failed, "
          f"slowest {slowest:.2f} s")
    assert not failed, failed


def stream_text(proxy: Proxy, out: dict[str, Any]) -> None:
    """A deterministic stream (temperature 0, a seed): its text, events and end."""
    pieces, events = [], 0
    with requests.post(proxy.url + CHAT, timeout=120, stream=True, json={
            "model": CHAT_ALIAS, "stream": True, "max_tokens": 300, "temperature": 0,
            "seed": 7, "messages": [{"role": "user", "content": "Tell a long story."}]}
            ) as response:
        out["status"] = response.status_code
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                events += 1
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    out["error"] = chunk["error"]
                for choice in chunk.get("choices", []):
                    pieces.append(choice.get("delta", {}).get("content") or "")
                if events == 1:
                    out["first_at"] = time.monotonic()
            elif line == b"data: [DONE]":
                out["done"] = True
    out.update(text="".join(pieces), events=events, ended_at=time.monotonic())


def test_sighup_reloads_the_config_without_dropping_a_stream(
        start_proxy: Callable[..., Proxy], llama_chat: LlamaServer) -> None:
    from .scripted_upstream import MODEL as NEW_MODEL
    from .scripted_upstream import ScriptedUpstream

    added = ScriptedUpstream().start()
    try:
        config = {"server": {"shutdown_timeout": "2s", "reload_grace": "60s"},
                  "endpoints": [{"url": llama_chat.url, "name": "chat"}]}
        proxy = start_proxy(config)
        assert proxy.process is not None and proxy.config_path is not None
        baseline: dict[str, Any] = {}
        stream_text(proxy, baseline)
        assert baseline.get("done") and baseline["events"] > 50
        running: dict[str, Any] = {}
        thread = threading.Thread(target=stream_text, args=(proxy, running))
        thread.start()
        deadline = time.monotonic() + 30
        while "first_at" not in running:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # Add an endpoint, and HUP while the stream runs and clients keep asking.
        config["endpoints"].append({"url": added.url, "name": "added"})
        proxy.config_path.write_text(yaml.safe_dump(config))
        with Load(proxy, clients=2) as load:
            time.sleep(1)
            hup = time.monotonic()
            proxy.process.send_signal(signal.SIGHUP)
            # Right after the master has taken the HUP (a request sent before that instant
            # is still the old workers' to take).
            while "read again; new workers follow it" not in proxy.log():
                assert time.monotonic() - hup < 10
                time.sleep(0.01)
            answer = requests.post(proxy.url + CHAT, timeout=30, json={
                "model": NEW_MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200, answer.text
            assert answer.headers["X-Olla-Endpoint"] == "added"
            answered_after = time.monotonic() - hup
            time.sleep(2)
        thread.join(120)
        failed = [r for r in load.results if r[0] != 200]
        assert not failed, failed
        # The stream ran on in its old worker, past the 2 s shutdown timeout, to its end,
        # and is what the same stream is without a reload.
        assert running.get("done") and "error" not in running, running.get("error")
        assert running["text"] == baseline["text"]
        assert running["events"] == baseline["events"]
        assert running["ended_at"] - hup > 2
        # A broken config changes nothing: refused, logged, the proxy serves as before.
        proxy.config_path.write_text("endpoints:\n  - url: ftp://broken\n")
        proxy.process.send_signal(signal.SIGHUP)
        time.sleep(3)
        assert proxy.process.poll() is None
        assert "reload refused, still serving the previous configuration" in proxy.log()
        again = requests.post(proxy.url + CHAT, timeout=30, json={
            "model": NEW_MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert again.status_code == 200 and again.headers["X-Olla-Endpoint"] == "added"
        print(f"\nSIGHUP: the new endpoint answered {answered_after:.2f} s after it; the "
              f"running stream ended {running['ended_at'] - hup:.2f} s after it, "
              f"{running['events']} events, the same text as without a reload; load across "
              f"it: {len(load.results)} requests, {len(failed)} failed, slowest "
              f"{max(r[1] for r in load.results):.2f} s")
    finally:
        added.stop()
