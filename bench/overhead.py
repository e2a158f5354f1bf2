"""Proxy overhead vs nginx: the same load, in one go on one machine, straight to a fast fake
llama.cpp upstream, through nginx running ``deploy/nginx.conf``, and through the proxy under
gunicorn (one gevent worker).

    .venv/bin/python -m bench [--seconds 5] [--stream-seconds 6] [--rounds 2] [--profile]

Scenarios, each run against every target (direct, nginx, proxy), targets in turn, the order
reversed every other round so that drift weighs on all of them alike:

- non-streamed chat (``wrk``, 1 thread, a fixed duration after a 1 s warm-up) at
  concurrency 1 and 32; the fake answers at once;
- streamed chat (bench/stream_client.c) with 50 and 500 streams open: each connection runs
  32-token streams (a token every 20 ms) back to back for a fixed time, the connections'
  starts spread over one stream's length so that the number of open streams is steady;
- 1000 streams opened at once, one per connection.

Time to first byte (TTFB) is from the start of a stream (its request, or its connect on a
new connection) to the first body byte, the first ``data:`` of the answer; gaps are the
times between consecutive content events of a stream, as the client receives them.

Prints a Markdown table (each figure also as a ratio to the direct run, the proxy's also to
nginx's), the CPU each process used, and whether the proxy meets its targets; writes
everything as JSON to
``bench/results/bench-<timestamp>.json``. Needs gcc, nginx and wrk. The machine should be
otherwise idle: it waits (``--wait-quiet``) for other processes to leave the cores alone, and
measures a run again (``--retry-noisy``) when they did not. ``--profile`` then samples the
proxy's worker with py-spy (``pip install py-spy``) during extra, unmeasured runs and prints
where its CPU time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.core import (
    BenchError,
    machine_busy_seconds,
    meta,
    percentile,
    process_tree,
    run_reported,
    run_wrk,
    stop_all,
    write_wrk_script,
)
from bench.tools import BUILD_DIR, CpuMeter, FakeUpstream, Nginx, RssSampler, build_native
from tests.integration.procs import ROOT, Proxy

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROFILE_DIR = BUILD_DIR / "profiles"  # not committed (bench/.gitignore)
PROFILE_RATE = 250  # py-spy samples per second
TARGETS = ("direct", "nginx", "proxy")
CHAT_PATH = "/v1/chat/completions"
PROXY_PREFIX = "/olla/llamacpp"
MODEL = "fake-model"
MESSAGES = [{"role": "user", "content": "Say something."}]
STREAM_TIMEOUT_S = 60  # one stream slower than this is a failure (timed out)
MB = 1_000_000
OTHER_CPU_WARNING = 20.0  # % of a core used by other processes that makes a run suspect
QUIET_POLL_S = 2.0
NOISY_WAIT_S = 60.0  # longest wait for a quiet machine before measuring a noisy run again
ERRORS = {0: "ok", 1: "connect failed", 2: "closed early", 3: "timed out", 4: "bad answer"}

# The targets (the proxy's own figures against the direct run of the same go; issue 14's).
NS_C1_ADDED_P50_MS = 0.5
NS_C32_MIN_RPS = 2500.0
S50_TTFB_ADDED_P50_MS = 10.0
S50_GAP_ADDED_P99_MS = 5.0
S500_TTFB_P99_VS_NGINX = 2.0
S1000_MAX_RSS_MB = 120.0

Log = Callable[[str], None]


@dataclass(frozen=True)
class Scenario:
    """One load shape."""

    name: str
    label: str
    streamed: bool
    concurrency: int
    burst: bool = False  # streams: all open at once, one per connection


SCENARIOS = (
    Scenario("ns-c1", "non-streamed, c=1", False, 1),
    Scenario("ns-c32", "non-streamed, c=32", False, 32),
    Scenario("s50", "50 streams", True, 50),
    Scenario("s500", "500 streams", True, 500),
    Scenario("s1000", "1000 streams at once", True, 1000, burst=True),
)


@dataclass
class Run:
    """One measured run of one scenario against one target."""

    scenario: str
    target: str
    round: int
    seconds: float
    requests: int               # answers that were complete and correct
    rps: float
    p50_ms: float               # latency: the whole answer (whole stream when streamed)
    p99_ms: float
    failures: int               # errors (status, connect, reset, timeout)
    short: int | None = None    # streams that ended without [DONE] or all their tokens
    ttfb_p50_ms: float | None = None
    ttfb_p99_ms: float | None = None
    gap_p50_ms: float | None = None
    gap_p99_ms: float | None = None
    gap_max_ms: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    rss_peak_mb: float | None = None
    rss_start_mb: float | None = None
    cpu_percent: dict[str, float] = field(default_factory=dict)
    noisy_retries: int = 0      # runs thrown away because other processes used the CPU
    # Raw samples for pooling rounds (not written to the JSON: too many).
    ttfb: list[float] = field(default_factory=list, repr=False)
    totals: list[float] = field(default_factory=list, repr=False)
    gaps: list[float] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------
# Load generators.


def chat_body(streamed: bool) -> dict[str, Any]:
    """The chat request every scenario sends."""
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 32, "stream": streamed}


def plain_run(scenario: Scenario, target: str, url: str, script: Path, seconds: int,
              round_number: int) -> Run:
    """One wrk run (figures straight from wrk's histogram)."""
    figures = run_wrk(url, script, scenario.concurrency, seconds)
    errors = {key: int(figures[key]) for key in ("connect_errors", "read_errors",
                                                 "write_errors", "status_errors", "timeouts")}
    duration = figures["duration_us"] / 1e6
    failures = sum(errors.values())
    requests_ok = int(figures["requests"]) - errors["status_errors"]
    return Run(scenario=scenario.name, target=target, round=round_number,
               seconds=round(duration, 3), requests=requests_ok,
               rps=round(figures["requests"] / duration, 1),
               p50_ms=figures["p50_us"] / 1000, p99_ms=figures["p99_us"] / 1000,
               failures=failures, errors={k: v for k, v in errors.items() if v})


@dataclass
class StreamRecord:
    """One stream as the client saw it (milliseconds)."""

    status: int
    err: int
    ttfb_ms: float | None
    total_ms: float
    content_events: int
    done: bool
    gaps_ms: list[float]


def parse_client_output(text: str) -> list[StreamRecord]:
    """Lines of bench/stream_client.c's output (see its header) as records."""
    records = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 9:
            raise BenchError(f"unexpected stream client line: {line!r}")
        gaps = [] if parts[8] == "-" else [int(v) / 1000 for v in parts[8].split(",")]
        ttfb = int(parts[4])
        records.append(StreamRecord(status=int(parts[2]), err=int(parts[3]),
                                    ttfb_ms=ttfb / 1000 if ttfb >= 0 else None,
                                    total_ms=int(parts[5]) / 1000,
                                    content_events=int(parts[6]), done=parts[7] == "1",
                                    gaps_ms=gaps))
    return records


@dataclass(frozen=True)
class StreamShape:
    """What the fake sends and how long the load lasts."""

    tokens: int
    interval_ms: int
    first_token_ms: int
    seconds: float

    @property
    def length_ms(self) -> int:
        """How long one stream takes at the source."""
        return self.first_token_ms + (self.tokens - 1) * self.interval_ms


def run_client(port: int, path: str, body_file: Path, concurrency: int, *, duration_ms: int,
               ramp_ms: int, per_conn: int) -> tuple[list[StreamRecord], float]:
    """Run the C stream client once; its records and the wall time it took."""
    binary = build_native("stream_client")
    deadline_ms = duration_ms + ramp_ms + 2 * STREAM_TIMEOUT_S * 1000
    with tempfile.NamedTemporaryFile(prefix="olla-bench-streams-", suffix=".txt") as out:
        command = [str(binary), "--port", str(port), "--path", path, "--body-file",
                   str(body_file), "--out", out.name, "--concurrency", str(concurrency),
                   "--duration-ms", str(duration_ms), "--ramp-ms", str(ramp_ms),
                   "--streams-per-conn", str(per_conn),
                   "--timeout-ms", str(STREAM_TIMEOUT_S * 1000),
                   "--deadline-ms", str(deadline_ms)]
        started = time.monotonic()
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=deadline_ms / 1000 + 30, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"the stream client did not finish: {exc}") from exc
        wall = time.monotonic() - started
        if result.returncode != 0:
            raise BenchError(f"stream client failed ({result.returncode}): {result.stderr}")
        return parse_client_output(Path(out.name).read_text()), wall


