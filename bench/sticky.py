"""Sticky sessions (KV-cache affinity) vs plain least-busy: two real llama.cpp replicas,
multi-turn chats, how much of each prompt llama.cpp finds in its cache.

    .venv/bin/python -m bench.sticky [--rounds 1] [--modes sticky,least-busy]
        [--key prefix_hash|session_header] [--schedule users|interleaved|pooled]
        [--think 5 10] [--conversations 8] [--turns 6] [--spill-after 5s]
        [--cache-ram MIB]

Two llama-servers (xllamacpp on Gemma 3 270M, the same GGUF served under one alias,
``--n-parallel 2 --n-ctx 4096``: 2048 tokens per slot, ``--threads 1`` each on a 2-core
machine) behind the proxy under gunicorn (one gevent worker, ``load_balancer:
least-busy``), once with ``proxy.sticky_sessions`` enabled and once without the block.
Every run of a mode starts both servers afresh, so that no mode finds the other's prompts
cached; modes alternate, the order reversed every other round.

The load: 8 conversations of 6 turns, each with its own system prompt (~440 tokens of
distinct text from its first line on), each turn a streamed ``POST
/olla/llamacpp/v1/chat/completions`` (``max_tokens`` 32, temperature 0, a fixed seed,
``stream_options.include_usage``, ``timings_per_token`` false) whose messages are the
previous turn's plus the model's reply and a new user message. No session header is sent
(``--key session_header`` sends ``X-Olla-Session-ID: conv-N``), so the proxy keys a
session on the prefix hash, as for clients like the openai SDK that send none.

Schedule (``users``, the default): 8 users chat at once on the fleet's 4 slots, each
reading a reply for 5-10 s (uniform, seeded: the same waits in every mode) before sending
the next turn, the first turns spread over 5 s (measured: 3.4 requests in flight on
average, queued ones included). A turn then arrives whatever the slots are doing, as in a
shared fleet, and least-busy's choice owes nothing to where the conversation was.
``--think 2 6`` oversubscribes the slots (4.6-5 in flight on average): a turn whose pinned
endpoint is full waits ``spill_after``, then spills to the other one, usually a cache miss
there; the more the slots are oversubscribed, the more turns spill.

The two schedules that keep the clients busy show affinity that is an accident of the
load, not of the balancer, so they flatter least-busy: ``pooled`` (4 clients, each running
whole conversations on the 4 slots) sends each turn back to the server it just left, whose
freed slot makes it the least busy; ``interleaved`` (all 8 conversations, turns first come
first served, 4 in flight) makes a conversation follow the same one onto the same slot each
time round. Measured with least-busy, endpoint switches in the 40 turn-to-turn steps:
``pooled`` 2, ``interleaved`` 4 and 12 (two runs), ``users`` 17 and 20.

Per mode and turn: mean prompt tokens, mean cached prompt tokens
(``usage.prompt_tokens_details.cached_tokens``, checked against llama.cpp's
``timings.cache_n``; ``timings.prompt_n`` are the tokens processed, checked against
llama.cpp's ``/metrics``), cache hit % (cached / prompt tokens), and time to first token at
p50 (client side: request sent to the first event with content; it includes the wait for a
slot). Per mode: the ``X-Olla-Sticky-Session`` outcomes and key sources, the endpoint
(``X-Olla-Endpoint``) of each turn and how often a conversation changed endpoint, ``GET
/internal/stats/sticky`` at the end, and wall time. Prints Markdown tables and writes JSON
to ``bench/results/sticky-<UTC timestamp>.json``. About 80 s per mode on 2 cores; one
round varies with when spills happen, so publish ``--rounds 3``.

What the cache holds: llama.cpp reuses a conversation's previous prompt minus its last few
tokens (this GGUF's ChatML template is plain text to Gemma's tokenizer, and the re-rendered
reply tokenises differently from the generated one), so a hit is ~75 new tokens a turn.
Each server also keeps prompts it evicted from a slot in RAM (llama.cpp's ``--cache-ram``,
8 GiB by default) and restores the longest match, so a conversation that comes back to a
server it left still finds the prefix it had there: least-busy is not at 0 %, and a spill
costs more than a least-busy switch (the other server has never seen a pinned
conversation). ``--cache-ram 0`` turns that cache off: then only what a slot still holds is
reused, and 8 conversations on 4 slots reuse next to nothing in either mode (4 do).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import requests

from bench.core import (
    BenchError,
    cpu_seconds,
    machine_busy_seconds,
    meta,
    percentile,
    process_tree,
    run_reported,
    stop_all,
)
from bench.overhead import OTHER_CPU_WARNING, wait_quiet
from tests.integration.procs import LlamaServer, Proxy

MODES = ("sticky", "least-busy")
KEYS = ("prefix_hash", "session_header")
SCHEDULES = ("users", "interleaved", "pooled")
ALIAS = "gemma-sticky"
ENDPOINTS = ("llama-a", "llama-b")
N_PARALLEL = 2
N_CTX = 4096          # 2048 tokens per slot; turn 6 is about 810
THREADS = 1           # per server: two servers share the machine's 2 cores
CHAT_PATH = "/olla/llamacpp/v1/chat/completions"
STATS_PATH = "/internal/stats/sticky"
SESSION_HEADER = "X-Olla-Session-ID"
MAX_TOKENS = 32
SEED = 42
REQUEST_TIMEOUT = (5.0, 120.0)  # (connect, read): read covers prompt processing
READY_TIMEOUT_S = 30.0
Log = Callable[[str], None]

STICKY_CONFIG: dict[str, Any] = {
    "enabled": True,
    "idle_ttl_seconds": 600,
    "max_sessions": 10000,
    "key_sources": ["session_header", "prefix_hash", "auth_header"],
    "prefix_hash_bytes": 512,
    "spill_after": "5s",          # the proxy's default
}

# The material of the system prompts: each conversation draws its own facts (seeded by
# its number), so no two share more than the chat template's first tokens.
TOPICS = ("a lighthouse on a northern island", "a bakery in an old mill",
          "a railway museum", "a mountain weather station", "a river ferry company",
          "a public library's map room", "a beekeeping cooperative", "a glass workshop",
          "a harbour fish market", "a botanical greenhouse", "a night-train service",
          "a violin maker's shop")
NOUNS = ("lantern", "ledger", "crate", "bell", "window", "ladder", "engine", "barrel",
         "compass", "kettle", "rope", "drawer", "map", "clock", "basket", "anchor")
ADJECTIVES = ("blue", "heavy", "cracked", "polished", "ancient", "narrow", "quiet",
              "bright", "rusty", "tall", "hollow", "spare")
PLACES = ("north hall", "cellar", "east tower", "loading dock", "attic", "front desk",
          "workshop", "garden shed", "west wing", "office")
FACTS_PER_PROMPT = 14
FOLLOW_UPS = ("Which item in the {place} matters most, and why?",
              "Summarise fact {n} in one short sentence.",
              "What would a visitor notice first about the {noun}?",
              "Give me two questions a new employee might ask.",
              "Which facts mention the {adjective} things? List their numbers.",
              "Write a one-line notice for the staff board.",
              "What should be repaired first?")


def system_prompt(conversation: int) -> str:
    """Conversation ``conversation``'s own system prompt (deterministic)."""
    rng = random.Random(1000 + conversation)
    topic = TOPICS[conversation % len(TOPICS)]
    lines = [f"Conversation {conversation}: you are the assistant of {topic}. Answer "
             "briefly and only from the facts below.", ""]
    for n in range(1, FACTS_PER_PROMPT + 1):
        lines.append(f"Fact {n}: the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} in the "
                     f"{rng.choice(PLACES)} was moved on day {rng.randint(1, 365)} and "
                     f"costs {rng.randint(2, 900)} coins.")
    return "\n".join(lines)


