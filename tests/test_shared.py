"""The shared slot table and queue on a real redis-server: several dispatchers stand for
workers (of one host or several), each with its own view of the same endpoints."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from app.config import QueueSettings, StateSettings
from app.errors import ClientDisconnected, SlotsExhausted
from app.leases import Lease
from app.metrics import Metrics
from app.registry import EndpointState, Status
from app.shared import SharedDispatcher, display_redis_url
from tests.integration.procs import RedisServer
from tests.test_dispatch import endpoint, wait_for


class Worker:
    """One worker's dispatcher and its own EndpointState objects."""

    def __init__(self, url: str, slots: dict[str, int | None], max_size: int = 10,
                 timeout: float = 5.0, ttl: float = 2.0, workers: int = 2,
                 metrics: Metrics | None = None) -> None:
        self.states = {name: endpoint(name, n) for name, n in slots.items()}
        self.d = SharedDispatcher(QueueSettings(max_size=max_size, timeout=timeout),
                                  StateSettings(redis_url=url, lease_ttl=ttl), self.states,
                                  metrics, workers=workers)
        self.d.refresh(self.states.values())   # what the health loop does after a round
        self.d.start()

    def __getitem__(self, name: str) -> EndpointState:
        return self.states[name]

    def acquire(self, key: str = "m", *names: str, **kwargs: object) -> Lease:
        return self.d.acquire(key, [self.states[n] for n in names or list(self.states)],
                              **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def workers(redis_url: str) -> Iterator[list[Worker]]:
    made: list[Worker] = []
    yield made
    for worker in made:
        worker.d.stop()


def make(made: list[Worker], url: str, **kwargs: object) -> Worker:
    worker = Worker(url, **kwargs)  # type: ignore[arg-type]
    made.append(worker)
    return worker


class Waiting(threading.Thread):
    """Acquires in the background; records the lease and when it came."""

    def __init__(self, worker: Worker, key: str = "m", order: list[str] | None = None,
                 label: str = "", **kwargs: object) -> None:
        super().__init__(daemon=True)
        self.worker, self.key, self.order, self.label, self.kwargs = (worker, key, order,
                                                                      label, kwargs)
        self.lease: Lease | None = None
        self.error: BaseException | None = None
        self.got_at: float | None = None

    def run(self) -> None:
        try:
            kwargs = dict(self.kwargs)
            names = kwargs.pop("names", ())
            self.lease = self.worker.acquire(self.key, *names, **kwargs)  # type: ignore[misc]
            self.got_at = time.monotonic()
            if self.order is not None:
                self.order.append(self.label)
        except BaseException as exc:  # recorded for the test
            self.error = exc


def test_the_slot_table_is_fleet_wide(workers: list[Worker], redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 2})
    two = make(workers, redis_url, slots={"a": 2})
    assert one.d.reachable and two.d.reachable
    first, second = one.acquire(), two.acquire()
    assert first.state is one["a"] and second.state is two["a"]
    view = one.d.snapshot()
    assert view.shared and view.in_use == {"a": 2}
    waiter = Waiting(one)
    waiter.start()
    wait_for(lambda: one.d.snapshot().depth == 1)
    assert two.d.snapshot().by_model == {"m": 1}       # every worker sees the fleet's queue
    released = time.monotonic()
    two.d.release(second)                              # frees on the other worker...
    waiter.join(5)
    assert waiter.lease is not None and waiter.got_at is not None
    assert waiter.got_at - released < 0.05             # ...and the waiter has it at once
    assert one["a"].in_flight == 2 and two["a"].in_flight == 0
    two.d.settle()
    assert one.d.snapshot().in_use == {"a": 2} and one.d.snapshot().depth == 0


def test_arrival_order_holds_across_workers(workers: list[Worker], redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 1})
    two = make(workers, redis_url, slots={"a": 1})
    held = one.acquire()
    order: list[str] = []
    waiting = []
    for i, worker in enumerate([two, one, two, one]):
        client = Waiting(worker, order=order, label=f"w{i}")
        client.start()
        wait_for(lambda i=i: one.d.snapshot().depth == i + 1)
        waiting.append(client)
    owner = {id(held): one}
    for expected in range(1, 5):
        owner[id(held)].d.release(held)
        wait_for(lambda expected=expected: len(order) == expected)
        client = waiting[expected - 1]
        assert client.lease is not None
        held = client.lease
        owner[id(held)] = client.worker
    assert order == ["w0", "w1", "w2", "w3"]


