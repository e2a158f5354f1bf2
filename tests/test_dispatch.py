"""Slots and the queue, driven with threads (no gevent, no sockets)."""

from __future__ import annotations

import threading
import time

import pytest

from app.config import Endpoint, QueueSettings
from app.dispatch import SLOTS_EXHAUSTED, Dispatcher, Share
from app.errors import ClientDisconnected, SlotsExhausted
from app.leases import Lease
from app.registry import EndpointState, Status


def endpoint(name: str, slots: int | None) -> EndpointState:
    state = EndpointState(Endpoint(name=name, url=f"http://{name}.test"))
    state.status = Status.HEALTHY
    if slots is not None:
        state.props = {"total_slots": slots}
    return state


def dispatcher(max_size: int = 10, timeout: float = 5.0) -> Dispatcher:
    return Dispatcher(QueueSettings(max_size=max_size, timeout=timeout, retry_after=3))


def wait_for(condition: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.005)
    raise AssertionError("condition not met")


class Client(threading.Thread):
    """Acquires a slot in the background; records what it got."""

    def __init__(self, d: Dispatcher, key: str, eligible: list[EndpointState],
                 log: list[str] | None = None, name: str = "",
                 share: Share | None = None) -> None:
        super().__init__(daemon=True)
        self.d, self.key, self.eligible, self.log, self.label = d, key, eligible, log, name
        self.share = share or Share()
        self.got: Lease | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.got = self.d.acquire(self.key, self.eligible, share=self.share)
            if self.log is not None:
                self.log.append(self.label)
        except BaseException as exc:  # recorded for the test to check
            self.error = exc


def test_free_slot_is_taken_at_once() -> None:
    d, a = dispatcher(), endpoint("a", 2)
    assert d.acquire("m", [a]).state is a and d.acquire("m", [a]).state is a
    assert a.in_flight == 2 and a.in_flight >= d.capacity(a)


def test_first_free_in_router_order() -> None:
    d, a, b = dispatcher(), endpoint("a", 1), endpoint("b", 1)
    assert d.acquire("m", [a, b]).state is a
    assert d.acquire("m", [a, b]).state is b


def test_unknown_capacity_never_queues() -> None:
    d, a = dispatcher(max_size=0), endpoint("a", None)
    for _ in range(50):
        assert d.acquire("m", [a]).state is a


def test_waiters_are_served_in_arrival_order() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    held = [d.acquire("m", [a])]
    order: list[str] = []
    clients = []
    for i in range(4):
        client = Client(d, "m", [a], order, f"c{i}")
        client.start()
        wait_for(lambda i=i: d.depth() == i + 1)
        clients.append(client)
    for expected in range(1, 5):
        d.release(held[-1])
        wait_for(lambda expected=expected: len(order) == expected)
        held.append(clients[expected - 1].got)  # type: ignore[arg-type]
    assert order == ["c0", "c1", "c2", "c3"]
    assert a.in_flight == 1 and d.depth() == 0


def test_oldest_waiter_first_across_models() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    lease = d.acquire("x", [a])
    order: list[str] = []
    first = Client(d, "y", [a], order, "y-first")
    first.start()
    wait_for(lambda: d.depth() == 1)
    second = Client(d, "x", [a], order, "x-second")
    second.start()
    wait_for(lambda: d.depth() == 2)
    d.release(lease)
    wait_for(lambda: len(order) == 1)
    assert order == ["y-first"]


def test_a_new_request_does_not_jump_the_queue() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    d.acquire("m", [a])
    waiting = Client(d, "m", [a])
    waiting.start()
    wait_for(lambda: d.depth() == 1)
    a.in_flight -= 1          # the slot frees without pump() (e.g. between two calls)
    late = Client(d, "m", [a])
    late.start()
    # It queues behind the waiter, not past it: the free slot goes to the waiter.
    wait_for(lambda: waiting.got is not None and waiting.got.state is a)
    wait_for(lambda: d.depth() == 1)
    assert late.got is None


def test_full_queue_is_503_slots_exhausted_with_retry_after() -> None:
    d, a = dispatcher(max_size=1), endpoint("a", 1)
    d.acquire("m", [a])
    Client(d, "m", [a]).start()
    wait_for(lambda: d.depth() == 1)
    with pytest.raises(SlotsExhausted) as raised:
        d.acquire("m", [a])
    error = raised.value
    assert (error.status, error.code, error.type) == (503, "slots_exhausted", "server_error")
    assert error.message == SLOTS_EXHAUSTED
    assert error.headers == {"Retry-After": "3"}


def test_queue_size_zero_never_waits() -> None:
    d, a = dispatcher(max_size=0), endpoint("a", 1)
    d.acquire("m", [a])
    with pytest.raises(SlotsExhausted):
        d.acquire("m", [a])


