"""Per-request accounting: one Exchange per proxied request, aggregated per endpoint and
per model for the status routes."""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from .registry import EndpointState

SAMPLES = 1000  # latency samples kept per model for percentiles


def percentile(samples: Any, q: float) -> float | None:
    """The q-th percentile (0-100) of the samples, nearest-rank; None when empty."""
    ordered = sorted(samples)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def find_timings(data: bytes) -> dict[str, Any] | None:
    """llama.cpp's ``timings`` (and OpenAI ``usage``) from a JSON body or the SSE events in
    a chunk; None when there are none. Only called on bodies that mention them."""
    candidates = [data] if data.lstrip().startswith(b"{") else [
        line[5:] for line in data.split(b"\n") if line.startswith(b"data:")]
    for raw in reversed(candidates):
        if b'"timings"' not in raw and b'"usage"' not in raw:
            continue
        try:
            document = json.loads(raw)
        except ValueError:
            continue
        if isinstance(document, dict) and isinstance(document.get("message"), dict):
            document = document["message"]  # Anthropic's message_start event
        if isinstance(document, dict):
            found = {k: document[k] for k in ("timings", "usage")
                     if isinstance(document.get(k), dict)}
            if found:
                return found
    return None


def _count(value: Any) -> TypeGuard[int]:
    """A token count: a non-negative integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int(value: Any) -> int:
    return value if _count(value) else 0


@dataclass
class ModelStats:
    """Traffic for one model name (as clients name it) in this worker."""

    requests: int = 0
    successes: int = 0
    failures: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    ttfb_ms: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    tokens_per_second: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_requested: float | None = None
    endpoints: dict[str, int] = field(default_factory=dict)


@dataclass
class TranslatorStats:
    """Requests through one of Olla's translators in this worker (here only Anthropic's,
    always passed through to llama.cpp's own Messages API)."""

    requests: int = 0
    successes: int = 0
    streaming: int = 0
    latency_sum_ms: float = 0.0

    def record(self, ok: bool, streaming: bool, latency_ms: float) -> None:
        """Count one answered request (a stream when it ended)."""
        self.requests += 1
        self.successes += ok
        self.streaming += streaming
        self.latency_sum_ms += latency_ms


class Stats:
    """Aggregates finished exchanges."""

    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = {}
        self.translators: dict[str, TranslatorStats] = {"anthropic": TranslatorStats()}
        self.started = time.time()

    def record(self, exchange: Exchange) -> None:
        """Count one finished exchange."""
        if not exchange.model:
            return
        model = self.models.setdefault(exchange.model, ModelStats())
        model.requests += 1
        model.successes += exchange.ok
        model.failures += not exchange.ok
        model.latencies_ms.append(exchange.total_ms)
        if exchange.ttfb_ms is not None:
            model.ttfb_ms.append(exchange.ttfb_ms)
        model.last_requested = time.time()
        name = exchange.state.endpoint.name
        model.endpoints[name] = model.endpoints.get(name, 0) + 1
        prompt, completion, rate = exchange.usage()
        if rate:
            model.tokens_per_second.append(rate)
        model.prompt_tokens += prompt or 0
        model.completion_tokens += completion or 0


@dataclass
class Exchange:
    """One request's trip through an endpoint; ``finish()`` exactly once."""

    state: EndpointState
    model: str
    route: str
    started: float                          # perf_counter at the request's arrival
    release: Callable[[], None]             # gives the slot lease back
    # Told about every counted exchange once it is over: stats, metrics, the request log.
    observers: Sequence[Callable[[Exchange], None]] = ()
    queue_wait_ms: float = 0.0
    request_id: str = ""
    client: str = ""                        # the API key's name ("" without keys)
    overhead_ms: float | None = None        # the proxy's own time before sending upstream
    ttfb_ms: float | None = None
    status: int = 0
    ok: bool = True
    timings: dict[str, Any] | None = None
    total_ms: float = 0.0
    finished: bool = False

    def sending(self) -> None:
        """The upstream request is about to go out."""
        self.overhead_ms = max(0.0, (time.perf_counter() - self.started) * 1000
                               - self.queue_wait_ms)

    def answered(self, status: int) -> None:
        """The upstream's status line and headers arrived (a non-streamed answer's first
        byte; a stream's first byte is its first event: ``first_byte()``)."""
        self.status = status
        self.ttfb_ms = (time.perf_counter() - self.started) * 1000

    def first_byte(self) -> None:
        """A stream's first event arrived."""
        self.ttfb_ms = (time.perf_counter() - self.started) * 1000

    def usage(self) -> tuple[int | None, int | None, float | None]:
        """(prompt tokens, generated tokens, tokens per second) from llama.cpp's ``usage``
        (OpenAI's or Anthropic's fields) or ``timings``, where it reported them. Prompt
        tokens count those read from the KV cache too."""
        timings = (self.timings or {}).get("timings") or {}
        usage = (self.timings or {}).get("usage") or {}
        prompt = usage.get("prompt_tokens")
        if not _count(prompt) and _count(usage.get("input_tokens")):
            prompt = usage["input_tokens"] + _int(usage.get("cache_read_input_tokens"))
        if not _count(prompt) and _count(timings.get("prompt_n")):
            prompt = timings["prompt_n"] + _int(timings.get("cache_n"))
        completion = usage.get("completion_tokens", usage.get("output_tokens",
                                                               timings.get("predicted_n")))
        rate = timings.get("predicted_per_second")
        return (prompt if _count(prompt) else None,
                completion if _count(completion) else None,
                float(rate) if isinstance(rate, (int, float)) and rate > 0 else None)

    def cached_tokens(self) -> int | None:
        """Prompt tokens llama.cpp took from its KV cache instead of processing them:
        ``timings.cache_n``, OpenAI's ``prompt_tokens_details.cached_tokens`` or
        Anthropic's ``cache_read_input_tokens``; None when it did not say."""
        timings = (self.timings or {}).get("timings") or {}
        usage = (self.timings or {}).get("usage") or {}
        details = usage.get("prompt_tokens_details")
        for found in (timings.get("cache_n"),
                      details.get("cached_tokens") if isinstance(details, dict) else None,
                      usage.get("cache_read_input_tokens")):
            if _count(found):
                return found
        return None

    def finish(self, ok: bool | None = None, counted: bool = True) -> None:
        """The exchange is over (body relayed, failed, or the client left). An attempt
        that was passed over for another endpoint is not ``counted`` in model stats."""
        if self.finished:
            return
        self.finished = True
        if ok is not None:
            self.ok = ok
        if self.status >= 500 and self.status != 501:
            self.ok = False
        self.total_ms = (time.perf_counter() - self.started) * 1000
        self.release()
        # A failed attempt counts against its endpoint; one passed over for a feature it
        # lacks (501) or while loading counts nowhere; a client request counts once.
        if counted or not self.ok:
            self.state.record_request(self.ok, self.total_ms)
        if counted:
            for observe in self.observers:
                observe(self)
