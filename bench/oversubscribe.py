"""3x oversubscription: the same load straight to llama.cpp and through the proxy.

    .venv/bin/python -m bench.oversubscribe [--requests K] [--clients C] [--n-predict N]

Starts one llama-server (xllamacpp on Gemma 3 270M, ``--n-parallel 2``) and the proxy under
gunicorn in front of it (``check_interval`` 1 s, default queue), then sends the same load
to each target in turn: C concurrent clients (default 6: three times the slots), each
sending K sequential non-streamed ``POST /completion`` (default 5, ``n_predict`` 32,
``ignore_eos``) on its own keep-alive connection. While a target runs, llama.cpp's
``/metrics`` is read every 50 ms: straight to llama.cpp the requests beyond its slots wait
in its own queue (``requests_deferred``); through the proxy they wait in the proxy's.

Per target: requests, errors (status other than 200, no answer, or not N tokens), p50/p99
latency (linear interpolation between ranks: with 30 requests p99 is near the slowest),
the largest ``requests_deferred`` and ``requests_processing`` seen, and wall time. Prints a
Markdown table and writes the figures as JSON to ``bench/results/oversubscribe-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from bench.core import first_line, percentile, run_reported, stop_all
from tests.integration.procs import LlamaServer, Proxy

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ALIAS = "gemma-oversubscribe"
N_PARALLEL = 2
PATHS = {"direct": "/completion", "proxy": "/olla/llamacpp/completion"}
POLL_S = 0.05            # /metrics sampling interval
REQUEST_TIMEOUT_S = 120  # a request slower than this is an error
READY_TIMEOUT_S = 30


class BenchError(RuntimeError):
    """A run that cannot be trusted (a process died, a target never became ready)."""


@dataclass
class Sample:
    """One request: when it was sent (s from the run's start), how long it took, outcome."""

    client: int
    index: int
    sent_s: float
    latency_ms: float
    status: int
    error: str = ""


def body(client: int, index: int, n_predict: int) -> dict[str, Any]:
    return {"model": ALIAS, "prompt": f"Client {client}, request {index}: tell me a story.",
            "n_predict": n_predict, "ignore_eos": True}


def client_loop(url: str, client: int, count: int, n_predict: int,
                started: float) -> list[Sample]:
    """``count`` sequential requests on one keep-alive session."""
    samples: list[Sample] = []
    with requests.Session() as session:
        for index in range(count):
            sent = time.perf_counter()
            status, error = 0, ""
            try:
                response = session.post(url, json=body(client, index, n_predict),
                                        timeout=REQUEST_TIMEOUT_S)
                status = response.status_code
                if status != 200:
                    error = f"status {status}: {response.text[:200]}"
                elif response.json().get("tokens_predicted") != n_predict:
                    error = f"tokens_predicted {response.json().get('tokens_predicted')}"
            except (requests.RequestException, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            samples.append(Sample(client, index, round(sent - started, 3),
                                  round((time.perf_counter() - sent) * 1000, 2), status, error))
    return samples


def llama_metrics(server: LlamaServer) -> dict[str, float]:
    return server.metrics()


class MetricsSampler:
    """Reads llama.cpp's /metrics every POLL_S seconds in a thread while a target runs."""

    def __init__(self, server: LlamaServer, limit_s: float) -> None:
        self.server = server
        self.limit_s = limit_s
        self.samples: list[dict[str, float]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.samples.append(llama_metrics(self.server))
            except (requests.RequestException, ValueError):
                self.failures += 1
            self._stop.wait(POLL_S)

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def peak(self, name: str) -> float | None:
        return max((s[name] for s in self.samples if name in s), default=None)


def run_target(target: str, url: str, server: LlamaServer, args: argparse.Namespace,
               log: Callable[[str], None]) -> dict[str, Any]:
    """The whole load against one target; its figures."""
    limit = REQUEST_TIMEOUT_S * args.requests + 60
    with MetricsSampler(server, limit) as sampler:
        time.sleep(2 * POLL_S)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            per_client = list(pool.map(
                lambda c: client_loop(url, c, args.requests, args.n_predict, started),
                range(args.clients)))
        wall = time.perf_counter() - started
    samples = [s for client in per_client for s in client]
    good = [s.latency_ms for s in samples if not s.error]
    errors = Counter(s.error.split(":")[0] for s in samples if s.error)
    figures = {
        "target": target,
        "requests": len(samples),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "p50_ms": round(percentile(good, 50), 1) if good else None,
        "p99_ms": round(percentile(good, 99), 1) if good else None,
        "mean_ms": round(sum(good) / len(good), 1) if good else None,
        "max_ms": round(max(good), 1) if good else None,
        "max_requests_deferred": sampler.peak("requests_deferred"),
        "max_requests_processing": sampler.peak("requests_processing"),
        "metrics_samples": len(sampler.samples),
        "metrics_failures": sampler.failures,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(len(good) * args.n_predict / wall, 1),
        "samples": [asdict(s) for s in samples],
    }
    log(f"{target:6}: {figures['requests']} requests, {figures['errors']} errors, "
        f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
        f"max deferred {figures['max_requests_deferred']}, wall {figures['wall_s']} s")
    return figures


def wait_ready(server: LlamaServer, proxy: Proxy, args: argparse.Namespace) -> None:
    """The proxy knows the endpoint's slots (else it holds nothing back), and both targets
    answer the request the run sends."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            endpoints = requests.get(f"{proxy.url}/internal/status/endpoints",
                                     timeout=5).json()["endpoints"]
            if endpoints[0]["status"] == "healthy" and endpoints[0]["total_slots"] == N_PARALLEL:
                break
        except (requests.RequestException, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.1)
    else:
        raise BenchError(f"the proxy did not see {N_PARALLEL} healthy slots within "
                         f"{READY_TIMEOUT_S} s")
    for target, base in (("direct", server.url), ("proxy", proxy.url)):
        response = requests.post(base + PATHS[target], json=body(-1, 0, args.n_predict),
                                 timeout=REQUEST_TIMEOUT_S)
        if response.status_code != 200:
            raise BenchError(f"warm-up {target} answered {response.status_code}: "
                             f"{response.text[:300]}")


def meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": first_line("git", "rev-parse", "HEAD"),
        "dirty": bool(first_line("git", "status", "--porcelain")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "n_parallel": N_PARALLEL,
        "args": vars(args),
    }


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Start the server and the proxy, send the load each way, stop everything."""
    server = LlamaServer(["--alias", ALIAS, "--n-parallel", str(N_PARALLEL),
                          "--n-ctx", "2048", "--threads", str(args.threads)])
    proxy = Proxy({"endpoints": [{"url": server.url, "name": "bench", "type": "llamacpp",
                                  "check_interval": "1s", "check_timeout": "1s"}]})
    results: dict[str, Any] = {"meta": meta(args), "targets": {}}
    try:
        log("starting llama-server (Gemma 3 270M) ...")
        server.start().wait()
        log(f"llama-server at {server.url}; starting the proxy ...")
        proxy.start()
        wait_ready(server, proxy, args)
        log(f"proxy at {proxy.url}; {args.clients} clients x {args.requests} requests "
            f"of {args.n_predict} tokens per target")
        urls = {"direct": server.url + PATHS["direct"], "proxy": proxy.url + PATHS["proxy"]}
        for round_number in range(args.rounds):
            order = ("direct", "proxy") if round_number % 2 == 0 else ("proxy", "direct")
            for target in order:
                figures = run_target(target, urls[target], server, args, log)
                results["targets"].setdefault(target, []).append(figures)
        assert server.process is not None and proxy.process is not None
        if proxy.process.poll() is not None or server.process.poll() is not None:
            raise BenchError("the server or the proxy died during the run")
        if any(f["errors"] for runs in results["targets"].values() for f in runs):
            results["proxy_log_tail"] = proxy.log()[-8000:]  # stop() deletes the log
    except RuntimeError:
        log("proxy log (tail):\n" + "\n".join(proxy.log().splitlines()[-25:]))
        raise
    finally:
        stop_all(proxy, server)
    return results


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def markdown(results: dict[str, Any]) -> str:
    args = results["meta"]["args"]
    lines = [
        f"### 3x oversubscription: {args['clients']} clients x {args['requests']} sequential "
        f"non-streamed /completion (n_predict {args['n_predict']}), llama-server "
        f"--n-parallel {N_PARALLEL} --threads {args['threads']}",
        "",
        "| Target | Round | Requests | Errors | p50 ms | p99 ms | Max ms | Max requests_deferred "
        "| Max requests_processing | Wall s | Tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in ("direct", "proxy"):
        for number, f in enumerate(results["targets"].get(target, [])):
            lines.append(
                f"| {target} | {number} | {f['requests']} | {f['errors']} | {f['p50_ms']} | "
                f"{f['p99_ms']} | {f['max_ms']} | {_number(f['max_requests_deferred'])} | "
                f"{_number(f['max_requests_processing'])} | {f['wall_s']:.2f} | "
                f"{f['tokens_per_s']} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.oversubscribe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5,
                        help="sequential requests per client (default 5)")
    parser.add_argument("--clients", type=int, default=3 * N_PARALLEL,
                        help=f"concurrent clients (default {3 * N_PARALLEL}: 3x the slots)")
    parser.add_argument("--n-predict", type=int, default=32,
                        help="tokens per request, ignore_eos (default 32)")
    parser.add_argument("--threads", type=int, default=2,
                        help="llama-server threads (default 2, as bench.core)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs per target, alternating the order (default 1)")
    args = parser.parse_args(argv)
    for name in ("requests", "clients", "n_predict", "threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reported("oversubscribe", lambda log: run(args, log), markdown)[0]


if __name__ == "__main__":
    sys.exit(main())
