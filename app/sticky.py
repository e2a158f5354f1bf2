"""Sticky sessions (Olla's ``proxy.sticky_sessions``): a conversation's next turn goes to the
endpoint that served its last one, whose llama.cpp still holds the conversation's prompt in
its KV cache and so skips re-reading it.

A request's session key comes from the first of ``key_sources`` that gives one:
``session_header`` (``X-Olla-Session-ID``), ``prefix_hash`` (the conversation's start: the
system prompt and the messages up to the first user message, or the prompt, cut to
``prefix_hash_bytes``), ``auth_header`` (the client's API key or Authorization) or ``ip``.
Keys are scoped per model and hashed; no client text is stored.

The outcome is ``hit`` (the pinned endpoint served it), ``miss`` (no session yet),
``repin`` (the pinned endpoint can no longer serve the model), ``spill`` (the pinned one
had no free slot for ``spill_after`` while another had one: the turn went there) or
``disabled`` (no key). After every answer the session points at the endpoint that gave
it, which then holds the freshest cache. Sessions on an endpoint that stops being
routable are purged.

Where they live: this worker's memory (``LocalSessions``, an LRU with a sliding idle
TTL), or Redis when ``state.redis_url`` is set (``RedisSessions``: every worker and host
sees one table), falling back to memory while Redis is down. Flask-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .concurrency import gevent_active, spawn
from .config import StickySettings
from .registry import Status, name_key
from .shared import RedisDown, as_text, pairs

if TYPE_CHECKING:
    from .shared import SharedTable

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Olla-Session-ID"
OUTCOMES = ("hit", "miss", "repin", "spill", "disabled")


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A request's session: the hashed key and the source it came from."""

    key: str
    source: str


def conversation_start(payload: Mapping[str, Any], limit: int) -> bytes | None:
    """The bytes that name a conversation for ``prefix_hash``: its system prompt (or
    instructions) and its messages up to and including the first user message, as compact
    JSON, cut to ``limit`` bytes; or the start of a prompt. None when there is nothing.

    Not the whole message list cut to ``limit`` bytes (Olla's rule): a conversation
    shorter than that would change its key with every turn, and never hit.
    """
    parts: list[Any] = [payload[k] for k in ("system", "instructions") if payload.get(k)]
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        given = payload.get("input")
        messages = given if isinstance(given, list) and given else None
    if messages is not None:
        for message in messages:
            parts.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
    else:
        prompt = payload.get("prompt", payload.get("input"))
        if isinstance(prompt, (str, list)) and prompt:
            parts.append(prompt)
    if not parts:
        return None
    out = bytearray()
    for part in parts:  # one part at a time: a long conversation is not serialised whole
        out += json.dumps(part, separators=(",", ":"), ensure_ascii=False).encode()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def session_key(settings: StickySettings, model: str | None, session_header: str,
                payload: Mapping[str, Any], client_ip: str,
                credential: str | None) -> SessionKey | None:
    """The request's session key from the first ``key_sources`` entry that gives one:
    ``session_header`` is the client's X-Olla-Session-ID (or ""), ``credential`` its API
    key."""
    for source in settings.key_sources:
        value: bytes | None = None
        if source == "session_header":
            value = session_header.encode() if session_header else None
        elif source == "prefix_hash":
            value = conversation_start(payload, settings.prefix_hash_bytes)
        elif source == "auth_header":
            value = credential.encode() if credential else None
        elif source == "ip":
            value = client_ip.encode() if client_ip else None
        if value:
            digest = hashlib.blake2b(value, digest_size=16,
                                     person=source.encode()[:16])
            digest.update(b"\0" + name_key(model or "").encode())
            return SessionKey(digest.hexdigest(), source)
    return None


@dataclass
class Counts:
    """Olla's counters, plus each outcome's."""

    insertions: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))


