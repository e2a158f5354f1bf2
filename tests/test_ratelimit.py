"""Rate limits, counted in this worker's memory and in a real Redis shared by workers."""

from __future__ import annotations

import pytest

from app.config import ApiKey, RateLimits, StateSettings
from app.errors import RateLimited
from app.ratelimit import Limiter

KEY = ApiKey(name="k", key="sk-k", requests_per_minute=3, tokens_per_minute=100)


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> StateSettings:
    if request.param == "memory":
        return StateSettings()
    url = request.getfixturevalue("redis_url")
    return StateSettings(redis_url=url)


def test_a_keys_requests_are_counted_and_refused_with_headers(state: StateSettings) -> None:
    limiter = Limiter(RateLimits(), [KEY], state)
    remaining = [limiter.admit("10.0.0.1", KEY).headers["X-RateLimit-Remaining"]
                 for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimited) as raised:
        limiter.admit("10.0.0.1", KEY)
    assert raised.value.status == 429 and raised.value.code == "rate_limit_exceeded"
    assert 1 <= int(raised.value.headers["Retry-After"]) <= 60
    assert "auth.api_keys[].requests_per_minute" in raised.value.message
    assert "sk-k" not in raised.value.message


def test_a_refused_request_counts_against_no_limit(state: StateSettings) -> None:
    limiter = Limiter(RateLimits(per_ip_requests_per_minute=5), [KEY], state)
    for _ in range(3):
        limiter.admit("10.0.0.2", KEY)
    for _ in range(3):  # refused by the key's limit: the address's count stays at 3
        with pytest.raises(RateLimited):
            limiter.admit("10.0.0.2", KEY)
    assert limiter.admit("10.0.0.2", None).headers["X-RateLimit-Remaining"] == "1"


def test_tokens_past_the_limit_fill_the_window(state: StateSettings) -> None:
    limiter = Limiter(RateLimits(), [ApiKey(name="t", key="sk-t", tokens_per_minute=100)],
                      state)
    key = limiter.keys["t"]
    limiter.admit("a", key)
    limiter.used_tokens("t", 70)
    limiter.admit("a", key)          # 70 of 100 used: still admitted
    limiter.used_tokens("t", 70)     # 140: over, counted all the same
    with pytest.raises(RateLimited) as raised:
        limiter.admit("a", key)
    assert "tokens_per_minute" in raised.value.message


def test_burst_is_per_second_and_global_is_for_everyone(state: StateSettings) -> None:
    limiter = Limiter(RateLimits(global_requests_per_minute=100, burst_size=2), [], state)
    limiter.admit("a", None)
    limiter.admit("b", None)
    with pytest.raises(RateLimited) as raised:
        limiter.admit("c", None)
    assert "burst_size" in raised.value.message and "per second" in raised.value.message


def test_two_workers_on_one_redis_share_one_count(redis_url: str) -> None:
    state = StateSettings(redis_url=redis_url)
    one, two = Limiter(RateLimits(), [KEY], state), Limiter(RateLimits(), [KEY], state)
    one.admit("x", KEY)
    two.admit("x", KEY)
    one.admit("x", KEY)
    with pytest.raises(RateLimited):
        two.admit("x", KEY)


def test_redis_unreachable_counts_in_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    from tests.integration.procs import free_port

    limiter = Limiter(RateLimits(), [KEY],
                      StateSettings(redis_url=f"redis://127.0.0.1:{free_port()}"))
    for _ in range(3):
        limiter.admit("x", KEY)
    with pytest.raises(RateLimited):
        limiter.admit("x", KEY)
    assert "Redis unreachable" in caplog.text and "counting in this worker" in caplog.text


def test_the_last_window_counts_by_how_much_it_still_overlaps() -> None:
    from app.ratelimit import Limit, Rule, Windows

    windows, rule = Windows(), Rule(Limit(10, 60), "key", "k")
    for _ in range(10):
        assert windows.check([rule], 1, 600.0)[0] == 0      # window 10: ten counted
    assert windows.check([rule], 1, 659.0)[0] == 1          # still full
    # Half-way through the next window, half of the last one still counts: room for 4 more
    # (5 from before + 4 + this one = 10).
    results = [windows.check([rule], 1, 690.0)[0] for _ in range(6)]
    assert results == [0, 0, 0, 0, 0, 1]
    assert windows.check([rule], 1, 800.0) == (0, 840.0, 9)  # two windows on: forgotten


def test_a_test_limit_is_checked_never_counted_and_take_always_counts() -> None:
    from app.ratelimit import Limit, Rule, Windows

    windows = Windows()
    test, take = Rule(Limit(5, 60), "tokens", "k", mode="test"), Rule(Limit(5, 60), "tokens",
                                                                      "k", mode="take")
    for _ in range(3):
        assert windows.check([test], 1, 0.0)[0] == 0
    assert windows.check([take], 9, 0.0)[0] == 0            # over the limit, counted
    assert windows.check([test], 1, 0.0)[0] == 1


def test_idle_counters_are_forgotten() -> None:
    from app.ratelimit import Limit, Rule, Windows

    windows = Windows()
    for address in range(100):
        windows.check([Rule(Limit(5, 60), "ip", str(address))], 1, 0.0)
    windows.check([Rule(Limit(5, 60), "ip", "late")], 1, 200.0)
    assert list(windows._counts) == ["ip:late"]
