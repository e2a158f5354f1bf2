"""What one upstream exchange costs the worker, on each transport under ``UpstreamPool``:
``app.transport`` (httptools on gevent sockets, for http:// endpoints) and urllib3 (for
https://, and every endpoint before issue 14).

    .venv/bin/python -m bench.transport [--requests 3000] [--streams 100] [--rounds 3]

In one process with gevent's monkey patching (as in the gunicorn worker), against the fast
fake upstream (``bench/fake_upstream.c``): ``--requests`` non-streamed chats (open, read
whole), then ``--streams`` streamed ones of 32 tokens 1 ms apart (open, read every chunk),
per transport, the transports alternated every round. Reports the process's CPU time (user
and system: the loopback's kernel work included) per exchange and per read of a stream, as
the median over the rounds, and writes JSON to ``bench/results/transport-<timestamp>.json``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from app.config import Endpoint, ProxySettings  # noqa: E402
from app.upstream import UpstreamPool, request_headers  # noqa: E402
from bench.tools import FakeUpstream  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {False: "app.transport", True: "urllib3"}


def chat(stream: bool) -> bytes:
    return json.dumps({"model": "fake-model", "stream": stream,
                       "messages": [{"role": "user", "content": "Say something."}]}).encode()


def one_round(endpoint: Endpoint, via_urllib3: bool, requests: int,
              streams: int) -> dict[str, float]:
    """CPU µs per non-streamed exchange, per stream and per read of a stream."""
    pool = UpstreamPool((endpoint,), ProxySettings(), via_urllib3=via_urllib3)
    headers = request_headers({"Content-Type": "application/json", "Accept": "*/*"}, endpoint)
    plain, streamed = chat(False), chat(True)
    try:
        started = time.process_time()
        for _ in range(requests):
            pool.open(endpoint, "POST", "/v1/chat/completions", body=plain,
                      headers=headers).read()
        per_request = (time.process_time() - started) / requests * 1e6
        reads = 0
        started = time.process_time()
        for _ in range(streams):
            upstream = pool.open(endpoint, "POST", "/v1/chat/completions", body=streamed,
                                 headers=headers)
            for _chunk in upstream.chunks():
                reads += 1
            upstream.close()
        per_stream = (time.process_time() - started) / streams * 1e6
    finally:
        pool.close()
    return {"request_us": per_request, "stream_us": per_stream,
            "reads_per_stream": reads / streams, "read_us": per_stream * streams / reads}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    fake = FakeUpstream(tokens=32, interval_ms=1, first_token_ms=1).start()
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    try:
        endpoint = Endpoint(name="fake", url=fake.url)
        one_round(endpoint, False, 200, 5)     # warm-up: imports, first connections
        for index in range(args.rounds):
            for old in ((False, True) if index % 2 == 0 else (True, False)):
                runs[old].append(one_round(endpoint, old, args.requests, args.streams))
    finally:
        fake.stop()
    summary = {NAMES[old]: {key: statistics.median(r[key] for r in rounds)
                            for key in rounds[0]} for old, rounds in runs.items()}
    print("| Transport | non-streamed exchange | 32-token stream | reads a stream "
          "| per read |\n|---|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['request_us']:.0f} µs | {s['stream_us']:.0f} µs "
              f"| {s['reads_per_stream']:.1f} | {s['read_us']:.0f} µs |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"transport-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps({"args": vars(args), "summary": summary,
                               "runs": {NAMES[k]: v for k, v in runs.items()}}, indent=1))
    print(f"\nJSON: {out.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