class LocalSessions:
    """Sessions in this worker: an LRU of at most ``max_sessions``, each forgotten after
    ``idle_ttl_seconds`` unused."""

    def __init__(self, settings: StickySettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.counts = Counts()

    def lookup(self, key: str) -> str | None:
        """The endpoint a session is pinned to (its idle time starts again), or None."""
        found = self.sessions.get(key)
        now = self.clock()
        if found is not None and now - found[1] > self.settings.idle_ttl_seconds:
            del self.sessions[key]
            self.counts.evictions += 1
            found = None
        if found is None:
            self.counts.misses += 1
            return None
        self.counts.hits += 1
        self.sessions[key] = (found[0], now)
        self.sessions.move_to_end(key)
        return found[0]

    def record(self, key: str, endpoint: str, outcome: str) -> None:
        """Pin a session to the endpoint that served it, and count the outcome."""
        self.count(outcome)
        if key not in self.sessions:
            self.counts.insertions += 1
        self.sessions[key] = (endpoint, self.clock())
        self.sessions.move_to_end(key)
        self._expire()

    def count(self, outcome: str, n: int = 1) -> None:
        """Count an outcome that changes no pin (``hit``: the lookup already restarted its
        idle time; ``disabled``)."""
        self.counts.outcomes[outcome] = self.counts.outcomes.get(outcome, 0) + n

    def flush(self) -> None:
        """Nothing to send: the counts are here."""

    def _expire(self) -> None:
        oldest = self.clock() - self.settings.idle_ttl_seconds
        while self.sessions:
            key, (_, used) = next(iter(self.sessions.items()))
            if used >= oldest and len(self.sessions) <= self.settings.max_sessions:
                return
            del self.sessions[key]
            self.counts.evictions += 1

    def purge(self, endpoint: str) -> int:
        """Forget every session pinned to ``endpoint``; how many there were."""
        gone = [k for k, (name, _) in self.sessions.items() if name == endpoint]
        for key in gone:
            del self.sessions[key]
        self.counts.evictions += len(gone)
        return len(gone)

    def figures(self) -> dict[str, Any]:
        self._expire()
        counts = self.counts
        return {"active_sessions": len(self.sessions), "insertions": counts.insertions,
                "hits": counts.hits, "misses": counts.misses, "evictions": counts.evictions,
                "outcomes": dict(counts.outcomes), "shared": False}


# Redis, under <key_prefix>:sticky: s = hash key -> endpoint, t = zset key -> last use (ms,
# Redis time), e:<endpoint> = set of the keys pinned there, n = hash of the counters. Each
# call is one atomic script; ARGV[1] is the key prefix (SharedTable.run), ARGV[2] unused.
_PRELUDE = """
local P = ARGV[1] .. ':sticky:'
local S, T, N, E = P .. 's', P .. 't', P .. 'n', P .. 'e:'
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
local function forget(key)
  local ep = redis.call('HGET', S, key)
  if ep then redis.call('SREM', E .. ep, key) end
  redis.call('HDEL', S, key)
  redis.call('ZREM', T, key)
  redis.call('HINCRBY', N, 'evictions', 1)
end
local function expire(ttl, most)
  for _, stale in ipairs(redis.call('ZRANGEBYSCORE', T, '-inf', now - ttl, 'LIMIT', 0, 256)) do
    forget(stale)
  end
  local over = redis.call('ZCARD', T) - most
  if over > 0 then
    for _, extra in ipairs(redis.call('ZRANGE', T, 0, over - 1)) do forget(extra) end
  end
end
"""
LOOKUP = _PRELUDE + """
local key, ttl = ARGV[3], tonumber(ARGV[4])
local ep = redis.call('HGET', S, key)
if ep then
  local used = tonumber(redis.call('ZSCORE', T, key) or 0)
  if now - used > ttl then forget(key); ep = false end
end
if not ep then redis.call('HINCRBY', N, 'misses', 1); return false end
redis.call('HINCRBY', N, 'hits', 1)
redis.call('ZADD', T, now, key)
return ep
"""
RECORD = _PRELUDE + """
local key, ep, outcome = ARGV[3], ARGV[4], ARGV[5]
redis.call('HINCRBY', N, 'outcome:' .. outcome, 1)
local old = redis.call('HGET', S, key)
if not old then redis.call('HINCRBY', N, 'insertions', 1) end
if old ~= ep then
  if old then redis.call('SREM', E .. old, key) end
  redis.call('HSET', S, key, ep)
  redis.call('SADD', E .. ep, key)
end
redis.call('ZADD', T, now, key)
expire(tonumber(ARGV[6]), tonumber(ARGV[7]))
return 1
"""
COUNT = _PRELUDE + """
for i = 3, #ARGV, 2 do redis.call('HINCRBY', N, 'outcome:' .. ARGV[i], ARGV[i + 1]) end
return 1
"""
PURGE = _PRELUDE + """
local ep = ARGV[3]
local gone = 0
for _, key in ipairs(redis.call('SMEMBERS', E .. ep)) do
  if redis.call('HGET', S, key) == ep then forget(key); gone = gone + 1 end
end
redis.call('DEL', E .. ep)
return gone
"""
FIGURES = _PRELUDE + """
expire(tonumber(ARGV[3]), tonumber(ARGV[4]))
return {redis.call('ZCARD', T), redis.call('HGETALL', N)}
"""


class RedisSessions:
    """Sessions in Redis, one table for every worker and host (``state.redis_url``);
    this worker's ``LocalSessions`` while Redis is down."""

    def __init__(self, settings: StickySettings, table: SharedTable,
                 fallback: LocalSessions) -> None:
        self.settings = settings
        self.table = table
        self.fallback = fallback
        self._unsent: dict[str, int] = {}
        for name, body in (("sticky_lookup", LOOKUP), ("sticky_record", RECORD),
                           ("sticky_count", COUNT), ("sticky_purge", PURGE),
                           ("sticky_figures", FIGURES)):
            table.add_script(name, body)

    def lookup(self, key: str) -> str | None:
        try:
            found = self.table.run("sticky_lookup", key, self.settings.idle_ttl_seconds * 1000)
        except RedisDown:
            return self.fallback.lookup(key)
        return as_text(found) if found else None

    def record(self, key: str, endpoint: str, outcome: str) -> None:
        try:
            self.table.run("sticky_record", key, endpoint, outcome,
                      self.settings.idle_ttl_seconds * 1000, self.settings.max_sessions)
        except RedisDown:
            self.fallback.record(key, endpoint, outcome)

    def count(self, outcome: str) -> None:
        """Count an outcome that changes no pin (``hit``: the lookup already restarted the
        session's idle time; ``disabled``): here, sent to Redis by ``flush``."""
        self._unsent[outcome] = self._unsent.get(outcome, 0) + 1

    def flush(self) -> None:
        """Send the outcomes counted here since the last flush (the renewing round's, once
        a second): a round trip a second, not one per request."""
        unsent, self._unsent = self._unsent, {}
        if not unsent:
            return
        try:
            self.table.run("sticky_count", *(x for pair in unsent.items() for x in pair))
        except RedisDown:
            for outcome, n in unsent.items():
                self.fallback.count(outcome, n)

    def purge(self, endpoint: str) -> int:
        self.fallback.purge(endpoint)
        try:
            return int(self.table.run("sticky_purge", endpoint))
        except RedisDown:
            return 0

    def figures(self) -> dict[str, Any]:
        try:
            active, flat = self.table.run("sticky_figures", self.settings.idle_ttl_seconds * 1000,
                                     self.settings.max_sessions)
        except RedisDown:
            return self.fallback.figures()
        counts = {field: int(value) for field, value in pairs(flat).items()}
        return {"active_sessions": int(active),
                **{k: counts.get(k, 0) for k in ("insertions", "hits", "misses",
                                                 "evictions")},
                "outcomes": {o: counts.get("outcome:" + o, 0) + self._unsent.get(o, 0)
                             for o in OUTCOMES},
                "shared": True}


Store = LocalSessions | RedisSessions


@dataclass
class Pin:
    """A request's session and where it was pinned when the request arrived."""

    session: SessionKey
    pinned: str | None


class Sticky:
    """The sessions and what they decide for one request: ``pin`` before choosing an
    endpoint, ``served`` once one answered."""

    def __init__(self, settings: StickySettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._routable: dict[str, bool] = {}
        # Writing to Redis is a round trip the answer need not wait for.
        self._later = isinstance(store, RedisSessions) and gevent_active()

    def _write(self, write: Callable[[], None]) -> None:
        if self._later:
            spawn(write)
        else:
            write()

    def pin(self, session: SessionKey) -> Pin:
        """Look the session up (its idle time starts again)."""
        return Pin(session, self.store.lookup(session.key))

    def served(self, pin: Pin | None, endpoint: str, was_candidate: bool) -> str:
        """The endpoint that answered: pin the session there and name the outcome.
        ``was_candidate``: whether the pinned endpoint could have served the request."""
        if pin is None:
            self.store.count("disabled")
            return "disabled"
        if pin.pinned == endpoint:
            self.store.count("hit")  # the pin stands; the lookup restarted its idle time
            return "hit"
        outcome = "miss" if pin.pinned is None else "spill" if was_candidate else "repin"
        key = pin.session.key
        self._write(lambda: self.store.record(key, endpoint, outcome))
        return outcome

    def health_changed(self, states: Iterable[Any]) -> None:
        """After a health round: forget the sessions of endpoints that stopped being
        routable (Olla purges on the same transition)."""
        for state in states:
            name = state.endpoint.name
            routable = state.routable or state.status is Status.UNKNOWN  # not probed yet
            if self._routable.get(name, True) and not routable:
                gone = self.store.purge(name)
                if gone:
                    log.info("sticky sessions: %d purged from %s (no longer routable)",
                             gone, name)
            self._routable[name] = routable
