"""Slots and the queue shared by every worker of every proxy host, in Redis.

With ``state.redis_url`` set, each endpoint has one slot table (a sorted set of leases,
scored by their expiry in Redis server time) and each model one FIFO queue (one sorted set
of waiters for all models, scored by arrival). Every change is one Lua script, atomic on
the server: taking a slot, queueing, leaving the queue, giving a slot back — which at once
hands it to the oldest eligible waiter anywhere and tells that waiter's worker over
pub/sub — renewing this worker's leases, and publishing an endpoint's capacity.

The pump (``PUMP`` below) is the one place that decides who is served next: by fair shares
per API key, as ``app.dispatch.Turns`` does in one worker (least service in 1/weight steps,
then served longest ago, then oldest), FIFO within a key and model, a key at its
``max_concurrent`` (counted fleet-wide: ``holding``) passed over.

A worker that dies (SIGKILL) stops renewing: its leases expire after ``state.lease_ttl``
and the next script run by any worker reclaims them; its waiters are dropped with its
heartbeat. While Redis is unreachable each worker falls back to ``Dispatcher``'s local
table with its share of every endpoint's slots (floor(total / workers), at least 1) and
rejoins when Redis answers again, re-registering the leases it holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .config import QueueSettings, StateSettings
from .dispatch import ANYONE, Dispatcher, QueueView, Share, Wait, _usable, _wait
from .leases import Lease, new_id
from .registry import EndpointState

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

POLL = 0.5            # seconds: a waiter also looks for its grant this often (pub/sub backstop)
RELEASE_DELAY = 0.002  # seconds a given-back lease may wait to ride along with an acquire
REDIS_TIMEOUT = 0.5   # seconds: a Redis call slower than this counts as Redis being down
WAITERS_SCANNED = 1000

_PRELUDE = """
local P = ARGV[1]
local TTL = tonumber(ARGV[2])
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reclaimed = {}

-- Expired leases are reaped by every worker's renewal (each second), the capacity and
-- status scripts: not here, on every request's path.
local function free(ep)
  local used = redis.call('ZCARD', P .. ':leases:' .. ep)
  local cap = redis.call('HGET', P .. ':cap', ep)
  if not cap or tonumber(cap) < 0 then return 1 end
  return tonumber(cap) - used
end

-- Fair shares: service per share in 1/weight steps against a virtual clock (the service
-- of the share served last), the turn each was last served at, slots each holds.
local function standing(share)
  local clock = tonumber(redis.call('GET', P .. ':vclock') or '0')
  local service = tonumber(redis.call('HGET', P .. ':service', share) or '0')
  return math.max(service, clock), tonumber(redis.call('HGET', P .. ':last', share) or '0')
end

local function room(share, max)
  if max <= 0 then return true end
  return tonumber(redis.call('HGET', P .. ':holding', share) or '0') < max
end

local function grant(ep, id, rid, worker, share, weight)
  redis.call('ZADD', P .. ':leases:' .. ep, NOW + TTL, id)
  redis.call('HSET', P .. ':lease_info', id, rid .. '\\t' .. worker .. '\\t' .. share)
  redis.call('HINCRBY', P .. ':holding', share, 1)
  if weight then
    local level = standing(share)
    redis.call('SET', P .. ':vclock', level)
    redis.call('HSET', P .. ':service', share, level + 1 / weight)
    redis.call('HSET', P .. ':last', share, redis.call('INCR', P .. ':turn'))
  end
end

-- A lease is gone (given back or expired): its share holds one slot less.
local function ungrant(id)
  local info = redis.call('HGET', P .. ':lease_info', id) or ''
  redis.call('HDEL', P .. ':lease_info', id)
  local share = string.match(info, '^[^\\t]*\\t[^\\t]*\\t(.*)$')
  if share and redis.call('HINCRBY', P .. ':holding', share, -1) <= 0 then
    redis.call('HDEL', P .. ':holding', share)
  end
  return info
end

