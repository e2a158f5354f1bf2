"""The Grafana dashboard (deploy/grafana/olla-py.json): a valid dashboard whose every query
uses only series, and labels, that the proxy exports, read from the ``/internal/metrics`` of
apps in front of fake upstreams."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import responses
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from app.health import Probe, check_once
from app.registry import Status
from app.services import services_of

from .conftest import CHAT_URL, models_doc, props_doc

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "olla-py.json"
MODEL = "llama-3.1-8b-instruct-q4_k_m.gguf"
# llama-server's own /metrics (--metrics), as a real one (xllamacpp 2026.10) answers.
LLAMACPP_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 36
# HELP llamacpp:prompt_tokens_cached_total Number of prompt tokens reused from the cache
# TYPE llamacpp:prompt_tokens_cached_total counter
llamacpp:prompt_tokens_cached_total 42
# HELP llamacpp:prompt_seconds_total Total time spent processing prompts
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 0.413089
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 24
# HELP llamacpp:tokens_predicted_seconds_total Total time spent generating tokens
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 1.22283
# HELP llamacpp:n_decode_total Total number of llama_decode() calls, excluding speculative \
decoding and multimodal decoding
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 28
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 33
# HELP llamacpp:spec_decode_num_draft_tokens_total Speculative: Total draft tokens generated
# TYPE llamacpp:spec_decode_num_draft_tokens_total counter
llamacpp:spec_decode_num_draft_tokens_total 0
# HELP llamacpp:spec_decode_num_accepted_tokens_total Speculative: Total draft tokens accepted \
by the target model
# TYPE llamacpp:spec_decode_num_accepted_tokens_total counter
llamacpp:spec_decode_num_accepted_tokens_total 0
# HELP llamacpp:spec_decode_num_drafts_total Speculative: Total speculative decoding \
verification steps
# TYPE llamacpp:spec_decode_num_drafts_total counter
llamacpp:spec_decode_num_drafts_total 0
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 53.0881
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds 17.8096
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
# HELP llamacpp:n_busy_slots_per_decode Average number of busy slots per llama_decode() call
# TYPE llamacpp:n_busy_slots_per_decode gauge
llamacpp:n_busy_slots_per_decode 1
"""
CHAT_ANSWER = {
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 26, "completion_tokens": 8, "total_tokens": 34,
              "prompt_tokens_details": {"cached_tokens": 20}},
    "timings": {"cache_n": 20, "prompt_n": 6, "predicted_n": 8, "predicted_per_second": 16.3},
}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
GRAFANA_BUILTINS = frozenset({"__rate_interval", "__interval", "__interval_ms", "__range",
                              "__range_s", "__range_ms"})

# name -> the label names its samples carry; None for a family declared without a sample yet
Exported = dict[str, set[str] | None]

# ------------------------------------------------------------------------------ the checker

# Series a family of each type exposes (prometheus_client's parser drops a counter's _total
# from the family name). `_created` is left out on purpose: under gunicorn the proxy runs in
# multiprocess mode, whose exposition has no `_created` series, so a panel on one shows nothing.
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                   "summary": ("", "_sum", "_count"), "gaugehistogram": ("_bucket", "_gsum",
                                                                         "_gcount"),
                   "info": ("_info",)}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
TOKEN = re.compile(r"(?P<matchers>\{[^}]*\})|(?P<range>\[[^\]]*\])"
                   r"|(?P<name>(?<![\w.$])[A-Za-z_:][\w:]*)|(?P<other>\S)")
MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = GROUPING | {"bool", "offset", "and", "or", "unless", "inf", "nan", "atan2"}
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_]\w*)\s*\)"
                          r"\s*$", re.DOTALL)
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def exported_series(text: str) -> Exported:
    """Every series name a Prometheus exposition holds, with the label names seen on it."""
    out: Exported = {}
    created: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type in ("counter", "histogram", "summary"):
            created.add(family.name + "_created")  # the text format: a gauge family of its own
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
            out.setdefault(family.name + suffix, None)
        for sample in family.samples:
            seen = out.get(sample.name) or set()
            out[sample.name] = seen | set(sample.labels)
    return {name: labels for name, labels in out.items() if name not in created}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it matches on) for each series selector of a PromQL
    expression. Identifiers called like functions (``rate(``) or aggregating (``sum by``),
    keywords, grouping label lists (``by (le, endpoint)``), string literals and range
    brackets are not series."""
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(STRING.sub('""', expr))]
    found: list[tuple[str, set[str]]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "matchers":
            raise ValueError(f"a selector without a metric name: {text} in {expr!r}")
        if kind == "name" and following in (("name", "by"), ("name", "without")):
            i += 1
            continue  # an aggregation: sum by (...) (...)
        if kind == "name" and following == ("other", "("):
            if text in GROUPING:  # skip the label list
                depth, i = 0, i + 1
                while i < len(tokens):
                    depth += {"(": 1, ")": -1}.get(tokens[i][1], 0)
                    if depth == 0:
                        break
                    i += 1
            i += 1
            continue  # a function or an aggregation
        if kind == "name" and text not in KEYWORDS:
            labels: set[str] = set()
            if following[0] == "matchers":
                labels = set(MATCHER_LABEL.findall(following[1]))
                i += 1
            found.append((text, labels))
        i += 1
    return found


def problems(queries: Iterable[tuple[str, str]], exported: Exported) -> list[str]:
    """What is wrong with each (where, PromQL) query: a series the proxy does not export, a
    label that series does not carry, or no series at all. Empty when all is well."""
    out: list[str] = []
    for where, expr in queries:
        label = None
        values = LABEL_VALUES.match(expr)
        if values:  # a templating query: label_values(selector, label)
            expr, label = values["selector"], values["label"]
        try:
            found = selectors(expr)
        except ValueError as exc:
            out.append(f"{where}: {exc}")
            continue
        if not found:
            out.append(f"{where}: no series in {expr!r}")
        for name, labels in found:
            if name not in exported:
                out.append(f"{where}: {name} is not a series the proxy exports")
                continue
            known = exported[name]
            wanted = labels | ({label} if label else set())
            if known is not None and not wanted <= known:
                out.append(f"{where}: {name} has no label {sorted(wanted - known)}")
    return out


# ------------------------------------------------------------------------------ the dashboard

def load_dashboard() -> dict[str, Any]:
    """The dashboard JSON as Grafana imports it."""
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels that query (not rows)."""
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"])
           for p in data_panels(dashboard) for t in p["targets"]]
    out += [(f"variable {v['name']}", v["definition"])
            for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return out


# ------------------------------------------------------------------------------ the proxy

def healthy(pool: Any, endpoint: Any) -> Probe:
    """A health probe that always finds the endpoint healthy."""
    return Probe(Status.HEALTHY, "", 1.0)


def fake_llamacpp(fake: responses.RequestsMock) -> None:
    """One llama-server with one slot: discovery, a chat answer, /slots and /metrics."""
    fake.get(f"{CHAT_URL}/v1/models", json=models_doc(MODEL))
    fake.get(f"{CHAT_URL}/props", json=props_doc(f"/models/{MODEL}", total_slots=1))
    fake.post(f"{CHAT_URL}/v1/chat/completions", json=CHAT_ANSWER)
    fake.get(f"{CHAT_URL}/slots", json=[{"id": 0, "is_processing": False}])
    fake.get(f"{CHAT_URL}/metrics", body=LLAMACPP_METRICS)


@pytest.fixture
def exported(fake: responses.RequestsMock, make_app: Callable[..., Flask],
             redis_url: str) -> Exported:
    """What the proxy exports once every labelled series has a sample: one app on its own
    (a request answered, one refused, one queued until it timed out, a lease reclaimed) and
    one with shared state (Redis), whose series differ."""
    fake_llamacpp(fake)
    endpoints = [{"url": CHAT_URL, "name": "chat"}]
    app = make_app({"endpoints": endpoints, "proxy": {"queue": {"timeout": "10ms"}}})
    svc = services_of(app)
    check_once(svc.registry, now=0.0, probe_fn=healthy)  # state, slots, llamacpp:* text
    client = app.test_client()
    assert client.post("/olla/llamacpp/v1/chat/completions", json=CHAT).status_code == 200
    assert client.post("/olla/llamacpp/v1/chat/completions", json={}).status_code == 400
    lease = svc.dispatcher.acquire("", list(svc.registry))  # the only slot
    assert client.post("/olla/llamacpp/v1/chat/completions", json=CHAT).status_code == 503
    del lease                                               # never given back
    assert len(svc.dispatcher.tick()) == 1                  # reclaimed
    found = exported_series(client.get("/internal/metrics").get_data(as_text=True))

    shared = make_app({"endpoints": endpoints, "state": {"redis_url": redis_url}})
    check_once(services_of(shared).registry, now=0.0, probe_fn=healthy)
    text = shared.test_client().get("/internal/metrics").get_data(as_text=True)
    for name, labels in exported_series(text).items():
        if labels is None:
            found.setdefault(name, None)
        else:
            found[name] = (found.get(name) or set()) | labels
    return found


# ------------------------------------------------------------------------------ tests

def test_the_dashboard_is_valid_and_importable() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard.get("id") is None  # so that an import makes a new one
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("endpoint", "model"):
        assert variables[name]["type"] == "query"
        assert LABEL_VALUES.match(variables[name]["definition"]), name
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = data_panels(dashboard)
    assert len(panels) >= 15
    for panel in panels:
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["type"] in {"timeseries", "stat", "bargauge", "gauge", "table",
                                 "state-timeline"}, where
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, where
        targets = panel["targets"]
        assert targets, where
        assert len({t["refId"] for t in targets}) == len(targets), where
        for target in targets:
            assert target["expr"].strip(), where
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], where
            for match in VARIABLE.finditer(target["expr"]):
                name = match[1] or match[2]
                assert name in variables or name in GRAFANA_BUILTINS, f"{where}: ${name}"


