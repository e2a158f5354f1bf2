"""Who is asking: inbound API keys and their model scopes, the client's address behind
trusted proxies, and who may read ``/internal``. No Flask.

Keys are compared in constant time: a presented key is hashed and its digest compared
with every configured key's digest, always all of them, so neither a key's bytes nor
which key matched show in the time an answer takes. Only a key's ``name`` ever leaves
this module.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from .config import ApiKey, InternalAccess, RateLimits
from .registry import name_key

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Headers(Protocol):
    """Request headers, as a mapping or Werkzeug's ``Headers`` give them."""

    def get(self, key: str, default: str) -> str: ...


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def presented_key(headers: Headers) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>`` (the OpenAI SDK's
    ``api_key``), else ``X-API-Key`` (the Anthropic SDK's header)."""
    authorization = headers.get("Authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get("X-API-Key", "").strip()
    return key or None


class Keys:
    """The configured API keys, found by what a client presents."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)
        self._digests = [(_digest(k.key), k) for k in self.keys]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str | None) -> ApiKey | None:
        """The key matching ``presented``, or None; the same work whichever matched."""
        if presented is None:
            return None
        digest = _digest(presented)
        found = None
        for known, key in self._digests:
            if hmac.compare_digest(known, digest):
                found = key
        return found


def may_use(key: ApiKey | None, model: str | None) -> bool:
    """Whether ``key`` may use ``model`` (names and globs compare as model names do:
    case-insensitively, with or without ``.gguf``). A key without ``models`` may use all;
    a scoped key must name a model."""
    if key is None or not key.models:
        return True
    if not model:
        return False
    wanted = name_key(model)
    return any(fnmatch.fnmatchcase(wanted, name_key(pattern)) for pattern in key.models)


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parsed networks (the config checked each one)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def within(text: str, nets: Iterable[Network]) -> bool:
    """Whether the address ``text`` lies in one of ``nets`` (not an address: no)."""
    address = _address(text)
    return address is not None and any(address in net for net in nets)


@dataclass(frozen=True)
class ClientAddress:
    """The client's address: the peer's, or, when the peer is a trusted proxy and
    ``trust_proxy_headers`` is on, the nearest untrusted hop of ``X-Forwarded-For`` (else
    ``X-Real-IP``). Hops a client wrote itself, left of a trusted proxy's, are not taken."""

    trust: bool
    trusted: tuple[Network, ...]

    @classmethod
    def of(cls, limits: RateLimits) -> ClientAddress:
        return cls(limits.trust_proxy_headers, networks(limits.trusted_proxy_cidrs))

    def resolve(self, peer: str, headers: Headers) -> str:
        if not self.trust or not within(peer, self.trusted):
            return peer
        forwarded = [h.strip() for h in headers.get("X-Forwarded-For", "").split(",")
                     if h.strip()]
        for hop in reversed(forwarded):
            if _address(hop) is None:
                break  # not an address: nothing left of it can be trusted either
            if not within(hop, self.trusted):
                return str(_address(hop))
        real = _address(headers.get("X-Real-IP", ""))
        if real is not None:
            return str(real)
        return str(_address(forwarded[0])) if forwarded and _address(forwarded[0]) else peer


class InternalPolicy:
    """Who may read ``/internal/*`` and ``/version``: addresses in ``allowed_cidrs``, or
    anyone with the ``admin_key``; ``/internal/metrics`` also with the ``metrics_key``."""

    OPEN = frozenset({"/internal/health"})

    def __init__(self, access: InternalAccess) -> None:
        self.allowed = networks(access.allowed_cidrs)
        self._admin = _digest(access.admin_key) if access.admin_key else None
        self._metrics = _digest(access.metrics_key) if access.metrics_key else None

    @staticmethod
    def guards(path: str) -> bool:
        """Whether the policy applies to ``path``."""
        return (path.startswith("/internal/") or path == "/internal" or path == "/version") \
            and path not in InternalPolicy.OPEN

    def admin(self, presented: str | None) -> bool:
        """Whether a change (drain, undrain) may be made: anyone the policy lets in when
        no ``admin_key`` is set, else only with it."""
        if self._admin is None:
            return True
        return presented is not None and hmac.compare_digest(self._admin, _digest(presented))

    def allows(self, path: str, address: str, presented: str | None) -> bool:
        if within(address, self.allowed):
            return True
        if presented is None:
            return False
        digest = _digest(presented)
        admin = self._admin is not None and hmac.compare_digest(self._admin, digest)
        metrics = self._metrics is not None and hmac.compare_digest(self._metrics, digest)
        return admin or (metrics and path == "/internal/metrics")


@dataclass(frozen=True)
class Access:
    """Everything the gate asks: keys, the client's address, the /internal policy."""

    keys: Keys
    address: ClientAddress
    internal: InternalPolicy

    @classmethod
    def of(cls, keys: Iterable[ApiKey], limits: RateLimits, internal: InternalAccess) -> Access:
        return cls(Keys(keys), ClientAddress.of(limits), InternalPolicy(internal))
