"""Metrics under gunicorn with several workers, against a real llama.cpp server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import CHAT_ALIAS
from .procs import LlamaServer, Proxy

pytestmark = pytest.mark.integration


def scrape(proxy: Proxy) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = requests.get(f"{proxy.url}/internal/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def pids_in(directory: Path) -> set[str]:
    """Processes that wrote counters into the multiprocess directory (into the proxy's own
    directory inside the one it was given)."""
    return {path.stem.rsplit("_", 1)[-1]
            for path in directory.glob("olla-metrics-*/counter_*.db")}


def test_two_workers_one_truth(start_proxy: Callable[..., Proxy], llama_chat: LlamaServer,
                               tmp_path: Path) -> None:
    proxy = start_proxy({"endpoints": [{"url": llama_chat.url, "name": "chat",
                                        "check_interval": "1s"}]},
                        env={"OLLA_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    sent = 12

    def one(i: int) -> int:
        body = {"model": CHAT_ALIAS, "prompt": "Hello", "n_predict": 4, "stream": i % 2 == 0}
        with requests.post(f"{proxy.url}/olla/llamacpp/completion", json=body,
                           timeout=60) as response:
            return response.status_code

    assert [one(i) for i in range(sent)] == [200] * sent
    # Which worker accepts a connection is the kernel's choice: tokenize (cheap, counted
    # under its own route) on fresh connections until both workers have served something.
    tokenized = 0
    while len(pids_in(tmp_path)) < 2 and tokenized < 200:
        assert requests.post(f"{proxy.url}/olla/llamacpp/tokenize", json={"content": "x"},
                             timeout=10).status_code == 200
        tokenized += 1
    assert len(pids_in(tmp_path)) == 2
    labels = {"endpoint": "chat", "model": CHAT_ALIAS, "route": "completion"}
    key = ("olla_requests_total", frozenset({**labels, "status": "200"}.items()))
    tokens = ("olla_completion_tokens_total",
              frozenset({"endpoint": "chat", "model": CHAT_ALIAS}.items()))
    reexported = ("llamacpp:requests_deferred", frozenset({"endpoint": "chat"}.items()))
    deadline = time.monotonic() + 10
    scrapes = 0
    found = scrape(proxy)
    while time.monotonic() < deadline and (scrapes < 8 or reexported not in found):
        found = scrape(proxy)
        scrapes += 1
        # Whichever worker answers, the counts are the sum over both workers.
        assert found[key] == sent
        assert found[tokens] == sent * 4
        assert found[("olla_request_duration_seconds_count",
                      frozenset(labels.items()))] == sent
        tokenize = ("olla_requests_total", frozenset(
            {**labels, "route": "tokenize", "status": "200"}.items()))
        assert found.get(tokenize, 0) == tokenized
        time.sleep(0.1)
    assert reexported in found, "llama.cpp's own metrics not re-exported"
    assert found[("llamacpp:requests_deferred", frozenset({"endpoint": "chat"}.items()))] == 0
    assert found[("olla_endpoint_up", frozenset({"endpoint": "chat"}.items()))] == 1


def test_one_log_line_per_request_text_and_json(start_proxy: Callable[..., Proxy],
                                                llama_chat: LlamaServer) -> None:
    for log_format in ("text", "json"):
        proxy = start_proxy({"logging": {"format": log_format},
                             "endpoints": [{"url": llama_chat.url, "name": "chat"}]})
        for i, stream in enumerate((False, True)):
            with requests.post(f"{proxy.url}/olla/llamacpp/completion", timeout=60,
                               headers={"X-Request-Id": f"{log_format}-{i}"},
                               json={"model": CHAT_ALIAS, "prompt": "Hi", "n_predict": 3,
                                     "stream": stream}) as response:
                assert response.status_code == 200
                response.content  # noqa: B018 - read to the end: the stream's line follows
        requests.post(f"{proxy.url}/olla/llamacpp/completion", json={"temperature": 5},
                      headers={"X-Request-Id": f"{log_format}-bad"}, timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and f"{log_format}-bad" not in proxy.log():
            time.sleep(0.05)
        lines = [line for line in proxy.log().splitlines() if f"{log_format}-" in line]
        assert len(lines) == 3, lines
        if log_format == "json":
            records = [json.loads(line) for line in lines]
            ok = [r for r in records if r["status"] == 200]
            assert {r["request_id"] for r in ok} == {"json-0", "json-1"}
            assert all(r["endpoint"] == "chat" and r["model"] == CHAT_ALIAS
                       and r["route"] == "completion" and r["completion_tokens"] == 3
                       and r["ttfb_ms"] <= r["total_ms"] for r in ok)
            assert [r["status"] for r in records if r["request_id"] == "json-bad"] == [400]
        else:
            for i in (0, 1):
                line = next(x for x in lines if f"request_id=text-{i} " in x)
                for part in ("endpoint=chat", f"model={CHAT_ALIAS}", "route=completion",
                             "status=200", "completion_tokens=3", "ttfb_ms=", "total_ms="):
                    assert part in line, (part, line)
            assert "status=400" in next(x for x in lines if "text-bad" in x)
