"""Slots and the queue on real llama.cpp servers: two servers (``--n-parallel`` 1 and 2,
one thread each) behind the proxy.

- 3x more concurrent long streams than slots all complete, dispatched in arrival order,
  while llama.cpp's own ``requests_deferred`` stays 0 (its hidden queue is never used);
- a full queue, or a wait longer than ``queue.timeout``, gets 503 ``slots_exhausted``
  with ``Retry-After``;
- a client that goes away frees its place: a queued one leaves the queue at once and never
  reaches llama.cpp; for a running one the proxy closes its upstream connection at once and
  llama.cpp's ``/slots`` shows the slot free within 1 s (streamed) or 2 s (non-streamed:
  llama-server's own 1 s poll, see ``test_aborted_request_frees_its_slot``).

Every request names its server's alias as ``model``, so each goes to its own server.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from .procs import LlamaServer, Proxy, running

pytestmark = pytest.mark.integration

PARALLEL = (1, 2)
COMPLETION = "/olla/llamacpp/completion"
N_PREDICT = 48           # tokens per request in the oversubscription test (~1 s each)
LONG = 400               # tokens of a request that must still be running when we act (~7 s)
STAGGER = 0.1            # seconds between the starts of the oversubscribed requests
POLL = 0.05              # seconds between samples of /metrics, /slots and the status route
SLOTS_EXHAUSTED = {"error": {"message": "All slots are busy. Please try again later.",
                             "type": "server_error", "code": "slots_exhausted"}}
FIGURES: dict[str, Any] = {}  # measured figures, printed for the closing note


def alias(n: int) -> str:
    return f"slots-{n}"


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def servers() -> Iterator[dict[int, LlamaServer]]:
    """One real llama-server per slot count: ``slots-1`` (1 slot), ``slots-2`` (2 slots)."""
    with running({n: LlamaServer(["--alias", alias(n), "--n-parallel", str(n), "--n-ctx",
                                  "2048", "--threads", "1"]) for n in PARALLEL}) as started:
        yield dict(started)


def slots_proxy(start_proxy: Callable[..., Proxy], servers: dict[int, LlamaServer],
                queue: dict[str, Any], parallel: tuple[int, ...] = PARALLEL) -> Proxy:
    """A proxy in front of ``servers[n]`` for each n in ``parallel``, ready: every endpoint
    healthy with its slot count known (before that the proxy would not hold anything back)."""
    proxy = start_proxy({
        "proxy": {"queue": queue},
        "endpoints": [{"url": servers[n].url, "name": alias(n), "type": "llamacpp",
                       "check_interval": "1s", "check_timeout": "1s"} for n in parallel]})

    def ready() -> bool:
        found = {e["name"]: e for e in endpoints_status(proxy)["endpoints"]}
        return all(found[alias(n)]["status"] == "healthy"
                   and found[alias(n)]["total_slots"] == n for n in parallel)

    wait_until(ready, 20)
    return proxy


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., Proxy], servers: dict[int, LlamaServer]) -> Proxy:
    """The proxy in front of both servers; its queue holds every waiter of the 3x test."""
    return slots_proxy(start_proxy, servers, {"max_size": 16, "timeout": "60s"})


@pytest.fixture(scope="module", autouse=True)
def report_figures() -> Iterator[None]:
    """Print what the tests measured, for the closing note (seen with ``-s``)."""
    yield
    if FIGURES:
        print("\nSLOTS FIGURES", json.dumps(FIGURES))


# ------------------------------------------------------------------------------- helpers

def wait_until(condition: Callable[[], bool], timeout: float, step: float = POLL) -> float:
    """Seconds until ``condition`` held; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def endpoints_status(proxy: Proxy) -> dict[str, Any]:
    response = requests.get(f"{proxy.url}/internal/status/endpoints", timeout=5)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def endpoint_status(proxy: Proxy, n: int) -> dict[str, Any]:
    return next(e for e in endpoints_status(proxy)["endpoints"] if e["name"] == alias(n))


