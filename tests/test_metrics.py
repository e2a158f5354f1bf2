"""Prometheus metrics and the request log, against fake upstreams."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from app.health import Probe, check_once
from app.logs import JsonFormatter
from app.registry import Status
from app.services import services_of

from .conftest import CHAT_URL, add_llamacpp

MODEL = "llama-3.1-8b-instruct-q4_k_m.gguf"
LLAMACPP_METRICS = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1234
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""


@pytest.fixture
def client(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> FlaskClient:
    add_llamacpp(fake, CHAT_URL, MODEL)
    fake.post(f"{CHAT_URL}/completion", json={
        "content": "hi", "timings": {"prompt_n": 5, "predicted_n": 7,
                                     "predicted_per_second": 50.0}})
    fake.get(f"{CHAT_URL}/slots", json=[{"id": 0, "is_processing": False}])
    fake.get(f"{CHAT_URL}/metrics", body=LLAMACPP_METRICS)
    return make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}]}).test_client()


def samples(client: FlaskClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/internal/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_counts_latency_and_tokens_after_known_requests(client: FlaskClient) -> None:
    for _ in range(3):
        assert client.post("/olla/llamacpp/completion",
                           json={"model": MODEL, "prompt": "x"}).status_code == 200
    assert client.post("/olla/llamacpp/completion", json={"temperature": 9}).status_code == 400
    found = samples(client)
    labels = {"endpoint": "chat", "model": MODEL, "route": "completion"}
    assert value(found, "olla_requests_total", **labels, status="200") == 3
    assert value(found, "olla_requests_total", endpoint="", model="", route="completion",
                 status="400") == 1
    assert value(found, "olla_request_duration_seconds_count", **labels) == 3
    assert value(found, "olla_time_to_first_byte_seconds_count", **labels) == 3
    assert value(found, "olla_proxy_overhead_seconds_count", **labels) == 3
    assert value(found, "olla_queue_wait_seconds_count", model=MODEL) == 3
    assert value(found, "olla_prompt_tokens_total", endpoint="chat", model=MODEL) == 15
    assert value(found, "olla_completion_tokens_total", endpoint="chat", model=MODEL) == 21
    assert value(found, "olla_tokens_per_second_count", endpoint="chat", model=MODEL) == 3
    assert value(found, "olla_tokens_per_second_sum", endpoint="chat", model=MODEL) == 150
    assert value(found, "olla_in_flight_requests", endpoint="chat") == 0


def test_endpoint_state_slots_and_llamacpp_reexport(client: FlaskClient) -> None:
    svc = services_of(client.application)  # type: ignore[arg-type]
    check_once(svc.registry, now=0.0,
               probe_fn=lambda pool, endpoint: Probe(Status.HEALTHY, "", 1.0))
    found = samples(client)
    assert value(found, "olla_endpoint_state", endpoint="chat", state="healthy") == 1
    assert value(found, "olla_endpoint_state", endpoint="chat", state="offline") == 0
    assert value(found, "olla_endpoint_up", endpoint="chat") == 1
    assert value(found, "olla_endpoint_slots", endpoint="chat") == 2
    assert value(found, "olla_endpoint_slots_in_use", endpoint="chat") == 0
    assert value(found, "llamacpp:prompt_tokens_total", endpoint="chat") == 1234
    assert value(found, "llamacpp:requests_deferred", endpoint="chat") == 0


def test_streamed_tokens_are_counted_from_the_final_event(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, MODEL)
    events = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
              b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":4,"completion_tokens":2},'
              b'"timings":{"predicted_n":2,"predicted_per_second":80.0}}\n\ndata: [DONE]\n\n')
    fake.post(f"{CHAT_URL}/v1/chat/completions", body=events, content_type="text/event-stream")
    client = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}]}).test_client()
    response = client.post("/olla/llamacpp/v1/chat/completions", json={
        "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert response.data == events
    found = samples(client)
    assert value(found, "olla_completion_tokens_total", endpoint="chat", model=MODEL) == 2
    assert value(found, "olla_tokens_per_second_sum", endpoint="chat", model=MODEL) == 80


def test_one_log_line_per_request(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.requests"):
        client.post("/olla/llamacpp/completion", json={"model": MODEL, "prompt": "x"},
                    headers={"X-Request-Id": "req-1"})
        client.post("/olla/llamacpp/completion", json={"model": "nope", "prompt": "x"},
                    headers={"X-Request-Id": "req-2"})
        client.get("/internal/status")
    lines = [r for r in caplog.records if r.name == "app.requests"]
    assert len(lines) == 2
    ok, missing = lines
    assert ok.request_id == "req-1" and ok.endpoint == "chat"  # type: ignore[attr-defined]
    assert ok.model == MODEL and ok.route == "completion"  # type: ignore[attr-defined]
    assert ok.status == 200 and ok.completion_tokens == 7  # type: ignore[attr-defined]
    assert ok.ttfb_ms is not None and ok.total_ms >= ok.ttfb_ms  # type: ignore[attr-defined]
    assert "request_id=req-1" in ok.getMessage() and "status=200" in ok.getMessage()
    assert missing.status == 404 and missing.endpoint == ""  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(ok))
    assert line["request_id"] == "req-1" and line["prompt_tokens"] == 5


def test_unknown_paths_share_one_route_label(client: FlaskClient) -> None:
    for i in range(5):
        assert client.get(f"/olla/llamacpp/scan-{i}").status_code == 404
    found = samples(client)
    assert value(found, "olla_requests_total", endpoint="", model="", route="(other)",
                 status="404") == 5
    assert not any("scan-" in dict(labels).get("route", "") for _, labels in found)


def test_only_llamacpp_families_are_reexported() -> None:
    from app.config import Endpoint
    from app.metrics import reexported
    from app.registry import EndpointState

    state = EndpointState(Endpoint(name="evil", url="http://evil.test"))
    state.metrics_text = ("# TYPE olla_requests_total counter\nolla_requests_total 1e9\n"
                          "# TYPE process_cpu_seconds_total counter\n"
                          "process_cpu_seconds_total 5\n"
                          "# TYPE llamacpp:requests_processing gauge\n"
                          "llamacpp:requests_processing 1\n")
    families = list(reexported([state]))
    assert [f.name for f in families] == ["llamacpp:requests_processing"]
    assert families[0].samples[0].labels == {"endpoint": "evil"}


def test_the_metrics_directory_removes_only_what_the_proxy_made(tmp_path: Path) -> None:
    import subprocess
    import sys

    from app import metrics_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "counter_4242.db").write_bytes(b"someone else's")
    foreign = shared / "olla-metrics-notours"
    foreign.mkdir()                                   # no owner file: not ours
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = shared / "olla-metrics-stale"
    stale.mkdir()
    (stale / metrics_dir.OWNER_FILE).write_text(gone)  # a previous run, its master gone
    (stale / "counter_1.db").write_bytes(b"old")
    live = shared / "olla-metrics-live"
    live.mkdir()
    (live / metrics_dir.OWNER_FILE).write_text(str(os.getpid()))  # a running proxy's

    environ = {metrics_dir.MULTIPROC_ENV: str(shared)}
    made = metrics_dir.prepare_directory(environ)
    assert environ[metrics_dir.MULTIPROC_ENV] == made
    assert Path(made).parent == shared and os.listdir(made) == [metrics_dir.OWNER_FILE]
    assert (shared / "counter_4242.db").exists() and foreign.exists() and live.exists()
    assert not stale.exists()
    metrics_dir.remove_directory(environ)
    assert not Path(made).exists() and (shared / "counter_4242.db").exists()