def stream_run(scenario: Scenario, target: str, port: int, path: str, body_file: Path,
               shape: StreamShape, round_number: int) -> Run:
    """One run of the stream client against one target, summarised."""
    if scenario.burst:
        records, wall = run_client(port, path, body_file, scenario.concurrency,
                                   duration_ms=0, ramp_ms=0, per_conn=1)
    else:
        records, wall = run_client(port, path, body_file, scenario.concurrency,
                                   duration_ms=int(shape.seconds * 1000),
                                   ramp_ms=shape.length_ms, per_conn=0)
    if not records:
        raise BenchError(f"{scenario.name} {target}: the client recorded no stream")
    failed = [r for r in records if r.err != 0 or r.status != 200]
    answered = [r for r in records if r.err == 0 and r.status == 200]
    complete = [r for r in answered if r.done and r.content_events == shape.tokens]
    errors = Counter(ERRORS.get(r.err, str(r.err)) if r.err else f"status {r.status}"
                     for r in failed)
    ttfb = [r.ttfb_ms for r in answered if r.ttfb_ms is not None]
    totals = [r.total_ms for r in complete]
    gaps = [g for r in answered for g in r.gaps_ms]
    run = Run(scenario=scenario.name, target=target, round=round_number, seconds=round(wall, 3),
              requests=len(complete), rps=round(len(complete) / wall, 1),
              p50_ms=0.0, p99_ms=0.0, failures=len(failed),
              short=len(answered) - len(complete), errors=dict(errors),
              ttfb=ttfb, totals=totals, gaps=gaps)
    fill_stream_percentiles(run)
    return run


