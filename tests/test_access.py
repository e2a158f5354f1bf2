"""Keys, scopes, client addresses and the /internal policy, without Flask."""

from __future__ import annotations

import pytest

from app.access import ClientAddress, InternalPolicy, Keys, may_use, networks, presented_key
from app.config import ApiKey, InternalAccess

ALICE = ApiKey(name="alice", key="sk-alice-0123456789")
BOB = ApiKey(name="bob", key="sk-bob-9876543210", models=("gemma*", "chat"))


def test_a_key_is_found_by_what_the_client_presents() -> None:
    keys = Keys([ALICE, BOB])
    assert keys.find("sk-alice-0123456789") is ALICE
    assert keys.find("sk-bob-9876543210") is BOB
    for wrong in ("sk-alice-012345678", "sk-alice-0123456789 ", "", "alice", None):
        assert keys.find(wrong) is None
    assert not Keys([]).enabled and keys.enabled


@pytest.mark.parametrize(("headers", "found"), [
    ({"Authorization": "Bearer sk-1"}, "sk-1"),
    ({"Authorization": "bearer   sk-1 "}, "sk-1"),
    ({"X-API-Key": "sk-2"}, "sk-2"),
    ({"Authorization": "Bearer sk-1", "X-API-Key": "sk-2"}, "sk-1"),
    ({"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": "sk-2"}, "sk-2"),
    ({"Authorization": "Bearer "}, None),
    ({}, None),
])
def test_keys_come_as_a_bearer_token_or_x_api_key(headers: dict[str, str],
                                                  found: str | None) -> None:
    assert presented_key(headers) == found


@pytest.mark.parametrize(("model", "allowed"), [
    ("gemma-3-270m-q4_k_m.gguf", True), ("Gemma-3-270M-Q4_K_M", True), ("chat", True),
    ("CHAT.gguf", True), ("llama-3.1-8b", False), ("xgemma", False), (None, False), ("", False),
])
def test_a_scoped_key_may_use_only_its_models(model: str | None, allowed: bool) -> None:
    assert may_use(BOB, model) is allowed
    assert may_use(ALICE, model) is True  # no models: every model (and none named)
    assert may_use(None, model) is True   # no keys configured


TRUSTED = ClientAddress(True, networks(["10.0.0.0/8", "127.0.0.0/8"]))


@pytest.mark.parametrize(("peer", "headers", "address"), [
    ("203.0.113.9", {"X-Forwarded-For": "1.2.3.4"}, "203.0.113.9"),   # untrusted peer
    ("10.0.0.5", {"X-Forwarded-For": "198.51.100.7"}, "198.51.100.7"),
    # A client that writes its own X-Forwarded-For gets its hop appended by the proxy:
    # the nearest untrusted hop is taken, not the spoofed one on the left.
    ("10.0.0.5", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}, "198.51.100.7"),
    ("10.0.0.5", {"X-Forwarded-For": "198.51.100.7, 10.0.0.9"}, "198.51.100.7"),
    ("10.0.0.5", {"X-Real-IP": "198.51.100.8"}, "198.51.100.8"),
    ("10.0.0.5", {"X-Forwarded-For": "garbage"}, "10.0.0.5"),
    ("::ffff:10.0.0.5", {"X-Forwarded-For": "2001:db8::1"}, "2001:db8::1"),
    ("10.0.0.5", {}, "10.0.0.5"),
])
def test_the_client_address_behind_trusted_proxies(peer: str, headers: dict[str, str],
                                                   address: str) -> None:
    assert TRUSTED.resolve(peer, headers) == address


def test_proxy_headers_are_ignored_unless_trusted() -> None:
    off = ClientAddress(False, networks(["10.0.0.0/8"]))
    assert off.resolve("10.0.0.5", {"X-Forwarded-For": "198.51.100.7"}) == "10.0.0.5"


def test_internal_routes_follow_their_policy() -> None:
    policy = InternalPolicy(InternalAccess(admin_key="adm-key", metrics_key="prom-key"))
    assert InternalPolicy.guards("/internal/status") and InternalPolicy.guards("/version")
    assert not InternalPolicy.guards("/internal/health")
    assert not InternalPolicy.guards("/olla/models")
    assert policy.allows("/internal/status", "127.0.0.1", None)
    assert policy.allows("/internal/status", "::1", None)
    assert not policy.allows("/internal/status", "192.0.2.1", None)
    assert not policy.allows("/internal/status", "192.0.2.1", "wrong")
    assert policy.allows("/internal/status", "192.0.2.1", "adm-key")
    assert policy.allows("/internal/metrics", "192.0.2.1", "prom-key")
    assert not policy.allows("/internal/status", "192.0.2.1", "prom-key")
    assert not InternalPolicy(InternalAccess()).allows("/internal/status", "192.0.2.1", "")
