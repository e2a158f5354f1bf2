"""What each endpoint serves: models discovered from ``/v1/models`` and ``/props``.

A llama.cpp server answers to its ``/v1/models`` id (the ``--alias``, or the model path as
given on its command line), to any extra aliases it lists, and to its GGUF file's base
name. Clients never see a filesystem path: an id that is a path is listed by base name.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from .concurrency import each
from .config import Endpoint
from .errors import UpstreamError
from .upstream import UpstreamPool

log = logging.getLogger(__name__)


def base_name(model_id: str) -> str:
    """``/models/llama-3.1-8b.gguf`` -> ``llama-3.1-8b.gguf``; other ids pass unchanged."""
    return model_id.replace("\\", "/").rsplit("/", 1)[-1]


def path_shown(url: str) -> str:
    """A configured URL or path as status texts show it: no user info, query or fragment
    (where keys hide), and no host (the endpoint's name says which)."""
    try:
        return urlsplit(url).path or "/"
    except ValueError:
        return "[unparseable url]"


def name_key(name: str) -> str:
    """How names compare: case-insensitively, with or without a ``.gguf`` suffix."""
    key = name.strip().lower()
    return key[:-5] if key.endswith(".gguf") else key


class Status(StrEnum):
    """An endpoint's health, as every status route shows it."""

    UNKNOWN = "unknown"        # not probed yet
    HEALTHY = "healthy"        # /health 200: routable
    LOADING = "loading"        # llama.cpp's 503 "Loading model": soon, not a failure
    UNHEALTHY = "unhealthy"    # any other error answer
    OFFLINE = "offline"        # refused, reset, timed out
    AUTH_ERROR = "auth_error"  # 401/403: the configured API key is wrong or missing


@dataclass
class EndpointState:
    """What this worker knows about one endpoint: models, health and traffic."""

    endpoint: Endpoint
    # Discovery.
    models: list[dict[str, Any]] = field(default_factory=list)
    names: frozenset[str] = frozenset()
    props: dict[str, Any] = field(default_factory=dict)
    discovered_at: float | None = None          # monotonic
    discovered_wall: float | None = None
    attempted_at: float = 0.0
    discovery_error: str | None = None
    # Routes this endpoint answered 501 to (e.g. embeddings on a server started without them).
    unsupported: set[str] = field(default_factory=set)
    # Health.
    status: Status = Status.UNKNOWN
    detail: str = ""
    failures: int = 0                           # consecutive failed probes or requests
    checked_wall: float | None = None
    next_check: float = 0.0                     # monotonic
    probe_ms: float | None = None
    # Slots: this worker's in-flight requests, plus those of others (other workers, other
    # clients) seen busy in /slots when last polled.
    others_busy: int = 0
    slots_polling: bool = True                  # False once /slots is disabled or refused
    # llama.cpp's own Prometheus text from /metrics (--metrics), re-exported by the proxy.
    metrics_text: str | None = None
    metrics_polling: bool = True                # False once /metrics is disabled or refused
    # Leases held here fleet-wide, as the shared table (Redis) last said; None without it.
    fleet_in_use: int | None = None
    # Taken out of rotation (config ``drain``, or POST .../drain): no new requests, those in
    # flight finish.
    draining: bool = False
    # Traffic through this worker.
    in_flight: int = 0
    requests: int = 0
    successes: int = 0
    latency_min_ms: float | None = None
    latency_max_ms: float = 0.0
    latency_sum_ms: float = 0.0
    # Looked up when called: the class may be defined before gevent patches threading.
    lock: threading.Lock = field(default_factory=lambda: threading.Lock(), repr=False)

    def __post_init__(self) -> None:
        self.draining = self.endpoint.drain

    @property
    def routable(self) -> bool:
        """Whether it is healthy (what the probes say)."""
        return self.status is Status.HEALTHY

    @property
    def accepting(self) -> bool:
        """Whether new requests may be sent here: healthy and not drained."""
        return self.status is Status.HEALTHY and not self.draining

    @property
    def shown_status(self) -> str:
        """The status routes' ``status``: ``draining`` while a drained endpoint still has
        requests in flight (fleet-wide with shared state), then ``drained``; else its
        health."""
        if not self.draining:
            return self.status.value
        held = self.fleet_in_use if self.fleet_in_use is not None else self.in_flight
        return "draining" if held else "drained"

    @property
    def primary_model(self) -> str | None:
        """The name this endpoint's model is listed under."""
        return self.models[0]["id"] if self.models else None

    @property
    def total_slots(self) -> int | None:
        """llama.cpp's ``--parallel``, from /props."""
        value = self.props.get("total_slots")
        return value if isinstance(value, int) else None

    @property
    def slots_in_use(self) -> int:
        """Slots busy on this endpoint: the proxy's leases (fleet-wide with shared state,
        else this worker's) plus those seen busy for others in /slots."""
        ours = self.fleet_in_use if self.fleet_in_use is not None else self.in_flight
        return ours + self.others_busy

    @property
    def n_ctx(self) -> int | None:
        """Context per slot, from /props."""
        settings = self.props.get("default_generation_settings")
        value = settings.get("n_ctx") if isinstance(settings, dict) else None
        return value if isinstance(value, int) else None

    def serves(self, keys: Iterable[str]) -> bool:
        """True if any of the name keys is one of this endpoint's names."""
        return any(k in self.names for k in keys)

    def native_name(self, keys: Iterable[str]) -> str | None:
        """The listed model id that one of ``keys`` names on this endpoint."""
        for model in self.models:
            if any(k in model["_keys"] for k in keys):
                return str(model["id"])
        return None

    def record_request(self, ok: bool, latency_ms: float) -> None:
        """Count one finished request."""
        self.requests += 1
        self.successes += ok
        self.latency_sum_ms += latency_ms
        self.latency_max_ms = max(self.latency_max_ms, latency_ms)
        if self.latency_min_ms is None or latency_ms < self.latency_min_ms:
            self.latency_min_ms = latency_ms


def parse_models(document: Any, props: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Model entries from a ``/v1/models`` body, ids made client-facing, with name keys."""
    entries = document.get("data") if isinstance(document, dict) else None
    out: list[dict[str, Any]] = []
    model_path = (props or {}).get("model_path")
    entries = entries if isinstance(entries, list) else []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("id"):
            continue
        model = copy.deepcopy(entry)
        raw_id = str(entry["id"])
        model["id"] = base_name(raw_id)
        names = {raw_id, model["id"]}
        aliases = entry.get("aliases")
        if isinstance(aliases, list):
            names.update(str(a) for a in aliases if a)
            # Listed as clients name them: a path alias (llama.cpp lists the model path
            # when there is no --alias) is shown by its file's base name.
            model["aliases"] = list(dict.fromkeys(base_name(str(a)) for a in aliases if a))
        if isinstance(model_path, str) and model_path and len(entries) == 1:
            names.add(base_name(model_path))
        model["_keys"] = frozenset(name_key(n) for n in names)
        out.append(model)
    return out


class Registry:
    """Discovered state of every configured endpoint."""

    def __init__(self, endpoints: tuple[Endpoint, ...], pool: UpstreamPool,
                 retry_after: float = 2.0, discovery_interval: float = 30.0) -> None:
        self.states = {e.name: EndpointState(e) for e in endpoints}
        self.pool = pool
        self.retry_after = retry_after
        self.discovery_interval = discovery_interval

    def __iter__(self) -> Any:
        return iter(self.states.values())

    def discover(self, state: EndpointState) -> bool:
        """Read ``/v1/models`` and ``/props`` from one endpoint; False if it did not answer."""
        endpoint = state.endpoint
        with state.lock:
            state.attempted_at = time.monotonic()
            try:
                shown = path_shown(endpoint.model_url)
                status, document = self.pool.get_json(endpoint, endpoint.model_url,
                                                       endpoint.check_timeout)
                if status in (401, 403) and endpoint.sends_credentials:
                    state.status = Status.AUTH_ERROR
                    state.detail = (f"{shown} answered {status}: the API key in "
                                    "this endpoint's headers is wrong")
                    raise UpstreamError(state.detail)
                if status in (401, 403):
                    # No key in the config: clients may bring their own, so keep routing
                    # requests that name no model; this endpoint's models stay unknown.
                    raise UpstreamError(f"{shown} answered {status}: it needs "
                                        "an API key; set one in this endpoint's headers")
                if status != 200:
                    raise UpstreamError(f"{shown} answered {status}")
            except UpstreamError as exc:
                state.discovery_error = exc.message
                log.warning("discovery failed for %s: %s", endpoint.name, exc.message)
                return False
            # /props only adds to what /v1/models says (slots, context): an answer too large
            # or too slow is an issue on the endpoint, and its models are still served.
            problem = None
            try:
                props_status, props = self.pool.get_json(endpoint, "/props",
                                                         endpoint.check_timeout)
            except UpstreamError as exc:
                props_status, props, problem = 0, None, f"/props: {exc.message}"
                log.warning("discovery of %s: %s", endpoint.name, problem)
            state.props = props if props_status == 200 and isinstance(props, dict) else {}
            state.models = parse_models(document, state.props)
            names = frozenset().union(*(m["_keys"] for m in state.models))
            if names != state.names:
                state.unsupported.clear()  # another model now: what it lacks is unknown
            state.names = names
            state.discovered_at = time.monotonic()
            state.discovered_wall = time.time()
            state.discovery_error = problem
            if state.status is Status.AUTH_ERROR:
                state.status = Status.UNKNOWN  # the key works now; the next probe decides
            return True

    def discover_many(self, states: list[EndpointState]) -> None:
        """Discover several endpoints concurrently."""
        each(self.discover, states)

    def due(self, state: EndpointState, max_age: float | None = None) -> bool:
        """Whether an endpoint should be (re)discovered now."""
        now = time.monotonic()
        if now - state.attempted_at < self.retry_after:
            return False
        if state.discovered_at is None:
            return True
        return max_age is not None and now - state.discovered_at > max_age

    def refresh(self, max_age: float | None = None) -> None:
        """Discover, on the request path, endpoints the health loop has not covered: never
        discovered and not known to be down (or older than ``max_age`` seconds)."""
        self.discover_many([
            s for s in self.states.values()
            if s.status in (Status.UNKNOWN, Status.HEALTHY) and self.due(s, max_age)])
        for state in self.states.values():
            if state.discovered_at is None and state.lock.locked():
                # Being discovered for the first time right now (the health loop's first
                # round, as a worker starts): its answer is this request's to wait for,
                # not a reason to say its models do not exist.
                with state.lock:
                    pass

    def models(self) -> list[dict[str, Any]]:
        """Routable endpoints' models merged into one OpenAI list, de-duplicated by id
        (endpoints not probed yet count while they answered discovery)."""
        seen: dict[str, dict[str, Any]] = {}
        for state in sorted(self.states.values(), key=lambda s: -s.endpoint.priority):
            if state.draining or not (state.routable or (state.status is Status.UNKNOWN
                                                         and state.discovery_error is None)):
                continue
            for model in state.models:
                if model["id"] not in seen:
                    seen[model["id"]] = {k: v for k, v in model.items() if k != "_keys"}
        return list(seen.values())