def fill_stream_percentiles(run: Run) -> None:
    """Percentiles of a stream run from its raw samples (nan when there are none)."""
    def pct(values: Sequence[float], q: float) -> float:
        return round(percentile(values, q), 3) if values else float("nan")

    run.p50_ms, run.p99_ms = pct(run.totals, 50), pct(run.totals, 99)
    run.ttfb_p50_ms, run.ttfb_p99_ms = pct(run.ttfb, 50), pct(run.ttfb, 99)
    run.gap_p50_ms, run.gap_p99_ms = pct(run.gaps, 50), pct(run.gaps, 99)
    run.gap_max_ms = round(max(run.gaps), 3) if run.gaps else float("nan")


# ---------------------------------------------------------------------------------------------
# The stack: fake upstream, nginx, proxy.


@dataclass
class Stack:
    """The three servers and how to reach each target."""

    fake: FakeUpstream
    nginx: Nginx
    proxy: Proxy
    worker_pid: int = 0

    def port(self, target: str) -> int:
        """The port a target listens on."""
        return {"direct": self.fake.port, "nginx": self.nginx.port,
                "proxy": self.proxy.port}[target]

    def path(self, target: str) -> str:
        """The chat route on a target."""
        return PROXY_PREFIX + CHAT_PATH if target == "proxy" else CHAT_PATH

    def url(self, target: str) -> str:
        """The chat URL on a target."""
        return f"http://127.0.0.1:{self.port(target)}{self.path(target)}"

    def meter(self) -> CpuMeter:
        """CPU accounting for every server."""
        assert self.fake.process and self.nginx.process and self.proxy.process
        return CpuMeter({"fake": [self.fake.process.pid], "nginx": [self.nginx.process.pid],
                         "proxy": [self.proxy.process.pid]},
                        waiting={"proxy": self.worker_pid})

    def find_worker(self) -> int:
        """The gunicorn worker: the only child of the master."""
        assert self.proxy.process is not None
        for _ in range(100):
            children = process_tree(self.proxy.process.pid)[1:]
            if len(children) == 1:
                return children[0]
            time.sleep(0.1)
        raise BenchError(f"expected one gunicorn worker, found {len(children)}")

    def check_alive(self) -> None:
        """Fail when a server died, or when the worker was replaced (it crashed)."""
        for name, process in (("fake", self.fake.process), ("nginx", self.nginx.process),
                              ("proxy", self.proxy.process)):
            if process is None or process.poll() is not None:
                raise BenchError(f"the {name} process died during the run")
        if self.find_worker() != self.worker_pid:
            raise BenchError("the gunicorn worker was replaced during the run (it crashed "
                             "or missed its heartbeat)")


@contextmanager
def running_stack(shape: StreamShape, log: Log) -> Iterator[Stack]:
    """Start the fake, nginx in front of it and the proxy in front of it; stop all after."""
    fake = FakeUpstream(tokens=shape.tokens, interval_ms=shape.interval_ms,
                        first_token_ms=shape.first_token_ms)
    nginx: Nginx | None = None
    proxy: Proxy | None = None
    try:
        fake.start()
        log(f"fake upstream at {fake.url}")
        nginx = Nginx(fake.port).start()
        log(f"nginx (deploy/nginx.conf) at {nginx.url}")
        # Assembly off: the fake answers a plain request at once but streams at 20 ms a
        # token, which llama.cpp does not (both take the same generation time there); the
        # assembled path's own cost is measured by `python -m bench.shared` (asm-c1).
        proxy = Proxy({"proxy": {"assemble_non_streamed": False},
                       "endpoints": [{"url": fake.url, "name": "fake", "type": "llamacpp"}]},
                      env={"OLLA_WORKERS": "1"})
        proxy.start()
        stack = Stack(fake, nginx, proxy)
        stack.worker_pid = stack.find_worker()
        log(f"proxy at {proxy.url} (gunicorn worker pid {stack.worker_pid})")
        yield stack
    except RuntimeError:
        if proxy is not None:
            log("proxy log (tail):\n" + "\n".join(proxy.log().splitlines()[-25:]))
        if nginx is not None:
            log("nginx error log (tail):\n" + nginx.log())
        raise
    finally:
        stop_all(proxy, nginx, fake)