def test_fifo_within_a_model_oldest_first_across_models(workers: list[Worker],
                                                        redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 1})
    two = make(workers, redis_url, slots={"a": 1})
    held = one.acquire("x")
    order: list[str] = []
    first = Waiting(two, "y", order, "y-first")
    first.start()
    wait_for(lambda: one.d.snapshot().depth == 1)
    second = Waiting(one, "x", order, "x-second")
    second.start()
    wait_for(lambda: one.d.snapshot().depth == 2)
    one.d.release(held)
    wait_for(lambda: len(order) == 1)
    assert order == ["y-first"]


def test_the_queue_bound_is_fleet_wide(workers: list[Worker], redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 1}, max_size=2)
    two = make(workers, redis_url, slots={"a": 1}, max_size=2)
    one.acquire()
    for worker, depth in ((one, 1), (two, 2)):
        Waiting(worker).start()
        wait_for(lambda depth=depth: one.d.snapshot().depth == depth)
    with pytest.raises(SlotsExhausted) as raised:
        two.acquire()
    assert raised.value.headers == {"Retry-After": "2"}


def test_timeout_and_a_client_that_leaves_leave_the_queue(workers: list[Worker],
                                                          redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 1}, timeout=0.3)
    one.acquire()
    started = time.monotonic()
    with pytest.raises(SlotsExhausted):
        one.acquire()
    assert time.monotonic() - started >= 0.3
    assert one.d.snapshot().depth == 0

    def gone(event: threading.Event, timeout: float) -> bool:
        raise ClientDisconnected("bye")

    with pytest.raises(ClientDisconnected):
        one.acquire(wait=gone)
    assert one.d.snapshot().depth == 0 and one["a"].in_flight == 1


def test_a_dead_workers_leases_and_waiters_are_reclaimed(workers: list[Worker],
                                                         redis_url: str,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    metrics = Metrics(shared=True)
    dead = make(workers, redis_url, slots={"a": 2}, ttl=1.0)
    alive = make(workers, redis_url, slots={"a": 2}, ttl=1.0, metrics=metrics)
    alive.d.tick()
    dead.acquire(request_id="req-of-the-dead")
    dead.acquire(request_id="req-of-the-dead-2")
    assert alive.d.snapshot().in_use == {"a": 2}
    dead.d.stop()                  # from here on it never renews: as if SIGKILLed
    started = time.monotonic()
    waiter = Waiting(alive)
    waiter.start()
    while waiter.lease is None and time.monotonic() - started < 3:
        alive.d.tick()             # what alive's renewing greenlet does every second
        time.sleep(0.1)
    assert waiter.lease is not None, "the dead worker's slots never came back"
    assert 0.9 <= time.monotonic() - started < 1.5
    assert "req-of-the-dead" in caplog.text
    assert metrics.registry.get_sample_value("olla_slot_leases_reclaimed_total",
                                             {"endpoint": "a"}) == 2.0


def test_a_dead_workers_waiters_are_dropped(workers: list[Worker], redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 1}, ttl=1.0)
    dead = make(workers, redis_url, slots={"a": 1}, ttl=1.0, timeout=2.0)
    held = one.acquire()
    dead.d.tick()
    stranded = Waiting(dead)
    stranded.start()
    wait_for(lambda: one.d.snapshot().depth == 1)
    dead.d.stop()
    time.sleep(1.1)                # its heartbeat runs out
    one.d.tick()
    waiter = Waiting(one)
    waiter.start()
    wait_for(lambda: one.d.snapshot().depth >= 1)
    one.d.release(held)
    wait_for(lambda: waiter.lease is not None)   # not handed to the dead worker's waiter
    stranded.join(5)                             # its own timeout ends it
    assert stranded.lease is None


def test_renewal_never_brings_back_a_released_lease(workers: list[Worker],
                                                    redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 1})
    lease = one.acquire()
    one.d._renew("XX")             # a renewal racing the release on its way to Redis
    one.d.release(lease)
    one.d._renew("XX")
    one.d.settle()
    assert one.d.snapshot().in_use == {"a": 0}


def test_redis_down_falls_back_to_a_share_and_rejoins(workers: list[Worker], redis_url: str,
                                                      redis_server: RedisServer) -> None:
    metrics = Metrics(shared=True)
    one = make(workers, redis_url, slots={"a": 4}, workers=2, max_size=0, metrics=metrics)
    first = one.acquire()
    redis_server.stop()
    second = one.acquire()                       # Redis gone: nothing lost, no error
    assert not one.d.reachable
    assert one.d.describe()["reachable"] is False and one.d.describe()["local_share"]
    assert metrics.registry.get_sample_value("olla_shared_state_up") == 0.0
    with pytest.raises(SlotsExhausted):
        one.acquire()                            # its share: floor(4 / 2) = 2
    one.d.release(second)
    redis_server.start()
    one.d.tick()                                 # reconnects, re-registers what it holds
    assert one.d.reachable
    assert metrics.registry.get_sample_value("olla_shared_state_up") == 1.0
    one.d.refresh(one.states.values())
    assert one.d.snapshot().in_use == {"a": 1}
    assert [lease.id for lease in one.d.book.live()] == [first.id]
    one.d.release(first)
    one.d.settle()
    assert one.d.snapshot().in_use == {"a": 0} and one["a"].in_flight == 0


