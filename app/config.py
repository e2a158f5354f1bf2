"""Typed, frozen settings loaded once from YAML and validated with marshmallow.

The YAML layout follows Olla's: the spec's top-level ``endpoints:`` list and Olla's own
``discovery.static.endpoints`` both load. Unknown keys, wrong types and unset ``${VAR}``
references stop start-up with a message naming the offending key.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("config/config.yaml")
MIB = 1024 * 1024
KNOWN_PREFIXES = ("llamacpp", "llama-cpp", "llama_cpp")
# The balancers app/balancer.py implements (it checks that it has each one; this module
# cannot import it: gunicorn's master reads the config before its workers patch sockets).
BALANCER_NAMES = ("least-busy", "least-connections", "priority", "round-robin")
CONFIG_FILE_ENV = "OLLA_CONFIG_FILE"
# The copy of the config the workers read: written by the gunicorn master at start and on
# each SIGHUP that brings a valid file (app.gunicorn_conf), so a broken edit reaches no one.
CONFIG_SNAPSHOT_ENV = "OLLA_CONFIG_SNAPSHOT"
WORKER_COUNT_ENV = "OLLA_WORKER_COUNT"  # set in each gunicorn worker by gunicorn.conf.py


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Endpoint:
    """One llama.cpp server behind the proxy."""

    name: str
    url: str
    type: str = "llamacpp"
    priority: int = 100
    headers: Mapping[str, str] = field(default_factory=dict)
    health_check_url: str = "/health"
    model_url: str = "/v1/models"
    check_interval: float = 5.0
    check_timeout: float = 2.0
    drain: bool = False                  # start drained: no new requests until undrained
    # Per-endpoint limits; the proxy's defaults where not set.
    timeouts: Timeouts | None = None

    def join(self, path: str) -> str:
        """Absolute URL for ``path`` on this endpoint (absolute URLs pass as they are)."""
        if path.startswith(("http://", "https://")):
            return path
        return self.url + "/" + path.lstrip("/")

    @property
    def limits(self) -> Timeouts:
        """This endpoint's timeouts (the proxy's defaults unless configured)."""
        return self.timeouts or Timeouts()

    @property
    def sends_credentials(self) -> bool:
        """True when the config supplies this endpoint's API key itself."""
        return any(k.lower() in CREDENTIAL_HEADERS for k in self.headers)


CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})


@dataclass(frozen=True)
class RequestLimits:
    """What one request may be (``server.request_limits``); beyond: 4xx, nothing sent on."""

    max_body_size: int = 100 * MIB       # bytes; 413 beyond
    max_header_size: int = 8190          # bytes of one header line (and the request line)
    max_json_depth: int = 100            # nesting of objects and lists; 400 beyond
    max_list_items: int = 262144         # items in any one list (or members of one object)
    max_json_values: int = 524288        # values in the whole body (strings, numbers, ...)


LOOPBACK_CIDRS = ("127.0.0.0/8", "::1/128")
# Olla's default: the networks a reverse proxy in front usually sits in.
PRIVATE_CIDRS = ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")


@dataclass(frozen=True)
class RateLimits:
    """``server.rate_limits``, Olla's keys (requests per minute; 0 = no limit). Client
    addresses come from ``X-Forwarded-For``/``X-Real-IP`` only when the peer is trusted."""

    global_requests_per_minute: int = 0
    per_ip_requests_per_minute: int = 0
    health_requests_per_minute: int = 0
    burst_size: int = 0                  # most requests within one second, per limit
    trust_proxy_headers: bool = False
    trusted_proxy_cidrs: tuple[str, ...] = PRIVATE_CIDRS

    @property
    def any(self) -> bool:
        """Whether any of these limits is on."""
        return bool(self.global_requests_per_minute or self.per_ip_requests_per_minute
                    or self.health_requests_per_minute)