def check_answers(stack: Stack, body_file: Path, shape: StreamShape, log: Log) -> None:
    """Every target answers a non-streamed chat and a full stream before anything is
    measured (the proxy's first health check may still be under way: retry a while)."""
    for target in TARGETS:
        response = None
        for _ in range(100):
            response = requests.post(stack.url(target), json=chat_body(False), timeout=10)
            if response.status_code == 200:
                break
            time.sleep(0.1)
        assert response is not None
        if response.status_code != 200 or response.json().get("object") != "chat.completion":
            raise BenchError(f"{target}: non-streamed chat answered {response.status_code}: "
                             f"{response.text[:300]}")
        records, _ = run_client(stack.port(target), stack.path(target), body_file, 1,
                                duration_ms=0, ramp_ms=0, per_conn=1)
        record = records[0]
        if record.err or record.status != 200 or not record.done \
                or record.content_events != shape.tokens:
            raise BenchError(f"{target}: a stream was not complete: {record}")
    log(f"check: every target answers; a stream is {shape.tokens} events and [DONE]")


# ---------------------------------------------------------------------------------------------
# Measuring.


def order(round_number: int) -> tuple[str, ...]:
    """Targets in turn; reversed every other round."""
    return TARGETS if round_number % 2 == 0 else TARGETS[::-1]


def measure(stack: Stack, args: argparse.Namespace, shape: StreamShape, work: Path,
            log: Log) -> list[Run]:
    """Every scenario against every target, ``args.rounds`` times."""
    plain_script = write_wrk_script(work, chat_body(False))
    stream_body = work / "stream.json"
    stream_body.write_text(json.dumps(chat_body(True)))
    check_answers(stack, stream_body, shape, log)
    meter = stack.meter()
    runs: list[Run] = []
    for scenario in SCENARIOS:
        if scenario.name not in args.scenarios:
            continue
        for target in TARGETS:  # warm-up, unmeasured
            if scenario.streamed:
                run_client(stack.port(target), stack.path(target), stream_body,
                           min(scenario.concurrency, 50), duration_ms=0, ramp_ms=0,
                           per_conn=1)
            else:
                run_wrk(stack.url(target), plain_script, scenario.concurrency, 1)
        for round_number in range(args.rounds):
            for target in order(round_number):
                for attempt in range(args.retry_noisy + 1):
                    run = measured_run(stack, meter, scenario, target, round_number, args,
                                       shape, plain_script, stream_body)
                    run.noisy_retries = attempt
                    log(describe(run))
                    noisy = run.cpu_percent.get("other", 0.0) > OTHER_CPU_WARNING
                    if not noisy or attempt == args.retry_noisy:
                        break
                    log(f"other processes used {run.cpu_percent['other']:.0f} % of a core "
                        "during that run: measuring it again once the machine is quiet")
                    wait_quiet(NOISY_WAIT_S, log)
                runs.append(run)
    return runs


def measured_run(stack: Stack, meter: CpuMeter, scenario: Scenario, target: str,
                 round_number: int, args: argparse.Namespace, shape: StreamShape,
                 plain_script: Path, stream_body: Path) -> Run:
    """One run with the CPU of every process and the worker's peak RSS."""
    cpu: dict[str, float] = {}
    sampler = RssSampler(stack.worker_pid)
    with sampler.measure(), meter.measure(cpu):
        if scenario.streamed:
            run = stream_run(scenario, target, stack.port(target), stack.path(target),
                             stream_body, shape, round_number)
        else:
            run = plain_run(scenario, target, stack.url(target), plain_script, args.seconds,
                            round_number)
    run.cpu_percent = cpu
    if target == "proxy":
        run.rss_peak_mb = round(sampler.peak_kib * 1024 / MB, 1)
        run.rss_start_mb = round(sampler.start_kib * 1024 / MB, 1)
    stack.check_alive()
    return run


def describe(run: Run) -> str:
    """A one-line log of a run."""
    text = (f"{run.scenario:6} {run.target:6} r{run.round}: {run.rps:9.1f} req/s  "
            f"p50 {run.p50_ms:8.2f} ms  p99 {run.p99_ms:8.2f} ms")
    if run.ttfb_p50_ms is not None:
        text += (f"  ttfb {run.ttfb_p50_ms:.2f}/{run.ttfb_p99_ms:.2f} ms  "
                 f"gap p99 {run.gap_p99_ms:.2f} ms  short {run.short}")
    text += f"  failures {run.failures}"
    if run.rss_peak_mb is not None:
        text += f"  rss {run.rss_peak_mb:.1f} MB"
    return text + f"  cpu {run.cpu_percent}"


