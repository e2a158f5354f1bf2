"""Prometheus metrics (``GET /internal/metrics``) through ``prometheus_client``.

Under gunicorn with several workers each worker is its own process with its own counters,
so the library's multiprocess mode is used: gunicorn.conf.py points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before forking, every worker writes its
samples there, and whichever worker answers a scrape sums them all (gauges of in-flight
requests and queue depth as the live sum over workers). What each worker sees for itself
anyway — endpoint state, slots, and every endpoint's own ``llamacpp:*`` metrics, which each
worker's health loop reads — is exported by a collector of the answering worker, with an
``endpoint`` label added, so one scrape shows the whole fleet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .metrics_dir import MULTIPROC_ENV
from .registry import EndpointState, Status

if TYPE_CHECKING:
    from .services import Services
    from .stats import Exchange

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
WAIT = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE = (1, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000)
LABELS = ("endpoint", "model", "route")


class Metrics:
    """The proxy's own series, and the exposition of everything."""

    def __init__(self, shared: bool = False) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("olla_requests", "Requests answered, by status",
                                [*LABELS, "status"], registry=r)
        self.ttfb = Histogram("olla_time_to_first_byte_seconds",
                              "Arrival to the upstream's first byte (a stream's first event)",
                              LABELS, buckets=SECONDS, registry=r)
        self.duration = Histogram("olla_request_duration_seconds",
                                  "Arrival to the last byte relayed", LABELS, buckets=SECONDS,
                                  registry=r)
        self.queue_wait = Histogram("olla_queue_wait_seconds",
                                    "Time waiting for a free slot", ["model"], buckets=WAIT,
                                    registry=r)
        self.overhead = Histogram("olla_proxy_overhead_seconds",
                                  "Time the proxy itself added before the upstream request "
                                  "went out (parsing, validation, routing; queue wait "
                                  "excluded)", LABELS, buckets=OVERHEAD, registry=r)
        self.prompt_tokens = Counter("olla_prompt_tokens",
                                     "Prompt tokens (llama.cpp usage), KV-cache hits included",
                                     ["endpoint", "model"], registry=r)
        self.prompt_cached_tokens = Counter(
            "olla_prompt_cached_tokens",
            "Prompt tokens llama.cpp reused from its KV cache (timings.cache_n)",
            ["endpoint", "model"], registry=r)
        self.completion_tokens = Counter("olla_completion_tokens",
                                         "Generated tokens (llama.cpp usage)",
                                         ["endpoint", "model"], registry=r)
        self.tokens_per_second = Histogram("olla_tokens_per_second",
                                           "Generation speed (llama.cpp timings)",
                                           ["endpoint", "model"], buckets=RATE, registry=r)
        self.in_flight = Gauge("olla_in_flight_requests", "Requests holding a slot now",
                               ["endpoint"], multiprocess_mode="livesum", registry=r)
        # With shared state the queue is the fleet's, read from Redis by FleetCollector.
        self.queue_depth = None if shared else Gauge(
            "olla_queue_depth", "Requests waiting for a slot now", ["model"],
            multiprocess_mode="livesum", registry=r)
        self.leases_reclaimed = Counter(
            "olla_slot_leases_reclaimed", "Slot leases reclaimed: dropped without being "
            "given back, or not renewed in time (their worker died)", ["endpoint"],
            registry=r)
        self.shared_state_up = None if not shared else Gauge(
            "olla_shared_state_up", "1 while the shared state (Redis) answers, 0 while "
            "workers fall back to local slot shares (the lowest over workers)",
            multiprocess_mode="livemin", registry=r)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: the library validates labels on every
        call, a cost on each request for children that exist after the first."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def record(self, exchange: Exchange) -> None:
        """Observe one finished proxied request."""
        labels = (exchange.state.endpoint.name, exchange.model, exchange.route)
        child = self.child
        if exchange.ttfb_ms is not None:
            child(self.ttfb, *labels).observe(exchange.ttfb_ms / 1000)
        child(self.duration, *labels).observe(exchange.total_ms / 1000)
        if exchange.overhead_ms is not None:
            child(self.overhead, *labels).observe(exchange.overhead_ms / 1000)
        prompt, completion, rate = exchange.usage()
        endpoint_model = labels[:2]
        if prompt:
            child(self.prompt_tokens, *endpoint_model).inc(prompt)
            cached = exchange.cached_tokens()
            if cached:
                child(self.prompt_cached_tokens, *endpoint_model).inc(cached)
        if completion:
            child(self.completion_tokens, *endpoint_model).inc(completion)
        if rate:
            child(self.tokens_per_second, *endpoint_model).observe(rate)

    def answered(self, endpoint: str, model: str, route: str, status: int) -> None:
        """Count one answered request (proxied or refused by the proxy itself)."""
        self.child(self.requests, endpoint, model, route, str(status)).inc()

    def _merged(self) -> CollectorRegistry:
        """Every worker's series (this one's alone without the multiprocess directory)."""
        if not self.multiprocess_dir:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return merged

    def prompt_totals(self) -> dict[tuple[str, str], tuple[float, float]]:
        """(prompt tokens, of them from the KV cache) per (endpoint, model), summed over
        this proxy's workers."""
        wanted = {"olla_prompt_tokens_total": 0, "olla_prompt_cached_tokens_total": 1}
        out: dict[tuple[str, str], list[float]] = {}
        for family in self._merged().collect():
            for sample in family.samples:
                at = wanted.get(sample.name)
                if at is not None:
                    labels = (sample.labels["endpoint"], sample.labels["model"])
                    out.setdefault(labels, [0.0, 0.0])[at] += sample.value
        return {labels: (totals[0], totals[1]) for labels, totals in out.items()}

    def render(self, svc: Services) -> bytes:
        """The exposition: every worker's series, plus this worker's view of the fleet."""
        body = generate_latest(self._merged())
        fleet = CollectorRegistry()
        fleet.register(FleetCollector(svc))
        return body + generate_latest(fleet)