@dataclass(frozen=True)
class CorsSettings:
    """``server.cors``, Olla's keys; answered by flask-cors."""

    enabled: bool = False
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    allowed_headers: tuple[str, ...] = ("*",)
    exposed_headers: tuple[str, ...] = ()  # empty: every X-Olla-* and rate-limit header
    allow_credentials: bool = False
    max_age: int = 300                     # seconds a browser may cache a preflight


@dataclass(frozen=True)
class InternalAccess:
    """``server.internal_access``: who may read ``/internal/*`` and ``/version``
    (``/internal/health`` stays open for liveness probes)."""

    allowed_cidrs: tuple[str, ...] = LOOPBACK_CIDRS
    admin_key: str | None = field(default=None, repr=False)    # opens all, from anywhere
    metrics_key: str | None = field(default=None, repr=False)  # opens /internal/metrics


@dataclass(frozen=True)
class ApiKey:
    """One inbound API key (``auth.api_keys``): who it is, what it may use, how much."""

    name: str
    key: str = field(repr=False)
    models: tuple[str, ...] = ()         # names or globs it may use; empty: every model
    max_concurrent: int = 0              # slots it may hold at once, fleet-wide; 0: any
    requests_per_minute: int = 0         # 0: no limit
    tokens_per_minute: int = 0           # prompt + generated tokens; 0: no limit
    weight: float = 1.0                  # its share of the slots when they are contended


@dataclass(frozen=True)
class AuthSettings:
    """``auth``: no keys, the proxy is open (as Olla is)."""

    api_keys: tuple[ApiKey, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys)


@dataclass(frozen=True)
class ServerSettings:
    """Where the proxy listens and what it accepts."""

    host: str = "localhost"
    port: int = 40114
    # Olla's names. Whole deadlines, not gaps between bytes: a request's headers, from its
    # first byte (408 or a closed connection beyond), and its body, from its headers (408).
    read_header_timeout: float = 10.0
    read_timeout: float = 30.0
    shutdown_timeout: float = 30.0       # SIGTERM: time requests in flight get to finish
    reload_grace: float = 600.0          # SIGHUP: time the old workers' requests get
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    cors: CorsSettings = field(default_factory=CorsSettings)
    internal_access: InternalAccess = field(default_factory=InternalAccess)

    @property
    def max_body_size(self) -> int:
        """The largest body accepted (bytes)."""
        return self.request_limits.max_body_size


@dataclass(frozen=True)
class Timeouts:
    """Limits on one upstream exchange, by phase (seconds; response 0 = no limit)."""

    connection_timeout: float = 5.0      # TCP connect
    first_byte_timeout: float = 600.0    # to the first byte of the answer: prompt processing
    read_timeout: float = 600.0          # longest silence between chunks after that
    response_timeout: float = 0.0        # the whole exchange


@dataclass(frozen=True)
class QueueSettings:
    """The bounded FIFO a request waits in while every slot it could use is busy."""

    max_size: int = 100                  # waiting requests per model; 0 = never queue
    timeout: float = 30.0                # longest wait before 503 slots_exhausted
    retry_after: int = 2                 # the Retry-After header sent with that 503


@dataclass(frozen=True)
class StickySettings:
    """Olla's ``proxy.sticky_sessions``: a conversation's turns go to the endpoint that
    served the last one (its llama.cpp still holds the prompt in its KV cache)."""

    enabled: bool = False
    idle_ttl_seconds: int = 600          # a session unused this long is forgotten (sliding)
    max_sessions: int = 10000            # the least recently used go beyond this
    key_sources: tuple[str, ...] = ("session_header", "prefix_hash", "auth_header")
    prefix_hash_bytes: int = 512         # leading bytes of the conversation hashed
    # A pinned endpoint with no free slot while another candidate has one: wait this long
    # for the pinned one, then go to the free one ("spill"). Measured (bench/sticky.py, 2
    # CPU replicas): 1 s spilled 4 turns in 48, each then reading its whole prompt again;
    # 5 s spilled none and gave the lower time to first token.
    spill_after: float = 5.0


