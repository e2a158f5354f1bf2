"""What access control and sticky sessions cost per request: one gunicorn worker on the
fast fake upstream, open, with an API key, with a key and rate limits counted in the
worker, and counted in Redis; and with sticky sessions in the worker and in Redis.

    .venv/bin/python -m bench.access [--seconds 5] [--rounds 2]

Scenarios ``ns-c1`` and ``ns-c32`` (non-streamed chat with ``wrk``, assembly off, as in
``python -m bench``). The limits are set high enough never to refuse (a per-address limit,
the key's requests per minute and tokens per minute: three windows checked, one counted
after the answer), so what is measured is their cost. With sticky sessions every request
is the same conversation (one key, a hit on the one endpoint): the prefix hashed, the
session looked up and written back. The order of configurations is
reversed every other round. Prints a Markdown table with each configuration's p50 added
over the open proxy, and writes JSON to ``bench/results/access-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.core import stop_all, write_wrk_script
from bench.overhead import CHAT_PATH, PROXY_PREFIX, Run, chat_body, plain_run
from bench.shared import SCENARIOS, comparison, describe
from bench.tools import FakeUpstream
from tests.integration.procs import Proxy, RedisServer

KEY = "sk-bench-0123456789abcdef"
HIGH = 10**9
CONFIGS = ("open", "API key", "key + limits", "key + limits in Redis", "sticky",
           "sticky in Redis")
Log = Any


def proxy_config(name: str, upstream: str, redis_url: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "proxy": {"assemble_non_streamed": False},
        "endpoints": [{"url": upstream, "name": "fake", "type": "llamacpp"}]}
    if name.startswith("sticky"):
        config["proxy"]["sticky_sessions"] = {"enabled": True}
    elif name != "open":
        key: dict[str, Any] = {"name": "bench", "key": KEY}
        if "limits" in name:
            key.update(requests_per_minute=HIGH, tokens_per_minute=HIGH)
            config["server"] = {"rate_limits": {"per_ip_requests_per_minute": HIGH}}
        config["auth"] = {"api_keys": [key]}
    if "Redis" in name:
        config["state"] = {"redis_url": redis_url}
    return config


def measure(args: argparse.Namespace, log: Log) -> list[Run]:
    fake = FakeUpstream(tokens=32, interval_ms=20, first_token_ms=20)
    redis = RedisServer()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="olla-bench-access-") as tmp:
        work = Path(tmp)
        open_script = write_wrk_script(work, chat_body(False))
        keyed_script = write_wrk_script(work, chat_body(False),
                                        {"Authorization": f"Bearer {KEY}"}, "keyed.lua")
        try:
            fake.start()
            redis.start()
            for round_number in range(args.rounds):
                order = CONFIGS if round_number % 2 == 0 else CONFIGS[::-1]
                for name in order:
                    proxy = Proxy(proxy_config(name, fake.url, redis.url))
                    try:
                        proxy.start()
                        url = proxy.url + PROXY_PREFIX + CHAT_PATH
                        keyed = name != "open" and not name.startswith("sticky")
                        script = keyed_script if keyed else open_script
                        for scenario in SCENARIOS[:2]:
                            plain_run(scenario, name, url, script, 1, round_number)  # warm
                            runs.append(plain_run(scenario, name, url, script, args.seconds,
                                                  round_number))
                            if runs[-1].failures:
                                log(f"{name}: {runs[-1].errors}")
                            log(describe(runs[-1]))
                    finally:
                        stop_all(proxy)
        finally:
            redis.stop()
            stop_all(fake)
    return runs


def markdown(results: dict[str, Any]) -> str:
    rows = results["summary"]
    base = {r["scenario"]: r for r in rows if r["target"] == "open"}
    lines = ["| Scenario | Configuration | req/s | p50 ms | p99 ms | p50 added ms | failed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        added = r["p50_ms"] - base[r["scenario"]]["p50_ms"]
        lines.append(f"| {r['scenario']} | {r['target']} | {r['rps']:.0f} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {added:+.3f} | "
                     f"{r['failures']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return comparison("access", __doc__, argv, measure, markdown, ("fake_upstream",))


if __name__ == "__main__":
    sys.exit(main())