def combine(runs: Sequence[Run]) -> dict[str, Any]:
    """One scenario x target over its rounds: totals summed; stream percentiles over all
    samples pooled; wrk's percentiles (which cannot be pooled) averaged over rounds."""
    first = runs[0]
    seconds = sum(r.seconds for r in runs)
    out: dict[str, Any] = {
        "scenario": first.scenario, "target": first.target, "rounds": len(runs),
        "requests": sum(r.requests for r in runs),
        "rps": round(sum(r.requests for r in runs) / seconds, 1),
        "failures": sum(r.failures for r in runs),
        "short": None if first.short is None else sum(r.short or 0 for r in runs),
        "rss_peak_mb": max((r.rss_peak_mb for r in runs if r.rss_peak_mb is not None),
                           default=None),
        "cpu_percent": {role: round(sum(r.cpu_percent.get(role, 0) for r in runs) / len(runs), 1)
                        for role in first.cpu_percent},
    }
    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r.errors)
    out["errors"] = dict(errors)
    if first.ttfb_p50_ms is None:
        out["p50_ms"] = round(sum(r.p50_ms for r in runs) / len(runs), 3)
        out["p99_ms"] = round(sum(r.p99_ms for r in runs) / len(runs), 3)
        for key in ("ttfb_p50_ms", "ttfb_p99_ms", "gap_p50_ms", "gap_p99_ms", "gap_max_ms"):
            out[key] = None
        return out
    pooled = Run(scenario=first.scenario, target=first.target, round=-1, seconds=seconds,
                 requests=0, rps=0, p50_ms=0, p99_ms=0, failures=0,
                 ttfb=[v for r in runs for v in r.ttfb],
                 totals=[v for r in runs for v in r.totals],
                 gaps=[v for r in runs for v in r.gaps])
    fill_stream_percentiles(pooled)
    for key in ("p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms", "gap_p50_ms", "gap_p99_ms",
                "gap_max_ms"):
        out[key] = getattr(pooled, key)
    out["streams"] = len(pooled.ttfb)
    return out


