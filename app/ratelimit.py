"""Rate limits: Olla's (``server.rate_limits``: in all, per client address, on the health
route, with a burst cap) and each API key's (requests and tokens per minute). No Flask.

Every limit is a sliding-window counter: this window's count plus the last window's,
weighted by how much of it still overlaps the last ``seconds``. A request is checked
against all its limits first and counted in all only if none is used up. Without Redis the
windows are in this worker's memory (``Windows``); with ``state.redis_url`` in Redis (one
count for every worker of every host: a limit of N per minute admits N in all), where one
Lua script checks and counts all of a request's limits in one round trip (``WINDOWS``, the
same arithmetic). While Redis is unreachable the worker counts in its own memory rather
than refusing or letting everything through. Tokens are counted after an answer
(llama.cpp's ``usage``/``timings``, streams included): a key over its tokens per minute is
refused until the window has room again.

Not the ``limits`` library, measured (``python -m bench.access``, one worker, three limits
per request): on Redis it takes a round trip per limit and one more for the headers, +1.5 ms
a request at concurrency 1, 44 % fewer requests/s at 32; in memory ~50 µs a call, +0.4 ms a
request. These windows cost one round trip, or a few µs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import ApiKey, RateLimits, StateSettings
from .errors import RateLimited

if TYPE_CHECKING:
    from .shared import SharedTable

log = logging.getLogger(__name__)

WARN_EVERY = 60.0     # seconds between warnings that Redis is down

# ARGV: prefix, ttl (unused), then per limit: name, amount, seconds, mode, cost. Modes:
# "hit" (check, then count), "test" (check only), "take" (count, never refuse). Returns
# {0, reset, remaining} of the last limit, or {i, reset, 0} for the first one used up.
WINDOWS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local P = ARGV[1] .. ':rl:'
local seen = {}
for i = 1, (#ARGV - 2) / 5 do
  local at = 2 + (i - 1) * 5
  local amount, seconds = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local mode, cost = ARGV[at + 4], tonumber(ARGV[at + 5])
  local index = math.floor(now / seconds)
  local current = P .. ARGV[at + 1] .. ':' .. index
  local before = tonumber(redis.call('GET', P .. ARGV[at + 1] .. ':' .. (index - 1)) or '0')
  local count = before * (1 - (now - index * seconds) / seconds)
                + tonumber(redis.call('GET', current) or '0')
  local reset = (index + 1) * seconds
  if mode ~= 'take' and count + cost > amount then
    return {i, tostring(reset), '0'}
  end
  seen[i] = {current, cost, seconds, mode, reset, amount - count - cost}
end
for _, limit in ipairs(seen) do
  if limit[4] ~= 'test' then
    redis.call('INCRBY', limit[1], limit[2])
    redis.call('EXPIRE', limit[1], limit[3] * 2 + 1)
  end
end
local last = seen[#seen]
return {0, tostring(last[5]), tostring(math.floor(last[6]))}
"""


@dataclass(frozen=True)
class Limit:
    """At most ``amount`` in any ``seconds``."""

    amount: int
    seconds: int


def per_minute(amount: int) -> Limit | None:
    return Limit(amount, 60) if amount else None


