"""Rate limits: Olla's (``server.rate_limits``: in all, per client address, on the health
route, with a burst cap) and each API key's (requests and tokens per minute). No Flask.

The windows are the ``limits`` library's sliding-window counters, in Redis when
``state.redis_url`` is set (one count for every worker of every host: a limit of N per
minute admits N in all), in this worker's memory otherwise. While Redis is unreachable the
worker counts in its own memory rather than refusing or letting everything through.
Tokens are counted after an answer (llama.cpp's ``usage``/``timings``, streams included):
a key over its tokens per minute is refused until the window has room again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from .config import ApiKey, RateLimits, StateSettings
from .errors import RateLimited

log = logging.getLogger(__name__)

REDIS_TIMEOUT = 0.5   # seconds: slower than this, Redis counts as down for this request
WARN_EVERY = 60.0     # seconds between warnings that Redis is down


@dataclass(frozen=True)
class Rule:
    """One limit on one counter: what is counted (``scope``), by whom (``who``)."""

    item: RateLimitItem
    scope: str
    who: str = ""
    what: str = "requests"   # for the 429 message
    setting: str = ""        # the config key that sets it


@dataclass
class Verdict:
    """The headers a rate-limited route answers with (the most specific rule's window)."""

    headers: dict[str, str] = field(default_factory=dict)


class Limiter:
    """Every rate limit, checked per request."""

    def __init__(self, limits: RateLimits, keys: Iterable[ApiKey],
                 state: StateSettings) -> None:
        self.settings = limits
        self.keys = {k.name: k for k in keys}
        self._local = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._shared: SlidingWindowCounterRateLimiter | None = None
        if state.redis_url:
            self._shared = SlidingWindowCounterRateLimiter(RedisStorage(
                state.redis_url, key_prefix=f"{state.key_prefix}:rl", wrap_exceptions=True,
                socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT))
        self._warned = -math.inf
        burst = limits.burst_size
        self._burst = RateLimitItemPerSecond(burst) if burst else None
        self._global = self._per_minute(limits.global_requests_per_minute)
        self._per_ip = self._per_minute(limits.per_ip_requests_per_minute)
        self._health = self._per_minute(limits.health_requests_per_minute)
        self._key_requests = {k.name: RateLimitItemPerMinute(k.requests_per_minute)
                              for k in self.keys.values() if k.requests_per_minute}
        self._key_tokens = {k.name: RateLimitItemPerMinute(k.tokens_per_minute)
                            for k in self.keys.values() if k.tokens_per_minute}

    @staticmethod
    def _per_minute(amount: int) -> RateLimitItem | None:
        return RateLimitItemPerMinute(amount) if amount else None

    @property
    def active(self) -> bool:
        """Whether any limit on proxied requests is configured."""
        return bool(self._global or self._per_ip or self._key_requests or self._key_tokens)

    @property
    def counts_tokens(self) -> bool:
        """Whether some key has ``tokens_per_minute``."""
        return bool(self._key_tokens)

    # ------------------------------------------------------------------------ checks

    def admit(self, address: str, key: ApiKey | None) -> Verdict:
        """Count one proxied request against every limit that applies; RateLimited (429)
        at the first one that is used up (later ones are then not counted)."""
        rules: list[Rule] = []
        if self._global is not None:
            rules.append(Rule(self._global, "global", what="requests in all",
                              setting="server.rate_limits.global_requests_per_minute"))
            if self._burst is not None:
                rules.append(Rule(self._burst, "global-burst", what="requests in all",
                                  setting="server.rate_limits.burst_size"))
        if self._per_ip is not None:
            rules.append(Rule(self._per_ip, "ip", address, "requests from this address",
                              "server.rate_limits.per_ip_requests_per_minute"))
            if self._burst is not None:
                rules.append(Rule(self._burst, "ip-burst", address,
                                  "requests from this address", "server.rate_limits.burst_size"))
        if key is not None and key.name in self._key_requests:
            rules.append(Rule(self._key_requests[key.name], "key", key.name,
                              f"requests for API key {key.name}",
                              "auth.api_keys[].requests_per_minute"))
        verdict = self._hit(rules)
        if key is not None and key.name in self._key_tokens:
            tokens = Rule(self._key_tokens[key.name], "tokens", key.name,
                          f"tokens for API key {key.name}", "auth.api_keys[].tokens_per_minute")
            if not self._call("test", tokens.item, tokens.scope, tokens.who):
                raise self._refused(tokens)
        return verdict

    def admit_health(self, address: str) -> Verdict:
        """Count one request to the health route (``health_requests_per_minute``)."""
        if self._health is None:
            return Verdict()
        return self._hit([Rule(self._health, "health", address, "health checks",
                               "server.rate_limits.health_requests_per_minute")])

    def _hit(self, rules: list[Rule]) -> Verdict:
        for rule in rules:
            if not self._call("hit", rule.item, rule.scope, rule.who):
                raise self._refused(rule)
        if not rules:
            return Verdict()
        shown = rules[-1]  # the most specific: the key's, else the address's, else all
        reset, remaining = self._stats(shown)
        return Verdict({"X-RateLimit-Limit": str(shown.item.amount),
                        "X-RateLimit-Remaining": str(max(0, remaining)),
                        "X-RateLimit-Reset": str(math.ceil(reset))})

    def _refused(self, rule: Rule) -> RateLimited:
        reset, _ = self._stats(rule)
        wait = max(1, math.ceil(reset - time.time()))
        per = "second" if rule.item.GRANULARITY.name == "second" else "minute"
        return RateLimited(
            f"Rate limit exceeded: at most {rule.item.amount} {rule.what} per {per} "
            f"({rule.setting}); retry in {wait} s",
            headers={"Retry-After": str(wait), "X-RateLimit-Limit": str(rule.item.amount),
                     "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(math.ceil(reset))})

    def _stats(self, rule: Rule) -> tuple[float, int]:
        stats = self._call("get_window_stats", rule.item, rule.scope, rule.who)
        return float(stats.reset_time), int(stats.remaining)

    # ---------------------------------------------------------------------- tokens

    def used_tokens(self, key_name: str, tokens: int) -> None:
        """Count tokens a key's request used (after its answer). Counted even past the
        limit: the window then stays full until enough of it has slid by."""
        item = self._key_tokens.get(key_name)
        if item is None or tokens <= 0:
            return
        if not self._call("hit", item, "tokens", key_name, cost=tokens):
            _, remaining = self._stats(Rule(item, "tokens", key_name))
            if remaining > 0:
                self._call("hit", item, "tokens", key_name, cost=remaining)

    # --------------------------------------------------------------- where windows live

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One call on the shared limiter, or this worker's while Redis is unreachable."""
        if self._shared is not None:
            try:
                return getattr(self._shared, method)(*args, **kwargs)
            except StorageError as exc:
                now = time.monotonic()
                if now - self._warned > WARN_EVERY:
                    self._warned = now
                    log.warning("rate limits: Redis unreachable (%s); counting in this "
                                "worker until it answers", type(exc.storage_error).__name__)
        return getattr(self._local, method)(*args, **kwargs)