def test_wait_timeout_is_503_and_leaves_the_queue() -> None:
    d, a = dispatcher(timeout=0.05), endpoint("a", 1)
    d.acquire("m", [a])
    started = time.monotonic()
    with pytest.raises(SlotsExhausted):
        d.acquire("m", [a])
    assert time.monotonic() - started >= 0.05
    assert d.depth() == 0 and d.queues == {}


def test_client_gone_while_queued_leaves_at_once() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    d.acquire("m", [a])

    def gone(event: threading.Event, timeout: float) -> bool:
        raise ClientDisconnected("bye")

    with pytest.raises(ClientDisconnected):
        d.acquire("m", [a], wait=gone)
    assert d.depth() == 0 and a.in_flight == 1


def test_slot_handed_over_as_the_client_left_is_given_back() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    first = d.acquire("m", [a])

    def released_then_gone(event: threading.Event, timeout: float) -> bool:
        d.release(first)      # the slot frees and goes to this waiter...
        assert event.is_set()
        raise ClientDisconnected("...which had just gone")

    with pytest.raises(ClientDisconnected):
        d.acquire("m", [a], wait=released_then_gone)
    assert a.in_flight == 0 and d.depth() == 0


def test_others_busy_count_against_capacity() -> None:
    d, a = dispatcher(max_size=0), endpoint("a", 2)
    a.others_busy = 2
    with pytest.raises(SlotsExhausted):
        d.acquire("m", [a])
    a.others_busy = 1
    assert d.acquire("m", [a]).state is a


def test_unroutable_endpoints_get_nothing_until_pumped_back() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    a.status = Status.LOADING
    client = Client(d, "m", [a])
    client.start()
    wait_for(lambda: d.depth() == 1)
    a.status = Status.HEALTHY
    d.refresh([a])            # what the health loop does after each round
    wait_for(lambda: client.got is not None and client.got.state is a)


def test_status_figures() -> None:
    d, a, b = dispatcher(), endpoint("a", 1), endpoint("b", 1)
    lease = d.acquire("m", [a])
    Client(d, "m", [a]).start()
    wait_for(lambda: d.depth() == 1)
    time.sleep(0.02)
    assert d.longest_wait() >= 0.02
    assert (d.waiting_for(a), d.waiting_for(b)) == (1, 0)
    assert d.snapshot().in_use == {"a": 1} and d.snapshot().by_model == {"m": 1}
    d.release(lease)
    wait_for(lambda: d.depth() == 0)
    assert d.longest_wait() == 0.0


def test_release_is_idempotent() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    lease = d.acquire("m", [a])
    d.release(lease)
    d.release(lease)
    assert a.in_flight == 0 and len(d.book) == 0
    assert d.acquire("m", [a]).state is a and a.in_flight == 1


@pytest.mark.parametrize(("workers", "total", "share"), [(2, 4, 2), (4, 2, 1), (3, 8, 2),
                                                         (1, 3, 3)])
def test_each_worker_takes_its_share_without_shared_state(workers: int, total: int,
                                                          share: int) -> None:
    d = Dispatcher(QueueSettings(max_size=0), workers=workers)
    a = endpoint("a", total)
    a.others_busy = 1   # other workers' requests show in /slots: not held against a share
    if workers == 1:
        share -= 1      # one worker: those are other clients, and count
    for _ in range(share):
        d.acquire("m", [a])
    with pytest.raises(SlotsExhausted):
        d.acquire("m", [a])
    assert a.in_flight == share