def summarise(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per scenario x target, in scenario order."""
    rows = []
    for scenario in SCENARIOS:
        for target in TARGETS:
            mine = [r for r in runs if r.scenario == scenario.name and r.target == target]
            if mine:
                rows.append(combine(mine))
    return rows


# ---------------------------------------------------------------------------------------------
# Targets.


def row(rows: Sequence[dict[str, Any]], scenario: str, target: str) -> dict[str, Any] | None:
    """The summary row of a scenario x target, if it ran."""
    return next((r for r in rows if r["scenario"] == scenario and r["target"] == target), None)


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of the issue: what was measured, the limit, pass or fail."""
    out: list[dict[str, Any]] = []

    def add(name: str, limit: str, measured: str, ok: bool) -> None:
        out.append({"target": name, "limit": limit, "measured": measured, "pass": ok})

    d, p = row(rows, "ns-c1", "direct"), row(rows, "ns-c1", "proxy")
    if d and p:
        added = p["p50_ms"] - d["p50_ms"]
        add("non-streamed c=1: added p50", f"<= {NS_C1_ADDED_P50_MS:g} ms",
            f"{added:+.2f} ms ({p['p50_ms']:.2f} vs {d['p50_ms']:.2f})",
            added <= NS_C1_ADDED_P50_MS)
    p = row(rows, "ns-c32", "proxy")
    if p:
        add("non-streamed c=32: throughput, errors", f">= {NS_C32_MIN_RPS:g} req/s, 0 errors",
            f"{p['rps']:.0f} req/s, {p['failures']} errors",
            p["rps"] >= NS_C32_MIN_RPS and p["failures"] == 0)
    d, p = row(rows, "s50", "direct"), row(rows, "s50", "proxy")
    if d and p:
        added = p["ttfb_p50_ms"] - d["ttfb_p50_ms"]
        add("50 streams: added time to first byte, p50", f"<= {S50_TTFB_ADDED_P50_MS:g} ms",
            f"{added:+.2f} ms ({p['ttfb_p50_ms']:.2f} vs {d['ttfb_p50_ms']:.2f})",
            added <= S50_TTFB_ADDED_P50_MS)
        added = p["gap_p99_ms"] - d["gap_p99_ms"]
        add("50 streams: p99 gap between chunks over direct", f"<= {S50_GAP_ADDED_P99_MS:g} ms",
            f"{added:+.2f} ms ({p['gap_p99_ms']:.2f} vs {d['gap_p99_ms']:.2f})",
            added <= S50_GAP_ADDED_P99_MS)
    n, p = row(rows, "s500", "nginx"), row(rows, "s500", "proxy")
    if p:
        add("500 streams: all complete in full", "0 failures, 0 short",
            f"{p['failures']} failures, {p['short']} short of {p['streams']}",
            p["failures"] == 0 and p["short"] == 0)
    if n and p:
        ratio = p["ttfb_p99_ms"] / n["ttfb_p99_ms"] if n["ttfb_p99_ms"] else float("inf")
        add("500 streams: p99 time to first byte vs nginx", f"<= {S500_TTFB_P99_VS_NGINX:g}x",
            f"{ratio:.1f}x ({p['ttfb_p99_ms']:.2f} vs {n['ttfb_p99_ms']:.2f} ms)",
            ratio <= S500_TTFB_P99_VS_NGINX)
    p = row(rows, "s1000", "proxy")
    if p:
        add("1000 streams at once: all complete in full", "0 failures, 0 short",
            f"{p['failures']} failures, {p['short']} short of {p['streams']}",
            p["failures"] == 0 and p["short"] == 0)
        add("1000 streams at once: worker peak RSS", f"<= {S1000_MAX_RSS_MB:g} MB",
            f"{p['rss_peak_mb']:.1f} MB", p["rss_peak_mb"] <= S1000_MAX_RSS_MB)
    return out


# ---------------------------------------------------------------------------------------------
# Report.


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value != value:  # nan
        return "n/a"
    return f"{value:.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str | None:
    if value is None or base is None or value != value or base != base or not base:
        return None
    return f"x{value / base:.2f}"


def _cell(value: float | None, direct: float | None, digits: int = 2,
          nginx: float | None = None) -> str:
    """A figure, with its ratio to the direct run's (and to nginx's, when given)."""
    text = _num(value, digits)
    ratios = [r for r in (_ratio(value, direct), _ratio(value, nginx)) if r]
    if len(ratios) == 2:
        return f"{text} ({ratios[0]}; {ratios[1]} nginx)"
    return f"{text} ({ratios[0]})" if ratios else text


def markdown(results: dict[str, Any]) -> str:
    """The summary table, the CPU table and the targets, as Markdown."""
    rows = results["summary"]
    labels = {s.name: s.label for s in SCENARIOS}
    lines = [
        "| Scenario | Target | req/s | p50 ms | p99 ms | TTFB p50 ms | TTFB p99 ms "
        "| gap p99 ms | failures | short streams | proxy peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = row(rows, r["scenario"], "direct") if r["target"] != "direct" else None
        n = row(rows, r["scenario"], "nginx") if r["target"] == "proxy" else None

        def cell(key: str, digits: int = 2, r: dict[str, Any] = r,
                 d: dict[str, Any] | None = d, n: dict[str, Any] | None = n) -> str:
            return _cell(r[key], d[key] if d else None, digits, n[key] if n else None)

        short = "-" if r["short"] is None else str(r["short"])
        lines.append(
            f"| {labels[r['scenario']]} | {r['target']} | {cell('rps', 0)} | {cell('p50_ms')} "
            f"| {cell('p99_ms')} | {cell('ttfb_p50_ms')} | {cell('ttfb_p99_ms')} "
            f"| {cell('gap_p99_ms')} | {r['failures']} | {short} "
            f"| {_num(r['rss_peak_mb'], 1) if r['target'] == 'proxy' else '-'} |")
    lines += [
        "",
        "CPU during the measured runs, % of one core (mean over rounds; the machine has "
        f"{results['meta']['cpus']} cores;\nclient = wrk or the stream client):",
        "",
        "| Scenario | Target | fake upstream | nginx | proxy | client | rest of the machine "
        "| proxy worker waiting for a CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = r["cpu_percent"]
        waiting = f"{cpu.get('proxy_waiting', 0):.0f}" if r["target"] == "proxy" else "-"
        lines.append(f"| {labels[r['scenario']]} | {r['target']} | {cpu.get('fake', 0):.0f} "
                     f"| {cpu.get('nginx', 0):.0f} | {cpu.get('proxy', 0):.0f} "
                     f"| {cpu.get('client', 0):.0f} | {cpu.get('other', 0):.0f} | {waiting} |")
    lines += ["", "Targets (the proxy, one gunicorn worker, against the direct run of this go):",
              "", "| Target | Limit | Measured | Result |", "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['limit']} | {t['measured']} "
                     f"| {'pass' if t['pass'] else '**FAIL**'} |")
    noisy = [f"{labels[r['scenario']]} {r['target']} round {r['round']} "
             f"({r['cpu_percent']['other']:.0f} %)"
             for r in results["runs"] if r["cpu_percent"].get("other", 0.0) > OTHER_CPU_WARNING]
    if noisy:
        lines += ["", "**Warning:** other processes used more than "
                  f"{OTHER_CPU_WARNING:g} % of a core during these runs (still so after "
                  "the retries), whose figures may be disturbed: " + "; ".join(noisy) + "."]
    if results.get("profile"):
        lines += ["", profile_markdown(results["profile"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Profile (py-spy on the worker, unmeasured runs).


_LIBRARY_PREFIX = re.compile(r"^.*/(?:site-packages|lib/python3\.\d+)/")
PACKAGES = (
    (f"{ROOT}/app/", "olla-py (app/)"),
    ("/flask/", "flask"),
    ("/werkzeug/", "werkzeug"),
    ("/gunicorn/", "gunicorn"),
    ("/gevent/", "gevent"),
    ("/greenlet/", "greenlet"),
    ("/requests/", "requests"),
    ("/urllib3/", "urllib3"),
    ("/marshmallow/", "marshmallow"),
    ("/http/client.py", "stdlib http.client"),
    ("/json/", "stdlib json"),
    ("/email/", "stdlib email (header parsing)"),
    ("/logging/", "stdlib logging"),
)


def package_of(frame: str) -> str:
    """Which package a py-spy frame ``name (/full/path.py:line)`` belongs to."""
    path = frame.partition(" (")[2]
    for needle, name in PACKAGES:
        if needle in path:
            return name
    if "/lib/python3" in path or "<frozen" in path:
        return "other stdlib"
    return "other"


def analyse_profile(raw: str) -> dict[str, Any]:
    """Self time by package and by function, and inclusive time by function, from py-spy's
    raw (collapsed stack) output."""
    total = 0
    by_package: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        by_package[package_of(leaf)] += count
        self_fn[_short(leaf)] += count
        for name in {_short(f) for f in frames}:
            inclusive[name] += count

    def share(counter: Counter[str], top: int) -> list[dict[str, Any]]:
        return [{"name": name, "percent": round(100 * n / total, 1)}
                for name, n in counter.most_common(top)]

    return {"samples": total, "self_by_package": share(by_package, 20),
            "self_by_function": share(self_fn, 25), "inclusive_by_function": share(inclusive, 40)}


def _short(frame: str) -> str:
    """``func (/long/path/site-packages/pkg/mod.py:123)`` -> ``func (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    path = path.removeprefix(str(ROOT) + "/")
    return f"{name} ({_LIBRARY_PREFIX.sub('', path)})"


def profile_markdown(profile: dict[str, Any]) -> str:
    """The profiles as Markdown."""
    lines = ["Where the worker's CPU goes (py-spy, on-CPU samples, unmeasured runs):"]
    for name, p in profile.items():
        cpu = p["cpu_percent"]
        lines += ["", f"**{name}** ({p['samples']} samples; the proxy used "
                  f"{cpu.get('proxy', 0):.0f} % of a core, its worker waited for a CPU "
                  f"{cpu.get('proxy_waiting', 0):.0f} % of the time). Self time by package: "
                  + ", ".join(f"{x['name']} {x['percent']:.0f} %"
                              for x in p["self_by_package"] if x["percent"] >= 1) + ".",
                  "", "| Self % | Function |", "|---:|---|"]
        lines += [f"| {x['percent']:.1f} | `{x['name']}` |" for x in p["self_by_function"][:12]]
    return "\n".join(lines)


def profile_runs(stack: Stack, args: argparse.Namespace, shape: StreamShape, work: Path,
                 log: Log) -> dict[str, Any]:
    """py-spy on the worker during one extra proxy run of each scenario asked for but c=1
    (which the c=32 profile explains)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    plain_script = write_wrk_script(work, chat_body(False))
    stream_body = work / "stream.json"
    out: dict[str, Any] = {}
    meter = stack.meter()
    for scenario in SCENARIOS:
        if scenario.name == "ns-c1" or scenario.name not in args.scenarios:
            continue
        raw = PROFILE_DIR / f"profile-{scenario.name}.txt"  # collapsed stacks, for flame graphs
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.unlink(missing_ok=True)
        spy = subprocess.Popen([py_spy, "record", "--pid", str(stack.worker_pid), "--rate",
                                str(PROFILE_RATE), "--format", "raw", "--nonblocking",
                                "--full-filenames", "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cpu: dict[str, float] = {}
        try:
            time.sleep(1.0)  # py-spy attaches
            with meter.measure(cpu):
                if scenario.streamed:
                    stream_run(scenario, "proxy", stack.port("proxy"), stack.path("proxy"),
                               stream_body, shape, -1)
                else:
                    plain_run(scenario, "proxy", stack.url("proxy"), plain_script,
                              args.seconds, -1)
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
        if not raw.exists():
            raise BenchError(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")
        analysis = analyse_profile(raw.read_text())
        analysis["cpu_percent"] = cpu
        out[scenario.name] = analysis
        log(f"profile {scenario.name}: {analysis['samples']} samples; raw stacks in "
            f"{raw.relative_to(ROOT)}")
    return out


# ---------------------------------------------------------------------------------------------
# Main.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5,
                        help="each non-streamed wrk run (default 5)")
    parser.add_argument("--stream-seconds", type=float, default=6.0,
                        help="how long each connection keeps starting streams (default 6)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measured runs per scenario and target (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream (32)")
    parser.add_argument("--interval-ms", type=int, default=20,
                        help="time between tokens, and before the first (20)")
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS),
                        help="comma-separated subset of: "
                             + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, profile the worker with py-spy during one extra "
                             "proxy run of each scenario but ns-c1")
    parser.add_argument("--wait-quiet", type=float, default=120.0,
                        help="seconds to wait, before starting, for other processes to "
                             "leave the cores alone (default 120)")
    parser.add_argument("--retry-noisy", type=int, default=2,
                        help="measure a run again (up to N times) when other processes used "
                             f"more than {OTHER_CPU_WARNING:g} %% of a core during it "
                             "(default 2)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 3 when the proxy misses a target")
    parser.set_defaults(workers=1)  # recorded in the results' meta
    args = parser.parse_args(argv)
    names = {s.name for s in SCENARIOS}
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(args.scenarios) - names
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    for name in ("seconds", "rounds", "tokens", "interval_ms"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.retry_noisy < 0:
        parser.error("--retry-noisy must be at least 0")
    if args.stream_seconds <= 0:
        parser.error("--stream-seconds must be positive")
    return args


def busy_elsewhere(seconds: float) -> float:
    """% of one core the machine spent busy over ``seconds``, outside this process (run
    before anything of ours starts: then it is all other processes)."""
    before, started = machine_busy_seconds(), time.monotonic()
    own = os.times()
    time.sleep(seconds)
    used = machine_busy_seconds() - before
    mine = sum(os.times()[:4]) - sum(own[:4])
    return round(100 * max(used - mine, 0.0) / (time.monotonic() - started), 1)


def wait_quiet(limit_s: float, log: Log) -> float:
    """Wait up to ``limit_s`` seconds for other processes to leave the cores alone; the
    last reading (% of a core they used)."""
    deadline = time.monotonic() + limit_s
    busy = busy_elsewhere(QUIET_POLL_S)
    while busy > OTHER_CPU_WARNING and time.monotonic() < deadline:
        log(f"other processes use {busy:.0f} % of a core: waiting for a quiet machine "
            f"(up to {max(deadline - time.monotonic(), 0):.0f} s more)")
        busy = busy_elsewhere(QUIET_POLL_S)
    if busy > OTHER_CPU_WARNING:
        log(f"WARNING: other processes use {busy:.0f} % of a core: figures will be disturbed")
    return busy


def run(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Start the stack, measure every scenario, stop everything."""
    shape = StreamShape(tokens=args.tokens, interval_ms=args.interval_ms,
                        first_token_ms=args.interval_ms, seconds=args.stream_seconds)
    build_native("fake_upstream")
    build_native("stream_client")
    results: dict[str, Any] = {"meta": {**meta(args), "workers": 1},
                               "shape": asdict(shape)}
    results["meta"]["busy_elsewhere_percent"] = wait_quiet(args.wait_quiet, log)
    with tempfile.TemporaryDirectory(prefix="olla-bench-") as tmp, \
            running_stack(shape, log) as stack:
        work = Path(tmp)
        runs = measure(stack, args, shape, work, log)
        results["summary"] = summarise(runs)
        results["targets"] = check_targets(results["summary"])
        results["runs"] = [{k: v for k, v in asdict(r).items()
                            if k not in ("ttfb", "totals", "gaps")} for r in runs]
        if args.profile:
            results["profile"] = profile_runs(stack, args, shape, work, log)
    return results


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables and the path of the JSON results."""
    args = parse_args(argv)
    missing = [tool for tool in ("wrk",) if shutil.which(tool) is None]
    if missing:
        print(f"python -m bench needs {', '.join(missing)} (Debian/Ubuntu: "
              "`sudo apt-get install -y wrk`).", file=sys.stderr)
        return 2
    status, results = run_reported("bench", lambda log: run(args, log), markdown,
                                   to_json=_json_safe)
    if results is not None and args.strict and not all(t["pass"] for t in results["targets"]):
        return 3
    return status


if __name__ == "__main__":
    sys.exit(main())