@dataclass(frozen=True)
class ProxySettings(Timeouts):
    """How the proxy talks to upstreams."""

    load_balancer: str = "least-busy"
    sse_keepalive: float = 15.0          # SSE comment while a stream waits; 0 = never
    queue: QueueSettings = field(default_factory=QueueSettings)
    # A write to the client blocked this long (a client that stopped reading) ends the
    # request: connection, upstream and slot.
    write_timeout: float = 60.0
    # The largest non-streamed answer relayed (bytes); a larger one is a 502, never held.
    max_response_size: int = 64 * MIB
    # Non-streamed generation requests go upstream as streams, assembled here, so that a
    # client that leaves frees its llama.cpp slot at once.
    assemble_non_streamed: bool = True
    sticky_sessions: StickySettings = field(default_factory=StickySettings)


@dataclass(frozen=True)
class StateSettings:
    """Where slots and the queue live: this worker alone, or Redis shared by every worker
    of every proxy host."""

    redis_url: str | None = None         # redis://, rediss://, unix://; $OLLA_REDIS_URL
    key_prefix: str = "olla"             # fleets sharing one Redis keep apart by prefix
    lease_ttl: float = 8.0               # a lease not renewed this long is reclaimed


@dataclass(frozen=True)
class EmbeddedSettings:
    """The local llama.cpp started when no endpoint is configured."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 0
    n_parallel: int = 4
    n_ctx: int = 8192
    threads: int = 0


@dataclass(frozen=True)
class AnthropicSettings:
    """Olla's ``translators.anthropic``: the Anthropic Messages routes under
    ``/olla/anthropic/``, passed through to llama.cpp's own ``/v1/messages``."""

    enabled: bool = True
    passthrough_enabled: bool = True     # false would mean translating: not built here
    max_message_size: int = 10 * MIB     # bytes of a request body; 413 beyond


