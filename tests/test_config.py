"""Unit tests for app/config.py: YAML loading, validation messages, defaults, endpoints."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import (
    MIB,
    ConfigError,
    Endpoint,
    Settings,
    Timeouts,
    config_path,
    expand_env,
    load_settings,
    parse_duration,
    settings_from_mapping,
)

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

# Copied verbatim from the spec (olla-llamacpp-api.txt, "Configuration Example").
SPEC_SINGLE_ENDPOINT = """\
endpoints:
  - url: "http://192.168.0.100:8080"
    name: "llamacpp-llama-8b"
    type: "llamacpp"
    priority: 95
    # Profile handles health checks and model discovery
    headers:
      X-API-Key: "${LLAMACPP_API_KEY}"
"""

# Copied verbatim from the spec (olla-llamacpp-api.txt, "Multi-Instance Setup").
SPEC_MULTI_INSTANCE = """\
endpoints:
  # Instance 1: Chat model
  - url: "http://192.168.0.100:8080"
    name: "llamacpp-chat"
    type: "llamacpp"
    priority: 90

  # Instance 2: Code model
  - url: "http://192.168.0.101:8080"
    name: "llamacpp-code"
    type: "llamacpp"
    priority: 85

  # Instance 3: Embedding model
  - url: "http://192.168.0.102:8080"
    name: "llamacpp-embed"
    type: "llamacpp"
    priority: 80
