"""Slot leases: every slot a request holds is a lease, and no lease outlives its request.

The request that takes a slot holds its ``Lease`` (strongly); this worker's ``LeaseBook``
holds it weakly, renews it while it is held, and reclaims it when its holder is gone without
giving it back: a backstop against any path that forgets to release. With shared state the
same lease also lives in Redis with an expiry the book's renewals push forward, so the slots
of a worker that dies (SIGKILL) come back once that expiry passes.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .registry import EndpointState


def new_id() -> str:
    """A lease (or waiter) id: 64 random bits as hex."""
    return os.urandom(8).hex()


@dataclass(eq=False, slots=True, weakref_slot=True)
class Lease:
    """One slot held on one endpoint by one request."""

    id: str
    request_id: str
    state: EndpointState
    share: str = ""           # whose slot (the API key's name; "" without keys)
    released: bool = False
    # When the request's last write to its client started, while that write is blocked
    # (monotonic; None when nothing is being written): for ``proxy.write_timeout``.
    writing_since: float | None = None
    # Ends the request from outside (closes the client connection): set by its owner.
    abort: Callable[[], None] | None = None
    # Wakes a running stream's relay from outside (shuts its upstream socket): set by its
    # owner once the stream is relayed; the relay then ends it as ``streaming.SHUTTING_DOWN``
    # says.
    interrupt: Callable[[], None] | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint's name."""
        return self.state.endpoint.name


@dataclass(slots=True)
class Held:
    """What the book keeps of a lease: enough to reclaim it once its holder is gone."""

    ref: weakref.ref[Lease]
    id: str
    request_id: str
    state: EndpointState
    share: str = ""

    @property
    def endpoint(self) -> str:
        """The endpoint's name."""
        return self.state.endpoint.name


class LeaseBook:
    """This worker's leases, held weakly."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._held: dict[str, Held] = {}

    def add(self, lease: Lease) -> None:
        """Start tracking a lease just taken."""
        self._held[lease.id] = Held(weakref.ref(lease), lease.id, lease.request_id,
                                    lease.state, lease.share)

    def remove(self, lease_id: str) -> Held | None:
        """Stop tracking a lease given back; what was held, or None if it was not."""
        return self._held.pop(lease_id, None)

    def live(self) -> list[Lease]:
        """The leases whose holders still hold them."""
        out = []
        for held in self._held.values():
            lease = held.ref()
            if lease is not None and not lease.released:
                out.append(lease)
        return out

    def sweep(self) -> list[Held]:
        """Take out and return the leases whose holder dropped them without giving them
        back (the rest are still held: renewed, where a shared table keeps an expiry)."""
        lost: list[Held] = []
        for lease_id, held in list(self._held.items()):
            lease = held.ref()
            if lease is None or lease.released:
                lost.append(held)
                del self._held[lease_id]
        return lost

    def by_endpoint(self) -> dict[str, int]:
        """Leases this worker holds, per endpoint name."""
        counts: dict[str, int] = {}
        for held in self._held.values():
            counts[held.endpoint] = counts.get(held.endpoint, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self._held)
