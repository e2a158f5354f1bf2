"""The dashboard's last 15 minutes (app/history.py): seconds, buckets, the fleet's sum in
Redis."""

from __future__ import annotations

from typing import Any

import pytest

from app.config import StateSettings
from app.history import SECONDS, TTFB_BOUNDS, History, Second, outcome_of, quantile
from app.shared import SharedTable


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeExchange:
    """What History reads of an Exchange."""

    def __init__(self, ttfb_ms: float | None, prompt: int = 0, cached: int = 0,
                 tokens: int = 0, ok: bool = True, status: int = 200) -> None:
        self.ttfb_ms, self.ok, self.status = ttfb_ms, ok, status
        self.route, self.model = "v1/chat/completions", "gemma"
        self._usage = (prompt or None, tokens or None, None)
        self._cached = cached or None

    def usage(self) -> tuple[int | None, int | None, None]:
        return self._usage  # type: ignore[return-value]

    def cached_tokens(self) -> int | None:
        return self._cached


def test_outcomes() -> None:
    assert [outcome_of(s) for s in (200, 302, 404, 429, 500, 503)] == [
        "ok", "ok", "client_error", "client_error", "server_error", "server_error"]


def test_quantiles_from_buckets() -> None:
    buckets = [0] * len(TTFB_BOUNDS)
    assert quantile(buckets, 0.5) is None
    buckets[TTFB_BOUNDS.index(100)] = 10   # ten samples in (50, 100] ms
    assert quantile(buckets, 0.5) == pytest.approx(75.0)
    buckets[TTFB_BOUNDS.index(1000)] = 10  # and ten in (750, 1000]
    assert quantile(buckets, 0.5) == pytest.approx(100.0)
    assert 750 < (quantile(buckets, 0.95) or 0) <= 1000
    buckets[-1] = 100                      # beyond the last bound: its lower bound
    assert quantile(buckets, 0.99) == TTFB_BOUNDS[-2]


def test_a_second_by_second_window() -> None:
    clock = Clock()
    history = History(clock=clock)
    history.answered(200, "v1/chat/completions", "gemma", None)
    history.exchange(FakeExchange(80, prompt=100, cached=75, tokens=20))  # type: ignore[arg-type]
    history.queue_depth(3)
    clock.now += 1
    history.answered(503, "v1/chat/completions", "gemma", "slots_exhausted")
    history.answered(404, "v1/chat/completions", "nope", "model_not_found")
    clock.now += 1
    series = history.series()
    assert series["seconds"] == SECONDS and len(series["queue_depth"]) == SECONDS
    assert series["start"] == int(clock.now) - SECONDS
    assert series["requests"]["ok"][-2:] == [1, 0]
    assert series["requests"]["server_error"][-1] == 1
    assert series["requests"]["client_error"][-1] == 1
    assert series["tokens_per_second"][-2] == 20 and series["queue_depth"][-2] == 3
    assert series["cache_hit_rate"][-2] == 75.0 and series["cache_hit_rate"][-1] is None
    assert series["ttfb_p50_ms"][-2] == pytest.approx(75.0)
    assert series["ttfb_p50_ms"][-1] is None and series["shared"] is False
    assert [e["code"] for e in series["errors"]] == ["model_not_found", "slots_exhausted"]
    assert set(series["errors"][0]) == {"time", "route", "model", "status", "code"}


def test_the_window_forgets_what_is_older_than_15_minutes() -> None:
    clock = Clock()
    history = History(clock=clock)
    history.answered(200, "r", "m", None)
    clock.now += SECONDS + 5
    history.answered(200, "r", "m", None)
    clock.now += 1
    assert sum(history.series()["requests"]["ok"]) == 1
    assert len(history.seconds) == 2


def test_a_stream_that_broke_is_an_error() -> None:
    history = History(clock=Clock())
    history.exchange(FakeExchange(50, ok=False, status=200))  # type: ignore[arg-type]
    assert history.errors[-1]["code"] == "stream_failed"


def test_seconds_round_trip_as_fields() -> None:
    second = Second(5)
    second.add("ok", 2)
    second.ttfb[3] = 4
    second.queue = 7
    again = Second.of(5, second.fields())
    assert (again.counts, again.ttfb, again.queue) == (second.counts, second.ttfb, 7)


def test_workers_add_up_in_redis(redis_url: str) -> None:
    state = StateSettings(redis_url=redis_url)
    clock = Clock()
    one = History(SharedTable(state, "w1"), clock)
    two = History(SharedTable(state, "w2"), clock)
    for history, ttfb, depth in ((one, 80, 2), (two, 900, 5)):
        history.answered(200, "v1/chat/completions", "gemma", None)
        history.exchange(FakeExchange(ttfb, prompt=100, cached=50, tokens=10))  # type: ignore[arg-type]
        history.queue_depth(depth)
    one.answered(500, "v1/chat/completions", "gemma", "upstream_error")
    one.flush()
    two.flush()                 # the current second is not over: nothing sent yet
    assert one.series()["requests"]["ok"][-1] == 0
    clock.now += 1
    one.flush()
    two.flush()
    series: dict[str, Any] = two.series()
    assert series["shared"] is True
    assert series["requests"]["ok"][-1] == 2 and series["requests"]["server_error"][-1] == 1
    assert series["tokens_per_second"][-1] == 20
    assert series["queue_depth"][-1] == 5       # the deepest, not the sum
    assert series["cache_hit_rate"][-1] == 50.0
    assert series["ttfb_p50_ms"][-1] == pytest.approx(100.0)   # one at 80, one at 900
    assert [e["code"] for e in series["errors"]] == ["upstream_error"]
    assert one.series() == series


def test_redis_down_keeps_this_workers_seconds() -> None:
    clock = Clock()
    history = History(SharedTable(StateSettings(redis_url="redis://127.0.0.1:1/0"), "w"),
                      clock)
    history.answered(200, "r", "m", None)
    clock.now += 1
    history.flush()
    series = history.series()
    assert series["shared"] is False and series["requests"]["ok"][-1] == 1
