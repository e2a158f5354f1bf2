"""Balancers order routable endpoints: first is tried first, the rest are failover order."""

from __future__ import annotations

from app.balancer import least_connections, make_balancer, priority, round_robin
from app.config import Endpoint
from app.registry import EndpointState


def states(*spec: tuple[str, int]) -> list[EndpointState]:
    return [EndpointState(Endpoint(name=n, url=f"http://{n}.test", priority=p)) for n, p in spec]


def names(ordered: list[EndpointState]) -> list[str]:
    return [s.endpoint.name for s in ordered]


def test_round_robin_takes_turns_and_keeps_everyone_for_failover() -> None:
    balance = round_robin()
    pool = states(("a", 1), ("b", 50), ("c", 100))
    firsts = [names(balance(pool))[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert sorted(names(balance(pool))) == ["a", "b", "c"]


def test_priority_serves_the_top_tier_in_turn_then_lower_tiers() -> None:
    balance = priority()
    pool = states(("low", 10), ("top1", 90), ("top2", 90), ("mid", 50))
    orders = [names(balance(pool)) for _ in range(4)]
    assert [o[0] for o in orders] == ["top1", "top2", "top1", "top2"]
    assert all(o[2:] == ["mid", "low"] for o in orders)


def test_least_connections_prefers_the_idlest_and_rotates_ties() -> None:
    balance = least_connections()
    pool = states(("a", 100), ("b", 100), ("c", 1))
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 3, 1, 1
    firsts = [names(balance(pool))[0] for _ in range(4)]
    assert set(firsts) == {"b", "c"}                   # ties take turns, priority ignored
    assert all(names(balance(pool))[-1] == "a" for _ in range(3))


def test_make_balancer_names() -> None:
    for name in ("priority", "round-robin", "least-connections"):
        assert callable(make_balancer(name))


def test_the_default_balancer_is_least_busy_free_slots_then_priority() -> None:
    from app.config import ProxySettings

    balance = make_balancer(ProxySettings().load_balancer)
    pool = states(("low", 10), ("high", 90), ("mid", 50), ("full", 100))
    slots = {"low": 4, "high": 2, "mid": 2, "full": 2}
    busy = {"low": 0, "high": 0, "mid": 0, "full": 2}
    for state in pool:
        state.props = {"total_slots": slots[state.endpoint.name]}
        state.in_flight = busy[state.endpoint.name]
    # Most free slots first (low: 4), then by priority among equals (high before mid);
    # the full one last, still there for failover.
    assert names(balance(pool)) == ["low", "high", "mid", "full"]
    pool[0].in_flight = 3            # low now has 1 free: the 2-free ones go first
    assert names(balance(pool)) == ["high", "mid", "low", "full"]


def test_the_config_offers_exactly_the_balancers_there_are() -> None:
    from app.balancer import BALANCERS
    from app.config import BALANCER_NAMES

    assert sorted(BALANCERS) == sorted(BALANCER_NAMES)
