"""Core figures: what the proxy adds in front of one real llama.cpp server.

    .venv/bin/python -m bench.core [--seconds N] [--concurrency C] [--streams N]

Starts one llama-server (xllamacpp on Gemma 3 270M) and the proxy under gunicorn in front of
it, then measures both ways, direct and through the proxy, in alternating runs:

A. ``POST /tokenize`` with a short content: requests per second and p50/p99 latency under
   ``wrk`` at concurrency 1 and C, each run a fixed duration after a warm-up;
B. a streamed ``POST /completion``: time from sending the request to the first ``data:``
   event bytes, over a raw socket, N requests each way, one at a time.

Prints Markdown tables and writes the same figures as JSON to
``bench/results/core-<timestamp>.json``. Needs ``wrk`` (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from tests.integration.procs import ROOT, LlamaServer, Proxy

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALIAS = "gemma-bench"
TOKENIZE_BODY = {"content": "Hello world, this is a short benchmark sentence."}
STREAM_BODY = {"prompt": "Hello", "n_predict": 8, "stream": True, "cache_prompt": True}
PROXY_PREFIX = "/olla/llamacpp"
TARGETS = ("direct", "proxy")
STREAM_WARMUP = 3  # discarded streams per target before measuring
WRK_TIMEOUT_S = 10  # wrk's per-request timeout: a request slower than this is an error
MAX_STREAM_BYTES = 1 << 20  # a stream of 8 tokens is a few KiB; stop reading well past that
MAX_RECVS = 10_000
READY_ATTEMPTS = 100
OTHER_CPU_WARNING = 20.0  # % of a core used by other processes that makes a run suspect

# wrk runs this: POST a fixed JSON body, and at the end print the figures as one JSON line
# (microseconds, straight from wrk's histogram) so nothing depends on its human-readable units.
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"duration_us": %.0f, "requests": %.0f, "bytes": %.0f, '
    .. '"connect_errors": %.0f, "read_errors": %.0f, "write_errors": %.0f, '
    .. '"status_errors": %.0f, "timeouts": %.0f, "mean_us": %.1f, "max_us": %.0f, '
    .. '"p50_us": %.0f, "p90_us": %.0f, "p99_us": %.0f}}\\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


class BenchError(RuntimeError):
    """A measurement that cannot be trusted (errors, wrong answers, a tool failing)."""


# ---------------------------------------------------------------------------------------------
# CPU accounting from /proc: which process burns the cores during a run.

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ")".
    return text[text.rindex(")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (a gunicorn master and its workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                children.append(int(entry.name))
    return [pid, *children]


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (all their threads)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children (here: the finished wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / _CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU use of the server, the proxy and the load generator over one measured run."""

    server_pid: int
    proxy_pid: int

    @contextmanager
    def measure(self, into: dict[str, float]) -> Iterator[None]:
        """Fill ``into`` with each role's CPU use during the block, in % of one core;
        ``other`` is what the rest of the machine used meanwhile (it should be near 0)."""
        proxy_pids = process_tree(self.proxy_pid)

        def sample() -> tuple[float, ...]:
            return (cpu_seconds([self.server_pid]), cpu_seconds(proxy_pids),
                    children_cpu_seconds(), machine_busy_seconds(), time.monotonic())

        before = sample()
        yield
        after = sample()
        used = [a - b for a, b in zip(after, before, strict=True)]
        wall = max(used[4], 1e-9)
        for index, role in enumerate(("llama_server", "proxy", "wrk")):
            into[role] = round(100 * used[index] / wall, 1)
        into["other"] = round(100 * max(used[3] - sum(used[:3]), 0.0) / wall, 1)


# ---------------------------------------------------------------------------------------------
# Figure A: /tokenize under wrk.


@dataclass
class WrkRun:
    """One wrk run against one target."""

    target: str
    concurrency: int
    round: int
    seconds: float
    requests: int
    rps: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    cpu_percent: dict[str, float] = field(default_factory=dict)
    wrk_output: str = ""  # wrk's own report, --latency distribution included


def write_wrk_script(directory: Path, body: dict[str, Any],
                     headers: dict[str, str] | None = None, name: str = "post.lua") -> Path:
    """The Lua script that makes wrk POST ``body`` (with ``headers``) and report as JSON."""
    path = directory / name
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    path.write_text(WRK_SCRIPT.format(body=json.dumps(body)) + extra)
    return path


