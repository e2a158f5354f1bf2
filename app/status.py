"""The status routes' JSON, built from the services: plain functions, no Flask.

Field names are Olla's (``internal/app/handlers/handler_status*.go``,
``handler_stats_models.go``, ``handler_version.go``, ``adapter/converter/unified_converter.go``)
wherever Olla has the figure. Where Olla renders a number as text, we give the number
(``success_rate`` is a float percentage, latencies are ``*_ms`` numbers) and keep Olla's
human strings only for times (``health_check: "2s ago"`` beside ``health_check_at``).

Nothing here may reveal an endpoint's configured ``headers`` (their names or values) or a
filesystem path: URLs lose user info, query and fragment, models are named by file base
name, and every response passes through ``redact()`` before it leaves.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .concurrency import running_counts
from .dispatch import QueueView
from .errors import InvalidRequest, ModelNotFound
from .process import process_figures
from .registry import EndpointState, Status, base_name, name_key
from .services import Services
from .stats import ModelStats, TranslatorStats, percentile

RECENT_MODELS = 10          # Olla's cap on /internal/status/models recent_models
MIN_SECRET_LENGTH = 6       # shorter header names/values are too common to scrub safely
REDACTED = "[redacted]"
UNPARSEABLE_URL = "[unparseable url]"


# ---------------------------------------------------------------------------- formatting

@dataclass(frozen=True)
class Clock:
    """One instant, read once per response so every figure in it agrees."""

    wall: float
    mono: float

    @classmethod
    def now(cls) -> Clock:
        """The current wall-clock and monotonic time."""
        return cls(time.time(), time.monotonic())

    def wall_of(self, mono: float) -> float:
        """The wall-clock time of a ``time.monotonic()`` reading."""
        return self.wall + (mono - self.mono)


def iso(wall: float | None) -> str | None:
    """``2025-06-01T12:00:00.000Z`` (UTC), or None."""
    if wall is None:
        return None
    stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def span(seconds: float) -> str:
    """Olla's short duration: ``7s``, ``12m``, ``3h``, ``2d``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        return f"{round(seconds / 60)}m"
    if seconds < 86400:
        return f"{round(seconds / 3600)}h"
    return f"{round(seconds / 86400)}d"


def ago(wall: float | None, clock: Clock) -> str:
    """``2s ago``, or ``never``."""
    return "never" if wall is None else f"{span(clock.wall - wall)} ago"


def until(wall: float | None, clock: Clock) -> str:
    """``in 3s``, ``now`` when due, or ``unknown``."""
    if wall is None:
        return "unknown"
    return "now" if wall <= clock.wall else f"in {span(wall - clock.wall)}"


