"""Balancers: order the routable candidates for one request (the first is tried first,
the rest are the failover order)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from .registry import EndpointState

Balancer = Callable[[Sequence[EndpointState]], list[EndpointState]]


def _rotated(states: Sequence[EndpointState], turn: int) -> list[EndpointState]:
    if not states:
        return []
    k = turn % len(states)
    return [*states[k:], *states[:k]]


def round_robin() -> Balancer:
    """Each request starts one further along the list."""
    counter = itertools.count()

    def order(states: Sequence[EndpointState]) -> list[EndpointState]:
        return _rotated(sorted(states, key=lambda s: s.endpoint.name), next(counter))

    return order


def priority() -> Balancer:
    """Highest priority tier first, round robin within a tier; lower tiers for failover."""
    counter = itertools.count()

    def order(states: Sequence[EndpointState]) -> list[EndpointState]:
        turn = next(counter)
        out: list[EndpointState] = []
        for _, tier in itertools.groupby(
                sorted(states, key=lambda s: (-s.endpoint.priority, s.endpoint.name)),
                key=lambda s: s.endpoint.priority):
            out += _rotated(list(tier), turn)
        return out

    return order


def least_connections() -> Balancer:
    """Fewest in-flight requests through this worker first; ties take turns."""
    counter = itertools.count()

    def order(states: Sequence[EndpointState]) -> list[EndpointState]:
        rotated = _rotated(sorted(states, key=lambda s: s.endpoint.name), next(counter))
        return sorted(rotated, key=lambda s: s.in_flight)  # stable: ties keep the rotation

    return order


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "round-robin": round_robin,
    "priority": priority,
    "least-connections": least_connections,
}


def make_balancer(name: str) -> Balancer:
    """The balancer configured as ``proxy.load_balancer``."""
    return BALANCERS[name]()


def free_slots(state: EndpointState) -> float:
    """Slots free on an endpoint now (infinite when its slot count is unknown)."""
    total = state.total_slots
    if total is None:
        return float("inf")
    return float(total - state.slots_in_use)


def least_busy() -> Balancer:
    """Most free slots first, then the highest priority; ties take turns."""
    counter = itertools.count()

    def order(states: Sequence[EndpointState]) -> list[EndpointState]:
        rotated = _rotated(sorted(states, key=lambda s: s.endpoint.name), next(counter))
        return sorted(rotated, key=lambda s: (-free_slots(s), -s.endpoint.priority))

    return order


BALANCERS["least-busy"] = least_busy