def run_wrk(url: str, script: Path, concurrency: int, seconds: int) -> dict[str, Any]:
    """Run wrk once and return the figures its ``done()`` hook printed."""
    command = ["wrk", "--threads", "1", "--connections", str(concurrency),
               "--duration", f"{seconds}s", "--timeout", f"{WRK_TIMEOUT_S}s",
               "--latency", "--script", str(script), url]
    # One wrk thread is plenty for a few thousand requests per second and leaves more of
    # the two cores to the server and the proxy being measured.
    try:
        completed = subprocess.run(command, capture_output=True, text=True,
                                   timeout=seconds + WRK_TIMEOUT_S + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {exc}") from exc
    if completed.returncode != 0:
        raise BenchError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()}")
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            figures: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            figures["raw"] = completed.stdout
            return figures
    raise BenchError(f"no figures in wrk's output:\n{completed.stdout}")


def wrk_run(target: str, url: str, script: Path, concurrency: int, seconds: int,
            round_number: int, meter: CpuMeter) -> WrkRun:
    """One measured wrk run, with the CPU each process used meanwhile."""
    cpu: dict[str, float] = {}
    with meter.measure(cpu):
        figures = run_wrk(url, script, concurrency, seconds)
    errors = {key: int(figures[key]) for key in ("connect_errors", "read_errors",
                                                 "write_errors", "status_errors", "timeouts")}
    duration = figures["duration_us"] / 1e6
    return WrkRun(target=target, concurrency=concurrency, round=round_number,
                  seconds=round(duration, 3), requests=int(figures["requests"]),
                  rps=round(figures["requests"] / duration, 1),
                  mean_ms=round(figures["mean_us"] / 1000, 3),
                  p50_ms=round(figures["p50_us"] / 1000, 3),
                  p90_ms=round(figures["p90_us"] / 1000, 3),
                  p99_ms=round(figures["p99_us"] / 1000, 3),
                  max_ms=round(figures["max_us"] / 1000, 3), errors=errors, cpu_percent=cpu,
                  wrk_output=figures["raw"])


def alternating(round_number: int) -> tuple[str, str]:
    """Order of the targets in a round: direct-proxy, then proxy-direct (ABBA), so that a
    steady drift (warming caches, a hotter CPU) weighs on both targets alike."""
    return TARGETS if round_number % 2 == 0 else (TARGETS[1], TARGETS[0])


def summarise_wrk(runs: Sequence[WrkRun]) -> dict[str, Any]:
    """Throughput over all rounds of a target, and its mean latency percentiles."""
    seconds = sum(r.seconds for r in runs)
    return {
        "rounds": len(runs),
        "requests": sum(r.requests for r in runs),
        "rps": round(sum(r.requests for r in runs) / seconds, 1),
        "rps_min": min(r.rps for r in runs),
        "rps_max": max(r.rps for r in runs),
        # Percentiles of separate runs cannot be merged exactly: the mean of the rounds'.
        "p50_ms": round(sum(r.p50_ms for r in runs) / len(runs), 3),
        "p99_ms": round(sum(r.p99_ms for r in runs) / len(runs), 3),
        "errors": sum(sum(r.errors.values()) for r in runs),
        "cpu_percent": {role: round(sum(r.cpu_percent[role] for r in runs) / len(runs), 1)
                        for role in runs[0].cpu_percent},
    }


def figure_a(urls: dict[str, str], concurrencies: Sequence[int], seconds: int,
             warmup: int, rounds: int, meter: CpuMeter,
             log: Callable[[str], None]) -> dict[str, Any]:
    """/tokenize throughput and latency at each concurrency, direct and through the proxy."""
    runs: list[WrkRun] = []
    summary: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="olla-bench-") as tmp:
        script = write_wrk_script(Path(tmp), TOKENIZE_BODY)
        for concurrency in concurrencies:
            for target in TARGETS:
                log(f"A: warm-up {target} c={concurrency} ({warmup:g} s)")
                run_wrk(urls[target], script, concurrency, warmup)
            cell: dict[str, list[WrkRun]] = {target: [] for target in TARGETS}
            for round_number in range(rounds):
                for target in alternating(round_number):
                    run = wrk_run(target, urls[target], script, concurrency, seconds,
                                  round_number, meter)
                    log(f"A: {target:6} c={concurrency:<3} round {round_number}: "
                        f"{run.rps:8.1f} req/s  p50 {run.p50_ms:.3f} ms  "
                        f"p99 {run.p99_ms:.3f} ms  errors {sum(run.errors.values())}  "
                        f"cpu {run.cpu_percent}")
                    cell[target].append(run)
                    runs.append(run)
            summary.append({"concurrency": concurrency,
                            **{target: summarise_wrk(cell[target]) for target in TARGETS}})
    return {"route": "/tokenize", "body": TOKENIZE_BODY, "seconds_per_run": seconds,
            "warmup_seconds": warmup, "rounds": rounds, "summary": summary,
            "runs": [asdict(r) for r in runs]}