def user_message(conversation: int, turn: int) -> str:
    """The user's message of turn ``turn`` (1-based) of a conversation."""
    if turn == 1:
        return "Hello. What is this place, in one sentence?"
    rng = random.Random(conversation * 100 + turn)
    template = FOLLOW_UPS[(conversation + turn) % len(FOLLOW_UPS)]
    return template.format(place=rng.choice(PLACES), noun=rng.choice(NOUNS),
                           adjective=rng.choice(ADJECTIVES),
                           n=rng.randint(1, FACTS_PER_PROMPT))


@dataclass
class TurnResult:
    """One request of a conversation, as the client saw it."""

    mode: str
    round: int
    conversation: int
    turn: int
    sent_s: float                 # from the start of the mode's run
    status: int = 0
    endpoint: str = ""            # X-Olla-Endpoint
    sticky: str = ""              # X-Olla-Sticky-Session
    key_source: str = ""          # X-Olla-Sticky-Key-Source
    prompt_tokens: int | None = None
    cached_tokens: int | None = None   # usage.prompt_tokens_details.cached_tokens
    cache_n: int | None = None         # timings.cache_n
    prompt_n: int | None = None        # timings.prompt_n: prompt tokens processed
    completion_tokens: int | None = None
    ttft_ms: float | None = None       # request sent -> first event with content
    total_ms: float | None = None
    reply: str = ""
    error: str = ""


