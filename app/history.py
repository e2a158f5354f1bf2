"""The last 15 minutes, second by second, for the dashboard (``/internal/ui/data``).

Each second holds what was answered (by outcome), the time to first byte of the requests
that finished in it (as counts per bucket, so that seconds and workers add up exactly and
p50/p95 come from the sum), the tokens generated, the prompt tokens and those llama.cpp took
from its KV cache, and the deepest queue seen. The last errors (time, route, model, status,
code; never prompt text or keys) are kept beside.

This worker's seconds live in a ring here. With ``state.redis_url`` every worker adds its
finished seconds to one hash per second in Redis (the renewing round, once a second, one
script), so a page shows the fleet's; while Redis is down it shows this worker's. Flask-free.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .shared import RedisDown, pairs

if TYPE_CHECKING:
    from .shared import SharedTable
    from .stats import Exchange

log = logging.getLogger(__name__)

SECONDS = 900            # 15 minutes
ERRORS = 20              # the last errors kept
# Upper bounds (ms) of the time-to-first-byte buckets; the last one is open.
TTFB_BOUNDS = (10, 25, 50, 100, 200, 350, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500,
               10000, 20000, 30000, 60000, math.inf)
OUTCOMES = ("ok", "client_error", "server_error")


def outcome_of(status: int) -> str:
    """``ok`` (below 400), ``client_error`` (4xx) or ``server_error`` (5xx)."""
    return "ok" if status < 400 else "client_error" if status < 500 else "server_error"


@dataclass
class Second:
    """What happened in one second."""

    at: int
    counts: dict[str, int] = field(default_factory=dict)   # OUTCOMES, tokens, prompt, cached
    ttfb: list[int] = field(default_factory=lambda: [0] * len(TTFB_BOUNDS))
    queue: int = 0                                          # deepest queue seen

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def fields(self) -> dict[str, int]:
        """The second as flat fields (Redis hash fields)."""
        out = {k: v for k, v in self.counts.items() if v}
        out.update({f"t{i}": n for i, n in enumerate(self.ttfb) if n})
        if self.queue:
            out["queue"] = self.queue
        return out

    @classmethod
    def of(cls, at: int, fields: Mapping[str, Any]) -> Second:
        second = cls(at)
        for key, value in fields.items():
            name, number = str(key), int(value)
            if name == "queue":
                second.queue = number
            elif name.startswith("t") and name[1:].isdigit():
                if int(name[1:]) < len(TTFB_BOUNDS):
                    second.ttfb[int(name[1:])] = number
            else:
                second.counts[name] = number
        return second


def quantile(buckets: list[int], q: float) -> float | None:
    """The q-quantile (0-1) of bucketed samples: the bucket's upper bound, interpolated
    inside the bucket (as Prometheus' histogram_quantile); None without samples."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if seen + n >= rank and n:
            low = 0.0 if i == 0 else float(TTFB_BOUNDS[i - 1])
            high = TTFB_BOUNDS[i]
            if math.isinf(high):
                return low
            return low + (high - low) * (rank - seen) / n
        seen += n
    return float(TTFB_BOUNDS[-2])


# Redis: <prefix>:hist:<second> hashes (summed fields, "queue" kept as the deepest) that
# expire after the window, and <prefix>:hist:errors, a capped list of JSON entries.
# ARGV: prefix, ttl (SharedTable.run), then window seconds, then per second:
# its epoch second, its number of fields, the fields and values; then the errors.
ADD = """
local P = ARGV[1] .. ':hist:'
local keep = tonumber(ARGV[3])
local i = 4
local seconds = tonumber(ARGV[i]) i = i + 1
for _ = 1, seconds do
  local key = P .. ARGV[i]
  local n = tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, n do
    local name, value = ARGV[i], tonumber(ARGV[i + 1])
    if name == 'queue' then
      local was = tonumber(redis.call('HGET', key, 'queue') or 0)
      if value > was then redis.call('HSET', key, 'queue', value) end
    else
      redis.call('HINCRBY', key, name, value)
    end
    i = i + 2
  end
  redis.call('EXPIRE', key, keep + 60)
end
while i <= #ARGV do
  redis.call('LPUSH', P .. 'errors', ARGV[i])
  i = i + 1
end
redis.call('LTRIM', P .. 'errors', 0, LAST_ERROR)
return 1
""".replace("LAST_ERROR", str(ERRORS - 1))
READ = """
local P = ARGV[1] .. ':hist:'
local first, last = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for at = first, last do
  local fields = redis.call('HGETALL', P .. at)
  if #fields > 0 then out[#out + 1] = at out[#out + 1] = fields end
end
return {out, redis.call('LRANGE', P .. 'errors', 0, LAST_ERROR)}
""".replace("LAST_ERROR", str(ERRORS - 1))


class History:
    """This worker's last ``SECONDS`` seconds, and the fleet's through Redis."""

    def __init__(self, table: SharedTable | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.seconds: deque[Second] = deque(maxlen=SECONDS)
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS)
        self.table = table
        self._unsent: list[Second] = []
        self._unsent_errors: list[dict[str, Any]] = []
        if table is not None:
            table.add_script("history_add", ADD)
            table.add_script("history_read", READ)

    def _now(self) -> Second:
        at = int(self.clock())
        if not self.seconds or self.seconds[-1].at != at:
            second = Second(at)
            self.seconds.append(second)
            if self.table is not None:
                self._unsent.append(second)
                del self._unsent[:-SECONDS]
        return self.seconds[-1]

    # ------------------------------------------------------------------------ recording

    def answered(self, status: int, route: str, model: str, code: str | None) -> None:
        """A request was answered (proxied or refused); an error is kept among the last."""
        self._now().add(outcome_of(status))
        if status >= 400:
            self.error(status, route, model, code)

    def error(self, status: int, route: str, model: str, code: str | None) -> None:
        entry = {"time": round(self.clock(), 3), "route": route, "model": model,
                 "status": status, "code": code or ""}
        self.errors.append(entry)
        if self.table is not None:
            self._unsent_errors.append(entry)
            del self._unsent_errors[:-ERRORS]

    def exchange(self, exchange: Exchange) -> None:
        """A proxied request finished: its first byte, tokens and cache figures (a stream
        that broke after its headers is kept among the errors too)."""
        second = self._now()
        if exchange.ttfb_ms is not None:
            second.ttfb[bisect.bisect_left(TTFB_BOUNDS, exchange.ttfb_ms)] += 1
        prompt, completion, _ = exchange.usage()
        if completion:
            second.add("tokens", completion)
        if prompt:
            second.add("prompt", prompt)
            cached = exchange.cached_tokens()
            if cached:
                second.add("cached", cached)
        if not exchange.ok and exchange.status < 400:
            self.error(exchange.status or 502, exchange.route, exchange.model,
                       "stream_failed")

    def queue_depth(self, depth: int) -> None:
        """The queue's depth now (sampled once a second)."""
        second = self._now()
        second.queue = max(second.queue, depth)

    # -------------------------------------------------------------------------- Redis

    def flush(self) -> None:
        """Add the seconds that are over (and new errors) to Redis: one script call."""
        if self.table is None:
            return
        current = int(self.clock())
        done = [s for s in self._unsent if s.at < current]
        if not done and not self._unsent_errors:
            return
        args: list[Any] = [SECONDS, len(done)]
        for second in done:
            fields = second.fields()
            args += [second.at, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        errors = [json.dumps(e) for e in self._unsent_errors]
        try:
            self.table.run("history_add", *args, *errors)
        except RedisDown as exc:
            log.debug("history not shared this second: %s", exc)
            return  # kept: sent with the next round
        self._unsent = [s for s in self._unsent if s.at >= current]
        self._unsent_errors = []

    # ------------------------------------------------------------------------- reading

    def window(self) -> tuple[int, list[Second], list[dict[str, Any]], bool]:
        """(first second, the seconds of the window, the last errors newest first, whether
        the figures are the fleet's)."""
        last = int(self.clock()) - 1  # the current second is not over
        first = last - SECONDS + 1
        if self.table is not None:
            try:
                flat, raw_errors = self.table.run("history_read", first, last)
            except RedisDown:
                pass
            else:
                seconds = [Second.of(int(flat[i]), pairs(flat[i + 1]))
                           for i in range(0, len(flat), 2)]
                return first, seconds, [json.loads(e) for e in raw_errors], True
        seconds = [s for s in self.seconds if first <= s.at <= last]
        return first, seconds, list(reversed(self.errors)), False

    def series(self) -> dict[str, Any]:
        """The window as one array per figure, a value per second (oldest first)."""
        first, seconds, errors, shared = self.window()
        by_second = {s.at: s for s in seconds}
        requests: dict[str, list[int]] = {o: [] for o in OUTCOMES}
        p50: list[float | None] = []
        p95: list[float | None] = []
        tokens: list[int] = []
        queue: list[int] = []
        cache: list[float | None] = []
        nothing = Second(0)  # read only: a second in which nothing happened
        for at in range(first, first + SECONDS):
            second = by_second.get(at, nothing)
            for outcome in OUTCOMES:
                requests[outcome].append(second.counts.get(outcome, 0))
            p50.append(_round(quantile(second.ttfb, 0.5)))
            p95.append(_round(quantile(second.ttfb, 0.95)))
            tokens.append(second.counts.get("tokens", 0))
            queue.append(second.queue)
            prompt = second.counts.get("prompt", 0)
            cache.append(round(100 * second.counts.get("cached", 0) / prompt, 1)
                         if prompt else None)
        return {"start": first, "step": 1, "seconds": SECONDS, "shared": shared,
                "requests": requests, "ttfb_p50_ms": p50, "ttfb_p95_ms": p95,
                "tokens_per_second": tokens, "queue_depth": queue,
                "cache_hit_rate": cache, "errors": errors}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