# ---------------------------------------------------------------------------------------------
# Figure B: time to the first event of a stream.


@dataclass
class StreamTiming:
    """Milliseconds from the end of connect: to the response headers, to the first
    ``data:`` bytes, and to the end of the stream."""

    headers_ms: float
    first_data_ms: float
    total_ms: float
    status: int


def time_stream(url: str, path: str, body: dict[str, Any], timeout: float = 30.0) -> StreamTiming:
    """POST ``body`` on a fresh connection; time from sending it to the first ``data:``."""
    host_port = url.removeprefix("http://").rstrip("/")
    host, port = host_port.rsplit(":", 1)
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n").encode()
    buffer = b""
    header_end = -1
    headers_at = first_data_at = None
    # Connecting is not part of the figure: the timer starts when the request is sent.
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(head + payload)
        for _ in range(MAX_RECVS):
            chunk = sock.recv(65536)
            now = time.perf_counter()
            if not chunk:
                break
            buffer += chunk
            if header_end < 0:
                header_end = buffer.find(b"\r\n\r\n")
                if header_end >= 0:
                    headers_at = now
            if header_end >= 0 and first_data_at is None and \
                    buffer.find(b"data:", header_end) >= 0:
                first_data_at = now
            if len(buffer) > MAX_STREAM_BYTES:
                raise BenchError(f"stream from {url}{path} exceeded {MAX_STREAM_BYTES} bytes")
        ended = time.perf_counter()
    if headers_at is None or first_data_at is None:
        raise BenchError(f"no data: event from {url}{path}: {buffer[:1000]!r}")
    status = int(buffer.split(b" ", 2)[1])
    if status != 200:
        raise BenchError(f"{url}{path} answered {status}: {buffer[:1000]!r}")
    return StreamTiming(headers_ms=(headers_at - started) * 1000,
                        first_data_ms=(first_data_at - started) * 1000,
                        total_ms=(ended - started) * 1000, status=status)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated between ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def figure_b(urls: dict[str, str], paths: dict[str, str], count: int,
             log: Callable[[str], None]) -> dict[str, Any]:
    """Time to first ``data:`` of a short stream, sequentially, direct and through the proxy.

    A failed stream (an error status, no event) is what a client would have seen: it is
    recorded and reported, not retried, and left out of the timings.
    """
    failures: list[dict[str, Any]] = []

    def attempt(target: str, index: int, phase: str) -> StreamTiming | None:
        try:
            return time_stream(urls[target], paths[target], STREAM_BODY)
        except (BenchError, OSError) as exc:
            failures.append({"target": target, "phase": phase, "index": index,
                             "error": str(exc)})
            log(f"B: {phase} stream {index} {target} FAILED: {str(exc)[:500]}")
            return None

    for index in range(STREAM_WARMUP):
        for target in TARGETS:
            attempt(target, index, "warm-up")
    samples: dict[str, list[StreamTiming | None]] = {target: [] for target in TARGETS}
    for index in range(count):
        for target in alternating(index):
            samples[target].append(attempt(target, index, "measured"))
    log(f"B: {count} streams each way done, {len(failures)} failed")
    summary: dict[str, Any] = {"failures": len(failures)}
    for target in TARGETS:
        good = [s for s in samples[target] if s is not None]
        if len(good) < count / 2:
            raise BenchError(f"B: only {len(good)} of {count} {target} streams succeeded")
        first = [s.first_data_ms for s in good]
        summary[target] = {
            "ok": len(good),
            "first_data_p50_ms": round(percentile(first, 50), 2),
            "first_data_p90_ms": round(percentile(first, 90), 2),
            "headers_p50_ms": round(percentile([s.headers_ms for s in good], 50), 2),
            "total_p50_ms": round(percentile([s.total_ms for s in good], 50), 2),
        }
    # Samples i of both targets ran back to back: their differences cancel slow drift.
    paired = [p.first_data_ms - d.first_data_ms
              for d, p in zip(samples["direct"], samples["proxy"], strict=True)
              if d is not None and p is not None]
    summary["added_p50_ms"] = round(summary["proxy"]["first_data_p50_ms"]
                                    - summary["direct"]["first_data_p50_ms"], 2)
    summary["paired_difference_p50_ms"] = round(percentile(paired, 50), 2)
    return {"route": "/completion", "body": STREAM_BODY, "count": count,
            "warmup": STREAM_WARMUP, "summary": summary, "failures": failures,
            "samples": {t: [asdict(s) if s is not None else None for s in samples[t]]
                        for t in TARGETS}}