def chat_body(messages: Sequence[dict[str, str]]) -> dict[str, Any]:
    return {"model": ALIAS, "messages": list(messages), "stream": True,
            "stream_options": {"include_usage": True}, "timings_per_token": False,
            "max_tokens": MAX_TOKENS, "temperature": 0, "seed": SEED}


def stream_turn(session: requests.Session, url: str, messages: Sequence[dict[str, str]],
                headers: dict[str, str], result: TurnResult) -> None:
    """Send one streamed chat turn and fill ``result`` from its headers and events."""
    started = time.perf_counter()
    parts: list[str] = []
    try:
        with session.post(url, json=chat_body(messages), headers=headers, stream=True,
                          timeout=REQUEST_TIMEOUT) as response:
            result.status = response.status_code
            result.endpoint = response.headers.get("X-Olla-Endpoint", "")
            result.sticky = response.headers.get("X-Olla-Sticky-Session", "")
            result.key_source = response.headers.get("X-Olla-Sticky-Key-Source", "")
            if response.status_code != 200:
                result.error = f"status {response.status_code}: {response.text[:300]}"
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[len(b"data: "):])
                for choice in event.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if result.ttft_ms is None:
                            result.ttft_ms = round((time.perf_counter() - started) * 1000, 1)
                        parts.append(content)
                usage, timings = event.get("usage"), event.get("timings")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
                    result.cached_tokens = (usage.get("prompt_tokens_details")
                                            or {}).get("cached_tokens")
                if timings and "cache_n" in timings:
                    result.cache_n = timings.get("cache_n")
                    result.prompt_n = timings.get("prompt_n")
    except (requests.RequestException, ValueError, AttributeError, TypeError) as exc:
        # AttributeError, TypeError: an event that is JSON but not the shape of a chunk.
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return
    finally:
        result.total_ms = round((time.perf_counter() - started) * 1000, 1)
    result.reply = "".join(parts)
    if result.prompt_tokens is None or result.cached_tokens is None:
        result.error = "no usage with prompt_tokens_details.cached_tokens in the last event"
    elif not parts:
        result.error = "no content"