STATES = tuple(s.value for s in Status)


class FleetCollector(Collector):
    """Endpoint state, slots and each endpoint's own llama.cpp metrics, as this worker's
    health loop last saw them."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterable[Metric]:
        states = list(self.svc.registry)
        state_family = GaugeMetricFamily("olla_endpoint_state",
                                         "1 for the endpoint's current state",
                                         labels=["endpoint", "state"])
        up = GaugeMetricFamily("olla_endpoint_up", "1 if the endpoint takes requests",
                               labels=["endpoint"])
        slots = GaugeMetricFamily("olla_endpoint_slots", "llama.cpp slots (total_slots)",
                                  labels=["endpoint"])
        busy = GaugeMetricFamily("olla_endpoint_slots_in_use",
                                 "Slots busy: the proxy's leases (fleet-wide with shared "
                                 "state) and others seen in /slots", labels=["endpoint"])
        view = self.svc.dispatcher.snapshot()  # with Redis: the fleet's, and fresh
        leases = GaugeMetricFamily("olla_slot_leases", "Slot leases held (fleet-wide with "
                                   "shared state, else by this worker)", labels=["endpoint"])
        for state in states:
            name = state.endpoint.name
            leases.add_metric([name], float(view.in_use.get(name, 0)))
            for value in STATES:
                state_family.add_metric([name, value], 1.0 if state.status.value == value
                                        else 0.0)
            up.add_metric([name], 1.0 if state.routable else 0.0)
            if state.total_slots is not None:
                slots.add_metric([name], float(state.total_slots))
            busy.add_metric([name], float(state.slots_in_use))
        yield from (state_family, up, slots, busy, leases)
        longest = GaugeMetricFamily("olla_queue_longest_wait_seconds",
                                    "How long the oldest waiting request has waited "
                                    "(fleet-wide with shared state, else this worker's)")
        longest.add_metric([], view.longest_wait)
        yield longest
        if view.shared:
            depth = GaugeMetricFamily("olla_queue_depth", "Requests waiting for a slot now "
                                      "(fleet-wide)", labels=["model"])
            for model, count in sorted(view.by_model.items()):
                depth.add_metric([model], float(count))
            yield depth
        yield from reexported(states)


def reexported(states: Iterable[EndpointState]) -> Iterator[Metric]:
    """Each endpoint's ``llamacpp:*`` families (and nothing else it sends), merged, with an
    ``endpoint`` label."""
    families: dict[str, Metric] = {}
    for state in states:
        text = state.metrics_text
        if not text:
            continue
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError as exc:
            log.debug("unparseable /metrics from %s: %s", state.endpoint.name, exc)
            continue
        for family in parsed:
            if not family.name.startswith("llamacpp:"):
                continue  # an upstream cannot add series of ours (olla_*) or anyone's
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels,
                                                "endpoint": state.endpoint.name},
                                  sample.value, sample.timestamp, sample.exemplar)
    yield from families.values()

