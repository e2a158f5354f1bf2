"""What shared state costs: one gunicorn worker with slots in-process, one worker with
slots in Redis, two workers with slots in Redis, on the fast fake upstream.

    .venv/bin/python -m bench.shared [--seconds 5] [--rounds 2]

Every configuration runs the same load against the same fake (bench/fake_upstream.c), with
a real redis-server on loopback for the Redis ones; the order of configurations is reversed
every other round. Scenarios:

- ``ns-c1``, ``ns-c32``: non-streamed chat with ``wrk`` at concurrency 1 and 32 (the fake
  answers at once; assembly off, as in ``python -m bench``, so the figures are the slot
  table's and the relay's, comparable with BENCHMARKS.md);
- ``s500``: 500 streams opened at once, one per connection (32 tokens, 20 ms apart);
- ``asm-c1``: non-streamed chat at concurrency 1 with assembly on, against a second fake
  that streams its 32 tokens at once: what building the non-streamed answer from a stream
  costs, next to the same request relayed as a plain answer.

Targets: Redis adds at most 0.3 ms at p50 at concurrency 1; two workers with Redis reach at
least 1.6x one worker's requests/s at concurrency 32; the 500-stream burst completes in
full. Prints a Markdown table and writes JSON to ``bench/results/shared-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import requests

from bench.core import BenchError, meta, percentile, run_reported, stop_all, write_wrk_script
from bench.overhead import (
    CHAT_PATH,
    PROXY_PREFIX,
    Run,
    Scenario,
    StreamShape,
    chat_body,
    plain_run,
    stream_run,
    wait_quiet,
)
from bench.tools import FakeUpstream, build_native
from tests.integration.procs import Proxy, RedisServer

SCENARIOS = (
    Scenario("ns-c1", "non-streamed, c=1", False, 1),
    Scenario("ns-c32", "non-streamed, c=32", False, 32),
    Scenario("s500", "500 streams at once", True, 500, burst=True),
    Scenario("asm-c1", "non-streamed, assembled from a stream, c=1", False, 1),
)
CONFIGS = ("1 worker", "1 worker + Redis", "2 workers + Redis")
REDIS_ADDED_P50_MS = 0.3
TWO_WORKERS_MIN_RATIO = 1.6
Log = Any


def proxy_config(upstream: str, redis_url: str | None, assemble: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "proxy": {"assemble_non_streamed": assemble},
        "endpoints": [{"url": upstream, "name": "fake", "type": "llamacpp"}]}
    if redis_url:
        config["state"] = {"redis_url": redis_url}
    return config


@contextmanager
def proxy_for(config_name: str, upstream: str, redis: RedisServer, assemble: bool,
              log: Log) -> Iterator[Proxy]:
    """The proxy in one configuration, answering."""
    workers = 2 if config_name.startswith("2") else 1
    proxy = Proxy(proxy_config(upstream, redis.url if "Redis" in config_name else None,
                               assemble), env={"OLLA_WORKERS": str(workers)})
    try:
        proxy.start()
        for _ in range(100):
            answer = requests.post(proxy.url + PROXY_PREFIX + CHAT_PATH,
                                   json=chat_body(False), timeout=10)
            if answer.status_code == 200:
                break
            time.sleep(0.1)
        if answer.status_code != 200:
            raise BenchError(f"{config_name}: the proxy answered {answer.status_code}")
        log(f"{config_name} (assembly {'on' if assemble else 'off'}) at {proxy.url}")
        yield proxy
    finally:
        stop_all(proxy)


def measure(args: argparse.Namespace, log: Log) -> list[Run]:
    """Every scenario in every configuration, ``args.rounds`` times, plus direct runs."""
    shape = StreamShape(tokens=32, interval_ms=20, first_token_ms=20, seconds=0)
    fake = FakeUpstream(tokens=32, interval_ms=20, first_token_ms=20)
    instant = FakeUpstream(tokens=32, interval_ms=0, first_token_ms=0)
    redis = RedisServer()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="olla-bench-shared-") as tmp:
        work = Path(tmp)
        script = write_wrk_script(work, chat_body(False))
        stream_body = work / "stream.json"
        stream_body.write_text(json.dumps(chat_body(True)))
        try:
            fake.start()
            instant.start()
            redis.start()
            for round_number in range(args.rounds):
                order = CONFIGS if round_number % 2 == 0 else CONFIGS[::-1]
                for scenario in SCENARIOS[:2]:
                    runs.append(plain_run(scenario, "direct", fake.url + CHAT_PATH, script,
                                          args.seconds, round_number))
                for name in order:
                    with proxy_for(name, fake.url, redis, False, log) as proxy:
                        url = proxy.url + PROXY_PREFIX + CHAT_PATH
                        for scenario in SCENARIOS[:2]:
                            plain_run(scenario, name, url, script, 1, round_number)  # warm
                            runs.append(plain_run(scenario, name, url, script, args.seconds,
                                                  round_number))
                            log(describe(runs[-1]))
                        runs.append(stream_run(SCENARIOS[2], name, proxy.port,
                                               PROXY_PREFIX + CHAT_PATH, stream_body, shape,
                                               round_number))
                        log(describe(runs[-1]))
                asm = SCENARIOS[3]
                runs.append(plain_run(asm, "direct", instant.url + CHAT_PATH, script,
                                      args.seconds, round_number))
                for assemble in (False, True):
                    with proxy_for("1 worker", instant.url, redis, assemble, log) as proxy:
                        url = proxy.url + PROXY_PREFIX + CHAT_PATH
                        plain_run(asm, "", url, script, 1, round_number)
                        target = "1 worker, assembled" if assemble else "1 worker, plain"
                        runs.append(plain_run(asm, target, url, script, args.seconds,
                                              round_number))
                        log(describe(runs[-1]))
        finally:
            redis.stop()
            stop_all(instant, fake)
    return runs


def describe(run: Run) -> str:
    return (f"{run.scenario:6} {run.target:20} r{run.round}: {run.rps:9.1f} req/s  "
            f"p50 {run.p50_ms:8.3f} ms  p99 {run.p99_ms:8.3f} ms  failures {run.failures}"
            + (f"  short {run.short}" if run.short is not None else "")
            + (f"  ttfb p99 {run.ttfb_p99_ms:.1f} ms" if run.ttfb_p99_ms is not None else ""))


def summarise(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per scenario and target: the median over rounds of each figure, failures summed."""
    rows: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        rows.setdefault((run.scenario, run.target), []).append(run)
    out = []
    for (scenario, target), group in rows.items():
        def median(key: str, group: list[Run] = group) -> float | None:
            values = [getattr(r, key) for r in group if getattr(r, key) is not None]
            return round(percentile(values, 50), 3) if values else None

        out.append({"scenario": scenario, "target": target, "rps": median("rps"),
                    "p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"),
                    "ttfb_p99_ms": median("ttfb_p99_ms"),
                    "requests": sum(r.requests for r in group),
                    "failures": sum(r.failures for r in group),
                    "short": sum(r.short or 0 for r in group) if group[0].short is not None
                    else None})
    return out