def test_a_lease_dropped_without_release_is_reclaimed(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    from app.metrics import Metrics

    metrics = Metrics()
    d = Dispatcher(QueueSettings(max_size=5, timeout=5.0), metrics)
    a = endpoint("a", 1)
    lease = d.acquire("m", [a], request_id="req-leaky")
    assert d.tick() == []            # held: renewed, not reclaimed
    assert a.in_flight == 1
    del lease                        # a path that forgot to give it back
    lost = d.tick()
    assert [h.request_id for h in lost] == ["req-leaky"]
    assert a.in_flight == 0 and len(d.book) == 0
    assert "req-leaky" in caplog.text and "reclaimed" in caplog.text
    value = metrics.registry.get_sample_value("olla_slot_leases_reclaimed_total",
                                              {"endpoint": "a"})
    assert value == 1.0
    assert d.acquire("m", [a]).state is a


def test_a_reclaimed_slot_goes_to_the_next_waiter() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    lease = d.acquire("m", [a])
    client = Client(d, "m", [a])
    client.start()
    wait_for(lambda: d.depth() == 1)
    del lease
    d.tick()
    wait_for(lambda: client.got is not None)
    assert a.in_flight == 1


def test_a_stalled_write_is_cut_off() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    lease = d.acquire("m", [a])
    aborted: list[str] = []
    lease.abort = lambda: aborted.append(lease.id)
    lease.writing_since = time.monotonic() - 5
    d.tick(write_timeout=10.0)
    assert aborted == []
    d.tick(write_timeout=2.0)
    assert aborted == [lease.id]
    lease.writing_since = None       # written: nothing more to cut
    d.tick(write_timeout=2.0)
    assert aborted == [lease.id]


HEAVY, LIGHT = Share("heavy"), Share("light")


def turns(d: Dispatcher, first: Lease, clients: list[Client], order: list[str]) -> None:
    """Give the one slot back, again and again, until every client has had it."""
    held = first
    for served in range(1, len(clients) + 1):
        d.release(held)
        wait_for(lambda served=served: len(order) == served)
        held = next(c.got for c in clients if c.label == order[-1])  # type: ignore[assignment]
    d.release(held)


def queue_up(d: Dispatcher, a: EndpointState, who: list[tuple[str, Share]],
             order: list[str]) -> list[Client]:
    clients = []
    for label, share in who:
        client = Client(d, "m", [a], order, label, share)
        client.start()
        wait_for(lambda: d.depth() == len(clients) + 1)
        clients.append(client)
    return clients


def test_a_flooding_key_does_not_starve_another() -> None:
    d, a = dispatcher(max_size=50), endpoint("a", 1)
    first = d.acquire("m", [a], share=HEAVY)
    order: list[str] = []
    clients = queue_up(d, a, [(f"h{i}", HEAVY) for i in range(6)]
                       + [("l0", LIGHT), ("l1", LIGHT)], order)
    turns(d, first, clients, order)
    # The light key's first request goes at the next turn, its second two turns later;
    # each key's own requests keep their order.
    assert order == ["l0", "h0", "l1", "h1", "h2", "h3", "h4", "h5"]


def test_a_heavier_weight_gets_more_turns() -> None:
    d, a = dispatcher(max_size=50), endpoint("a", 1)
    double = Share("double", weight=2.0)
    first = d.acquire("m", [a], share=HEAVY)
    order: list[str] = []
    clients = queue_up(d, a, [(f"h{i}", HEAVY) for i in range(4)]
                       + [(f"d{i}", double) for i in range(6)], order)
    turns(d, first, clients, order)
    assert order[:6] == ["d0", "d1", "h0", "d2", "d3", "h1"]


def test_without_keys_it_is_a_plain_fifo() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    first = d.acquire("m", [a])
    order: list[str] = []
    clients = queue_up(d, a, [(f"c{i}", Share()) for i in range(4)], order)
    turns(d, first, clients, order)
    assert order == ["c0", "c1", "c2", "c3"]


def test_a_key_at_its_max_concurrent_waits_while_others_go() -> None:
    d, a = dispatcher(), endpoint("a", 3)
    capped = Share("capped", max_concurrent=1)
    held = d.acquire("m", [a], share=capped)
    order: list[str] = []
    waiting = Client(d, "m", [a], order, "capped-2", capped)
    waiting.start()
    wait_for(lambda: d.depth() == 1)  # queued although two slots are free
    other = d.acquire("m", [a], share=LIGHT)  # another key is not held up by it
    assert a.in_flight == 2 and order == []
    d.release(held)
    wait_for(lambda: order == ["capped-2"])
    assert d.holding == {"capped": 1, "light": 1}
    d.release(other)
    d.release(waiting.got)  # type: ignore[arg-type]
    assert d.holding == {} and a.in_flight == 0


def test_max_concurrent_is_split_between_workers_without_shared_state() -> None:
    d = Dispatcher(QueueSettings(max_size=5, timeout=0.05), workers=2)
    a = endpoint("a", 8)
    capped = Share("capped", max_concurrent=4)
    held = [d.acquire("m", [a], share=capped) for _ in range(2)]
    with pytest.raises(SlotsExhausted):
        d.acquire("m", [a], share=capped)  # this worker's half is 2
    for lease in held:
        d.release(lease)


def test_closing_the_queue_answers_every_waiter_and_queues_nobody() -> None:
    d, a = dispatcher(), endpoint("a", 1)
    held = d.acquire("m", [a])
    waiting = Client(d, "m", [a])
    waiting.start()
    wait_for(lambda: d.depth() == 1)
    d.close_queue()
    waiting.join(5)
    assert isinstance(waiting.error, SlotsExhausted)
    assert waiting.error.code == "server_shutting_down"
    assert waiting.error.headers["Retry-After"] == "3" and d.depth() == 0
    with pytest.raises(SlotsExhausted) as raised:
        d.acquire("m", [a])  # no slot free, and no waiting any more
    assert raised.value.code == "server_shutting_down"
    d.release(held)
    assert d.acquire("m", [a]).state is a  # a free slot is still given