class Conversation:
    """One chat's messages so far, and what its turns measured."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.messages = [{"role": "system", "content": system_prompt(number)},
                         {"role": "user", "content": user_message(number, 1)}]
        self.results: list[TurnResult] = []

    @property
    def turn(self) -> int:
        """The 1-based number of the next turn."""
        return len(self.results) + 1

    def record(self, result: TurnResult, turns: int) -> None:
        """Keep the result; append the reply and the next user message."""
        self.results.append(result)
        if self.turn <= turns:
            self.messages += [{"role": "assistant", "content": result.reply},
                              {"role": "user", "content": user_message(self.number,
                                                                       self.turn)}]


def think_time(args: argparse.Namespace, conversation: int, turn: int) -> float:
    """Seconds a user reads before sending turn ``turn`` (before turn 1: a start offset
    that spreads the first turns); seeded, so that every mode waits the same."""
    rng = random.Random(f"think-{conversation}-{turn}")
    low, high = args.think
    return rng.uniform(0, low) if turn == 1 else rng.uniform(low, high)


def converse(url: str, args: argparse.Namespace, mode: str, round_number: int
             ) -> tuple[list[Conversation], float]:
    """Every conversation's turns through the proxy at ``url`` in the order of
    ``args.schedule``; the conversations and the wall time."""
    conversations = [Conversation(n) for n in range(args.conversations)]
    started = time.perf_counter()
    line: queue.Queue[Conversation | None] = queue.Queue()  # interleaved: the turns' line
    for conversation in conversations:
        line.put(conversation)
    remaining = [args.conversations]
    lock = threading.Lock()

    def turn(session: requests.Session, conversation: Conversation) -> None:
        headers = ({SESSION_HEADER: f"conv-{conversation.number}"}
                   if args.key == "session_header" else {})
        result = TurnResult(mode, round_number, conversation.number, conversation.turn,
                            round(time.perf_counter() - started, 3))
        stream_turn(session, url, conversation.messages, headers, result)
        conversation.record(result, args.turns)

    def user(conversation: Conversation) -> None:
        with requests.Session() as session:
            while conversation.turn <= args.turns:
                time.sleep(think_time(args, conversation.number, conversation.turn))
                turn(session, conversation)

    def pooled() -> None:
        with requests.Session() as session:
            while True:
                try:
                    conversation = line.get_nowait()
                except queue.Empty:
                    return
                while conversation is not None and conversation.turn <= args.turns:
                    turn(session, conversation)

    def interleaved() -> None:
        with requests.Session() as session:
            while (conversation := line.get()) is not None:
                turn(session, conversation)
                if conversation.turn <= args.turns:
                    line.put(conversation)  # the back of the line
                    continue
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        for _ in range(args.concurrency):
                            line.put(None)

    if args.schedule == "users":
        threads = [threading.Thread(target=user, args=(c,), daemon=True) for c in conversations]
    else:
        target = pooled if args.schedule == "pooled" else interleaved
        threads = [threading.Thread(target=target, daemon=True)
                   for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return conversations, time.perf_counter() - started


def proxy_config(mode: str, servers: Sequence[LlamaServer],
                 spill_after: str) -> dict[str, Any]:
    """The proxy's YAML: least-busy over both servers, sticky sessions on or left out."""
    proxy: dict[str, Any] = {"load_balancer": "least-busy"}
    if mode == "sticky":
        proxy["sticky_sessions"] = {**STICKY_CONFIG, "spill_after": spill_after}
    return {"proxy": proxy, "endpoints": [
        {"url": server.url, "name": name, "type": "llamacpp", "check_interval": "1s",
         "check_timeout": "1s"} for name, server in zip(ENDPOINTS, servers, strict=True)]}


def wait_ready(proxy: Proxy) -> None:
    """Both endpoints healthy with their slots known, and the alias routable."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    seen: Any = None
    while time.monotonic() < deadline:
        try:
            seen = requests.get(f"{proxy.url}/internal/status/endpoints",
                                timeout=5).json()["endpoints"]
            if len(seen) == len(ENDPOINTS) and all(
                    e["status"] == "healthy" and e["total_slots"] == N_PARALLEL for e in seen):
                models = requests.get(f"{proxy.url}/olla/llamacpp/v1/models", timeout=5)
                if ALIAS in models.text:
                    return
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            seen = exc
        time.sleep(0.2)
    raise BenchError(f"the proxy did not see both endpoints healthy with {N_PARALLEL} slots "
                     f"within {READY_TIMEOUT_S:g} s: {seen}")


def warm_up(server: LlamaServer) -> None:
    """One short chat straight to the server, so that the first measured turn does not pay
    for its first allocations (its prompt shares nothing with the conversations')."""
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0}
    response = requests.post(server.url + "/v1/chat/completions", json=body,
                             timeout=REQUEST_TIMEOUT)
    if response.status_code != 200:
        raise BenchError(f"warm-up at {server.url} answered {response.status_code}: "
                         f"{response.text[:300]}")


def sticky_stats(proxy: Proxy) -> Any:
    """``GET /internal/stats/sticky`` (None when the proxy does not have the route)."""
    try:
        response = requests.get(proxy.url + STATS_PATH, timeout=5)
        return response.json() if response.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