def uptime(seconds: float) -> str:
    """Olla's uptime text: ``42s``, ``5m``, ``3h 12m``, ``2d 4h``."""
    if seconds < 60:
        return f"{round(seconds)}s"
    if seconds < 3600:
        return f"{round(seconds / 60)}m"
    hours, minutes = int(seconds // 3600), int(seconds // 60) % 60
    if hours < 24:
        return f"{hours}h {minutes}m"
    return f"{hours // 24}d {hours % 24}h"


def latency_text(ms: float | None) -> str:
    """Olla's latency text: ``0ms``, ``85ms``, ``1.2s``."""
    ms = round(ms or 0)
    return f"{ms / 1000:.1f}s" if ms >= 1000 else f"{ms}ms"


def size_text(size: int) -> str:
    """Olla's byte size text: ``512 B``, ``4.58 GB``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    units = ["KB", "MB", "GB", "TB", "PB"]
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.2f} {units[0]}"


def ms(value: float | None) -> float | None:
    """A latency in ms, to 0.1 ms."""
    return None if value is None else round(value, 1)


def rate(part: int, whole: int) -> float | None:
    """A percentage to 0.01, or None when there is nothing to divide."""
    return round(part * 100 / whole, 2) if whole else None


def display_url(url: str) -> str:
    """An endpoint URL without user info, query or fragment (where secrets hide)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = (f"[{host}]" if ":" in host else host) + (
            f":{parts.port}" if parts.port is not None else "")
    except ValueError:
        return UNPARSEABLE_URL
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _fnv1a32(text: str) -> int:
    value = 0x811C9DC5
    for byte in text.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def endpoint_ids(states: Iterable[EndpointState]) -> dict[str, str]:
    """Olla's stable endpoint ids: FNV-1a 32-bit of the display URL in base 36; endpoints
    sharing a display URL get ``-0``, ``-1``... in name order. Keyed by endpoint name."""
    groups: dict[str, list[str]] = {}
    for state in states:
        groups.setdefault(display_url(state.endpoint.url), []).append(state.endpoint.name)
    ids: dict[str, str] = {}
    for url, names in groups.items():
        base = _base36(_fnv1a32(url))
        if len(names) == 1:
            ids[names[0]] = base
        else:
            ids.update({name: f"{base}-{i}" for i, name in enumerate(sorted(names))})
    return ids


# ----------------------------------------------------------------------------- redaction

def secrets_of(svc: Services) -> list[str]:
    """Every configured header name and value (and a value's last word: the token in
    ``Bearer <token>``) long enough to scrub without mangling ordinary text."""
    found: set[str] = set()
    for endpoint in svc.settings.endpoints:
        for key, value in endpoint.headers.items():
            found.update(s for s in (key, value, *value.split()[-1:])
                         if len(s) >= MIN_SECRET_LENGTH)
    return sorted(found, key=len, reverse=True)


def redact(document: Any, secrets: list[str]) -> Any:
    """A copy of a JSON document with every secret in its strings replaced."""
    if not secrets:
        return document
    pattern = re.compile("|".join(re.escape(s) for s in secrets), re.IGNORECASE)

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(REDACTED, value)
        if isinstance(value, dict):
            return {scrub(k): scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return scrub(document)


def _finish(svc: Services, document: dict[str, Any]) -> dict[str, Any]:
    return redact(document, secrets_of(svc))  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ endpoints

@dataclass(frozen=True)
class EndpointView:
    """One endpoint as the serializers see it: its state, its id, and the instant."""

    state: EndpointState
    id: str
    clock: Clock
    queued: int = 0        # requests waiting that could use this endpoint
    leases: int = 0        # slot leases held there (fleet-wide with shared state)

    @property
    def next_check_wall(self) -> float | None:
        """When the next probe is due (None: never scheduled)."""
        next_check = self.state.next_check
        return self.clock.wall_of(next_check) if next_check > 0 else None

    @property
    def issues(self) -> str:
        """What is wrong with the endpoint, as one line (Olla's ``issues``); "" if nothing."""
        state = self.state
        found: list[str] = []
        if state.detail and state.status is not Status.HEALTHY:
            found.append(state.detail)
        if state.discovery_error and state.discovery_error != state.detail:
            found.append(f"model discovery: {state.discovery_error}")
        if state.failures > 3:
            found.append(f"{state.failures} consecutive failures")
        if state.requests > 10 and state.successes * 100 < state.requests * 90:
            found.append("low success rate")
        return "; ".join(found)


# A field group maps an endpoint to some of its fields; a serializer is a tuple of groups.
# New figures (slots in use, queue depth...) are a new group, or a line in ``capacity``.
FieldGroup = Callable[[EndpointView], dict[str, Any]]


def identity(view: EndpointView) -> dict[str, Any]:
    """Who the endpoint is."""
    endpoint = view.state.endpoint
    return {"id": view.id, "name": endpoint.name, "url": display_url(endpoint.url),
            "type": endpoint.type, "priority": endpoint.priority}


def health(view: EndpointView) -> dict[str, Any]:
    """Its state, the last probe and the next one."""
    state, clock = view.state, view.clock
    return {
        "status": state.shown_status,
        "issues": view.issues,
        "health_check": ago(state.checked_wall, clock),
        "health_check_at": iso(state.checked_wall),
        "response_time": None if state.probe_ms is None else latency_text(state.probe_ms),
        "response_time_ms": ms(state.probe_ms),
        "next_check": until(view.next_check_wall, clock),
        "next_check_at": iso(view.next_check_wall),
    }


def models(view: EndpointView) -> dict[str, Any]:
    """What it serves, and when that was last read."""
    state = view.state
    return {"model_count": len(state.models),
            "last_model_sync": ago(state.discovered_wall, view.clock),
            "last_model_sync_at": iso(state.discovered_wall)}


def traffic(view: EndpointView) -> dict[str, Any]:
    """Requests this worker sent it."""
    state = view.state
    served = state.requests > 0
    return {
        "request_count": state.requests,
        "success_rate": rate(state.successes, state.requests),
        "min_latency_ms": ms(state.latency_min_ms) if served else None,
        "avg_latency_ms": ms(state.latency_sum_ms / state.requests) if served else None,
        "max_latency_ms": ms(state.latency_max_ms) if served else None,
        "active_connections": state.in_flight,
    }


def capacity(view: EndpointView) -> dict[str, Any]:
    """llama.cpp's own figures from /props (ours, not Olla's)."""
    state = view.state
    build = state.props.get("build_info")
    return {"total_slots": state.total_slots, "n_ctx": state.n_ctx,
            "build_info": build if isinstance(build, str) else None,
            # Ours: the proxy's leases (fleet-wide with shared state, else this worker's)
            # plus others seen busy in /slots.
            "slots_in_use": state.slots_in_use,
            "slots_polled": state.slots_polling,
            "leases": view.leases,
            "queued": view.queued}


def status_summary(view: EndpointView) -> dict[str, Any]:
    """The endpoint as ``/internal/status`` lists it (Olla's shorter, older names)."""
    state, clock = view.state, view.clock
    served = state.requests > 0
    average = state.latency_sum_ms / state.requests if served else None
    return {
        "id": view.id, "name": state.endpoint.name, "url": display_url(state.endpoint.url),
        "status": state.shown_status, "priority": state.endpoint.priority,
        "success_rate": rate(state.successes, state.requests),
        "avg_latency": latency_text(average), "avg_latency_ms": ms(average),
        "min_latency_ms": ms(state.latency_min_ms) if served else None,
        "max_latency_ms": ms(state.latency_max_ms) if served else None,
        "connections": state.in_flight, "requests": state.requests,
        "last_check": ago(state.checked_wall, clock), "health_check_at": iso(state.checked_wall),
        "next_check": until(view.next_check_wall, clock),
        "next_check_at": iso(view.next_check_wall),
        "issues": view.issues,
        "models": {"last_updated": iso(state.discovered_wall), "count": len(state.models)},
    }


ENDPOINT_FIELDS: tuple[FieldGroup, ...] = (identity, health, models, traffic, capacity)
STATUS_ENDPOINT_FIELDS: tuple[FieldGroup, ...] = (status_summary, capacity)


def serialize_endpoint(view: EndpointView,
                       groups: tuple[FieldGroup, ...] = ENDPOINT_FIELDS) -> dict[str, Any]:
    """One endpoint's JSON object: its field groups, merged in order."""
    out: dict[str, Any] = {}
    for group in groups:
        out.update(group(view))
    return out


def _views(svc: Services, clock: Clock, queue: QueueView) -> list[EndpointView]:
    """Every endpoint, Olla's order: priority first, healthy first within it, then name."""
    states = list(svc.registry)
    ids = endpoint_ids(states)
    views = [EndpointView(s, ids[s.endpoint.name], clock,
                          queue.waiting_for.get(s.endpoint.name, 0),
                          queue.in_use.get(s.endpoint.name, 0))
             for s in states]
    return sorted(views, key=lambda v: (-v.state.endpoint.priority,
                                        v.state.status is not Status.HEALTHY,
                                        v.state.endpoint.name, v.id))


def queue_status(svc: Services, queue: QueueView) -> dict[str, Any]:
    """The slot queue (ours): depth, bound, the longest current wait, per model; the
    fleet's with shared state, else this worker's."""
    settings = svc.settings.proxy.queue
    return {
        "depth": queue.depth,
        "max_size": settings.max_size,
        "timeout_s": settings.timeout,
        "longest_wait_ms": ms(queue.longest_wait * 1000),
        "by_model": {key or "(no model named)": count
                     for key, count in sorted(queue.by_model.items()) if count},
        "scope": "fleet" if queue.shared else "worker",
    }


def endpoints_status(svc: Services, clock: Clock | None = None) -> dict[str, Any]:
    """``GET /internal/status/endpoints``."""
    clock = clock or Clock.now()
    queue = svc.dispatcher.snapshot()
    views = _views(svc, clock, queue)
    return _finish(svc, {
        "timestamp": iso(clock.wall),
        "total_count": len(views),
        "healthy_count": sum(v.state.status is Status.HEALTHY for v in views),
        "routable_count": sum(v.state.routable for v in views),
        "endpoints": [serialize_endpoint(v) for v in views],
        "queue": queue_status(svc, queue),
    })


def system_status(svc: Services, clock: Clock | None = None) -> dict[str, Any]:
    """``GET /internal/status``: the fleet at a glance."""
    clock = clock or Clock.now()
    queue = svc.dispatcher.snapshot()
    views = _views(svc, clock, queue)
    states = [v.state for v in views]
    healthy = sum(s.status is Status.HEALTHY for s in states)
    requests = sum(s.requests for s in states)
    successes = sum(s.successes for s in states)
    latency = sum(s.latency_sum_ms for s in states)
    return _finish(svc, {
        "timestamp": iso(clock.wall),
        "endpoints": [serialize_endpoint(v, STATUS_ENDPOINT_FIELDS) for v in views],
        "proxy": {"engine": "olla-py", "profile": "streaming",
                  "balancer": svc.settings.proxy.load_balancer},
        "queue": queue_status(svc, queue),
        "shared_state": svc.dispatcher.describe(),
        "system": {
            "status": fleet_status(healthy, len(states), successes, requests),
            "endpoints_up": f"{healthy}/{len(states)}",
            "success_rate": rate(successes, requests),
            "avg_latency": latency_text(latency / requests if requests else None),
            "avg_latency_ms": ms(latency / requests) if requests else None,
            "uptime": uptime(clock.wall - svc.stats.started),
            "start_time": iso(svc.stats.started),
            "version": svc.version,
            "active_connections": sum(s.in_flight for s in states),
            "total_requests": requests,
            "total_failures": requests - successes,
            "has_traffic": requests > 0,
        },
    })


def fleet_status(healthy: int, total: int, successes: int, requests: int) -> str:
    """Olla's verdict: ``critical`` under half the endpoints up or under 90% success,
    ``degraded`` under 80% up or under 95% success, else ``healthy``."""
    if total == 0:
        return "critical"
    up = healthy / total
    success = successes * 100 / requests if requests else 100.0
    if up < 0.5 or success < 90:
        return "critical"
    if up < 0.8 or success < 95:
        return "degraded"
    return "healthy"


# -------------------------------------------------------------------------------- models

_FAMILY = re.compile(r"[a-z]+")
_QUANT = re.compile(r"(?:^|[-._])((?:i?q\d(?:_[a-z0-9]+)*)|bf16|f16|f32)(?:$|[-._])", re.I)
_PATH_LIKE = re.compile(r"^(?:[/.~]|[a-z]:)|\\", re.I)
# Olla's llama.cpp profile infers capabilities from the model's name.
_CAPABILITY_GLOBS = (
    ("chat", re.compile(r"chat|instruct", re.I)),
    ("embeddings", re.compile(r"embed", re.I)),
    ("vision", re.compile(r"vision|llava|minicpm", re.I)),
    ("code", re.compile(r"code|coder|starcoder", re.I)),
)


def _model_state(status: Status) -> str:
    """A model's state on one endpoint, in Olla's words (a llama.cpp server has its one
    model loaded while it is healthy)."""
    return {Status.HEALTHY: "loaded", Status.LOADING: "loading",
            Status.UNKNOWN: "unknown"}.get(status, "unavailable")


def _parameter_size(n_params: Any) -> str:
    if not isinstance(n_params, (int, float)) or n_params <= 0:
        return ""
    if n_params >= 1e9:
        return f"{n_params / 1e9:.1f}B"
    return f"{round(n_params / 1e6)}M"


def _family(name: str) -> str:
    match = _FAMILY.match(name.lower())
    return match.group(0) if match else ""


def _quantization(name: str) -> str:
    stem = name[:-5] if name.lower().endswith(".gguf") else name
    match = _QUANT.search(stem)
    return match.group(1).upper() if match else ""


def _safe_name(name: str) -> str:
    """A name that might be a path, by base name."""
    return base_name(name) if _PATH_LIKE.search(name) else name


@dataclass
class Source:
    """One endpoint serving a catalogued model."""

    state: EndpointState
    native: str                                  # the id this endpoint lists it under


@dataclass
class CatalogueModel:
    """One model merged across the endpoints that serve it."""

    id: str
    keys: set[str] = field(default_factory=set)
    sources: list[Source] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    max_context_length: int | None = None
    n_params: Any = None
    size: int | None = None
    created: int | None = None
    last_seen: float | None = None

    @property
    def family(self) -> str:
        """A guess from the name: its leading letters (``llama``, ``gemma``, ``qwen``)."""
        return _family(self.id)

    @property
    def quantization(self) -> str:
        """From the GGUF name (the id, else a listed name): ``Q4_K_M``, ``F16``..."""
        return next(filter(None, map(_quantization, [self.id, *self.aliases])), "")

    @property
    def parameter_size(self) -> str:
        """From llama.cpp's ``meta.n_params``: ``8.0B``."""
        return _parameter_size(self.n_params)

    @property
    def available(self) -> bool:
        """Whether some endpoint serving it can take a request now."""
        return any(s.state.routable for s in self.sources)

    def availability(self) -> list[dict[str, str]]:
        """Every endpoint serving it with the model's state there and the endpoint's."""
        return [{"endpoint": s.state.endpoint.name, "state": _model_state(s.state.status),
                 "status": s.state.status.value} for s in self.sources]


def catalogue(svc: Services) -> list[CatalogueModel]:
    """Every discovered model, merged by name across endpoints (whatever their state), with
    the config's ``model_aliases`` that resolve to it. Sorted by id."""
    merged: dict[str, CatalogueModel] = {}
    for state in sorted(svc.registry, key=lambda s: (-s.endpoint.priority, s.endpoint.name)):
        for entry in state.models:
            model_id = str(entry["id"])
            model = merged.get(name_key(model_id))
            if model is None:
                model = merged[name_key(model_id)] = CatalogueModel(model_id)
            _merge(model, state, entry)
    for alias, targets in svc.settings.model_aliases.items():
        target_keys = {name_key(t) for t in targets}
        for model in merged.values():
            if target_keys & model.keys and alias not in model.aliases:
                model.aliases.append(alias)
    for model in merged.values():
        model.aliases.sort()
        found = {cap for cap, glob in _CAPABILITY_GLOBS if glob.search(model.id)}
        found.update(model.capabilities)
        if "embeddings" not in found:
            found.add("completion")
        model.capabilities = sorted(found)
    return sorted(merged.values(), key=lambda m: m.id.lower())


def _merge(model: CatalogueModel, state: EndpointState, entry: Mapping[str, Any]) -> None:
    model.keys.update(entry.get("_keys", ()))
    model.sources.append(Source(state, str(entry["id"])))
    names = [str(entry["id"]), *(str(a) for a in entry.get("aliases") or [] if a)]
    model_path = state.props.get("model_path")
    if isinstance(model_path, str) and model_path and len(state.models) == 1:
        names.append(base_name(model_path))
    for name in map(_safe_name, names):
        if name_key(name) != name_key(model.id) and name not in model.aliases:
            model.aliases.append(name)
    meta = entry.get("meta")
    if not isinstance(meta, dict):
        meta = {}
    n_ctx_train = meta.get("n_ctx_train")
    if isinstance(n_ctx_train, int) and n_ctx_train > (model.max_context_length or 0):
        model.max_context_length = n_ctx_train
    if model.n_params is None:
        model.n_params = meta.get("n_params")
    if model.size is None and isinstance(meta.get("size"), int):
        model.size = meta["size"]
    if model.created is None and isinstance(entry.get("created"), int):
        model.created = entry["created"]
    if state.discovered_wall is not None:
        model.last_seen = max(model.last_seen or 0.0, state.discovered_wall)
    modalities = state.props.get("modalities")
    if isinstance(modalities, dict):
        model.capabilities += [m for m in ("vision", "audio") if modalities.get(m) is True]


def _summary(model: CatalogueModel, ids: Mapping[str, str], clock: Clock) -> dict[str, Any]:
    """A model as ``/internal/status/models`` lists it (empty fields left out, as Olla)."""
    out: dict[str, Any] = {"name": model.id, "type": "llamacpp", "family": model.family,
                           "params": model.parameter_size, "quant": model.quantization,
                           "size": size_text(model.size) if model.size else ""}
    out = {k: v for k, v in out.items() if v}
    out.update({
        "last_seen": ago(model.last_seen, clock),
        "last_seen_at": iso(model.last_seen),
        "endpoints": [s.state.endpoint.name for s in model.sources],
        "endpoint_ids": [ids[s.state.endpoint.name] for s in model.sources],
        "aliases": model.aliases,
        "capabilities": model.capabilities,
        "max_context_length": model.max_context_length,
    })
    return out


def models_status(svc: Services, args: Mapping[str, str] | None = None,
                  clock: Clock | None = None) -> dict[str, Any]:
    """``GET /internal/status/models[?detailed=true&group=family]``."""
    args = args or {}
    clock = clock or Clock.now()
    ids = endpoint_ids(svc.registry)
    found = catalogue(svc)
    by_family: dict[str, list[str]] = {}
    for model in found:
        by_family.setdefault(model.family or "unknown", []).append(model.id)
    recent = sorted(found, key=lambda m: (-(m.last_seen or 0.0), m.id.lower()))
    document: dict[str, Any] = {
        "timestamp": iso(clock.wall),
        "total_models": len(found),
        "total_families": len(by_family),
        "total_endpoints": sum(1 for s in svc.registry if s.models),
        "models_by_family": by_family,
        "recent_models": [_summary(m, ids, clock) for m in recent[:RECENT_MODELS]],
    }
    if args.get("detailed") == "true" and args.get("group") == "family":
        document["model_groups"] = [{
            "family": family,
            "models": [_summary(m, ids, clock) for m in found if (m.family or "unknown") == family],
            "endpoints": sorted({s.state.endpoint.name for m in found
                                 if (m.family or "unknown") == family for s in m.sources}),
            "model_count": len(names),
        } for family, names in sorted(by_family.items(),
                                      key=lambda item: (item[0] == "unknown", item[0]))]
    return _finish(svc, document)


def _flag(args: Mapping[str, str], name: str) -> bool | None:
    value = args.get(name)
    if value is None or value == "":
        return None
    if value not in ("true", "false"):
        raise InvalidRequest(f"invalid value for '{name}' parameter. Use 'true' or 'false'")
    return value == "true"


def unified_models(svc: Services, args: Mapping[str, str] | None = None,
                   clock: Clock | None = None,
                   visible: Callable[[str], bool] = lambda name: True) -> dict[str, Any]:
    """``GET /olla/models``: Olla's unified catalogue. Lists every discovered model with
    every endpoint serving it and its state there. Filters: ``endpoint`` (name),
    ``available`` (true: some endpoint can take requests now), ``family``, ``capability``;
    ``format=openai`` gives the plain OpenAI list. Only models ``visible`` by their id or an
    alias (the API key's scope) are listed."""
    args = args or {}
    clock = clock or Clock.now()
    output = args.get("format") or "unified"
    if output not in ("unified", "openai"):
        raise InvalidRequest(f"unsupported format '{output}': use 'unified' or 'openai'")
    available = _flag(args, "available")
    endpoint = args.get("endpoint")
    family = args.get("family")
    capability = args.get("capability")
    selected = [
        m for m in catalogue(svc)
        if (not endpoint or any(s.state.endpoint.name == endpoint for s in m.sources))
        and (available is None or m.available == available)
        and (not family or m.family == family.lower())
        and (not capability or capability.lower() in m.capabilities)
        and any(visible(name) for name in (m.id, *m.aliases))
    ]
    data = [_catalogue_entry(model, clock, output == "unified") for model in selected]
    return _finish(svc, {"object": "list", "data": data})


def unified_model(svc: Services, model_id: str, clock: Clock | None = None,
                  visible: Callable[[str], bool] = lambda name: True) -> dict[str, Any]:
    """``GET /olla/models/{id}``: one model of the catalogue, found by its id or an alias
    as model names compare; ModelNotFound (404) when there is none (or the key may not
    see it)."""
    wanted = name_key(model_id)
    for model in catalogue(svc):
        names = (model.id, *model.aliases)
        if wanted in {name_key(n) for n in names} and any(visible(n) for n in names):
            return _catalogue_entry(model, clock or Clock.now(), unified=True)
    raise ModelNotFound(f"Model not found: {model_id}")


def _catalogue_entry(model: CatalogueModel, clock: Clock, unified: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": model.id, "object": "model",
                             "created": model.created or int(clock.wall), "owned_by": "olla"}
    if unified:
        extensions: dict[str, Any] = {
            "family": model.family,
            "parameter_size": model.parameter_size,
            "quantization": model.quantization,
            "aliases": model.aliases,
            "availability": model.availability(),
            "capabilities": model.capabilities,
        }
        if model.max_context_length:
            extensions["max_context_length"] = model.max_context_length
        entry["olla"] = extensions
    return entry


# --------------------------------------------------------------------------------- stats

def _mean(samples: Iterable[float]) -> float | None:
    values = list(samples)
    return sum(values) / len(values) if values else None


def _round2(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _model_stats(name: str, stats: ModelStats, clock: Clock,
                 include_endpoints: bool) -> dict[str, Any]:
    latencies = list(stats.latencies_ms)
    average = _mean(latencies)
    p95, p99 = percentile(latencies, 95), percentile(latencies, 99)
    tps = _mean(stats.tokens_per_second)
    out: dict[str, Any] = {
        "name": name,
        "total_requests": stats.requests,
        "successful_requests": stats.successes,
        "failed_requests": stats.failures,
        "success_rate": rate(stats.successes, stats.requests),
        "average_latency": latency_text(average),
        "p95_latency": latency_text(p95),
        "p99_latency": latency_text(p99),
        "average_latency_ms": ms(average),
        "p50_latency_ms": ms(percentile(latencies, 50)),
        "p95_latency_ms": ms(p95),
        "p99_latency_ms": ms(p99),
        "p50_ttfb_ms": ms(percentile(stats.ttfb_ms, 50)),
        "p95_ttfb_ms": ms(percentile(stats.ttfb_ms, 95)),
        "tokens_per_second": _round2(tps),
        "p50_tokens_per_second": _round2(percentile(stats.tokens_per_second, 50)),
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "last_requested": ago(stats.last_requested, clock),
        "last_requested_at": iso(stats.last_requested),
    }
    if include_endpoints:
        out["endpoint_breakdown"] = {
            endpoint: {"endpoint_name": endpoint, "request_count": count}
            for endpoint, count in sorted(stats.endpoints.items())}
    return out


def model_stats(svc: Services, args: Mapping[str, str] | None = None,
                clock: Clock | None = None) -> dict[str, Any]:
    """``GET /internal/stats/models[?include_endpoints=true&include_summary=true]``: per
    model, as clients named it, in this worker since it started; busiest first."""
    args = args or {}
    clock = clock or Clock.now()
    table = dict(svc.stats.models)
    ranked = sorted(table.items(), key=lambda item: (-item[1].requests, item[0]))
    models = [_model_stats(name, stats, clock, args.get("include_endpoints") == "true")
              for name, stats in ranked]
    endpoints: dict[str, Any] = {}
    if args.get("include_summary") == "true":
        for state in sorted(svc.registry, key=lambda s: s.endpoint.name):
            served = state.requests > 0
            average = state.latency_sum_ms / state.requests if served else None
            endpoints[state.endpoint.name] = {
                "endpoint_name": state.endpoint.name,
                "request_count": state.requests,
                "success_rate": rate(state.successes, state.requests),
                "average_latency": latency_text(average),
                "average_latency_ms": ms(average),
            }
    requests = sum(s.requests for s in table.values())
    successes = sum(s.successes for s in table.values())
    hour_ago = clock.wall - 3600
    least = min(ranked, key=lambda item: (item[1].requests, item[0]), default=None)
    return _finish(svc, {
        "timestamp": iso(clock.wall),
        "models": models,
        "endpoints": endpoints,
        "summary": {
            "overall_success_rate": rate(successes, requests),
            "most_popular_model": ranked[0][0] if ranked else "",
            "least_popular_model": least[0] if least else "",
            "total_models": len(table),
            "active_models": sum((s.last_requested or 0) > hour_ago for s in table.values()),
            "total_requests": requests,
        },
    })


# --------------------------------------------------------------------------- translators

def _translator(name: str, stats: TranslatorStats) -> dict[str, Any]:
    average = stats.latency_sum_ms / stats.requests if stats.requests else None
    return {
        "translator_name": name,
        "total_requests": stats.requests,
        "successful_requests": stats.successes,
        "failed_requests": stats.requests - stats.successes,
        "success_rate": rate(stats.successes, stats.requests),
        # Every request is passed through: llama.cpp speaks the Messages API itself.
        "passthrough_requests": stats.requests,
        "passthrough_rate": rate(stats.requests, stats.requests),
        "translation_requests": 0,
        "streaming_requests": stats.streaming,
        "non_streaming_requests": stats.requests - stats.streaming,
        "fallback_no_compatible_endpoints": 0,
        "fallback_translator_does_not_support_passthrough": 0,
        "fallback_cannot_passthrough": 0,
        "average_latency": latency_text(average),
        "average_latency_ms": ms(average),
    }


def translator_stats(svc: Services, clock: Clock | None = None) -> dict[str, Any]:
    """``GET /internal/stats/translators``: Olla's fields, in this worker since it
    started; busiest first."""
    clock = clock or Clock.now()
    table = svc.stats.translators
    ranked = sorted(table.items(), key=lambda item: (-item[1].requests, item[0]))
    requests = sum(t.requests for _, t in ranked)
    successes = sum(t.successes for _, t in ranked)
    streaming = sum(t.streaming for _, t in ranked)
    return _finish(svc, {
        "timestamp": iso(clock.wall),
        "translators": [_translator(name, stats) for name, stats in ranked],
        "summary": {
            "overall_success_rate": rate(successes, requests),
            "overall_passthrough_rate": rate(requests, requests),
            "total_translators": len(table),
            "active_translators": sum(t.requests > 0 for t in table.values()),
            "total_requests": requests,
            "total_passthrough": requests,
            "total_translations": 0,
            "total_streaming": streaming,
            "total_non_streaming": requests - streaming,
        },
    })


# -------------------------------------------------------------------------------- sticky

def sticky_stats(svc: Services) -> dict[str, Any]:
    """``GET /internal/stats/sticky``: Olla's fields (``{"enabled": false}`` when off),
    each outcome's count, and the KV-cache hit rate llama.cpp reported (prompt tokens it
    reused over all prompt tokens), per endpoint and model and in all, over this proxy's
    workers since they started."""
    sticky = svc.sticky
    if sticky is None:
        return {"enabled": False}
    figures = sticky.store.figures()
    breakdown = []
    prompt_all = cached_all = 0.0
    for (endpoint, model), (prompt, cached) in sorted(svc.metrics.prompt_totals().items()):
        prompt_all += prompt
        cached_all += cached
        breakdown.append({"endpoint": endpoint, "model": model, "prompt_tokens": int(prompt),
                          "cached_prompt_tokens": int(cached),
                          "cache_hit_rate": rate(int(cached), int(prompt))})
    settings = sticky.settings
    return _finish(svc, {
        "enabled": True,
        "active_sessions": figures["active_sessions"],
        "insertions": figures["insertions"],
        "hits": figures["hits"],
        "misses": figures["misses"],
        "evictions": figures["evictions"],
        "max_sessions": settings.max_sessions,
        "idle_ttl_seconds": settings.idle_ttl_seconds,
        "key_sources": list(settings.key_sources),
        "spill_after_ms": round(settings.spill_after * 1000),
        "outcomes": figures["outcomes"],
        "shared": figures["shared"],
        "cache_hit_rate": rate(int(cached_all), int(prompt_all)),
        "prompt_tokens": int(prompt_all),
        "cached_prompt_tokens": int(cached_all),
        "cache": breakdown,
    })


# ------------------------------------------------------------------------------ process

def process_status(svc: Services, clock: Clock | None = None) -> dict[str, Any]:
    """``GET /internal/process``: the answering worker's memory, collector, greenlets and
    runtime (``app.process``)."""
    clock = clock or Clock.now()
    connections, background = running_counts()
    return _finish(svc, {"timestamp": iso(clock.wall),
                         **process_figures(svc.stats.started, connections, background,
                                           now=clock.wall, iso=iso)})


# ----------------------------------------------------------------------------- dashboard

def served(view: EndpointView) -> dict[str, Any]:
    """What the dashboard shows beside the status fields: the models and the requests in
    flight (the fleet's leases with shared state, else this worker's)."""
    state = view.state
    return {"models": sorted({str(m.get("id")) for m in state.models if m.get("id")}),
            "in_flight": view.leases if view.leases else state.in_flight,
            "draining": state.draining}


UI_ENDPOINT_FIELDS: tuple[FieldGroup, ...] = (identity, health, capacity, served)


def ui_data(svc: Services, clock: Clock | None = None) -> dict[str, Any]:
    """``GET /internal/ui/data``: the fleet now (endpoints, the queue per model) and its last
    15 minutes second by second (``app.history``), with the last errors."""
    clock = clock or Clock.now()
    queue = svc.dispatcher.snapshot()
    views = _views(svc, clock, queue)
    history = svc.history.series()
    errors = [{**e, "time": iso(e["time"])} for e in history.pop("errors")]
    # The queue is keyed by the name as compared (lower case, no .gguf): shown by the
    # fleet's own name for it where an endpoint lists one.
    shown = {name_key(str(m.get("id"))): str(m.get("id"))
             for state in svc.registry for m in state.models if m.get("id")}
    models = [{"model": shown.get(key, key) or "(no model named)", "depth": count,
               "longest_wait_ms": ms(queue.longest_by_model.get(key, 0.0) * 1000)}
              for key, count in sorted(queue.by_model.items()) if count]
    return _finish(svc, {
        "timestamp": iso(clock.wall),
        "version": svc.version,
        "endpoints": [serialize_endpoint(v, UI_ENDPOINT_FIELDS) for v in views],
        "queue": {**queue_status(svc, queue), "models": models},
        "history": history,
        "errors": errors,
        "sticky_sessions": svc.sticky is not None,
    })


# ------------------------------------------------------------------------------ version

CAPABILITIES = ("load_balancing", "health_checking", "model_unification",
                "endpoint_discovery", "failover", "streaming")

API_ENDPOINTS = {
    "health": "/internal/health",
    "status": "/internal/status",
    "status_endpoints": "/internal/status/endpoints",
    "status_models": "/internal/status/models",
    "stats_models": "/internal/stats/models",
    "stats_translators": "/internal/stats/translators",
    "stats_sticky": "/internal/stats/sticky",
    "process": "/internal/process",
    "ui_data": "/internal/ui/data",
    "models": "/olla/models",
    "version": "/version",
}


def version_info(svc: Services) -> dict[str, Any]:
    """``GET /version``."""
    return _finish(svc, {
        "name": "olla-py",
        "version": svc.version,
        "description": "One endpoint in front of many llama.cpp servers, with Olla's API",
        "build": {"python_version": platform.python_version(),
                  "platform": f"{platform.system().lower()}/{platform.machine()}"},
        "capabilities": list(CAPABILITIES),
        "capabilities_experimental": [],
        "supported_backends": ["llamacpp"],
        "api": {"version": "v1", "endpoints": dict(API_ENDPOINTS)},
    })


def liveness() -> dict[str, str]:
    """``GET /internal/health``: the process answers (Olla's body, always 200)."""
    return {"status": "healthy"}