# ---------------------------------------------------------------------------------------------
# Report.


def _ratio(proxy: float, direct: float) -> str:
    return f"{proxy / direct:.2f}" if direct else "n/a"


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables, ratios being proxy / direct."""
    a, b = results["tokenize"], results["stream"]
    lines = [
        f"### A. POST /tokenize, {a['rounds']} x {a['seconds_per_run']:g} s per cell "
        f"(wrk, 1 thread; p50/p99: mean over rounds)",
        "",
        "| Concurrency | Direct req/s | Proxy req/s | Proxy/direct | Direct p50 ms "
        "| Proxy p50 ms | Proxy/direct | Direct p99 ms | Proxy p99 ms | Proxy/direct "
        "| Errors d/p |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in a["summary"]:
        d, p = row["direct"], row["proxy"]
        lines.append(
            f"| {row['concurrency']} | {d['rps']:.0f} | {p['rps']:.0f} | "
            f"{_ratio(p['rps'], d['rps'])} | {d['p50_ms']:.2f} | {p['p50_ms']:.2f} | "
            f"{_ratio(p['p50_ms'], d['p50_ms'])} | {d['p99_ms']:.2f} | {p['p99_ms']:.2f} | "
            f"{_ratio(p['p99_ms'], d['p99_ms'])} | {d['errors']}/{p['errors']} |")
    s = b["summary"]
    d, p = s["direct"], s["proxy"]
    lines += [
        "",
        f"### B. Streamed POST /completion (n_predict 8): time to first `data:`, "
        f"{b['count']} sequential requests each way, {s['failures']} failed "
        "(warm-up included)",
        "",
        "| Figure | Direct ms | Proxy ms | Proxy/direct | Added ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key in (("first data p50", "first_data_p50_ms"),
                       ("first data p90", "first_data_p90_ms"),
                       ("headers p50", "headers_p50_ms"),
                       ("whole stream p50", "total_p50_ms")):
        lines.append(f"| {label} | {d[key]:.2f} | {p[key]:.2f} | {_ratio(p[key], d[key])} | "
                     f"{p[key] - d[key]:+.2f} |")
    lines += [
        "",
        f"Added time to first data at p50: **{s['added_p50_ms']:+.2f} ms** "
        f"(median of paired differences: {s['paired_difference_p50_ms']:+.2f} ms).",
        "",
        "### CPU during the /tokenize runs (% of one core; the machine has "
        f"{results['meta']['cpus']})",
        "",
        "| Concurrency | Target | llama-server | proxy (gunicorn) | wrk | rest of the machine |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in a["summary"]:
        for target in TARGETS:
            cpu = row[target]["cpu_percent"]
            lines.append(f"| {row['concurrency']} | {target} | {cpu['llama_server']:.0f} | "
                         f"{cpu['proxy']:.0f} | {cpu['wrk']:.0f} | {cpu['other']:.0f} |")
    busiest = max(run["cpu_percent"]["other"] for run in a["runs"])
    if busiest > OTHER_CPU_WARNING:
        lines += ["", f"**Warning:** other processes used up to {busiest:.0f} % of a core "
                  "during a measured run: the figures may be disturbed."]
    return "\n".join(lines)


def first_line(*argv: str) -> str:
    """The first line a command prints ("" when it cannot run)."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                                check=False, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else ""


def meta(args: argparse.Namespace) -> dict[str, Any]:
    """Where and on what the figures were taken."""
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": first_line("git", "rev-parse", "HEAD"),
        "dirty": bool(first_line("git", "status", "--porcelain")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "wrk": first_line("wrk", "--version"),
        "workers": args.workers or int(os.environ.get("OLLA_WORKERS", "1")),
        "args": vars(args),
    }


# ---------------------------------------------------------------------------------------------
# Orchestration.