def test_redis_unreachable_at_start(workers: list[Worker]) -> None:
    one = make(workers, "redis://127.0.0.1:1/0", slots={"a": 2}, workers=1, max_size=0)
    assert not one.d.reachable
    assert one.acquire().state is one["a"] and one.acquire().state is one["a"]
    with pytest.raises(SlotsExhausted):
        one.acquire()
    assert one.d.describe()["backend"] == "redis"


def test_status_shows_no_password() -> None:
    assert display_redis_url("redis://:s3cret@cache.internal:6380/2") == \
        "redis://cache.internal:6380/2"
    assert display_redis_url("rediss://user:pw@h/0") == "rediss://h/0"
    assert display_redis_url("unix:///run/redis.sock?password=x") == "unix:///run/redis.sock"


def test_unknown_capacity_is_never_queued(workers: list[Worker], redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": None}, max_size=0)
    for _ in range(20):
        one.acquire()
    assert one.d.snapshot().in_use == {"a": 20}


def test_an_unroutable_endpoint_gets_no_grant(workers: list[Worker], redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 1, "b": 1})
    one["b"].status = Status.OFFLINE
    one.d.refresh(one.states.values())
    assert one.acquire("m", "a", "b").state is one["a"]
    waiter = Waiting(one, names=("a", "b"))
    waiter.start()
    wait_for(lambda: one.d.snapshot().depth == 1)
    one["b"].status = Status.HEALTHY
    one.d.refresh([one["b"]])
    wait_for(lambda: waiter.lease is not None)
    assert waiter.lease is not None and waiter.lease.state is one["b"]


def test_leases_given_back_together_reach_redis_in_one_go(workers: list[Worker],
                                                          redis_url: str) -> None:
    one = make(workers, redis_url, slots={"a": 8})
    leases = [one.acquire() for _ in range(8)]
    for lease in leases:
        one.d.release(lease)
    assert one["a"].in_flight == 0           # at once, locally
    one.d.settle()
    assert one.d.snapshot().in_use == {"a": 0}


def test_fair_shares_hold_across_workers(workers: list[Worker], redis_url: str) -> None:
    """The heavy key floods from one worker, the light one asks from another: the light
    key's requests go at the next turn and two turns later, not after the flood."""
    from app.dispatch import Share

    one = make(workers, redis_url, slots={"a": 1}, max_size=50)
    two = make(workers, redis_url, slots={"a": 1}, max_size=50)
    heavy, light = Share("heavy"), Share("light")
    held = one.acquire(share=heavy)
    order: list[str] = []
    waiting = []
    for label, worker, share in [*[(f"h{i}", one, heavy) for i in range(5)],
                                 ("l0", two, light), ("l1", two, light)]:
        client = Waiting(worker, order=order, label=label, share=share)
        client.start()
        wait_for(lambda: one.d.snapshot().depth == len(waiting) + 1)
        waiting.append(client)
    owner = {id(held): one}
    for served in range(1, len(waiting) + 1):
        owner[id(held)].d.release(held)
        wait_for(lambda served=served: len(order) == served)
        client = next(c for c in waiting if c.label == order[-1])
        assert client.lease is not None
        held = client.lease
        owner[id(held)] = client.worker
    owner[id(held)].d.release(held)
    assert order == ["l0", "h0", "l1", "h1", "h2", "h3", "h4"]


def test_max_concurrent_holds_fleet_wide(workers: list[Worker], redis_url: str) -> None:
    from app.dispatch import Share

    one = make(workers, redis_url, slots={"a": 4})
    two = make(workers, redis_url, slots={"a": 4})
    capped = Share("capped", max_concurrent=2)
    held = [one.acquire(share=capped), two.acquire(share=capped)]
    third = Waiting(two, share=capped)
    third.start()
    wait_for(lambda: one.d.snapshot().depth == 1)   # queued: two are held, on two workers
    other = one.acquire(share=Share("other"))       # while another key is served at once
    assert one.d.snapshot().depth == 1
    one.d.release(held[0])
    third.join(5)
    assert third.lease is not None
    for worker, lease in ((two, held[1]), (one, other), (two, third.lease)):
        worker.d.release(lease)
        worker.d.settle()
    holding = one.d.table.command("HGETALL", one.d.table.key("holding"))
    assert not holding  # every slot given back is un-counted for its key