def test_every_query_uses_only_series_the_proxy_exports(exported: Exported) -> None:
    dashboard = load_dashboard()
    assert problems(queries(dashboard), exported) == []
    used = {name for _, expr in queries(dashboard)
            for name, _ in selectors(LABEL_VALUES.sub(r"\g<selector>", expr))}
    # Each series was seen with a sample, so its labels were checked too.
    assert {name for name in used if exported[name] is None} == set()
    assert any(name.startswith("llamacpp:") for name in used)


def test_the_checker_reports_what_is_not_exported(exported: Exported) -> None:
    assert problems([("p", "sum(rate(olla_no_such_metric_total[5m]))")], exported) == [
        "p: olla_no_such_metric_total is not a series the proxy exports"]
    assert problems([("p", 'olla_endpoint_up{model="x"}')], exported) == [
        "p: olla_endpoint_up has no label ['model']"]
    assert problems([("v", "label_values(olla_endpoint_up, route)")], exported) == [
        "v: olla_endpoint_up has no label ['route']"]
    assert problems([("p", "olla_requests")], exported) == [   # the family, not a series
        "p: olla_requests is not a series the proxy exports"]
    assert problems([("p", "olla_requests_created")], exported) == [  # not under gunicorn
        "p: olla_requests_created is not a series the proxy exports"]
    assert problems([("p", 'sum(rate({__name__="olla_requests_total"}[1m]))')], exported)
    assert problems([("p", "vector(1)")], exported) == ["p: no series in 'vector(1)'"]


def test_the_tokenizer_finds_series_not_functions_labels_or_variables() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, endpoint) (rate(olla_time_to_first_byte_'
            'seconds_bucket{endpoint=~"$endpoint", model=~"a{b}[c]"}[$__rate_interval])))')
    assert selectors(expr) == [("olla_time_to_first_byte_seconds_bucket", {"endpoint", "model"})]
    expr = ("max by (endpoint) (llamacpp:requests_deferred offset 5m) > on (endpoint) "
            "group_left (state) 1e3 * olla_endpoint_state == bool 1 or vector(0)")
    assert selectors(expr) == [("llamacpp:requests_deferred", set()),
                               ("olla_endpoint_state", set())]
    assert selectors("sum(x) without (route) / ignoring(route) y") == [("x", set()),
                                                                      ("y", set())]