class Windows:
    """Sliding-window counters in this worker's memory (``WINDOWS``'s arithmetic): per
    counter, its window length, the current window's index and count, the last one's."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, int, float, float]] = {}
        self._lock = threading.Lock()
        self._swept = 0

    def check(self, rules: list[Rule], cost: int, now: float) -> tuple[int, float, int]:
        """(0, reset, remaining of the last rule), or (i, reset, 0) for the first rule
        used up (then nothing is counted)."""
        with self._lock:
            seen = []
            for index, rule in enumerate(rules, 1):
                seconds, amount = rule.limit.seconds, rule.limit.amount
                window = int(now // seconds)
                current, before = self._window(rule.name, window)
                count = before * (1 - (now - window * seconds) / seconds) + current
                reset = float((window + 1) * seconds)
                if rule.mode != "take" and count + cost > amount:
                    return index, reset, 0
                seen.append((rule, window, current, before, reset, amount - count - cost))
            for rule, window, current, before, _, _ in seen:
                if rule.mode != "test":
                    self._counts[rule.name] = (rule.limit.seconds, window, current + cost,
                                               before)
            self._sweep(now)
            reset, remaining = seen[-1][4], seen[-1][5]
            return 0, reset, int(remaining)

    def _window(self, name: str, window: int) -> tuple[float, float]:
        """(this window's count, the last one's) for a counter."""
        found = self._counts.get(name)
        if found is None:
            return 0.0, 0.0
        _, index, current, before = found
        if index == window:
            return current, before
        return 0.0, current if index == window - 1 else 0.0

    def _sweep(self, now: float) -> None:
        """Forget counters idle for two windows (looked at once a minute): client
        addresses come and go."""
        minute = int(now // 60)
        if minute == self._swept:
            return
        self._swept = minute
        for name, (seconds, index, _, _) in list(self._counts.items()):
            if int(now // seconds) - index > 1:
                del self._counts[name]


@dataclass(frozen=True)
class Rule:
    """One limit on one counter: what is counted (``scope``), by whom (``who``)."""

    limit: Limit
    scope: str
    who: str = ""
    what: str = "requests"   # for the 429 message
    setting: str = ""        # the config key that sets it
    mode: str = "hit"        # hit: check and count; test: check only; take: count only

    @property
    def name(self) -> str:
        return f"{self.scope}:{self.who}"


@dataclass
class Verdict:
    """The headers a rate-limited route answers with (the most specific rule's window)."""

    headers: dict[str, str] = field(default_factory=dict)


class Limiter:
    """Every rate limit, checked per request."""

    def __init__(self, limits: RateLimits, keys: Iterable[ApiKey], state: StateSettings,
                 table: SharedTable | None = None) -> None:
        """``table``: the worker's Redis connections (the slot table's), when it has them;
        else, with ``state.redis_url``, connections of its own."""
        self.keys = {k.name: k for k in keys}
        self._local = Windows()
        self._shared: SharedTable | None = table
        if table is None and state.redis_url:
            from .shared import SharedTable

            self._shared = SharedTable(state, "", {})
        if self._shared is not None:
            self._shared.add_script("windows", WINDOWS)
        self._warned = -math.inf
        burst = limits.burst_size
        self._burst = Limit(burst, 1) if burst else None
        self._global = per_minute(limits.global_requests_per_minute)
        self._per_ip = per_minute(limits.per_ip_requests_per_minute)
        self._health = per_minute(limits.health_requests_per_minute)
        self._key_requests = {k.name: Limit(k.requests_per_minute, 60)
                              for k in self.keys.values() if k.requests_per_minute}
        self._key_tokens = {k.name: Limit(k.tokens_per_minute, 60)
                            for k in self.keys.values() if k.tokens_per_minute}

    @property
    def active(self) -> bool:
        """Whether any limit on proxied requests is configured."""
        return bool(self._global or self._per_ip or self._key_requests or self._key_tokens)

    @property
    def limits_health(self) -> bool:
        return self._health is not None

    @property
    def shared(self) -> bool:
        """Whether the windows live in Redis."""
        return self._shared is not None

    @property
    def counts_tokens(self) -> bool:
        """Whether some key has ``tokens_per_minute``."""
        return bool(self._key_tokens)

    # ------------------------------------------------------------------------ checks

    def admit(self, address: str, key: ApiKey | None) -> Verdict:
        """Check one proxied request against every limit that applies and count it in all
        of them; RateLimited (429, counted nowhere) when one is used up. The headers show
        the most specific limit: the key's, else the address's, else the global one."""
        rules: list[Rule] = []
        if key is not None and key.name in self._key_tokens:
            rules.append(Rule(self._key_tokens[key.name], "tokens", key.name,
                              f"tokens for API key {key.name}",
                              "auth.api_keys[].tokens_per_minute", "test"))
        if self._burst is not None:
            if self._global is not None:
                rules.append(Rule(self._burst, "global-burst", "", "requests in all",
                                  "server.rate_limits.burst_size"))
            if self._per_ip is not None:
                rules.append(Rule(self._burst, "ip-burst", address,
                                  "requests from this address", "server.rate_limits.burst_size"))
        if self._global is not None:
            rules.append(Rule(self._global, "global", "", "requests in all",
                              "server.rate_limits.global_requests_per_minute"))
        if self._per_ip is not None:
            rules.append(Rule(self._per_ip, "ip", address, "requests from this address",
                              "server.rate_limits.per_ip_requests_per_minute"))
        if key is not None and key.name in self._key_requests:
            rules.append(Rule(self._key_requests[key.name], "key", key.name,
                              f"requests for API key {key.name}",
                              "auth.api_keys[].requests_per_minute"))
        return self._check(rules)

    def admit_health(self, address: str) -> Verdict | None:
        """Count one request to the health route (``health_requests_per_minute``)."""
        if self._health is None:
            return None
        return self._check([Rule(self._health, "health", address, "health checks",
                                 "server.rate_limits.health_requests_per_minute")])

    def used_tokens(self, key_name: str, tokens: int) -> None:
        """Count tokens a key's request used (after its answer), even past the limit: the
        window then stays full until enough of it has slid by."""
        item = self._key_tokens.get(key_name)
        if item is not None and tokens > 0:
            self._check([Rule(item, "tokens", key_name, mode="take")], cost=tokens)

    # --------------------------------------------------------------- where windows live

    def _check(self, rules: list[Rule], cost: int = 1) -> Verdict:
        if not rules:
            return Verdict()
        if self._shared is not None:
            from .shared import RedisDown

            args: list[Any] = []
            for rule in rules:
                args += [rule.name, rule.limit.amount, rule.limit.seconds, rule.mode, cost]
            try:
                refused, reset, remaining = self._shared.run("windows", *args)
            except RedisDown as exc:
                self._redis_down(exc)
            else:
                return self._verdict(rules, int(refused), float(reset), int(remaining))
        return self._verdict(rules, *self._local.check(rules, cost, time.time()))

    def _verdict(self, rules: list[Rule], refused: int, reset: float,
                 remaining: int) -> Verdict:
        if refused:
            raise self._refused(rules[refused - 1], reset)
        shown = rules[-1]
        return Verdict({"X-RateLimit-Limit": str(shown.limit.amount),
                        "X-RateLimit-Remaining": str(max(0, remaining)),
                        "X-RateLimit-Reset": str(math.ceil(reset))})

    @staticmethod
    def _refused(rule: Rule, reset: float) -> RateLimited:
        wait = max(1, math.ceil(reset - time.time()))
        per = "second" if rule.limit.seconds == 1 else "minute"
        return RateLimited(
            f"Rate limit exceeded: at most {rule.limit.amount} {rule.what} per {per} "
            f"({rule.setting}); retry in {wait} s",
            headers={"Retry-After": str(wait), "X-RateLimit-Limit": str(rule.limit.amount),
                     "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(math.ceil(reset))})

    def _redis_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned > WARN_EVERY:
            self._warned = now
            log.warning("rate limits: Redis unreachable (%s); counting in this worker "
                        "until it answers", exc)