"""

OLLA_LAYOUT = """\
discovery:
  type: static
  static:
    endpoints:
      - url: "http://10.0.0.5:8080"
        name: "gpu-box"
        type: "llamacpp"
        priority: 100
        health_check_url: "/health"
        model_url: "/v1/models"
        check_interval: 10s
        check_timeout: 1s
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    """Write a YAML file under tmp_path and return its path."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config_error(raw: Any, environ: dict[str, str] | None = None) -> str:
    """The ConfigError text for a config mapping that must be rejected."""
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(raw, environ={} if environ is None else environ)
    return str(info.value)


# --- the spec's examples and the repo's files -------------------------------------------


def test_spec_single_endpoint_example_loads_with_key_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_SINGLE_ENDPOINT)
    settings = load_settings(str(path), environ={"LLAMACPP_API_KEY": "sk-local-123"})
    assert settings.endpoints == (
        Endpoint(name="llamacpp-llama-8b", url="http://192.168.0.100:8080", type="llamacpp",
                 priority=95, headers={"X-API-Key": "sk-local-123"}, timeouts=Timeouts()),
    )
    assert settings.endpoints[0].sends_credentials


def test_spec_single_endpoint_example_without_key_names_the_header(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_SINGLE_ENDPOINT)
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ={})
    message = str(info.value)
    assert "endpoints[0].headers.X-API-Key" in message
    assert "LLAMACPP_API_KEY" in message
    assert str(path) in message


def test_spec_multi_instance_example_loads(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, SPEC_MULTI_INSTANCE)), environ={})
    assert [(e.name, e.url, e.priority) for e in settings.endpoints] == [
        ("llamacpp-chat", "http://192.168.0.100:8080", 90),
        ("llamacpp-code", "http://192.168.0.101:8080", 85),
        ("llamacpp-embed", "http://192.168.0.102:8080", 80),
    ]
    for endpoint in settings.endpoints:
        assert endpoint.type == "llamacpp"
        assert endpoint.headers == {}
        assert not endpoint.sends_credentials
        # Olla's llamacpp profile defaults.
        assert endpoint.health_check_url == "/health"
        assert endpoint.model_url == "/v1/models"
        assert endpoint.check_interval == 5.0
        assert endpoint.check_timeout == 2.0


def test_repo_config_yaml_loads() -> None:
    settings = load_settings(str(REPO_CONFIG_DIR / "config.yaml"), environ={})
    assert settings.server.host == "localhost"
    assert settings.server.port == 40114
    assert settings.server.max_body_size == 100 * MIB
    assert settings.proxy.connection_timeout == 5.0
    assert settings.proxy.read_timeout == 600.0
    assert settings.prefixes == ("llamacpp",)
    assert settings.endpoints == ()


def test_repo_example_yaml_loads_with_key_set() -> None:
    settings = load_settings(str(REPO_CONFIG_DIR / "example.yaml"),
                             environ={"LLAMACPP_API_KEY": "sk-embed"})
    assert [e.name for e in settings.endpoints] == [
        "llamacpp-chat", "llamacpp-code", "llamacpp-embed"]
    embed = settings.endpoints[2]
    assert embed.headers == {"X-API-Key": "sk-embed"}
    assert embed.sends_credentials
    assert not settings.endpoints[0].sends_credentials


@pytest.mark.parametrize("environ", [{}, {"LLAMACPP_API_KEY": ""}], ids=["unset", "empty"])
def test_repo_example_yaml_loads_without_key(environ: dict[str, str]) -> None:
    settings = load_settings(str(REPO_CONFIG_DIR / "example.yaml"), environ=environ)
    embed = settings.endpoints[2]
    assert embed.name == "llamacpp-embed"
    # `${LLAMACPP_API_KEY:-}` with no key: no empty X-API-Key header, and the client's own
    # credentials are not dropped in favour of it.
    assert embed.headers == {}
    assert not embed.sends_credentials


def test_olla_discovery_static_layout_loads(tmp_path: Path) -> None:
    settings = load_settings(str(write(tmp_path, OLLA_LAYOUT)), environ={})
    assert settings.endpoints == (
        Endpoint(name="gpu-box", url="http://10.0.0.5:8080", priority=100,
                 check_interval=10.0, check_timeout=1.0, timeouts=Timeouts()),
    )


def test_both_endpoint_layouts_at_once_is_an_error() -> None:
    raw = yaml.safe_load(SPEC_MULTI_INSTANCE + OLLA_LAYOUT)
    message = config_error(raw)
    assert "endpoints" in message
    assert "not both" in message


def test_olla_layout_unset_variable_names_the_olla_key_path() -> None:
    raw = {"discovery": {"static": {"endpoints": [
        {"url": "http://a:8080", "headers": {"Authorization": "Bearer ${TOKEN}"}}]}}}
    message = config_error(raw)
    assert "discovery.static.endpoints[0].headers.Authorization" in message
    assert "TOKEN" in message


# --- defaults ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, {}], ids=["empty-document", "empty-mapping"])
def test_defaults(raw: dict[str, Any] | None) -> None:
    settings = settings_from_mapping(raw, environ={})
    assert settings == Settings()
    assert (settings.server.host, settings.server.port) == ("localhost", 40114)
    assert settings.server.max_body_size == 100 * 1024 * 1024
    assert settings.prefixes == ("llamacpp",)
    assert settings.endpoints == ()
    assert settings.model_aliases == {}


def test_partial_server_section_keeps_other_defaults() -> None:
    settings = settings_from_mapping({"server": {"port": 8081}}, environ={})
    assert settings.server.port == 8081
    assert settings.server.host == "localhost"
    assert settings.server.max_body_size == 100 * MIB


def test_max_body_size_is_read_from_request_limits() -> None:
    raw = {"server": {"host": "0.0.0.0", "request_limits": {"max_body_size": 1024,
                                                             "max_header_size": 2048}}}
    settings = settings_from_mapping(raw, environ={})
    assert settings.server.max_body_size == 1024
    assert settings.server.host == "0.0.0.0"


def test_other_sections_load() -> None:
    raw = {
        "proxy": {"load_balancer": "priority"},
        "model_aliases": {"gpt-4o": ["llama-3.1-8b", "qwen-7b"]},
        "embedded": {"enabled": False, "port": 8089, "n_parallel": 2},
        "logging": {"level": "debug", "format": "json", "output": "stdout"},
    }
    settings = settings_from_mapping(raw, environ={})
    assert settings.proxy.load_balancer == "priority"
    assert settings.model_aliases == {"gpt-4o": ("llama-3.1-8b", "qwen-7b")}
    assert (settings.embedded.enabled, settings.embedded.port) == (False, 8089)
    assert settings.embedded.n_parallel == 2
    assert (settings.log_level, settings.log_format) == ("debug", "json")


def test_settings_are_frozen() -> None:
    settings = settings_from_mapping({}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server.port = 1  # type: ignore[misc]


# --- environment variables in headers ------------------------------------------------------


@pytest.mark.parametrize(("value", "environ", "expected"), [
    ("${KEY}", {"KEY": "abc"}, "abc"),
    ("Bearer ${KEY}", {"KEY": "abc"}, "Bearer abc"),
    ("${A}-${B}", {"A": "1", "B": "2"}, "1-2"),
    ("${KEY:-fallback}", {}, "fallback"),
    ("${KEY:-fallback}", {"KEY": "set"}, "set"),
    ("${KEY:-fallback}", {"KEY": ""}, "fallback"),  # as in the shell: ":-" covers empty
    ("${KEY:-}", {}, ""),
    ("${KEY}", {"KEY": ""}, ""),
    ("no variables", {}, "no variables"),
    ("$KEY", {"KEY": "abc"}, "$KEY"),  # only the braced form is expanded
])
def test_expand_env(value: str, environ: dict[str, str], expected: str) -> None:
    assert expand_env(value, "where", environ) == expected


def test_expand_env_unset_variable_names_key_and_variable() -> None:
    with pytest.raises(ConfigError, match=r"^endpoints\[2\]\.headers\.X: .*MISSING_VAR"):
        expand_env("${SET} ${MISSING_VAR}", "endpoints[2].headers.X", {"SET": "x"})


def test_header_values_expand_from_environment() -> None:
    raw = {"endpoints": [{"url": "http://a:8080", "headers": {
        "Authorization": "Bearer ${TOKEN}", "X-Team": "${TEAM:-ml}", "X-Static": "plain"}}]}
    settings = settings_from_mapping(raw, environ={"TOKEN": "t0k"})
    assert settings.endpoints[0].headers == {
        "Authorization": "Bearer t0k", "X-Team": "ml", "X-Static": "plain"}


def test_unset_variable_in_second_endpoint_names_its_index() -> None:
    raw = {"endpoints": [
        {"url": "http://a:8080", "name": "a"},
        {"url": "http://b:8080", "name": "b", "headers": {"X-API-Key": "${B_KEY}"}},
    ]}
    message = config_error(raw)
    assert "endpoints[1].headers.X-API-Key" in message
    assert "B_KEY" in message


# --- wrong types, bad values and unknown keys ---------------------------------------------


@pytest.mark.parametrize(("raw", "key_path"), [
    ({"server": {"port": "8080"}}, "server.port"),
    ({"server": {"port": 8080.5}}, "server.port"),
    ({"server": {"port": True}}, "server.port"),
    ({"server": {"port": 0}}, "server.port"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"host": 127}}, "server.host"),
    ({"server": None}, "server"),
    ({"server": {"request_limits": {"max_body_size": "100MB"}}},
     "server.request_limits.max_body_size"),
    ({"server": {"request_limits": {"max_body_size": 0}}}, "server.request_limits.max_body_size"),
    ({"proxy": {"read_timeout": "10 minutes"}}, "proxy.read_timeout"),
    ({"proxy": {"connection_timeout": -1}}, "proxy.connection_timeout"),
    ({"proxy": {"load_balancer": "random"}}, "proxy.load_balancer"),
    ({"endpoints": "http://a:8080"}, "endpoints"),
    ({"endpoints": [{"name": "no-url"}]}, "endpoints[0].url"),
    ({"endpoints": [{"url": 8080}]}, "endpoints[0].url"),
    ({"endpoints": [{"url": "ftp://a:8080"}]}, "endpoints[0].url"),
    ({"endpoints": [{"url": "http://a:8080", "type": "ollama"}]}, "endpoints[0].type"),
    ({"endpoints": [{"url": "http://a:8080", "priority": "high"}]}, "endpoints[0].priority"),
    ({"endpoints": [{"url": "http://a:8080", "priority": 1.5}]}, "endpoints[0].priority"),
    ({"endpoints": [{"url": "http://a:8080", "headers": {"X-API-Key": 123}}]},
     "endpoints[0].headers.X-API-Key"),
    ({"endpoints": [{"url": "http://a:8080", "headers": ["X-API-Key: k"]}]},
     "endpoints[0].headers"),
    ({"endpoints": [{"url": "http://a:8080"}, {"url": "http://b:8080", "check_interval": "x"}]},
     "endpoints[1].check_interval"),
    ({"discovery": {"type": "consul"}}, "discovery.type"),
    ({"discovery": {"static": {"endpoints": [{"url": "http://a:8080", "priority": "1"}]}}},
     "discovery.static.endpoints[0].priority"),
    ({"routing": {"prefixes": "llamacpp"}}, "routing.prefixes"),
    ({"routing": {"prefixes": [7]}}, "routing.prefixes[0]"),
    ({"model_aliases": {"gpt-4o": []}}, "model_aliases.gpt-4o"),
    ({"model_aliases": {"gpt-4o": "llama"}}, "model_aliases.gpt-4o"),
    ({"embedded": {"enabled": "maybe"}}, "embedded.enabled"),
    ({"embedded": {"n_parallel": 0}}, "embedded.n_parallel"),
    ({"logging": {"level": "loud"}}, "logging.level"),
    ({"logging": {"format": "xml"}}, "logging.format"),
])
def test_wrong_type_or_value_names_the_key(raw: dict[str, Any], key_path: str) -> None:
    message = config_error(raw)
    assert message.startswith("invalid configuration: ")
    # marshmallow reports a bad mapping value under "<key>.value".
    assert re.search(rf"(^|[ ;]){re.escape(key_path)}(\.value)?: ", message), message


@pytest.mark.parametrize(("raw", "key_path"), [
    ({"servers": {"port": 1}}, "servers"),
    ({"server": {"hostname": "x"}}, "server.hostname"),
    ({"server": {"request_limits": {"max_body": 1}}}, "server.request_limits.max_body"),
    ({"proxy": {"retry": {"max_attempts": 3}}}, "proxy.retry"),
    ({"endpoints": [{"url": "http://a:8080", "weight": 3}]}, "endpoints[0].weight"),
    ({"endpoints": [{"url": "http://a:8080", "auth": {"type": "bearer"}}]}, "endpoints[0].auth"),
    ({"discovery": {"refresh_interval": "30s"}}, "discovery.refresh_interval"),
    ({"routing": {"prefix": ["llamacpp"]}}, "routing.prefix"),
])
def test_unknown_key_is_an_error_naming_it(raw: dict[str, Any], key_path: str) -> None:
    message = config_error(raw)
    assert f"{key_path}: Unknown field" in message


# --- routing prefixes ----------------------------------------------------------------------


@pytest.mark.parametrize("prefixes", [
    ["llamacpp"],
    ["llama-cpp"],
    ["llama_cpp"],
    ["llamacpp", "llama-cpp", "llama_cpp"],
])
def test_known_prefixes_are_accepted(prefixes: list[str]) -> None:
    settings = settings_from_mapping({"routing": {"prefixes": prefixes}}, environ={})
    assert settings.prefixes == tuple(prefixes)


@pytest.mark.parametrize(("prefixes", "key_path"), [
    (["ollama"], "routing.prefixes[0]"),
    (["llamacpp", "vllm"], "routing.prefixes[1]"),
    (["LlamaCpp"], "routing.prefixes[0]"),
])
def test_unknown_prefix_is_an_error(prefixes: list[str], key_path: str) -> None:
    message = config_error({"routing": {"prefixes": prefixes}})
    # The message names the entry and lists what is allowed.
    assert f"{key_path}: Must be one of: llamacpp, llama-cpp, llama_cpp" in message


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    (5, 5.0),
    (0, 0.0),
    (2.5, 2.5),
    ("500ms", 0.5),
    ("5s", 5.0),
    ("2m", 120.0),
    ("1m30s", 90.0),
    ("1h", 3600.0),
    ("1h2m3s", 3723.0),
    ("1.5s", 1.5),
    (" 10s ", 10.0),
])
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "5", "5 s", "5d", "5sm", "s", "", "   ", "-5s", "abc", -1, -0.5,
    True, False, None, [5], {"s": 5}, math.nan, math.inf,
])
def test_parse_duration_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_durations_in_config() -> None:
    raw = {
        "proxy": {"connection_timeout": "500ms", "read_timeout": "1m30s"},
        "endpoints": [{"url": "http://a:8080", "check_interval": 30, "check_timeout": "1.5s"}],
    }
    settings = settings_from_mapping(raw, environ={})
    assert settings.proxy.connection_timeout == 0.5
    assert settings.proxy.read_timeout == 90.0
    assert settings.endpoints[0].check_interval == 30.0
    assert settings.endpoints[0].check_timeout == 1.5


def test_negative_duration_message_names_the_key() -> None:
    message = config_error({"proxy": {"read_timeout": -5}})
    assert "proxy.read_timeout: must not be negative" in message


# --- finding and reading the file ----------------------------------------------------------


def test_load_settings_explicit_path(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9001\n", "custom.yaml")
    assert load_settings(str(path), environ={}).server.port == 9001


def test_load_settings_from_olla_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 9002\n", "from-env.yaml")
    settings = load_settings(environ={"OLLA_CONFIG_FILE": str(path)})
    assert settings.server.port == 9002


def test_explicit_path_wins_over_olla_config_file(tmp_path: Path) -> None:
    explicit = write(tmp_path, "server:\n  port: 9003\n", "explicit.yaml")
    from_env = write(tmp_path, "server:\n  port: 9004\n", "from-env.yaml")
    settings = load_settings(str(explicit), environ={"OLLA_CONFIG_FILE": str(from_env)})
    assert settings.server.port == 9003


def test_default_path_is_config_config_yaml(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "server:\n  port: 9005\n", "config/config.yaml")
    monkeypatch.chdir(tmp_path)
    assert config_path(environ={}) == Path("config/config.yaml")
    assert load_settings(environ={}).server.port == 9005


def test_olla_config_file_wins_over_default_path(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "server:\n  port: 9005\n", "config/config.yaml")
    other = write(tmp_path, "server:\n  port: 9006\n", "other.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={"OLLA_CONFIG_FILE": str(other)}).server.port == 9006


@pytest.mark.parametrize("environ", [{}, {"OLLA_CONFIG_FILE": ""}], ids=["unset", "empty"])
def test_no_file_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                environ: dict[str, str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_path(environ=environ) is None
    assert load_settings(environ=environ) == Settings()


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"config file not found: {missing}")):
        load_settings(str(missing), environ={})


def test_missing_olla_config_file_does_not_fall_back(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "server:\n  port: 9005\n", "config/config.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"config file not found: gone\.yaml"):
        load_settings(environ={"OLLA_CONFIG_FILE": "gone.yaml"})


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(str(tmp_path), environ={})


@pytest.mark.parametrize("text", [
    "server: [unclosed\n",
    "endpoints:\n  - url: a\n   name: b\n",
    "key: value\n\tbad: tab\n",
])
def test_invalid_yaml_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ={})
    assert str(info.value).startswith(f"{path}: not valid YAML")


@pytest.mark.parametrize("text", ["- url: http://a:8080\n", "just a string\n", "42\n"])
def test_non_mapping_document_is_an_error(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ={})
    assert str(info.value).startswith(f"{path}: ")
    assert "mapping" in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load_settings(str(write(tmp_path, text)), environ={}) == Settings()


def test_errors_from_a_file_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: eighty\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ={})
    assert str(info.value).startswith(f"{path}: invalid configuration: server.port:")


# --- endpoints -----------------------------------------------------------------------------


def test_duplicate_endpoint_names_are_an_error() -> None:
    raw = {"endpoints": [
        {"url": "http://a:8080", "name": "gpu"},
        {"url": "http://b:8080", "name": "cpu"},
        {"url": "http://c:8080", "name": "gpu"},
    ]}
    message = config_error(raw)
    assert message.startswith("endpoints:")
    assert "duplicate" in message
    assert "gpu" in message
    assert "cpu" not in message


def test_duplicate_unnamed_urls_are_duplicate_names() -> None:
    message = config_error({"endpoints": [{"url": "http://a:8080"}, {"url": "http://a:8080/"}]})
    assert "duplicate endpoint name(s): http://a:8080" in message


def test_name_defaults_to_url_without_trailing_slash() -> None:
    settings = settings_from_mapping({"endpoints": [{"url": "http://a:8080/base/"}]}, environ={})
    assert settings.endpoints[0].url == "http://a:8080/base"
    assert settings.endpoints[0].name == "http://a:8080/base"


@pytest.mark.parametrize("alias", ["llamacpp", "llama-cpp", "llama_cpp"])
def test_endpoint_type_aliases_normalise_to_llamacpp(alias: str) -> None:
    settings = settings_from_mapping(
        {"endpoints": [{"url": "http://a:8080", "type": alias}]}, environ={})
    assert settings.endpoints[0].type == "llamacpp"


@pytest.mark.parametrize("url", [
    "http://user:pass@192.168.0.100:8080",
    "https://token@llama.example.com",
    "http://:secret@host:8080/v1",
])
def test_url_with_credentials_is_rejected(url: str) -> None:
    message = config_error({"endpoints": [{"url": url}]})
    assert "endpoints[0].url:" in message
    assert "credentials" in message
    # The secret itself is not echoed back.
    assert "pass" not in message and "secret" not in message


@pytest.mark.parametrize("url", [
    "http://192.168.0.100:8080",
    "https://llama.example.com",
    "http://localhost:8080/llama/",
    "http://host:8080/path@v2",  # an @ in the path is not a credential
])
def test_plain_urls_are_accepted(url: str) -> None:
    settings = settings_from_mapping({"endpoints": [{"url": url}]}, environ={})
    assert settings.endpoints[0].url == url.rstrip("/")


@pytest.mark.parametrize(("base", "path", "expected"), [
    ("http://a:8080", "/health", "http://a:8080/health"),
    ("http://a:8080", "health", "http://a:8080/health"),
    ("http://a:8080", "/v1/models", "http://a:8080/v1/models"),
    ("http://a:8080/llama", "/health", "http://a:8080/llama/health"),
    ("http://a:8080/llama", "v1/models", "http://a:8080/llama/v1/models"),
    ("http://a:8080", "http://b:9090/status", "http://b:9090/status"),
    ("http://a:8080/llama", "https://mon.example.com/h?x=1", "https://mon.example.com/h?x=1"),
])
def test_endpoint_join(base: str, path: str, expected: str) -> None:
    assert Endpoint(name="e", url=base).join(path) == expected


def test_health_and_model_urls_from_config_join_onto_base_path() -> None:
    raw = {"endpoints": [{"url": "http://a:8080/llama/", "health_check_url": "/healthz",
                          "model_url": "http://b:9090/models"}]}
    endpoint = settings_from_mapping(raw, environ={}).endpoints[0]
    assert endpoint.join(endpoint.health_check_url) == "http://a:8080/llama/healthz"
    assert endpoint.join(endpoint.model_url) == "http://b:9090/models"


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, False),
    ({"X-Trace": "1"}, False),
    ({"Authorization": "Bearer t"}, True),
    ({"authorization": "Bearer t"}, True),
    ({"X-API-Key": "k"}, True),
    ({"X-Api-Key": "k"}, True),
    ({"x-api-key": "k", "X-Trace": "1"}, True),
    ({"Proxy-Authorization": "Basic x"}, False),
])
def test_endpoint_sends_credentials(headers: dict[str, str], expected: bool) -> None:
    assert Endpoint(name="e", url="http://a:8080", headers=headers).sends_credentials is expected


def test_null_endpoint_list_means_no_endpoints() -> None:
    assert settings_from_mapping({"endpoints": None}, environ={}).endpoints == ()
    assert settings_from_mapping({"discovery": {"static": {"endpoints": None}}},
                                 environ={}).endpoints == ()


@pytest.mark.parametrize(("raw", "key"), [
    ({"routing": {"prefixes": []}}, "routing.prefixes"),
    ({"proxy": {"connection_timeout": 0}}, "proxy.connection_timeout"),
    ({"proxy": {"read_timeout": "0s"}}, "proxy.read_timeout"),
    ({"endpoints": [{"url": "http://a:1", "check_interval": 0}]}, "check_interval"),
])
def test_empty_prefixes_and_zero_timeouts_are_refused(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        settings_from_mapping(raw, environ={})


def test_timeouts_default_from_proxy_and_override_per_endpoint() -> None:
    settings = settings_from_mapping({
        "proxy": {"first_byte_timeout": "2m", "read_timeout": "30s", "response_timeout": "1h",
                  "sse_keepalive": "10s", "queue": {"max_size": 8, "timeout": "5s"}},
        "endpoints": [{"url": "http://a:1", "name": "a"},
                      {"url": "http://b:1", "name": "b", "read_timeout": "5s",
                       "connection_timeout": "250ms"}]}, environ={})
    a, b = (e.limits for e in settings.endpoints)
    assert a == Timeouts(connection_timeout=5.0, first_byte_timeout=120.0, read_timeout=30.0,
                         response_timeout=3600.0)
    assert b == Timeouts(connection_timeout=0.25, first_byte_timeout=120.0, read_timeout=5.0,
                         response_timeout=3600.0)
    assert settings.proxy.sse_keepalive == 10.0
    assert (settings.proxy.queue.max_size, settings.proxy.queue.timeout) == (8, 5.0)
    assert settings.proxy.load_balancer == "least-busy"


def test_state_defaults_and_keys() -> None:
    state = settings_from_mapping({}, environ={}).state
    assert (state.redis_url, state.key_prefix, state.lease_ttl) == (None, "olla", 8.0)
    loaded = settings_from_mapping({"state": {
        "redis_url": "rediss://:${PW}@cache:6380/1", "key_prefix": "lab-a", "lease_ttl": "5s"}},
        environ={"PW": "s3cret"}).state
    assert loaded.redis_url == "rediss://:s3cret@cache:6380/1"
    assert (loaded.key_prefix, loaded.lease_ttl) == ("lab-a", 5.0)


def test_olla_redis_url_wins_over_the_file() -> None:
    environ = {"OLLA_REDIS_URL": "unix:///run/redis/redis.sock"}
    assert settings_from_mapping({"state": {"redis_url": "redis://a:1/0"}},
                                 environ=environ).state.redis_url == environ["OLLA_REDIS_URL"]
    assert settings_from_mapping({}, environ={"OLLA_REDIS_URL": ""}).state.redis_url is None


@pytest.mark.parametrize(("raw", "key"), [
    ({"state": {"redis_url": "http://cache:6379"}}, "state.redis_url"),
    ({"state": {"lease_ttl": "500ms"}}, "state.lease_ttl"),
    ({"state": {"key_prefix": "has space"}}, "state.key_prefix"),
    ({"state": {"nope": 1}}, "state.nope"),
    ({"proxy": {"write_timeout": 0}}, "proxy.write_timeout"),
    ({"proxy": {"assemble_non_streamed": "yes"}}, "proxy.assemble_non_streamed"),
])
def test_bad_state_and_proxy_keys_stop_start_up(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        settings_from_mapping(raw, environ={})


def test_an_environment_redis_url_that_is_not_redis_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="OLLA_REDIS_URL"):
        settings_from_mapping({}, environ={"OLLA_REDIS_URL": "http://cache:6379"})


def test_write_timeout_and_assembly_settings() -> None:
    proxy = settings_from_mapping({"proxy": {"write_timeout": "2m",
                                             "assemble_non_streamed": False}}, environ={}).proxy
    assert (proxy.write_timeout, proxy.assemble_non_streamed) == (120.0, False)
    default = settings_from_mapping({}, environ={}).proxy
    assert (default.write_timeout, default.assemble_non_streamed) == (60.0, True)


def test_request_limits_defaults_and_keys() -> None:
    limits = settings_from_mapping({}, environ={}).server.request_limits
    assert (limits.max_body_size, limits.max_header_size, limits.max_json_depth,
            limits.max_list_items, limits.max_json_values) == (100 * MIB, 8190, 100, 262144,
                                                               524288)
    loaded = settings_from_mapping({"server": {"request_limits": {
        "max_body_size": 1000, "max_header_size": 4096, "max_json_depth": 20,
        "max_list_items": 50, "max_json_values": 70}}}, environ={}).server.request_limits
    assert (loaded.max_body_size, loaded.max_header_size, loaded.max_json_depth,
            loaded.max_list_items, loaded.max_json_values) == (1000, 4096, 20, 50, 70)


def test_read_timeouts_are_olla_keys_with_olla_defaults() -> None:
    server = settings_from_mapping({}, environ={}).server
    assert (server.read_header_timeout, server.read_timeout) == (10.0, 30.0)
    server = settings_from_mapping({"server": {"read_header_timeout": "2s",
                                               "read_timeout": "1m"}}, environ={}).server
    assert (server.read_header_timeout, server.read_timeout) == (2.0, 60.0)
    with pytest.raises(ConfigError, match=r"server\.read_timeout"):
        settings_from_mapping({"server": {"read_timeout": "0s"}}, environ={})


@pytest.mark.parametrize(("key", "value"), [("max_header_size", 100), ("max_json_depth", 1),
                                            ("max_json_depth", 501), ("max_json_values", 0),
                                            ("max_list_items", 0), ("max_body_size", "1MB")])
def test_bad_request_limits_stop_start_up(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"server.request_limits.{key}"):
        settings_from_mapping({"server": {"request_limits": {key: value}}}, environ={})


@pytest.mark.parametrize("value", ["Bearer abc\r\nX-Evil: 1", "key\n", "k\u0000ey", "模型",
                                   "${SECRET}"])
def test_a_header_value_that_cannot_be_sent_stops_start_up_unprinted(value: str) -> None:
    secret = "s3cret\r\nInjected: yes"
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping({"endpoints": [{"url": "http://a:1", "name": "a",
                                              "headers": {"Authorization": value}}]},
                              environ={"SECRET": secret})
    text = str(raised.value)
    assert "endpoints[0].headers.Authorization" in text
    assert value not in text and secret not in text and "abc" not in text


def test_a_header_name_that_is_not_a_token_stops_start_up() -> None:
    with pytest.raises(ConfigError, match="not a valid header name"):
        settings_from_mapping({"endpoints": [{"url": "http://a:1", "headers": {
            "X Key": "v"}}]}, environ={})


def test_latin1_header_values_are_fine() -> None:
    settings = settings_from_mapping({"endpoints": [{"url": "http://a:1", "headers": {
        "X-Team": "caf\u00e9"}}]}, environ={})
    assert settings.endpoints[0].headers["X-Team"] == "caf\u00e9"


def test_api_keys_from_the_config_the_environment_or_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "bob.key"
    secret.write_text("sk-bob-from-file\n")
    auth = settings_from_mapping({"auth": {"api_keys": [
        {"name": "alice", "key": "${ALICE_KEY}", "models": ["gemma*"], "max_concurrent": 2,
         "requests_per_minute": 60, "tokens_per_minute": 1000, "weight": 2},
        {"name": "bob", "key_file": str(secret)}]}},
        environ={"ALICE_KEY": "sk-alice"}).auth
    alice, bob = auth.api_keys
    assert auth.enabled and (alice.key, bob.key) == ("sk-alice", "sk-bob-from-file")
    assert (alice.models, alice.max_concurrent, alice.requests_per_minute,
            alice.tokens_per_minute, alice.weight) == (("gemma*",), 2, 60, 1000, 2.0)
    assert "sk-alice" not in repr(auth)  # a key never shows, only its name
    assert not settings_from_mapping({}, environ={}).auth.enabled


@pytest.mark.parametrize(("keys", "message"), [
    ([{"name": "a"}], "key either as key or as key_file"),
    ([{"name": "a", "key": "k", "key_file": "/x"}], "key either as key or as key_file"),
    ([{"name": "a", "key": "${EMPTY:-}"}], "the key is empty"),
    ([{"name": "a", "key": " k "}], "spaces at its ends"),
    ([{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}], "the same name given twice"),
    ([{"name": "a", "key": "k"}, {"name": "b", "key": "k"}], "the same key given twice (a, b)"),
    ([{"name": "a b", "key": "k"}], "auth.api_keys[0].name"),
    ([{"name": "a", "key_file": "/nonexistent/key"}], "cannot read"),
    ([{"name": "a", "key": "k", "weight": 0}], "weight"),
])
def test_bad_api_keys_stop_start_up_naming_no_key(keys: list[dict[str, object]],
                                                  message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_mapping({"auth": {"api_keys": keys}}, environ={})
    assert message in str(raised.value)
    assert "k1" not in str(raised.value) and "k2" not in str(raised.value)


def test_rate_limits_cors_and_internal_access_keys() -> None:
    server = settings_from_mapping({"server": {
        "rate_limits": {"global_requests_per_minute": 1000, "per_ip_requests_per_minute": 100,
                        "burst_size": 50, "health_requests_per_minute": 1000,
                        "cleanup_interval": "5m", "trust_proxy_headers": True,
                        "trusted_proxy_cidrs": ["10.0.0.0/8"]},
        "cors": {"enabled": True, "allowed_origins": ["http://a"], "max_age": 60},
        "internal_access": {"allowed_cidrs": ["10.1.0.0/16"], "admin_key": "${ADMIN}"}}},
        environ={"ADMIN": "adm"}).server
    assert server.rate_limits.burst_size == 50 and server.rate_limits.trust_proxy_headers
    assert server.rate_limits.trusted_proxy_cidrs == ("10.0.0.0/8",)
    assert server.cors.allowed_origins == ("http://a",) and server.cors.max_age == 60
    assert server.internal_access.allowed_cidrs == ("10.1.0.0/16",)
    assert server.internal_access.admin_key == "adm"
    defaults = settings_from_mapping({}, environ={}).server
    assert not defaults.rate_limits.any and not defaults.cors.enabled
    assert defaults.internal_access.allowed_cidrs == ("127.0.0.0/8", "::1/128")
    with pytest.raises(ConfigError, match="not an address or network"):
        settings_from_mapping({"server": {"internal_access": {"allowed_cidrs": ["nope"]}}},
                              environ={})