def check_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    def find(scenario: str, target: str) -> dict[str, Any]:
        return next(r for r in rows if r["scenario"] == scenario and r["target"] == target)

    local, shared = find("ns-c1", "1 worker"), find("ns-c1", "1 worker + Redis")
    added = shared["p50_ms"] - local["p50_ms"]
    one, two = find("ns-c32", "1 worker"), find("ns-c32", "2 workers + Redis")
    ratio = two["rps"] / one["rps"]
    bursts = [find("s500", name) for name in CONFIGS]
    return [
        {"target": f"Redis adds <= {REDIS_ADDED_P50_MS} ms at p50 (c=1)",
         "measured": f"{added:+.3f} ms", "pass": added <= REDIS_ADDED_P50_MS},
        {"target": f"2 workers + Redis >= {TWO_WORKERS_MIN_RATIO}x 1 worker (c=32)",
         "measured": f"{ratio:.2f}x ({two['rps']:.0f} vs {one['rps']:.0f} req/s)",
         "pass": ratio >= TWO_WORKERS_MIN_RATIO},
        {"target": "the 500-stream burst completes in full, every configuration",
         "measured": ", ".join(f"{b['target']}: {b['requests']} complete, {b['failures']} "
                               f"failed, {b['short']} short" for b in bursts),
         "pass": all(b["failures"] == 0 and b["short"] == 0 for b in bursts)},
    ]


def markdown(results: dict[str, Any]) -> str:
    lines = ["| Scenario | Target | req/s | p50 ms | p99 ms | TTFB p99 ms | complete | "
             "failed | short |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def num(value: Any, digits: int = 2) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    for r in results["summary"]:
        lines.append(f"| {r['scenario']} | {r['target']} | {num(r['rps'], 0)} | "
                     f"{num(r['p50_ms'], 3)} | {num(r['p99_ms'], 3)} | "
                     f"{num(r['ttfb_p99_ms'], 1)} | {r['requests']} | {r['failures']} | "
                     f"{'' if r['short'] is None else r['short']} |")
    lines += ["", "| Target | Measured | |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'HOLDS' if t['pass'] else 'MISSED'} |"
              for t in results["targets"]]
    return "\n".join(lines)


def comparison(name: str, description: str | None, argv: Sequence[str] | None,
               measure: Callable[[argparse.Namespace, Log], list[Run]],
               markdown: Callable[[dict[str, Any]], str], natives: Sequence[str],
               targets: Callable[[Sequence[dict[str, Any]]], list[dict[str, Any]]] | None = None,
               ) -> int:
    """The command line of a bench that compares configurations of the proxy: options,
    a quiet machine, the runs, their summary (and targets), reported as Markdown and JSON
    under ``bench/results/<name>-<timestamp>.json``."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--wait-quiet", type=float, default=120.0)
    args = parser.parse_args(argv)
    args.workers = 1

    def run(log: Log) -> dict[str, Any]:
        for native in natives:
            build_native(native)
        results: dict[str, Any] = {"meta": meta(args)}
        results["meta"]["busy_elsewhere_percent"] = wait_quiet(args.wait_quiet, log)
        runs = measure(args, log)
        results["summary"] = summarise(runs)
        if targets is not None:
            results["targets"] = targets(results["summary"])
        results["runs"] = [{k: v for k, v in asdict(r).items()
                            if k not in ("ttfb", "totals", "gaps")} for r in runs]
        return results

    status, _ = run_reported(name, run, markdown)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    return comparison("shared", __doc__, argv, measure, markdown,
                      ("fake_upstream", "stream_client"), check_targets)


if __name__ == "__main__":
    sys.exit(main())