@contextmanager
def fleet(mode: str, args: argparse.Namespace,
          log: Log) -> Iterator[tuple[Proxy, list[LlamaServer]]]:
    """Two fresh llama-servers (empty caches) and the proxy in front, for one mode's run."""
    server_args = ["--alias", ALIAS, "--n-parallel", str(N_PARALLEL), "--n-ctx", str(N_CTX),
                   "--threads", str(THREADS)]
    cache_ram = [] if args.cache_ram is None else ["--cache-ram", str(args.cache_ram)]
    servers: list[LlamaServer] = [LlamaServer([*server_args, *cache_ram])
                                  for _ in ENDPOINTS]
    proxy = Proxy(proxy_config(mode, servers, args.spill_after))
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait()
        for server in servers:
            warm_up(server)
        try:
            proxy.start()
            wait_ready(proxy)
        except RuntimeError:
            log("proxy log (tail):\n" + "\n".join(proxy.log().splitlines()[-25:]))
            raise
        log(f"{mode}: servers at {', '.join(s.url for s in servers)}, proxy at {proxy.url}")
        yield proxy, servers
        processes = [s.process for s in servers] + [proxy.process]
        if any(p is None or p.poll() is not None for p in processes):
            raise BenchError(f"{mode}: a server or the proxy died during the run")
    finally:
        stop_all(proxy, *servers)