def check_same_answer(urls: dict[str, str], log: Callable[[str], None]) -> None:
    """Both targets answer /tokenize with 200 and the same tokens (the proxy's first
    discovery of the endpoint may still be under way: retry for a few seconds)."""
    answers: dict[str, Any] = {}
    for target in TARGETS:
        for _ in range(READY_ATTEMPTS):
            try:
                response = requests.post(urls[target], json=TOKENIZE_BODY, timeout=10)
            except requests.RequestException as exc:
                raise BenchError(f"{target} {urls[target]} failed: {exc}") from exc
            if response.status_code == 200:
                answers[target] = response.json()
                break
            time.sleep(0.1)
        else:
            raise BenchError(f"{target} {urls[target]} answered {response.status_code}: "
                             f"{response.text[:300]}")
    if answers["direct"] != answers["proxy"]:
        raise BenchError(f"direct and proxy disagree: {answers}")
    log(f"check: both answer {len(answers['direct'].get('tokens', []))} tokens")


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Start the server and the proxy, take both figures, stop everything."""
    server = LlamaServer(["--alias", ALIAS, "--n-parallel", "2"])
    env = {"OLLA_WORKERS": str(args.workers)} if args.workers else {}
    proxy = Proxy({"endpoints": [{"url": server.url, "name": "bench", "type": "llamacpp"}]},
                  env=env)
    results: dict[str, Any] = {"meta": meta(args)}
    try:
        log("starting llama-server (Gemma 3 270M) ...")
        server.start().wait()
        log(f"llama-server at {server.url}; starting the proxy ...")
        proxy.start()
        log(f"proxy at {proxy.url}")
        assert server.process is not None and proxy.process is not None
        meter = CpuMeter(server.process.pid, proxy.process.pid)
        tokenize = {"direct": f"{server.url}/tokenize",
                    "proxy": f"{proxy.url}{PROXY_PREFIX}/tokenize"}
        check_same_answer(tokenize, log)
        concurrencies = sorted({1, args.concurrency})
        results["tokenize"] = figure_a(tokenize, concurrencies, args.seconds, args.warmup,
                                       args.rounds, meter, log)
        results["stream"] = figure_b({"direct": server.url, "proxy": proxy.url},
                                     {"direct": "/completion",
                                      "proxy": f"{PROXY_PREFIX}/completion"},
                                     args.streams, log)
        if results["stream"]["failures"] or any(
                row[t]["errors"] for row in results["tokenize"]["summary"] for t in TARGETS):
            results["proxy_log_tail"] = proxy.log()[-8000:]  # stop() deletes the log
        if proxy.process.poll() is not None or server.process.poll() is not None:
            raise BenchError("the server or the proxy died during the run")
    except RuntimeError:  # BenchError, or a process that did not start (procs.wait_http)
        log("proxy log (tail):\n" + "\n".join(proxy.log().splitlines()[-25:]))
        raise
    finally:
        stop_all(proxy, server)
    return results


def stop_all(*processes: Any) -> None:
    """Stop each (``None`` skipped) with Ctrl-C ignored meanwhile: a second Ctrl-C must not
    cut the clean-up short and leave servers behind."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for process in processes:
            if process is not None:
                process.stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5,
                        help="duration of each measured wrk run (default 5)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="the higher concurrency for /tokenize (default 16; 1 always runs)")
    parser.add_argument("--streams", type=int, default=30,
                        help="streamed requests each way for the first-byte figure (default 30)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measured wrk runs per target and concurrency (default 2)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured wrk run per target before each concurrency (default 1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="gunicorn workers for the proxy (default: OLLA_WORKERS, else 1)")
    args = parser.parse_args(argv)
    for name in ("seconds", "concurrency", "streams", "rounds", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_reported(prefix: str, run: Callable[[Callable[[str], None]], dict[str, Any]],
                 markdown: Callable[[dict[str, Any]], str],
                 to_json: Callable[[Any], Any] = lambda value: value,
                 ) -> tuple[int, dict[str, Any] | None]:
    """Run a benchmark with clean-up on Ctrl-C or kill, then print its Markdown and write its
    JSON to ``bench/results/<prefix>-<UTC time>.json``. Returns (exit status, results)."""
    signal.signal(signal.SIGTERM, _interrupt)  # a plain kill cleans up like Ctrl-C
    # Even when started with SIGINT ignored (a background job of a script), Ctrl-C or
    # kill -INT stops the run and its servers.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    try:
        results = run(log)
    except KeyboardInterrupt:
        log("interrupted: every server stopped")
        return 130, None
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1, None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{prefix}-{stamp}.json"
    path.write_text(json.dumps(to_json(results), indent=2) + "\n")
    print(markdown(results))
    print(f"\nJSON: {path.relative_to(ROOT)}")
    return 0, results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables and the path of the JSON results."""
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench.core needs wrk, the HTTP load generator, and it is not on PATH.\n"
              "Install it (Debian/Ubuntu: `sudo apt-get install -y wrk`; macOS: "
              "`brew install wrk`) and run again.", file=sys.stderr)
        return 2
    return run_reported("core", lambda log: run(args, log), markdown)[0]


if __name__ == "__main__":
    sys.exit(main())