@dataclass(frozen=True)
class Settings:
    """Everything the app needs, validated once."""

    server: ServerSettings = field(default_factory=ServerSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    endpoints: tuple[Endpoint, ...] = ()
    prefixes: tuple[str, ...] = ("llamacpp",)
    model_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Re-read every endpoint's /v1/models and /props this often (and on recovery).
    discovery_interval: float = 30.0
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    state: StateSettings = field(default_factory=StateSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    anthropic: AnthropicSettings = field(default_factory=AnthropicSettings)
    log_level: str = "info"
    log_format: str = "text"
    log_output: str = "stderr"           # stdout, stderr or a file path


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a Go-style duration string ("500ms", "5s", "1m30s")."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        parts = _DURATION_RE.findall(text)
        if "".join(n + u for n, u in parts) != text:
            raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 5s, 2m, 1h)")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"not a duration: {value!r}")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


class Duration(fields.Field[float]):
    """A duration in seconds, from a number or a string such as "5s"."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc


class StrictBoolean(fields.Boolean):
    """true or false (YAML's own booleans), not the strings marshmallow would also take."""

    truthy: set[object] = {True}
    falsy: set[object] = {False}


POSITIVE = validate.Range(min=0, min_inclusive=False, error="must be longer than 0")
TIMEOUT_KEYS = ("connection_timeout", "first_byte_timeout", "read_timeout", "response_timeout")


class Strict(Schema):
    class Meta:
        unknown = RAISE


class RequestLimitsSchema(Strict):
    max_body_size = fields.Integer(strict=True, validate=validate.Range(min=1))
    # gunicorn's own bounds for a header line: at least 1 KiB, at most 8190 for the
    # request line (its limit_request_line cap).
    max_header_size = fields.Integer(strict=True, validate=validate.Range(min=1024))
    # Python's C parser gives up near 1000 levels: the limit stays well below it.
    max_json_depth = fields.Integer(strict=True, validate=validate.Range(min=2, max=500))
    max_list_items = fields.Integer(strict=True, validate=validate.Range(min=1))
    max_json_values = fields.Integer(strict=True, validate=validate.Range(min=1))


def _check_cidr(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValidationError(f"{value!r} is not an address or network such as "
                              "10.0.0.0/8") from None


class CidrList(fields.List):  # type: ignore[type-arg]
    """Addresses or networks (``10.0.0.0/8``, ``::1``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(fields.String(validate=_check_cidr), **kwargs)


class RateLimitsSchema(Strict):
    global_requests_per_minute = fields.Integer(strict=True, validate=validate.Range(min=0))
    per_ip_requests_per_minute = fields.Integer(strict=True, validate=validate.Range(min=0))
    health_requests_per_minute = fields.Integer(strict=True, validate=validate.Range(min=0))
    burst_size = fields.Integer(strict=True, validate=validate.Range(min=0))
    trust_proxy_headers = StrictBoolean()
    trusted_proxy_cidrs = CidrList()
    # Olla's sweep of idle per-IP buckets; the limiter here expires its windows itself.
    cleanup_interval = Duration()


class CorsSchema(Strict):
    enabled = StrictBoolean()
    allowed_origins = fields.List(fields.String())
    allowed_methods = fields.List(fields.String(validate=validate.Regexp(r"^[A-Za-z]+$")))
    allowed_headers = fields.List(fields.String())
    exposed_headers = fields.List(fields.String())
    allow_credentials = StrictBoolean()
    max_age = fields.Integer(strict=True, validate=validate.Range(min=0))

    @validates_schema
    def _coherent(self, data: dict[str, Any], **kwargs: Any) -> None:
        origins = data.get("allowed_origins", CorsSettings.allowed_origins)
        if data.get("enabled") and not origins:
            raise ValidationError("must list at least one origin when CORS is enabled",
                                  "allowed_origins")
        if data.get("allow_credentials") and "*" in origins:
            raise ValidationError("cannot be \"*\" with allow_credentials: browsers refuse "
                                  "credentials for any origin; list the origins",
                                  "allowed_origins")


class InternalAccessSchema(Strict):
    allowed_cidrs = CidrList()
    admin_key = fields.String(validate=validate.Length(min=1))
    metrics_key = fields.String(validate=validate.Length(min=1))


class ApiKeySchema(Strict):
    name = fields.String(required=True, validate=validate.Regexp(
        r"^[A-Za-z0-9._:@-]{1,64}$", error="must be 1-64 letters, digits or ._:@-"))
    key = fields.String(validate=validate.Length(min=1))
    key_file = fields.String(validate=validate.Length(min=1))
    models = fields.List(fields.String(validate=validate.Length(min=1)))
    max_concurrent = fields.Integer(strict=True, validate=validate.Range(min=0))
    requests_per_minute = fields.Integer(strict=True, validate=validate.Range(min=0))
    tokens_per_minute = fields.Integer(strict=True, validate=validate.Range(min=0))
    weight = fields.Float(validate=validate.Range(min=0.01, max=1000))

    @validates_schema
    def _one_source(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("key" in data) == ("key_file" in data):
            raise ValidationError("give the key either as key or as key_file (one of them)",
                                  "key")


class AuthSchema(Strict):
    api_keys = fields.List(fields.Nested(ApiKeySchema))


class ServerSchema(Strict):
    host = fields.String()
    port = fields.Integer(strict=True, validate=validate.Range(min=1, max=65535))
    read_header_timeout = Duration(validate=POSITIVE)
    read_timeout = Duration(validate=POSITIVE)
    shutdown_timeout = Duration()
    reload_grace = Duration()
    request_limits = fields.Nested(RequestLimitsSchema)
    rate_limits = fields.Nested(RateLimitsSchema)
    cors = fields.Nested(CorsSchema)
    internal_access = fields.Nested(InternalAccessSchema)


class QueueSchema(Strict):
    max_size = fields.Integer(strict=True, validate=validate.Range(min=0))
    timeout = Duration()
    retry_after = fields.Integer(strict=True, validate=validate.Range(min=0))


STICKY_KEY_SOURCES = ("session_header", "prefix_hash", "auth_header", "ip")


class StickySchema(Strict):
    enabled = StrictBoolean()
    idle_ttl_seconds = fields.Integer(strict=True, validate=validate.Range(min=1))
    max_sessions = fields.Integer(strict=True, validate=validate.Range(min=1))
    key_sources = fields.List(fields.String(validate=validate.OneOf(STICKY_KEY_SOURCES)),
                              validate=validate.Length(min=1))
    prefix_hash_bytes = fields.Integer(strict=True, validate=validate.Range(min=16))
    spill_after = Duration()


class InspectorSchema(Strict):
    enabled = StrictBoolean()
    output_dir = fields.String()
    session_header = fields.String()


class AnthropicSchema(Strict):
    enabled = StrictBoolean()
    passthrough_enabled = StrictBoolean()
    max_message_size = fields.Integer(strict=True, validate=validate.Range(min=1024))
    inspector = fields.Nested(InspectorSchema)


class TranslatorsSchema(Strict):
    anthropic = fields.Nested(AnthropicSchema)


class ProxySchema(Strict):
    connection_timeout = Duration(validate=POSITIVE)
    first_byte_timeout = Duration(validate=POSITIVE)
    read_timeout = Duration(validate=POSITIVE)
    response_timeout = Duration()
    sse_keepalive = Duration()
    write_timeout = Duration(validate=POSITIVE)
    max_response_size = fields.Integer(strict=True, validate=validate.Range(min=1024))
    assemble_non_streamed = StrictBoolean()
    load_balancer = fields.String(
        validate=validate.OneOf(BALANCER_NAMES)
    )
    queue = fields.Nested(QueueSchema)
    sticky_sessions = fields.Nested(StickySchema)


class EndpointSchema(Strict):
    url = fields.String(required=True, validate=validate.Regexp(
        r"^https?://[^/@\s?#]+(/[^\s?#]*)?$",
        error="must be an http(s) URL without credentials, query or fragment"))
    name = fields.String(validate=validate.Regexp(
        r"^[^\x00-\x1f\x7f]+$", error="must be text without control characters"))
    type = fields.String(validate=validate.OneOf(KNOWN_PREFIXES))
    priority = fields.Integer(strict=True)
    drain = StrictBoolean()
    headers = fields.Dict(keys=fields.String(), values=fields.String())
    health_check_url = fields.String()
    model_url = fields.String()
    check_interval = Duration(validate=POSITIVE)
    check_timeout = Duration(validate=POSITIVE)
    connection_timeout = Duration(validate=POSITIVE)
    first_byte_timeout = Duration(validate=POSITIVE)
    read_timeout = Duration(validate=POSITIVE)
    response_timeout = Duration()


class StaticSchema(Strict):
    # `endpoints:` with every entry commented out is YAML null: no endpoints.
    endpoints = fields.List(fields.Nested(EndpointSchema), allow_none=True)


class ModelDiscoverySchema(Strict):
    enabled = StrictBoolean()
    interval = Duration(validate=POSITIVE)


class DiscoverySchema(Strict):
    type = fields.String(validate=validate.Equal("static"))
    static = fields.Nested(StaticSchema)
    model_discovery = fields.Nested(ModelDiscoverySchema)


class RoutingSchema(Strict):
    prefixes = fields.List(fields.String(validate=validate.OneOf(KNOWN_PREFIXES)),
                           validate=validate.Length(min=1, error="must list at least one prefix"))


class EmbeddedSchema(Strict):
    enabled = StrictBoolean()
    host = fields.String()
    port = fields.Integer(strict=True, validate=validate.Range(min=0, max=65535))
    n_parallel = fields.Integer(strict=True, validate=validate.Range(min=1))
    n_ctx = fields.Integer(strict=True, validate=validate.Range(min=0))
    threads = fields.Integer(strict=True, validate=validate.Range(min=0))


class StateSchema(Strict):
    redis_url = fields.String(allow_none=True, validate=validate.Regexp(
        r"^(rediss?|unix)://", error="must be a redis://, rediss:// or unix:// URL"))
    key_prefix = fields.String(validate=validate.Regexp(
        r"^[A-Za-z0-9_.:-]{1,64}$", error="must be 1-64 letters, digits or _.:-"))
    lease_ttl = Duration(validate=validate.Range(min=1, error="must be at least 1s"))


class LoggingSchema(Strict):
    level = fields.String(validate=validate.OneOf(["debug", "info", "warning", "error"]))
    format = fields.String(validate=validate.OneOf(["text", "json"]))
    # stdout, stderr, or a file path (appended to; reopened when logrotate moves it)
    output = fields.String(validate=validate.Length(min=1))


class ConfigSchema(Strict):
    server = fields.Nested(ServerSchema)
    proxy = fields.Nested(ProxySchema)
    # `endpoints:` with every entry commented out is YAML null: no endpoints.
    endpoints = fields.List(fields.Nested(EndpointSchema), allow_none=True)
    discovery = fields.Nested(DiscoverySchema)
    routing = fields.Nested(RoutingSchema)
    model_aliases = fields.Dict(
        keys=fields.String(), values=fields.List(fields.String(), validate=validate.Length(min=1))
    )
    embedded = fields.Nested(EmbeddedSchema)
    state = fields.Nested(StateSchema)
    logging = fields.Nested(LoggingSchema)
    auth = fields.Nested(AuthSchema)
    translators = fields.Nested(TranslatorsSchema)

    @validates_schema
    def _one_endpoint_list(self, data: dict[str, Any], **kwargs: Any) -> None:
        static = data.get("discovery", {}).get("static", {})
        if "endpoints" in data and "endpoints" in static:
            raise ValidationError(
                "give endpoints either at the top level or under discovery.static, not both",
                "endpoints",
            )


# RFC 9110 field-name and field-value (Latin-1 at most, no CR, LF or other controls).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: str, where: str, environ: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset VAR without default is an error.

    As in the shell, ``:-`` also takes the default when VAR is set but empty.
    """

    def repl(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if default is not None and not environ.get(name):
            return default
        if name in environ:
            return environ[name]
        raise ConfigError(f"{where}: environment variable {name} is not set")

    return _VAR_RE.sub(repl, value)


def _flatten(messages: Any, prefix: str = "") -> list[str]:
    if isinstance(messages, dict):
        out: list[str] = []
        for key, value in messages.items():
            label = f"{prefix}[{key}]" if isinstance(key, int) else (
                f"{prefix}.{key}" if prefix else str(key)
            )
            out.extend(_flatten(value, label))
        return out
    if isinstance(messages, list):
        return [f"{prefix}: {m}" for m in messages]
    return [f"{prefix}: {messages}"]


def _endpoint(raw: Mapping[str, Any], where: str, environ: Mapping[str, str],
              proxy: ProxySettings) -> Endpoint:
    url = raw["url"].rstrip("/")
    expanded = {
        key: expand_env(value, f"{where}.headers.{key}", environ)
        for key, value in raw.get("headers", {}).items()
    }
    for key, value in expanded.items():
        # Named, never printed: the value is often a key, or comes from the environment.
        if not _HEADER_NAME.fullmatch(key):
            raise ConfigError(f"{where}.headers: {key!r} is not a valid header name")
        if not _HEADER_VALUE.fullmatch(value):
            raise ConfigError(f"{where}.headers.{key}: the value (after ${{VAR}} expansion) "
                              "holds a line break, a control character or a character "
                              "outside Latin-1")
    # A header that expands to nothing (``${KEY:-}`` with KEY unset) is left out, so an
    # empty X-API-Key neither reaches llama.cpp nor displaces the client's own credentials.
    headers = {key: value for key, value in expanded.items() if value}
    values: dict[str, Any] = {
        k: raw[k]
        for k in ("priority", "health_check_url", "model_url", "check_interval", "check_timeout",
                  "drain")
        if k in raw
    }
    timeouts = Timeouts(**{k: raw.get(k, getattr(proxy, k)) for k in TIMEOUT_KEYS})
    return Endpoint(name=raw.get("name") or url, url=url, type="llamacpp", headers=headers,
                    timeouts=timeouts, **values)


def _discovery_interval(discovery: Mapping[str, Any]) -> float:
    options = discovery.get("model_discovery", {})
    if options.get("enabled", True) is False:
        return math.inf  # only at start and when an endpoint recovers
    return float(options.get("interval", Settings.discovery_interval))


REDIS_URL_ENV = "OLLA_REDIS_URL"


def _server(raw: Mapping[str, Any], environ: Mapping[str, str]) -> ServerSettings:
    values = dict(raw)
    rate = dict(values.pop("rate_limits", {}))
    if rate.pop("cleanup_interval", None) is not None:
        log.warning("server.rate_limits.cleanup_interval has no effect here: the rate "
                    "limiter's windows expire by themselves")
    for key in ("trusted_proxy_cidrs",):
        if key in rate:
            rate[key] = tuple(rate[key])
    cors: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                            for k, v in values.pop("cors", {}).items()}
    access = dict(values.pop("internal_access", {}))
    if "allowed_cidrs" in access:
        access["allowed_cidrs"] = tuple(access["allowed_cidrs"])
    for key in ("admin_key", "metrics_key"):
        if key in access:
            access[key] = expand_env(access[key], f"server.internal_access.{key}",
                                     environ) or None
    return ServerSettings(request_limits=RequestLimits(**values.pop("request_limits", {})),
                          rate_limits=RateLimits(**rate), cors=CorsSettings(**cors),
                          internal_access=InternalAccess(**access), **values)


def _auth(raw: Mapping[str, Any], environ: Mapping[str, str]) -> AuthSettings:
    """``auth``: every key read (``${VAR}`` expanded, ``key_file`` read and trimmed) and
    checked to be distinct; a key is never printed, only its name."""
    keys = []
    for i, entry in enumerate(raw.get("api_keys", [])):
        where = f"auth.api_keys[{i}]"
        values = dict(entry)
        if "key_file" in values:
            path = Path(values.pop("key_file"))
            try:
                secret = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{where}.key_file: cannot read {path}: "
                                  f"{type(exc).__name__}") from exc
        else:
            secret = expand_env(values.pop("key"), f"{where}.key", environ)
        if not secret:
            raise ConfigError(f"{where}.key: the key is empty (after ${{VAR}} expansion)")
        if not _HEADER_VALUE.fullmatch(secret) or secret != secret.strip():
            raise ConfigError(f"{where}.key: the key holds spaces at its ends, a line break "
                              "or a control character")
        values["models"] = tuple(values.get("models", ()))
        keys.append(ApiKey(key=secret, **values))
    names = [k.name for k in keys]
    for problem, seen in (("name", names), ("key", [k.key for k in keys])):
        twice = {n for n in seen if seen.count(n) > 1}
        if twice:
            shown = ", ".join(sorted(k.name for k in keys if getattr(k, problem) in twice))
            raise ConfigError(f"auth.api_keys: the same {problem} given twice ({shown})")
    return AuthSettings(api_keys=tuple(keys))


def _anthropic(raw: Mapping[str, Any]) -> AnthropicSettings:
    """``translators.anthropic``. Only passthrough is built: llama-server answers the
    Messages API itself, so there is nothing to translate, and a setting asking for
    translation (or Olla's request inspector) is refused rather than ignored."""
    values = dict(raw)
    if values.get("passthrough_enabled") is False:
        raise ConfigError("translators.anthropic.passthrough_enabled: false asks for "
                          "Anthropic-to-OpenAI translation, which this proxy does not do: "
                          "llama.cpp serves /v1/messages itself, so requests are passed "
                          "through (set it to true, or leave it out)")
    if values.pop("inspector", {}).get("enabled") is True:
        raise ConfigError("translators.anthropic.inspector: Olla's request inspector (which "
                          "writes prompts to files) is not built here; leave it disabled")
    return AnthropicSettings(**values)


def _state(raw: Mapping[str, Any], environ: Mapping[str, str]) -> StateSettings:
    """``state``, with ``$OLLA_REDIS_URL`` (when set and not empty) in place of the file's
    ``redis_url``; ``${VAR}`` in the URL is expanded (a password kept in the environment)."""
    values = dict(raw)
    url = environ.get(REDIS_URL_ENV) or values.get("redis_url")
    if url:
        url = expand_env(url, "state.redis_url", environ)
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"state.redis_url ({REDIS_URL_ENV}): must be a redis://, "
                              "rediss:// or unix:// URL")
    values["redis_url"] = url or None
    return StateSettings(**values)


def settings_from_mapping(raw: Mapping[str, Any] | None,
                          environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a parsed YAML document and build Settings from it."""
    environ = os.environ if environ is None else environ
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("the configuration must be a mapping of keys at the top level")
    try:
        data = ConfigSchema().load(dict(raw))
    except ValidationError as exc:
        raise ConfigError("invalid configuration: " + "; ".join(_flatten(exc.messages))) from exc

    server = _server(data.get("server", {}), environ)
    proxy_raw = dict(data.get("proxy", {}))
    sticky = dict(proxy_raw.pop("sticky_sessions", {}))
    if "key_sources" in sticky:
        sticky["key_sources"] = tuple(sticky["key_sources"])
    proxy = ProxySettings(queue=QueueSettings(**proxy_raw.pop("queue", {})),
                          sticky_sessions=StickySettings(**sticky), **proxy_raw)
    endpoint_list = data.get("endpoints")
    list_key = "endpoints"
    if endpoint_list is None:
        endpoint_list = data.get("discovery", {}).get("static", {}).get("endpoints") or []
        list_key = "discovery.static.endpoints"
    endpoints = tuple(_endpoint(e, f"{list_key}[{i}]", environ, proxy)
                      for i, e in enumerate(endpoint_list))
    names = [e.name for e in endpoints]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"endpoints: duplicate endpoint name(s): {', '.join(duplicates)}")
    logging_raw = data.get("logging", {})
    prefixes = tuple(data.get("routing", {}).get("prefixes", Settings.prefixes))
    return Settings(
        server=server,
        proxy=proxy,
        endpoints=endpoints,
        prefixes=prefixes,
        model_aliases={k: tuple(v) for k, v in data.get("model_aliases", {}).items()},
        discovery_interval=_discovery_interval(data.get("discovery", {})),
        embedded=EmbeddedSettings(**data.get("embedded", {})),
        state=_state(data.get("state", {}), environ),
        auth=_auth(data.get("auth", {}), environ),
        anthropic=_anthropic(data.get("translators", {}).get("anthropic", {})),
        log_level=logging_raw.get("level", Settings.log_level),
        log_format=logging_raw.get("format", Settings.log_format),
        log_output=logging_raw.get("output", Settings.log_output),
    )


def config_path(explicit: str | None = None,
                environ: Mapping[str, str] | None = None) -> Path | None:
    """The file to read: ``--config``, else the master's snapshot (in a gunicorn worker),
    else ``OLLA_CONFIG_FILE``, else config/config.yaml."""
    environ = os.environ if environ is None else environ
    chosen = explicit or environ.get(CONFIG_SNAPSHOT_ENV) or environ.get(CONFIG_FILE_ENV)
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_settings(explicit: str | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the YAML configuration (defaults when there is no file)."""
    environ = os.environ if environ is None else environ
    path = config_path(explicit, environ)
    if path is None:
        return settings_from_mapping({}, environ)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return settings_from_mapping(raw, environ)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