local function reap(ep)
  local key = P .. ':leases:' .. ep
  local dead = redis.call('ZRANGEBYSCORE', key, '-inf', NOW)
  for _, id in ipairs(dead) do
    redis.call('ZREM', key, id)
    local info = ungrant(id)
    reclaimed[#reclaimed + 1] = id .. '\\t' .. ep .. '\\t' .. info
  end
  return redis.call('ZCARD', key)
end

-- Endpoint names travel joined by newlines (config names hold no control characters).
local function names(text)
  return string.gmatch(text, '[^\\n]+')
end

local function drop_waiter(id, key)
  redis.call('ZREM', P .. ':waiters', id)
  if redis.call('HINCRBY', P .. ':qlen', key, -1) <= 0 then
    redis.call('HDEL', P .. ':qlen', key)
  end
end
"""

# The one place that chooses who is served (as app.dispatch.Turns): of the first waiter of
# each share and model, the share with the least service, then the one served longest ago,
# then the oldest; a share at its max_concurrent is passed over; one that finds no free slot
# holds back its share's later waiters for that model. Waiters past their deadline, or whose
# worker stopped beating, are dropped.
PUMP = """
local function pump()
  local groups, order = {}, {}
  local ids = redis.call('ZRANGE', P .. ':waiters', 0, LAST_WAITER)
  for seq, id in ipairs(ids) do
    local w = P .. ':w:' .. id
    local f = redis.call('HMGET', w, 'key', 'eligible', 'worker', 'deadline', 'request_id',
                         'share', 'weight', 'max')
    local key = f[1]
    if not key then
      redis.call('ZREM', P .. ':waiters', id)
    elseif tonumber(f[4]) < NOW or redis.call('EXISTS', P .. ':hb:' .. f[3]) == 0 then
      drop_waiter(id, key)
      redis.call('DEL', w)
    else
      local share = f[6] or ''
      local g = share .. '\\n' .. key
      if not groups[g] then
        groups[g] = {next = 1, share = share, weight = tonumber(f[7] or '1'),
                     max = tonumber(f[8] or '0')}
        order[#order + 1] = g
      end
      local list = groups[g]
      list[#list + 1] = {id = id, f = f, seq = seq}
    end
  end
  while true do
    local best, best_level, best_last, best_seq = nil, 0, 0, 0
    for _, g in ipairs(order) do
      local group = groups[g]
      local head = group[group.next]
      if head and not group.blocked and room(group.share, group.max) then
        local level, last = standing(group.share)
        if not best or level < best_level or (level == best_level and (last < best_last
            or (last == best_last and head.seq < best_seq))) then
          best, best_level, best_last, best_seq = g, level, last, head.seq
        end
      end
    end
    if not best then return end
    local group = groups[best]
    local head = group[group.next]
    local f = head.f
    local chosen = nil
    for ep in names(f[2]) do
      if free(ep) > 0 then chosen = ep break end
    end
    if chosen then
      grant(chosen, head.id, f[5], f[3], group.share, group.weight)
      drop_waiter(head.id, f[1])
      local w = P .. ':w:' .. head.id
      redis.call('HSET', w, 'endpoint', chosen)
      redis.call('PEXPIRE', w, 60000)
      redis.call('PUBLISH', P .. ':grant:' .. f[3], head.id .. '\\t' .. chosen)
      group.next = group.next + 1
    else
      group.blocked = true
    end
  end
end
""".replace("LAST_WAITER", str(WAITERS_SCANNED - 1))

_SCRIPTS = {
    # key, max_size, worker, request_id, id, timeout_ms, usable now (names), eligible
    # while waiting (names), share, weight, max_concurrent, then leases this worker gave
    # back since its last call (ep, id...): released, and handed on, before this request
    # is served
    "acquire": """
local key, max_size, worker, rid, id = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local share, weight, max = ARGV[11], tonumber(ARGV[12]), tonumber(ARGV[13])
if #ARGV > 13 then
  for i = 14, #ARGV, 2 do
    redis.call('ZREM', P .. ':leases:' .. ARGV[i], ARGV[i + 1])
    ungrant(ARGV[i + 1])
  end
  pump()
end
local qlen = tonumber(redis.call('HGET', P .. ':qlen', key) or '0')
if qlen == 0 and room(share, max) then
  for ep in names(ARGV[9]) do
    if free(ep) > 0 then
      grant(ep, id, rid, worker, share, weight)
      return {'granted', ep, reclaimed}
    end
  end
end
if qlen >= max_size then return {'full', '', reclaimed} end
local seq = redis.call('INCR', P .. ':seq')
local w = P .. ':w:' .. id
local wait = tonumber(ARGV[8])
redis.call('HSET', w, 'key', key, 'eligible', ARGV[10], 'worker', worker,
           'deadline', NOW + wait + 5000, 'arrived', NOW, 'request_id', rid,
           'share', share, 'weight', weight, 'max', max)
redis.call('PEXPIRE', w, wait + 60000)
redis.call('ZADD', P .. ':waiters', seq, id)
redis.call('HINCRBY', P .. ':qlen', key, 1)
-- Those queued before may be held back by their keys' max_concurrent while a slot is
-- free for this one (granted at once, told by pub/sub like any other).
if qlen > 0 then pump() end
return {'queued', '', reclaimed}
""",
    # id: leave the queue, or collect the slot granted just before
    "leave": """
local id = ARGV[3]
local w = P .. ':w:' .. id
local f = redis.call('HMGET', w, 'key', 'endpoint')
redis.call('DEL', w)
if f[2] then return {'granted', f[2]} end
if f[1] and redis.call('ZSCORE', P .. ':waiters', id) then drop_waiter(id, f[1]) end
return {'left', ''}
""",
    # ep, id, ep, id...: leases given back (batched), then whoever can use them
    "release": """
for i = 3, #ARGV, 2 do
  redis.call('ZREM', P .. ':leases:' .. ARGV[i], ARGV[i + 1])
  ungrant(ARGV[i + 1])
end
pump()
return reclaimed
""",
    # worker, mode (XX: renew only; ADD: re-register after a rejoin), this worker's
    # endpoints (names), then ep, id, rid, share...
    "renew": """
local worker, mode = ARGV[3], ARGV[4]
redis.call('SET', P .. ':hb:' .. worker, '1', 'PX', TTL)
local i = 6
while i + 3 <= #ARGV do
  local ep, id = ARGV[i], ARGV[i + 1]
  if mode == 'ADD' and not redis.call('ZSCORE', P .. ':leases:' .. ep, id) then
    grant(ep, id, ARGV[i + 2], worker, ARGV[i + 3], nil)
  else
    redis.call('ZADD', P .. ':leases:' .. ep, 'XX', NOW + TTL, id)
  end
  i = i + 4
end
for ep in names(ARGV[5]) do reap(ep) end
pump()
return reclaimed
""",
    # ep, capacity (-1: unknown, never queued)
    "capacity": """
redis.call('HSET', P .. ':cap', ARGV[3], ARGV[4])
local used = reap(ARGV[3])
pump()
return {used, reclaimed}
""",
    # endpoints (names): in use per endpoint, waiters per model (with each model's oldest
    # arrival) and per endpoint, the oldest
    "snapshot": """
local eps = {}
for ep in names(ARGV[3]) do eps[#eps + 1] = ep end
local in_use, index = {}, {}
for i, ep in ipairs(eps) do in_use[i] = reap(ep) index[ep] = i end
local waiting = {}
for i = 1, #eps do waiting[i] = 0 end
local by_model, first, oldest = {}, {}, -1
for _, id in ipairs(redis.call('ZRANGE', P .. ':waiters', 0, LAST_WAITER)) do
  local f = redis.call('HMGET', P .. ':w:' .. id, 'key', 'eligible', 'arrived')
  if f[1] then
    local arrived = tonumber(f[3])
    by_model[f[1]] = (by_model[f[1]] or 0) + 1
    if not first[f[1]] or arrived < first[f[1]] then first[f[1]] = arrived end
    if oldest < 0 or arrived < oldest then oldest = arrived end
    for ep in names(f[2]) do
      if index[ep] then waiting[index[ep]] = waiting[index[ep]] + 1 end
    end
  end
end
local flat = {}
for k, v in pairs(by_model) do
  flat[#flat + 1] = k flat[#flat + 1] = v flat[#flat + 1] = first[k]
end
return {NOW, in_use, waiting, flat, oldest, reclaimed}
""".replace("LAST_WAITER", str(WAITERS_SCANNED - 1)),
}


class RedisDown(Exception):
    """Redis did not answer (or answered an error): fall back to the local table."""


@dataclass(frozen=True)
class Reclaimed:
    """A lease that expired in the shared table (its worker died or stalled)."""

    id: str
    endpoint: str
    request_id: str
    worker: str


def display_redis_url(url: str) -> str:
    """The Redis URL without its password (for status routes and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "[unparseable url]"
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def worker_id() -> str:
    """This worker's name in the shared table: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{new_id()[:6]}"


def as_text(value: Any) -> str:
    """A value Redis answered, as text (bytes decoded)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """HGETALL's flat answer (field, value, field, value...) as a dict."""
    return {as_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


class SharedTable:
    """The Redis side: connections and the scripts, each call one round trip. Raises
    RedisDown for anything Redis does not do."""

    def __init__(self, settings: StateSettings, worker: str,
                 scripts: Mapping[str, str] | None = None) -> None:
        """``scripts``: name -> whole Lua body; by default the slot table's."""
        import redis

        assert settings.redis_url is not None
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._no_script = redis.exceptions.NoScriptError
        self.client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT, retry_on_timeout=False,
            decode_responses=True)
        self.prefix = settings.key_prefix
        self.ttl_ms = int(settings.lease_ttl * 1000)
        self.worker = worker
        if scripts is None:
            scripts = {name: _PRELUDE + PUMP + body for name, body in _SCRIPTS.items()}
        self._scripts = {name: self.client.register_script(body)
                         for name, body in scripts.items()}

    def add_script(self, name: str, body: str) -> None:
        """One more script on this table's connections (the rate limiter's windows)."""
        self._scripts[name] = self.client.register_script(body)

    def run(self, name: str, *args: Any) -> Any:
        """Run one script with the prefix and TTL in front of its arguments: EVALSHA on a
        pooled connection directly (redis-py's Script and client layers cost as much again
        as the round trip itself), loading the script when Redis does not know it."""
        pool = self.client.connection_pool
        try:
            connection = pool.get_connection()
        except self._errors as exc:
            raise RedisDown(f"{type(exc).__name__}: {exc}") from exc
        try:
            try:
                connection.send_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", self._scripts[name].sha, 0, self.prefix, self.ttl_ms, *args)
                return connection.read_response()
            except self._no_script:
                # A restarted (or flushed) Redis: load it again, on the same connection.
                connection.send_command(  # type: ignore[no-untyped-call]
                    "EVAL", self._scripts[name].script, 0, self.prefix, self.ttl_ms, *args)
                return connection.read_response()
        except self._errors as exc:
            connection.disconnect()  # type: ignore[no-untyped-call]
            raise RedisDown(f"{type(exc).__name__}: {exc}") from exc
        finally:
            pool.release(connection)

    def command(self, *args: Any) -> Any:
        """One plain command."""
        try:
            return self.client.execute_command(*args)  # type: ignore[no-untyped-call]
        except self._errors as exc:
            raise RedisDown(f"{type(exc).__name__}: {exc}") from exc

    def channel(self) -> str:
        """Where this worker hears of grants to its waiters."""
        return f"{self.prefix}:grant:{self.worker}"

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))


class SharedDispatcher(Dispatcher):
    """``Dispatcher`` over a Redis table shared by every worker and host, falling back to
    the local one (with this worker's share of the slots) while Redis is unreachable."""

    def __init__(self, queue: QueueSettings, settings: StateSettings,
                 states: Mapping[str, EndpointState], metrics: Metrics | None = None,
                 workers: int = 1, worker: str | None = None) -> None:
        super().__init__(queue, metrics, workers, settings.lease_ttl)
        self.state_settings = settings
        self.states = states
        self.table = SharedTable(settings, worker or worker_id())
        self._names = "\n".join(states)
        self.reachable = False
        self.down_since: float | None = time.monotonic()
        self.last_error = "not connected yet"
        self._grants: dict[str, list[Any]] = {}     # waiter id -> [event, endpoint name]
        self._listener: Any = None
        self._released: list[str] = []             # ep, id, ep, id... not yet in Redis
        self._released_lock = threading.Lock()
        self._flush_due = False
        self._stopping = False
        if not self.connect():
            log.warning("shared state: Redis at %s unreachable at start (%s): each worker "
                        "takes floor(total_slots / %d) slots per endpoint until it answers",
                        display_redis_url(settings.redis_url or ""), self.last_error,
                        self.workers)

    # ------------------------------------------------------------------ reachability

    def connect(self) -> bool:
        """Try Redis now (start-up, and each tick while it is down); rejoin on success."""
        try:
            self.table.command("PING")
        except RedisDown as exc:
            self._down(exc)
            return False
        if not self.reachable:
            self._rejoin()
        return self.reachable

    def _rejoin(self) -> None:
        """Redis answers (again): register every lease this worker holds, so that the
        shared table counts what ran while it was away."""
        self.reachable = True  # before renewing, which reports failures through _down
        try:
            self._renew("ADD")
        except RedisDown as exc:
            self._down(exc)
            return
        was_down = self.down_since is not None and self.last_error != "not connected yet"
        self.down_since = None
        self.last_error = ""
        log.info("shared state: %s %s", "rejoined" if was_down else "connected to",
                 display_redis_url(self.state_settings.redis_url or ""))
        self._set_up(True)

    def _down(self, exc: BaseException) -> None:
        if self.reachable:
            log.warning("shared state: Redis unreachable (%s): each worker now takes "
                        "floor(total_slots / %d) slots per endpoint on its own", exc,
                        self.workers)
        self.reachable = False
        self.last_error = str(exc)
        if self.down_since is None:
            self.down_since = time.monotonic()
        self._set_up(False)

    def _set_up(self, up: bool) -> None:
        if self.metrics is not None and self.metrics.shared_state_up is not None:
            self.metrics.shared_state_up.set(1.0 if up else 0.0)

    # ------------------------------------------------------------------ taking, giving

    def has_room(self, state: EndpointState) -> bool:
        """Whether the fleet's table has a free slot there now (this worker's while Redis
        is down)."""
        if not self.reachable:
            return super().has_room(state)
        capacity = _capacity(state)
        return capacity < 0 or self.in_use(state) < capacity

    def acquire(self, key: str, eligible: Sequence[EndpointState], request_id: str = "",
                wait: Wait | None = None, share: Share = ANYONE) -> Lease:
        """As ``Dispatcher.acquire``, fleet-wide while Redis answers."""
        if not self.reachable or self.closing:
            return super().acquire(key, eligible, request_id, wait, share)
        # A slot now only where this worker sees the endpoint usable; once queued, any of
        # them, as the shared capacity (published by every worker's probes) allows.
        usable = "\n".join(s.endpoint.name for s in eligible if _usable(s))
        names = "\n".join(s.endpoint.name for s in eligible)
        lease_id = new_id()
        # Registered before the request is queued: a grant may arrive before the reply.
        grant: list[Any] = [threading.Event(), None]
        self._grants[lease_id] = grant
        try:
            try:
                verdict, endpoint, reclaimed = self.table.run(
                    "acquire", key, self.settings.max_size, self.table.worker, request_id,
                    lease_id, int(self.settings.timeout * 1000), usable, names,
                    share.name, share.weight, share.max_concurrent, *self._take_released())
            except RedisDown as exc:
                self._down(exc)
                return super().acquire(key, eligible, request_id, wait, share)
            self._log_reclaimed(reclaimed)
            if verdict == "granted":
                return self._adopt_shared(lease_id, request_id, endpoint, share)
            if verdict == "full":
                raise self._exhausted(f"the queue for {key or 'this route'} is full "
                                      f"({self.settings.max_size} waiting, fleet-wide)")
            return self._await(key, eligible, lease_id, request_id, grant, wait, share)
        finally:
            self._grants.pop(lease_id, None)

    def _await(self, key: str, eligible: Sequence[EndpointState], lease_id: str,
               request_id: str, grant: list[Any], wait: Wait | None, share: Share) -> Lease:
        """Wait in the shared queue: woken by pub/sub, or finding the grant by polling."""
        deadline = time.monotonic() + self.settings.timeout
        endpoint: str | None = None
        try:
            while endpoint is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closing:
                    break
                if (wait or _wait)(grant[0], min(remaining, POLL)):
                    endpoint = grant[1]
                else:
                    found = self.table.command("HGET", self.table.key("w", lease_id),
                                               "endpoint")
                    endpoint = as_text(found) if found else None
        except RedisDown as exc:
            self._down(exc)
            return super().acquire(key, eligible, request_id, wait, share)
        except BaseException:
            # The client went away while waiting: leave the queue, or give back the slot
            # granted just as it left.
            self._leave_or_give_back(lease_id)
            raise
        if endpoint is None:
            endpoint = self._leave_shared(lease_id)
            if endpoint is None:
                if self.closing:
                    raise self._shutting_down()
                raise self._exhausted(f"no slot freed within {self.settings.timeout:g} s")
        else:
            self._forget_waiter(lease_id)
        return self._adopt_shared(lease_id, request_id, endpoint, share)

    def close_queue(self) -> None:
        """As ``Dispatcher.close_queue``, for this worker's waiters in the shared queue too
        (they leave it; others' waiters stay)."""
        super().close_queue()
        for grant in list(self._grants.values()):
            grant[0].set()

    def _leave_shared(self, lease_id: str) -> str | None:
        """Leave the shared queue; the endpoint granted meanwhile, if any."""
        try:
            verdict, endpoint = self.table.run("leave", lease_id)
        except RedisDown as exc:
            self._down(exc)
            return None
        return as_text(endpoint) if verdict == "granted" else None

    def _forget_waiter(self, lease_id: str) -> None:
        try:
            self.table.command("DEL", self.table.key("w", lease_id))
        except RedisDown as exc:
            self._down(exc)

    def _leave_or_give_back(self, lease_id: str) -> None:
        endpoint = self._leave_shared(lease_id)
        if endpoint is not None:
            self._release_shared(endpoint, lease_id)

    def _adopt_shared(self, lease_id: str, request_id: str, endpoint: Any,
                      share: Share) -> Lease:
        name = as_text(endpoint)
        state = self.states.get(name)
        if state is None:  # another host's endpoint under a name this one lacks
            self._release_shared(name, lease_id)
            raise self._exhausted(f"the shared table granted unknown endpoint {name!r}")
        with self._lock:
            return self._adopt(Lease(lease_id, request_id, state, share.name))

    def _give_back(self, lease_id: str, state: EndpointState) -> None:
        self._release_shared(state.endpoint.name, lease_id)

    def _release_shared(self, endpoint: str, lease_id: str) -> None:
        """Tell Redis a lease ended, off the request's path: the next acquire takes it
        along (one round trip for both), or a flush RELEASE_DELAY later does, whichever
        comes first; either hands the slot on to the oldest waiter."""
        if not self.reachable:
            return  # the lease expires there; counted again when Redis is back
        with self._released_lock:
            self._released += (endpoint, lease_id)
            if self._flush_due:
                return
            self._flush_due = True
        from .concurrency import later

        later(RELEASE_DELAY, self.settle)

    def _take_released(self) -> list[str]:
        with self._released_lock:
            taken, self._released = self._released, []
            return taken

    def settle(self) -> None:
        """Send Redis the leases given back and not yet told (the delayed flush; also
        for tests and shutdown)."""
        with self._released_lock:
            self._flush_due = False
        released = self._take_released()
        if released and self.reachable:
            try:
                self._log_reclaimed(self.table.run("release", *released))
            except RedisDown as exc:
                self._down(exc)

    def refresh(self, states: Iterable[EndpointState]) -> None:
        """Publish the probed endpoints' capacity (what this worker's health loop saw),
        which also dispatches fleet-wide; then the local queue."""
        if self.reachable:
            try:
                for state in states:
                    used, reclaimed = self.table.run("capacity", state.endpoint.name,
                                                     _capacity(state))
                    state.fleet_in_use = int(used)
                    self._log_reclaimed(reclaimed)
            except RedisDown as exc:
                self._down(exc)
        super().pump()

    def in_use(self, state: EndpointState) -> int:
        """Leases held on an endpoint fleet-wide (this worker's while Redis is down)."""
        if self.reachable:
            try:
                used = int(self.table.command("ZCARD",
                                              self.table.key("leases", state.endpoint.name)))
                state.fleet_in_use = used
                return used
            except RedisDown as exc:
                self._down(exc)
        return state.in_flight

    # ---------------------------------------------------------------- the renewing tick

    def tick(self, write_timeout: float | None = None) -> list[Any]:
        """Renew this worker's leases and heartbeat in Redis (or try to reach it again),
        reclaiming expired leases fleet-wide; then the local round."""
        lost = super().tick(write_timeout)
        if not self.reachable:
            self.connect()
        else:
            try:
                self._renew("XX")
            except RedisDown as exc:
                self._down(exc)
        if not self.reachable:
            for state in self.states.values():
                state.fleet_in_use = None
        return lost

    def _renew(self, mode: str) -> None:
        args: list[str] = []
        for lease in self.book.live():
            args += [lease.endpoint, lease.id, lease.request_id, lease.share]
        self._log_reclaimed(self.table.run("renew", self.table.worker, mode, self._names,
                                           *args))

    def _log_reclaimed(self, reclaimed: Iterable[Any]) -> None:
        for entry in reclaimed or ():
            lease_id, endpoint, request_id, worker = [*as_text(entry).split("\t"), "", ""][:4]
            self._reclaimed(Reclaimed(lease_id, endpoint, request_id, worker),
                            f"not renewed within {self.state_settings.lease_ttl:g} s "
                            f"(worker {worker or 'unknown'} stopped?)")

    # ---------------------------------------------------------------- grants by pub/sub

    def start(self) -> None:
        """Listen for grants to this worker's waiters (a greenlet under gevent)."""
        from .concurrency import spawn

        if self._listener is None:
            self._stopping = False
            self._listener = spawn(self._listen)

    def stop(self) -> None:
        """Stop listening."""
        self._stopping = True
        self._listener = None

    def _listen(self) -> None:
        while not self._stopping:
            pubsub = self.table.client.pubsub(  # type: ignore[no-untyped-call]
                ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.table.channel())
                while not self._stopping:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._granted(as_text(message["data"]))
            except self.table._errors as exc:
                log.debug("shared state: grant listener reconnecting: %s", exc)
                time.sleep(1.0)
            finally:
                with contextlib.suppress(*self.table._errors):
                    pubsub.close()

    def _granted(self, data: str) -> None:
        lease_id, _, endpoint = data.partition("\t")
        grant = self._grants.get(lease_id)
        if grant is not None:
            grant[1] = endpoint
            grant[0].set()

    # ---------------------------------------------------------------------- for status

    def snapshot(self) -> QueueView:
        """The fleet's slots and queue (with this worker's local waiters, if any)."""
        local = super().snapshot()
        if not self.reachable:
            return local
        names = [s.endpoint.name for s in self.states.values()]
        try:
            now, in_use, waiting, flat, oldest, reclaimed = self.table.run(
                "snapshot", self._names)
        except RedisDown as exc:
            self._down(exc)
            return local
        self._log_reclaimed(reclaimed)
        by_model = dict(local.by_model)
        longest_by_model = dict(local.longest_by_model)
        for i in range(0, len(flat), 3):
            model = as_text(flat[i])
            by_model[model] = by_model.get(model, 0) + int(flat[i + 1])
            waited = max(0.0, (int(now) - int(flat[i + 2])) / 1000)
            longest_by_model[model] = max(longest_by_model.get(model, 0.0), waited)
        for name, used in zip(names, in_use, strict=True):
            self.states[name].fleet_in_use = int(used)
        longest = max(local.longest_wait,
                      (int(now) - int(oldest)) / 1000 if int(oldest) >= 0 else 0.0)
        return QueueView(
            depth=sum(by_model.values()), longest_wait=max(0.0, longest), by_model=by_model,
            longest_by_model=longest_by_model,
            waiting_for={n: int(w) + local.waiting_for.get(n, 0)
                         for n, w in zip(names, waiting, strict=True)},
            in_use={n: int(u) for n, u in zip(names, in_use, strict=True)}, shared=True)

    def describe(self) -> dict[str, Any]:
        """The ``shared_state`` object of /internal/status."""
        out = super().describe()
        out.update({
            "backend": "redis",
            "reachable": self.reachable,
            "url": display_redis_url(self.state_settings.redis_url or ""),
            "key_prefix": self.state_settings.key_prefix,
            "worker": self.table.worker,
            "local_share": not self.reachable and self.workers > 1,
        })
        if not self.reachable:
            out["error"] = self.last_error
        return out


def _capacity(state: EndpointState) -> int:
    """What the shared table may fill on an endpoint: ``total_slots`` less those busy for
    others (-1: unknown, never queued; 0 while it cannot take requests)."""
    if not _usable(state):
        return 0
    total = state.total_slots
    if total is None:
        return -1
    return max(0, total - state.others_busy)