@contextmanager
def cpu_elsewhere(pids: Sequence[int]) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the % of one core the machine spent busy
    meanwhile outside ``pids`` and this process (near 0 on a quiet machine)."""
    def sample() -> tuple[float, float, float]:
        own = os.times()
        return (machine_busy_seconds(), cpu_seconds(pids) + own.user + own.system,
                time.monotonic())

    out: list[float] = []
    before = sample()
    yield out
    busy, mine, now = (a - b for a, b in zip(sample(), before, strict=True))
    out.append(round(100 * max(busy - mine, 0.0) / max(now, 1e-9), 1))


def run_mode(mode: str, round_number: int, args: argparse.Namespace,
             log: Log) -> dict[str, Any]:
    """One mode's conversations on a fresh fleet: every turn's result, stats, wall time."""
    with fleet(mode, args, log) as (proxy, servers):
        before = [server.metrics() for server in servers]
        assert proxy.process is not None
        ours = [*(s.process.pid for s in servers if s.process), *process_tree(proxy.process.pid)]
        with cpu_elsewhere(ours) as elsewhere:
            conversations, wall = converse(proxy.url + CHAT_PATH, args, mode, round_number)
        stats = sticky_stats(proxy)
        # llama.cpp's own count of the prompt tokens it processed, against the clients' sum
        # of timings.prompt_n.
        processed = {name: {key: round(after.get(key, 0) - earlier.get(key, 0))
                            for key in ("prompt_tokens_total", "tokens_predicted_total")}
                     for name, earlier, after in zip(ENDPOINTS, before,
                                                     [s.metrics() for s in servers],
                                                     strict=True)}
        turns = [r for c in conversations for r in c.results]
        errors = [r for r in turns if r.error]
        if errors:
            log(f"{mode}: {len(errors)} failed turns, e.g. {errors[0].error}")
            log("proxy log (tail):\n" + "\n".join(proxy.log().splitlines()[-15:]))
    figures = figures_of(turns)
    if elsewhere[0] > OTHER_CPU_WARNING:
        log(f"WARNING: other processes used {elsewhere[0]:.0f} % of a core during the run")
    log(f"{mode} r{round_number}: {len(turns)} turns in {wall:.1f} s, {len(errors)} failed, "
        f"cache hit {figures['hit_percent']} %, TTFT p50 {figures['ttft_p50_ms']} ms, "
        f"endpoint switches {figures['endpoint_switches']}, sticky {figures['sticky']}")
    return {"mode": mode, "round": round_number, "wall_s": round(wall, 2),
            "other_cpu_percent": elsewhere[0], "sticky_stats": stats,
            "llama_metrics": processed,
            "turns": [asdict(r) for r in turns]}


# ---------------------------------------------------------------------------------------------
# Figures.


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def figures_of(turns: Sequence[TurnResult]) -> dict[str, Any]:
    """Cache and latency figures over ``turns`` (failed turns only counted)."""
    good = [t for t in turns if not t.error]
    prompt = sum(t.prompt_tokens or 0 for t in good)
    cached = sum(t.cached_tokens or 0 for t in good)
    ttft = [t.ttft_ms for t in good if t.ttft_ms is not None]
    by_conversation: dict[tuple[int, int], list[TurnResult]] = {}
    for t in sorted(turns, key=lambda t: t.turn):
        by_conversation.setdefault((t.round, t.conversation), []).append(t)
    switches = sum(1 for chat in by_conversation.values()
                   for before, after in itertools.pairwise(chat)
                   if before.endpoint and after.endpoint and before.endpoint != after.endpoint)
    return {
        "turns": len(turns),
        "failed": len(turns) - len(good),
        "prompt_tokens_mean": _mean([t.prompt_tokens or 0 for t in good]),
        "cached_tokens_mean": _mean([t.cached_tokens or 0 for t in good]),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "processed_tokens": sum(t.prompt_n or 0 for t in good),
        "hit_percent": round(100 * cached / prompt, 1) if prompt else None,
        "ttft_p50_ms": round(percentile(ttft, 50), 1) if ttft else None,
        "ttft_p90_ms": round(percentile(ttft, 90), 1) if ttft else None,
        "total_p50_ms": round(percentile([t.total_ms or 0 for t in good], 50), 1)
        if good else None,
        "endpoint_switches": switches,
        "sticky": dict(Counter(t.sticky or "(none)" for t in turns)),
        "key_sources": dict(Counter(t.key_source or "(none)" for t in turns)),
        "endpoints": dict(Counter(t.endpoint or "(none)" for t in turns)),
        "cache_n_mismatches": sum(1 for t in good if t.cache_n != t.cached_tokens),
    }


def summarise(runs: Sequence[dict[str, Any]], turns: int) -> dict[str, Any]:
    """Per mode: figures per turn index and in total, over every round."""
    summary: dict[str, Any] = {}
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [r for r in runs if r["mode"] == mode]
        results = [TurnResult(**t) for r in mine for t in r["turns"]]
        summary[mode] = {
            "per_turn": {str(n): figures_of([t for t in results if t.turn == n])
                         for n in range(1, turns + 1)},
            "total": figures_of(results),
            "wall_s": [r["wall_s"] for r in mine],
            "other_cpu_percent": [r["other_cpu_percent"] for r in mine],
            "sticky_stats": [r["sticky_stats"] for r in mine],
            "llama_prompt_tokens": sum(m["prompt_tokens_total"] for r in mine
                                       for m in r["llama_metrics"].values()),
        }
    return summary


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def markdown(results: dict[str, Any]) -> str:
    """The summary as Markdown tables: per turn, then per mode."""
    args = results["meta"]["args"]
    summary = results["summary"]
    modes = list(summary)
    schedule = (f"one user each, {args['think'][0]:g}-{args['think'][1]:g} s between turns"
                if args["schedule"] == "users"
                else f"{args['schedule']}, {args['concurrency']} in flight")
    lines = [
        f"### Sticky sessions vs least-busy: {args['conversations']} conversations x "
        f"{args['turns']} turns ({schedule}, key {args['key']}); 2 llama-servers x "
        f"{N_PARALLEL} slots (Gemma 3 270M, --threads {THREADS}), max_tokens {MAX_TOKENS}, "
        f"{args['rounds']} round(s)",
        "",
        "| Turn | " + " | ".join(f"{m}: cached / prompt tokens (mean) | {m}: hit % | "
                                f"{m}: TTFT p50 ms" for m in modes) + " |",
        "|---:|" + "---:|---:|---:|" * len(modes),
    ]
    rows = [*[(n, n) for n in summary[modes[0]]["per_turn"]], ("all", None)]
    for label, key in rows:
        cells = []
        for mode in modes:
            f = summary[mode]["total"] if key is None else summary[mode]["per_turn"][key]
            cells += [f"{_cell(f['cached_tokens_mean'])} / {_cell(f['prompt_tokens_mean'])}",
                      _cell(f["hit_percent"]), _cell(f["ttft_p50_ms"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| Mode | Turns | Failed | Prompt tokens processed (llama.cpp's count) | Cache hit % "
        "| TTFT p50 / p90 ms "
        "| Endpoint switches | X-Olla-Sticky-Session | Key source | Turns per endpoint "
        "| Wall s | Other CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|",
    ]
    for mode in modes:
        f = summary[mode]["total"]
        lines.append(
            f"| {mode} | {f['turns']} | {f['failed']} | {f['processed_tokens']} "
            f"({summary[mode]['llama_prompt_tokens']}) | "
            f"{_cell(f['hit_percent'])} | {_cell(f['ttft_p50_ms'])} / "
            f"{_cell(f['ttft_p90_ms'])} | {f['endpoint_switches']} | {_counts(f['sticky'])} | "
            f"{_counts(f['key_sources'])} | {_counts(f['endpoints'])} | "
            f"{' + '.join(f'{w:.1f}' for w in summary[mode]['wall_s'])} | "
            f"{' + '.join(f'{c:.0f}' for c in summary[mode]['other_cpu_percent'])} |")
    stats = [(m, s) for m in modes for s in summary[m]["sticky_stats"] if s]
    if stats:
        lines += ["", "`GET /internal/stats/sticky` at the end of each run:", ""]
        lines += [f"- {m}: `{json.dumps(s, sort_keys=True)}`" for m, s in stats]
    busiest = max(c for m in modes for c in summary[m]["other_cpu_percent"])
    if busiest > OTHER_CPU_WARNING:
        lines += ["", f"**Warning:** other processes used up to {busiest:.0f} % of a core "
                  "during a measured run (Other CPU %): the figures may be disturbed."]
    mismatches = sum(summary[m]["total"]["cache_n_mismatches"] for m in modes)
    if mismatches:
        lines += ["", f"**Note:** {mismatches} turns had `timings.cache_n` differ from "
                  "`usage.prompt_tokens_details.cached_tokens`."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Orchestration.


def run(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Every mode, ``args.rounds`` times, each on a fresh fleet; the figures."""
    started = time.monotonic()
    results: dict[str, Any] = {"meta": meta(args)}
    results["meta"]["busy_elsewhere_percent"] = wait_quiet(args.wait_quiet, log)
    runs: list[dict[str, Any]] = []
    for round_number in range(args.rounds):
        order = args.modes if round_number % 2 == 0 else args.modes[::-1]
        for mode in order:
            runs.append(run_mode(mode, round_number, args, log))
    failed = sum(1 for r in runs for t in r["turns"] if t["error"])
    total = sum(len(r["turns"]) for r in runs)
    if failed * 2 > total:
        raise BenchError(f"{failed} of {total} turns failed")
    results["summary"] = summarise(runs, args.turns)
    results["runs"] = runs
    results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    log(f"done in {results['meta']['wall_s']:.0f} s")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.sticky", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each mode, alternating, on fresh servers (default 1)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {', '.join(MODES)} (default both)")
    parser.add_argument("--key", choices=KEYS, default="prefix_hash",
                        help="prefix_hash (default): no session header; session_header: "
                             f"send {SESSION_HEADER}: conv-N")
    parser.add_argument("--conversations", type=int, default=8, help="(default 8)")
    parser.add_argument("--turns", type=int, default=6, help="per conversation (default 6)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="users",
                        help="users (default): one client per conversation, thinking "
                             "between turns; interleaved: turns first come, first served, "
                             "--concurrency in flight; pooled: --concurrency clients, each "
                             "running whole conversations")
    parser.add_argument("--think", type=float, nargs=2, default=[5.0, 10.0],
                        metavar=("MIN", "MAX"),
                        help="users: seconds between a reply and the next turn, uniform "
                             "(default 5 10; the first turns start within MIN)")
    parser.add_argument("--concurrency", type=int, default=2 * N_PARALLEL,
                        help=f"interleaved, pooled: requests in flight (default "
                             f"{2 * N_PARALLEL}: the fleet's slots)")
    parser.add_argument("--spill-after", default=STICKY_CONFIG["spill_after"],
                        help="sticky_sessions.spill_after (default 5s, the proxy's)")
    parser.add_argument("--cache-ram", type=int, default=None, metavar="MIB",
                        help="llama.cpp's prompt cache in RAM per server, MiB (default: "
                             "llama.cpp's, 8192; 0 turns it off)")
    parser.add_argument("--wait-quiet", type=float, default=120.0,
                        help="seconds to wait, before starting, for other processes to "
                             "leave the cores alone (default 120)")
    parser.set_defaults(workers=1)  # recorded in the results' meta
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    for name in ("rounds", "conversations", "turns", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 <= args.think[0] <= args.think[1]:
        parser.error("--think: 0 <= MIN <= MAX")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables and the path of the JSON results."""
    args = parse_args(argv)
    return run_reported("sticky", lambda log: run(args, log), markdown)[0]


if __name__ == "__main__":
    sys.exit(main())