def queue_depth(proxy: Proxy) -> int:
    response = requests.get(f"{proxy.url}/internal/status", timeout=5)
    response.raise_for_status()
    return int(response.json()["queue"]["depth"])


def metrics(server: LlamaServer) -> dict[str, float]:
    """llama.cpp's Prometheus figures, without the ``llamacpp:`` prefix."""
    return server.metrics()


def wait_idle(proxy: Proxy, server: LlamaServer, n: int, timeout: float = 15) -> None:
    """Nothing running or waiting, as llama.cpp and the proxy see it (the proxy's view of
    others' slots catches up on its next /slots poll)."""
    def idle() -> bool:
        endpoint = endpoint_status(proxy, n)
        return (server.busy_slots() == 0 and metrics(server)["requests_processing"] == 0
                and endpoint["slots_in_use"] == 0 and endpoint["active_connections"] == 0
                and queue_depth(proxy) == 0)

    wait_until(idle, timeout)


class Sampler:
    """Samples ``probe()`` every POLL seconds in a thread until stopped (at most
    ``limit`` seconds): ``with Sampler(f) as s: ...; s.samples``."""

    def __init__(self, probe: Callable[[], Any], limit: float = 120) -> None:
        self.probe = probe
        self.limit = limit
        self.samples: list[Any] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.samples.append(self.probe())
            except Exception as exc:  # reported by the test, not lost in the thread
                self.errors.append(exc)
            self._stop.wait(POLL)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def raw_post(proxy: Proxy, body: dict[str, Any]) -> socket.socket:
    """Send a POST to the completion route on a raw socket (so the test decides exactly
    how and when the client goes away) and return the socket."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall((f"POST {COMPLETION} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                  ).encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 15) -> bytes:
    """What the socket received up to and including ``marker``; fails after ``timeout``."""
    received = b""
    deadline = time.monotonic() + timeout
    while marker not in received:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout} s: {received[:500]!r}")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}: {received[:500]!r}")
        received += chunk
    return received


def hang_up(sock: socket.socket, how: str) -> None:
    """Close the client's connection: ``close`` (FIN; an RST if unread data is pending, as
    for a stream) or ``reset`` (SO_LINGER 0: an RST at once)."""
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def new_tracebacks(proxy: Proxy, since: int) -> str:
    """Tracebacks the proxy logged after offset ``since`` of its log ("" if none)."""
    text = proxy.log()[since:]
    return text if "Traceback" in text else ""


def long_body(n: int, n_predict: int = LONG, stream: bool = True,
              prompt: str = "Tell me a very long story about a lighthouse.") -> dict[str, Any]:
    return {"model": alias(n), "prompt": prompt, "n_predict": n_predict, "ignore_eos": True,
            "stream": stream}


def start_long_stream(proxy: Proxy, server: LlamaServer, n: int,
                      n_predict: int = LONG) -> socket.socket:
    """A long stream through the proxy, running on llama.cpp (its first token arrived)."""
    sock = raw_post(proxy, long_body(n, n_predict))
    read_until(sock, b"data: ")
    return sock


# ---------------------------------------------------------------------- oversubscription

@dataclass
class Outcome:
    """One streamed request of the oversubscription test (monotonic seconds)."""

    index: int
    status: int = 0
    sent: float = 0.0
    first_token: float | None = None
    done: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    body: bytes = b""


def stream_completion(proxy: Proxy, n: int, index: int, start_at: float) -> Outcome:
    """Start at ``start_at``; note when the first token arrives; read the stream to its end."""
    time.sleep(max(0.0, start_at - time.monotonic()))
    outcome = Outcome(index, sent=time.monotonic())
    body = {"model": alias(n), "prompt": f"Request {index}: write a long poem about the sea.",
            "n_predict": N_PREDICT, "ignore_eos": True, "stream": True}
    with requests.post(proxy.url + COMPLETION, json=body, stream=True, timeout=60) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            outcome.body = response.content
        else:
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if outcome.first_token is None:
                    outcome.first_token = time.monotonic()
                outcome.events.append(json.loads(line[6:]))
    outcome.done = time.monotonic()
    return outcome


@pytest.mark.parametrize("n", PARALLEL)
def test_three_times_more_requests_than_slots_complete_in_arrival_order(
        proxy: Proxy, servers: dict[int, LlamaServer], n: int) -> None:
    server = servers[n]
    wait_idle(proxy, server, n)
    count = 3 * n
    with Sampler(lambda: metrics(server)) as llama, Sampler(lambda: queue_depth(proxy)) as queue:
        time.sleep(3 * POLL)  # a baseline sample or two before the load
        start = time.monotonic() + 0.1
        with ThreadPoolExecutor(max_workers=count) as pool:
            outcomes = list(pool.map(lambda k: stream_completion(proxy, n, k,
                                                                 start + k * STAGGER),
                                     range(count)))
    assert not llama.errors and not queue.errors, (llama.errors, queue.errors)
    assert len(llama.samples) > 10 and len(queue.samples) > 10

    for outcome in outcomes:
        assert outcome.status == 200, (outcome.index, outcome.status, outcome.body[:300])
        assert not any("error" in event for event in outcome.events), outcome.events[-1]
        final = outcome.events[-1]
        assert final["stop"] is True and final["timings"]["predicted_n"] == N_PREDICT, final
        assert outcome.first_token is not None
    # FIFO: n requests run at a time, so request k starts before request k + n.
    first = [o.first_token for o in outcomes]
    for k in range(count - n):
        assert first[k] < first[k + n], (
            f"request {k + n} got its first token before request {k}: "
            f"{[round(t - start, 2) for t in first if t is not None]}")

    deferred = max(s["requests_deferred"] for s in llama.samples)
    processing = max(s["requests_processing"] for s in llama.samples)
    depth = max(queue.samples)
    assert deferred == 0, "llama.cpp queued requests itself: the proxy sent more than n"
    assert processing == n  # every slot was used...
    assert 0 < depth <= 2 * n  # ...and the rest waited in the proxy
    FIGURES[f"n_parallel={n}"] = {
        "requests": count, "max_queue_depth": depth, "max_requests_deferred": deferred,
        "max_requests_processing": processing,
        "first_token_s": [round(o.first_token - start, 2) for o in outcomes
                          if o.first_token is not None],
        "done_s": [round(o.done - start, 2) for o in outcomes]}


# ------------------------------------------------------------------------------ overflow

def test_full_queue_gets_503_slots_exhausted(start_proxy: Callable[..., Proxy],
                                             servers: dict[int, LlamaServer],
                                             proxy: Proxy) -> None:
    server = servers[1]
    wait_idle(proxy, server, 1)
    small = slots_proxy(start_proxy, servers, {"max_size": 1, "timeout": "60s"}, parallel=(1,))
    running = start_long_stream(small, server, 1)
    waiting = raw_post(small, long_body(1, stream=False))
    try:
        wait_until(lambda: queue_depth(small) == 1, 5)
        started = time.monotonic()
        response = requests.post(small.url + COMPLETION, json=long_body(1, stream=False),
                                 timeout=30)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.json() == SLOTS_EXHAUSTED
        assert response.headers["Retry-After"] == "2"
        assert elapsed < 1.0  # refused at once, not after waiting
        assert queue_depth(small) == 1 and server.busy_slots() == 1
    finally:
        hang_up(waiting, "close")
        hang_up(running, "close")
    try:
        wait_idle(small, server, 1)
    finally:
        small.stop()  # its /slots polls would slow llama.cpp's notice of gone clients


def test_queue_timeout_gets_503_slots_exhausted(start_proxy: Callable[..., Proxy],
                                                servers: dict[int, LlamaServer],
                                                proxy: Proxy) -> None:
    server = servers[1]
    wait_idle(proxy, server, 1)
    impatient = slots_proxy(start_proxy, servers, {"max_size": 4, "timeout": "1s"},
                            parallel=(1,))
    running = start_long_stream(impatient, server, 1)
    try:
        started = time.monotonic()
        response = requests.post(impatient.url + COMPLETION, json=long_body(1, stream=False),
                                 timeout=30)
        waited = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.json() == SLOTS_EXHAUSTED
        assert response.headers["Retry-After"] == "2"
        assert 0.9 <= waited < 2.0, waited
        assert queue_depth(impatient) == 0 and server.busy_slots() == 1
        FIGURES["queue_timeout_1s_answered_after_s"] = round(waited, 2)
    finally:
        hang_up(running, "close")
    try:
        wait_idle(impatient, server, 1)
    finally:
        impatient.stop()


# -------------------------------------------------------------------------------- aborts

@pytest.mark.parametrize("how", ["close", "reset"])
def test_queued_client_that_leaves_never_reaches_llamacpp(
        proxy: Proxy, servers: dict[int, LlamaServer], how: str) -> None:
    server = servers[1]
    wait_idle(proxy, server, 1)
    log_from = len(proxy.log())
    before = metrics(server)
    ahead = 120  # tokens of the request running while another client waits (~2 s)
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(requests.post, proxy.url + COMPLETION,
                              json=long_body(1, ahead, stream=False), timeout=60)
        wait_until(lambda: server.busy_slots() == 1, 5)
        queued = raw_post(proxy, long_body(1, 7, stream=False, prompt="Never to be run"))
        wait_until(lambda: queue_depth(proxy) == 1, 5)
        hang_up(queued, how)
        left_after = wait_until(lambda: queue_depth(proxy) == 0, 10, step=0.02)
        still_running = not running.done()
        response = running.result(timeout=60)
    ended = time.monotonic()
    assert response.status_code == 200 and response.json()["tokens_predicted"] == ahead
    # Had the gone client been dispatched when the slot freed, llama.cpp would now be running
    # it, or would have predicted its 7 tokens (~0.15 s) by the time we look, 1 s on.
    time.sleep(max(0.0, ended + 1.0 - time.monotonic()))
    after = metrics(server)
    predicted = after["tokens_predicted_total"] - before["tokens_predicted_total"]
    FIGURES[f"queued_{how}_left_queue_after_s"] = round(left_after, 3)
    assert left_after <= 1.0 and predicted == ahead, (
        f"the gone client left the queue {left_after:.2f} s after hanging up (the request "
        f"ahead ended by then: {not still_running}); llama.cpp predicted {predicted:g} "
        f"tokens, {predicted - ahead:g} of them for the gone client\n"
        + new_tracebacks(proxy, log_from)[-3000:])
    assert still_running, "the request ahead ended too soon for the test to mean much"
    assert server.busy_slots() == 0 and after["requests_processing"] == 0
    assert after["requests_deferred"] == 0
    assert not new_tracebacks(proxy, log_from)


def check_proxy_released(proxy: Proxy, gone: float, log_from: int) -> None:
    """After the client hung up at ``gone``: the proxy's in-flight count is back to 0 within
    1 s, its view of llama.cpp's slots (its /slots poll, every check_interval = 1 s) catches
    up, and it logged no traceback."""
    wait_until(lambda: endpoint_status(proxy, 1)["active_connections"] == 0,
               max(0.0, gone + 1.0 - time.monotonic()) + 0.1)
    wait_until(lambda: endpoint_status(proxy, 1)["slots_in_use"] == 0, 3)
    assert not new_tracebacks(proxy, log_from)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_aborted_stream_frees_its_slot(proxy: Proxy, servers: dict[int, LlamaServer],
                                       how: str) -> None:
    server = servers[1]
    wait_idle(proxy, server, 1)
    sock = start_long_stream(proxy, server, 1)
    time.sleep(0.5)  # mid-stream
    assert server.busy_slots() == 1 and endpoint_status(proxy, 1)["active_connections"] == 1
    log_from = len(proxy.log())
    gone = time.monotonic()
    hang_up(sock, how)
    # llama.cpp stops a stream at its next token once the proxy closed the connection.
    freed = wait_until(lambda: server.busy_slots() == 0, 15, step=0.02)
    assert freed <= 1.0, (f"llama.cpp generated for {freed:.2f} s after the client left\n"
                          + new_tracebacks(proxy, log_from)[-3000:])
    check_proxy_released(proxy, gone, log_from)
    FIGURES[f"stream_{how}_slot_free_after_s"] = round(freed, 3)


TCP_STATES = {"01": "ESTABLISHED", "08": "CLOSE_WAIT"}


def llama_side_connections(server: LlamaServer) -> dict[int, str]:
    """llama-server's end of its TCP connections: peer port -> state (ESTABLISHED,
    CLOSE_WAIT: the peer closed, llama-server has not yet; others by their hex code)."""
    found: dict[int, str] = {}
    with open("/proc/net/tcp") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == server.port:
                found[int(remote.rsplit(":", 1)[1], 16)] = TCP_STATES.get(state, state)
    return found


@pytest.mark.parametrize("how", ["close", "reset"])
def test_aborted_request_frees_its_slot(proxy: Proxy, servers: dict[int, LlamaServer],
                                        how: str) -> None:
    """A running non-streamed request whose client hangs up: the proxy notices while it
    waits for the answer (nothing has been sent to the client) and closes its upstream
    connection within 1 s; llama.cpp frees the slot within ~2 s.

    Why 2 s, and why the test does not poll /slots meanwhile: llama-server notices that a
    non-streamed request's connection was closed only when its HTTP thread's 1 s wait for
    the result times out, and every other answer llama.cpp produces (a /slots or /metrics
    request, another client's streamed tokens) wakes that thread and starts the 1 s wait
    again. Polled every 20 ms, the slot stays busy to the end of the generation even when
    the client talks to llama-server directly. So the test watches the connection in
    /proc/net/tcp, which llama-server does not see, and asks /slots once, 2 s on.
    """
    server = servers[1]
    wait_idle(proxy, server, 1)
    sock = raw_post(proxy, long_body(1, stream=False))
    wait_until(lambda: server.busy_slots() == 1, 5)
    time.sleep(1.0)  # the proxy is waiting for the whole answer: nothing has been sent
    assert server.busy_slots() == 1 and endpoint_status(proxy, 1)["active_connections"] == 1
    open_before = {port for port, state in llama_side_connections(server).items()
                   if state == "ESTABLISHED"}
    log_from = len(proxy.log())
    gone = time.monotonic()
    hang_up(sock, how)
    upstream: int | None = None
    closed_after = noticed_after = released_after = None
    # For 2 s: watch the proxy's connection to llama.cpp and its in-flight count, not /slots.
    while time.monotonic() - gone < 2.0:
        now = llama_side_connections(server)
        if upstream is None:
            # Closed by the proxy: half-closed (FIN) or gone at once (RST).
            closing = [port for port in open_before if now.get(port) in ("CLOSE_WAIT", None)]
            if closing:
                upstream, closed_after = closing[0], time.monotonic() - gone
                if now.get(upstream) is None:  # reset: gone at once from both ends
                    noticed_after = closed_after
        elif noticed_after is None and now.get(upstream) != "CLOSE_WAIT":
            noticed_after = time.monotonic() - gone  # llama-server's end is closed too
        if released_after is None and endpoint_status(proxy, 1)["active_connections"] == 0:
            released_after = time.monotonic() - gone
        time.sleep(0.01)
    assert closed_after is not None and closed_after <= 1.0, (
        "the proxy did not close its connection to llama.cpp within 1 s of the client "
        "hanging up\n" + new_tracebacks(proxy, log_from)[-3000:])
    assert released_after is not None and released_after <= 1.0, released_after
    if server.busy_slots():
        freed = 2.0 + wait_until(lambda: server.busy_slots() == 0, 15, step=0.1)
        noticed = "not" if noticed_after is None else f"after {noticed_after:.2f} s"
        raise AssertionError(
            f"llama.cpp's slot still busy 2 s after the client left, free after {freed:.1f} s "
            f"(the proxy closed its connection after {closed_after:.2f} s; llama-server "
            f"closed its end {noticed})")
    wait_until(lambda: endpoint_status(proxy, 1)["slots_in_use"] == 0, 3)
    assert not new_tracebacks(proxy, log_from)
    FIGURES[f"non_stream_{how}_upstream_closed_after_s"] = round(closed_after, 3)
