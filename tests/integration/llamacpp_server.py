"""Run a real llama-server (xllamacpp) on the PyPI Gemma model, for the integration tests.

    python tests/integration/llamacpp_server.py --port P --model GGUF [--alias A] [--embedding]
        [--api-key K] [--n-parallel N] [--n-ctx C] [--cache-ram MIB]

Runs until SIGTERM. A separate process so that tests can kill and restart it.
"""

from __future__ import annotations

import argparse
import signal
import time

import xllamacpp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True, help="the GGUF file (procs.model_path())")
    parser.add_argument("--alias", action="append", default=[])
    parser.add_argument("--embedding", action="store_true")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--n-parallel", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-slots", action="store_true")
    # llama.cpp's prompt cache in RAM (prompts evicted from a slot, restored on a match);
    # default: llama.cpp's own (8192 MiB), 0 turns it off.
    parser.add_argument("--cache-ram", type=int, default=None, metavar="MIB")
    args = parser.parse_args()

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_parallel = args.n_parallel
    params.n_ctx = args.n_ctx
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.endpoint_metrics = True
    params.endpoint_slots = not args.no_slots
    if args.cache_ram is not None:
        params.cache_ram_mib = args.cache_ram
    if args.alias:
        params.model_alias = set(args.alias)
    if args.embedding:
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    if args.api_key:
        params.api_keys = [args.api_key]
    server = xllamacpp.Server(params)  # keep a reference: the server stops when collected
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stop.append(signum))
    while not stop:
        time.sleep(0.1)
    del server


if __name__ == "__main__":
    main()
