"""The proxy routes against fake upstreams (`responses`): our own logic, no real server."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from app import assemble
from app.registry import Status

from .conftest import CHAT_URL, EMBED_URL, add_llamacpp

POST_ROUTES = ["completion", "v1/completions", "v1/chat/completions", "embedding",
               "v1/embeddings", "tokenize", "detokenize", "infill"]
VALID = {
    "completion": {"prompt": "hi"},
    "v1/completions": {"prompt": "hi"},
    "v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
    "embedding": {"content": "hi"},
    "v1/embeddings": {"input": ["a", "b"]},
    "tokenize": {"content": "hi"},
    "detokenize": {"tokens": [1, 2]},
    "infill": {"input_prefix": "def f():"},
    "v1/messages": {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
}

# A refused connection, as requests reports one (what it wraps says so).
REFUSED = requests.ConnectionError(ConnectionRefusedError(111, "Connection refused"))


def error_of(response: object) -> dict[str, str]:
    body = response.get_json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("route", POST_ROUTES)
def test_each_post_route_is_forwarded_byte_for_byte(
        two_endpoints: FlaskClient, fake: responses.RequestsMock, route: str) -> None:
    upstream = fake.post(f"{CHAT_URL}/{route}", json={"ok": route})
    payload = dict(VALID[route])
    if route in assemble.ROUTES:
        payload["stream"] = True  # a non-streamed one is assembled: see the next test
    raw = json.dumps(payload, indent=3).encode()  # odd spacing must survive
    response = two_endpoints.post(f"/olla/llamacpp/{route}", data=raw,
                                  headers={"Content-Type": "application/json"})
    assert response.status_code == 200
    assert response.get_json() == {"ok": route}
    assert upstream.call_count == 1
    assert upstream.calls[0].request.body == raw


@pytest.mark.parametrize("route", sorted(assemble.ROUTES))
def test_non_streamed_generation_goes_upstream_as_a_stream(
        two_endpoints: FlaskClient, fake: responses.RequestsMock, route: str) -> None:
    upstream = fake.post(f"{CHAT_URL}/{route}", json={"ok": route})
    response = two_endpoints.post(f"/olla/llamacpp/{route}", json=VALID[route])
    assert response.get_json() == {"ok": route}  # a JSON answer (an error) is relayed as is
    sent = json.loads(upstream.calls[0].request.body)
    assert sent == assemble.upstream_payload(route, VALID[route])
    assert sent["stream"] is True and {**sent, **VALID[route]}.items() >= VALID[route].items()


def test_assembly_can_be_turned_off(fake: responses.RequestsMock,
                                    make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "llama-3.1-8b-instruct-q4_k_m.gguf")
    upstream = fake.post(f"{CHAT_URL}/completion", json={"content": "x"})
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}],
                    "proxy": {"assemble_non_streamed": False}})
    raw = b'{"prompt":   "hi"}'
    app.test_client().post("/olla/llamacpp/completion", data=raw)
    assert upstream.calls[0].request.body == raw


def test_unknown_fields_reach_llamacpp_untouched(two_endpoints: FlaskClient,
                                                 fake: responses.RequestsMock) -> None:
    upstream = fake.post(f"{CHAT_URL}/completion", json={"content": "x"})
    body = {"prompt": "hi", "n_probs": 3, "grammar": "root ::= \"a\"",
            "json_schema": {"type": "object"}, "logit_bias": [[15043, 1.0]],
            "cache_prompt": False, "id_slot": 1, "totally_new_knob": {"nested": [1, 2.5, None]},
            "temperature": 0.70}
    two_endpoints.post("/olla/llamacpp/completion", json=body)
    assert json.loads(upstream.calls[0].request.body) == assemble.upstream_payload(
        "completion", body)
    streamed = {**body, "stream": True}
    two_endpoints.post("/olla/llamacpp/completion", json=streamed)
    assert json.loads(upstream.calls[1].request.body) == streamed


def test_json_body_accepted_without_content_type(two_endpoints: FlaskClient,
                                                 fake: responses.RequestsMock) -> None:
    fake.post(f"{CHAT_URL}/tokenize", json={"tokens": [1]})
    response = two_endpoints.post("/olla/llamacpp/tokenize", data=b'{"content":"hi"}',
                                  content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200
    assert response.get_json() == {"tokens": [1]}


@pytest.mark.parametrize(("route", "body", "field"), [
    ("completion", {"prompt": "x", "temperature": 2.5}, "temperature"),
    ("completion", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("completion", {"prompt": "x", "top_k": -1}, "top_k"),
    ("completion", {"prompt": "x", "n_predict": -2}, "n_predict"),
    ("completion", {"prompt": "x", "stop": [1]}, "stop"),
    ("completion", {"prompt": "x", "stream": "true"}, "stream"),
    ("completion", {"n_predict": 5}, "prompt"),
    ("v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("v1/chat/completions", {"messages": []}, "messages"),
    ("v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0].role"),
    ("tokenize", {}, "content"),
    ("detokenize", {"tokens": ["a"]}, "tokens"),
    ("infill", {"input_suffix": "x"}, "input_prefix"),
    ("v1/embeddings", {"input": 3.5}, "input"),
    ("embedding", {}, "content"),
])
def test_invalid_input_is_400_without_contacting_upstream(
        two_endpoints: FlaskClient, fake: responses.RequestsMock, route: str,
        body: dict[str, object], field: str) -> None:
    upstream = fake.post(f"{CHAT_URL}/{route}", json={})
    response = two_endpoints.post(f"/olla/llamacpp/{route}", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_parameter"
    assert field in error["message"]
    assert upstream.call_count == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\"text\"", b"null", b"", b"\xff\xfe",
                                 b"{\"prompt\": \"x\", \"temperature\": NaN}",
                                 b"{\"prompt\": \"x\", \"repeat_penalty\": Infinity}"])
def test_malformed_or_non_object_body_is_400(two_endpoints: FlaskClient, raw: bytes) -> None:
    response = two_endpoints.post("/olla/llamacpp/completion", data=raw)
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_parameter"


def test_body_over_limit_is_413(fake: responses.RequestsMock,
                                make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "m.gguf")
    upstream = fake.post(f"{CHAT_URL}/completion", json={})
    app = make_app({"server": {"request_limits": {"max_body_size": 1000}},
                    "endpoints": [{"url": CHAT_URL, "name": "chat"}]})
    response = app.test_client().post("/olla/llamacpp/completion",
                                      json={"prompt": "x" * 2000})
    assert response.status_code == 413
    assert error_of(response)["type"] == "invalid_request_error"
    assert upstream.call_count == 0


@pytest.mark.parametrize("path", ["/olla/llamacpp/slots", "/olla/llamacpp/props",
                                  "/olla/llamacpp/metrics", "/olla/llamacpp/health",
                                  "/olla/llamacpp/", "/olla/llamacpp/v1/models/extra"])
def test_other_paths_under_prefix_are_not_forwarded(two_endpoints: FlaskClient,
                                                    fake: responses.RequestsMock,
                                                    path: str) -> None:
    response = two_endpoints.get(path)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"
    forwarded = [c for c in fake.calls if not c.request.url.endswith(("/v1/models", "/props"))]
    assert forwarded == []


@pytest.mark.parametrize("prefix", ["llama-cpp", "llama_cpp", "openai", "nope"])
def test_disabled_or_unknown_prefix_is_404(two_endpoints: FlaskClient, prefix: str) -> None:
    response = two_endpoints.post(f"/olla/{prefix}/completion", json={"prompt": "x"})
    assert response.status_code == 404
    assert prefix in error_of(response)["message"]


def test_listed_prefixes_are_enabled(fake: responses.RequestsMock,
                                     make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "m.gguf")
    fake.post(f"{CHAT_URL}/tokenize", json={"tokens": []})
    app = make_app({"routing": {"prefixes": ["llama-cpp", "llama_cpp"]},
                    "endpoints": [{"url": CHAT_URL, "name": "chat"}]})
    client = app.test_client()
    assert client.post("/olla/llama-cpp/tokenize", json={"content": "x"}).status_code == 200
    assert client.post("/olla/llama_cpp/tokenize", json={"content": "x"}).status_code == 200
    assert client.post("/olla/llamacpp/tokenize", json={"content": "x"}).status_code == 404


def test_the_unified_route_serves_the_openai_routes(two_endpoints: FlaskClient,
                                                    fake: responses.RequestsMock) -> None:
    fake.post(f"{CHAT_URL}/v1/chat/completions", json={"choices": []})
    fake.post(f"{EMBED_URL}/v1/embeddings", json={"data": []})
    chat = two_endpoints.post("/olla/proxy/v1/chat/completions", json={
        "model": "llama-3.1-8b-instruct-q4_k_m.gguf", "stream": False,
        "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 200 and chat.headers["X-Olla-Endpoint"] == "chat"
    embedded = two_endpoints.post("/olla/proxy/v1/embeddings", json={
        "model": "nomic-embed-text-v1.5.Q4_K_M.gguf", "input": "x"})
    assert embedded.status_code == 200 and embedded.headers["X-Olla-Endpoint"] == "embed"
    listed = two_endpoints.get("/olla/proxy/v1/models").json
    assert {m["id"] for m in listed["data"]} == {"llama-3.1-8b-instruct-q4_k_m.gguf",
                                                 "nomic-embed-text-v1.5.Q4_K_M.gguf"}
    invalid = two_endpoints.post("/olla/proxy/v1/chat/completions", json={"messages": []})
    assert invalid.status_code == 400
    native = two_endpoints.post("/olla/proxy/completion", json={"prompt": "x"})
    assert native.status_code == 404 and "unified route" in error_of(native)["message"]


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", "/olla/llamacpp/completion", "POST"),
    ("PUT", "/olla/llamacpp/v1/chat/completions", "POST"),
    ("POST", "/olla/llamacpp/v1/models", "GET, HEAD"),
    ("DELETE", "/olla/llamacpp/tokenize", "POST"),
])
def test_wrong_method_is_405_with_allow(two_endpoints: FlaskClient, method: str, path: str,
                                        allow: str) -> None:
    response = two_endpoints.open(path, method=method)
    assert response.status_code == 405
    assert response.headers["Allow"] == allow
    assert error_of(response)["code"] == "method_not_allowed"


def test_models_are_merged_deduplicated_and_never_paths(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "llama-3.1-8b-instruct-q4_k_m.gguf")
    add_llamacpp(fake, EMBED_URL, "/srv/models/nomic-embed-text-v1.5.Q4_K_M.gguf")
    add_llamacpp(fake, "http://dup.test:8080", "/other/dir/llama-3.1-8b-instruct-q4_k_m.gguf")
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"},
                                  {"url": EMBED_URL, "name": "embed"},
                                  {"url": "http://dup.test:8080", "name": "dup"}]})
    body = app.test_client().get("/olla/llamacpp/v1/models").get_json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert sorted(ids) == ["llama-3.1-8b-instruct-q4_k_m.gguf",
                           "nomic-embed-text-v1.5.Q4_K_M.gguf"]
    assert all(m["object"] == "model" and "created" in m and "owned_by" in m
               for m in body["data"])
    assert not any("_keys" in m for m in body["data"])


def test_models_skip_unreachable_endpoints(fake: responses.RequestsMock,
                                          make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "chat.gguf")
    fake.get(f"{EMBED_URL}/v1/models", body=REFUSED)
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"},
                                  {"url": EMBED_URL, "name": "embed"}]})
    response = app.test_client().get("/olla/llamacpp/v1/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.get_json()["data"]] == ["chat.gguf"]


@pytest.mark.parametrize("name", ["nomic-embed-text-v1.5.Q4_K_M.gguf",
                                  "/srv/models/nomic-embed-text-v1.5.Q4_K_M.gguf",
                                  "nomic-embed-text-v1.5.q4_k_m",
                                  "NOMIC-EMBED-TEXT-V1.5.Q4_K_M.GGUF"])
def test_named_model_routes_to_its_endpoint(two_endpoints: FlaskClient,
                                            fake: responses.RequestsMock, name: str) -> None:
    chat = fake.post(f"{CHAT_URL}/v1/embeddings", json={"from": "chat"})
    embed = fake.post(f"{EMBED_URL}/v1/embeddings", json={"from": "embed"})
    response = two_endpoints.post("/olla/llamacpp/v1/embeddings",
                                  json={"model": name, "input": "x"})
    assert response.get_json() == {"from": "embed"}
    assert (chat.call_count, embed.call_count) == (0, 1)
    assert response.headers["X-Olla-Endpoint"] == "embed"
    # The fleet's one name for it, however the client spelled it.
    assert response.headers["X-Olla-Model"] == "nomic-embed-text-v1.5.Q4_K_M.gguf"
    # The body is forwarded as sent: the model name is not rewritten.
    assert json.loads(embed.calls[0].request.body)["model"] == name


def test_model_by_alias_listed_by_server(fake: responses.RequestsMock,
                                         make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "qwen-coder", model_path="/m/Qwen2.5-Coder-7B-Q4_K_M.gguf",
                 aliases=["qwen-coder", "coder"])
    upstream = fake.post(f"{CHAT_URL}/completion", json={})
    client = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}]}).test_client()
    for name in ("qwen-coder", "coder", "Qwen2.5-Coder-7B-Q4_K_M.gguf"):
        assert client.post("/olla/llamacpp/completion",
                           json={"model": name, "prompt": "x"}).status_code == 200
    assert upstream.call_count == 3


def test_unknown_model_is_404_model_not_found(two_endpoints: FlaskClient,
                                              fake: responses.RequestsMock) -> None:
    upstream = fake.post(f"{CHAT_URL}/v1/chat/completions", json={})
    response = two_endpoints.post("/olla/llamacpp/v1/chat/completions", json={
        "model": "unknown-model.gguf", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 404
    assert error_of(response) == {"message": "Model not found: unknown-model.gguf",
                                  "type": "invalid_request_error", "code": "model_not_found"}
    assert upstream.call_count == 0


def test_no_model_goes_to_highest_priority(two_endpoints: FlaskClient,
                                           fake: responses.RequestsMock) -> None:
    chat = fake.post(f"{CHAT_URL}/tokenize", json={"tokens": [1]})
    response = two_endpoints.post("/olla/llamacpp/tokenize", json={"content": "x"})
    assert chat.call_count == 1
    assert response.headers["X-Olla-Endpoint"] == "chat"
    assert response.headers["X-Olla-Model"] == "llama-3.1-8b-instruct-q4_k_m.gguf"


def test_no_model_skips_an_endpoint_that_refuses(two_endpoints: FlaskClient,
                                                 fake: responses.RequestsMock) -> None:
    fake.post(f"{CHAT_URL}/tokenize",
              body=REFUSED)
    embed = fake.post(f"{EMBED_URL}/tokenize", json={"tokens": [2]})
    response = two_endpoints.post("/olla/llamacpp/tokenize", json={"content": "x"})
    assert response.status_code == 200
    assert response.headers["X-Olla-Endpoint"] == "embed"
    assert embed.call_count == 1


def test_none_reachable_is_503(fake: responses.RequestsMock,
                               make_app: Callable[..., Flask]) -> None:
    for url in (CHAT_URL, EMBED_URL):
        fake.get(f"{url}/v1/models", body=REFUSED)
        fake.post(f"{url}/completion", body=REFUSED)
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"},
                                  {"url": EMBED_URL, "name": "embed"}]})
    response = app.test_client().post("/olla/llamacpp/completion", json={"prompt": "x"})
    assert response.status_code == 503
    error = error_of(response)
    assert error["type"] == "server_error"
    assert "chat" in error["message"] and "embed" in error["message"]


def test_no_endpoints_configured_is_503(make_app: Callable[..., Flask]) -> None:
    response = make_app().test_client().post("/olla/llamacpp/completion", json={"prompt": "x"})
    assert response.status_code == 503
    assert error_of(response)["code"] == "no_endpoints_available"


def test_read_timeout_before_answer_is_504_and_not_retried(
        two_endpoints: FlaskClient, fake: responses.RequestsMock) -> None:
    chat = fake.post(f"{CHAT_URL}/completion", body=requests.ReadTimeout("read timed out"))
    embed = fake.post(f"{EMBED_URL}/completion", json={})
    response = two_endpoints.post("/olla/llamacpp/completion", json={"prompt": "x"})
    assert response.status_code == 504
    assert error_of(response)["code"] == "upstream_timeout"
    assert (chat.call_count, embed.call_count) == (1, 0)


@pytest.mark.parametrize(("status", "body"), [
    (501, {"error": {"code": 501, "message": "Infill is not supported by this model",
                     "type": "not_supported_error"}}),
    (400, {"error": {"code": 400, "message": "request (3002 tokens) exceeds the available "
                     "context size (1024 tokens)", "type": "exceed_context_size_error",
                     "n_prompt_tokens": 3002, "n_ctx": 1024}}),
    (401, {"error": {"code": 401, "message": "Invalid API Key",
                     "type": "authentication_error"}}),
])
def test_upstream_errors_relayed_faithfully(two_endpoints: FlaskClient,
                                           fake: responses.RequestsMock, status: int,
                                           body: dict[str, object]) -> None:
    raw = json.dumps(body).encode()
    fake.post(f"{CHAT_URL}/infill", body=raw, status=status,
              content_type="application/json; charset=utf-8")
    response = two_endpoints.post("/olla/llamacpp/infill", json={
        "model": "llama-3.1-8b-instruct-q4_k_m.gguf", "input_prefix": "x"})
    assert response.status_code == status
    assert response.data == raw
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"


def test_response_headers(two_endpoints: FlaskClient, fake: responses.RequestsMock) -> None:
    fake.post(f"{CHAT_URL}/tokenize", json={"tokens": [1]},
              headers={"X-Olla-Endpoint": "spoofed", "Connection": "close, X-Private",
                       "X-Private": "hop", "X-Upstream-Extra": "kept",
                       "Access-Control-Allow-Origin": "*",
                       "Access-Control-Allow-Credentials": "true"})
    response = two_endpoints.post("/olla/llamacpp/tokenize", json={"content": "x"},
                                  headers={"X-Request-Id": "client-req-42"})
    headers = response.headers
    assert headers["X-Olla-Backend-Type"] == "llamacpp"
    assert headers["X-Olla-Endpoint"] == "chat"
    assert headers["X-Olla-Model"] == "llama-3.1-8b-instruct-q4_k_m.gguf"
    assert headers["X-Olla-Request-Id"] == "client-req-42"
    assert headers["X-Olla-Response-Time"].endswith("ms")
    assert int(headers["X-Olla-Response-Time"][:-2]) >= 0
    assert headers["Via"].startswith("1.1 olla/")
    assert headers.getlist("X-Olla-Endpoint") == ["chat"]
    assert "X-Private" not in headers
    assert headers["X-Upstream-Extra"] == "kept"
    # llama-server's own CORS (any origin) is never relayed: CORS is server.cors's to say.
    assert not [k for k, _ in headers.items() if k.lower().startswith("access-control-")]


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "semi;colon", "new\u00e9"])
def test_unsafe_request_id_is_replaced(two_endpoints: FlaskClient,
                                       fake: responses.RequestsMock, bad: str) -> None:
    upstream = fake.post(f"{CHAT_URL}/tokenize", json={"tokens": [1]})
    response = two_endpoints.post("/olla/llamacpp/tokenize", json={"content": "x"},
                                  headers={"X-Request-Id": bad})
    rid = response.headers["X-Olla-Request-Id"]
    assert rid != bad and len(rid) == 32
    assert upstream.calls[0].request.headers["X-Request-Id"] == rid


def test_error_responses_carry_request_id_and_via(two_endpoints: FlaskClient) -> None:
    response = two_endpoints.post("/olla/llamacpp/completion", json={"temperature": 9})
    assert response.status_code == 400
    assert len(response.headers["X-Olla-Request-Id"]) == 32
    assert response.headers["Via"].startswith("1.1 olla/")


def test_request_headers_hop_by_hop_dropped_and_config_headers_added(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "m.gguf")
    upstream = fake.post(f"{CHAT_URL}/completion", json={})
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat",
                                   "headers": {"X-API-Key": "configured-key"}}]})
    app.test_client().post("/olla/llamacpp/completion", json={"prompt": "x"}, headers={
        "Authorization": "Bearer not-needed", "X-Api-Key": "client", "Connection": "X-Drop",
        "X-Drop": "1", "Keep-Alive": "timeout=5", "TE": "trailers", "X-Custom": "kept"})
    sent = upstream.calls[0].request.headers
    assert sent["X-API-Key"] == "configured-key"
    assert "Authorization" not in sent
    for hop in ("X-Drop", "Keep-Alive", "TE"):
        assert hop not in sent
    assert sent["X-Custom"] == "kept"
    assert sent["X-Forwarded-For"]


def test_client_credentials_pass_when_config_sets_none(two_endpoints: FlaskClient,
                                                       fake: responses.RequestsMock) -> None:
    upstream = fake.post(f"{CHAT_URL}/completion", json={})
    two_endpoints.post("/olla/llamacpp/completion", json={"prompt": "x"},
                       headers={"Authorization": "Bearer client-key"})
    assert upstream.calls[0].request.headers["Authorization"] == "Bearer client-key"


def test_model_alias_rewrites_model_for_the_chosen_endpoint(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "/m/gemma-3-270m-q4_k_m.gguf")
    upstream = fake.post(f"{CHAT_URL}/v1/chat/completions", json={})
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}],
                    "model_aliases": {"my-chat": ["gemma-3-270m-q4_k_m.gguf"]}})
    response = app.test_client().post("/olla/llamacpp/v1/chat/completions", json={
        "model": "my-chat", "messages": [{"role": "user", "content": "x"}], "extra": 1})
    assert response.status_code == 200
    sent = json.loads(upstream.calls[0].request.body)
    assert sent == assemble.upstream_payload("v1/chat/completions", {
        "model": "gemma-3-270m-q4_k_m.gguf", "messages": [{"role": "user", "content": "x"}],
        "extra": 1})
    assert response.headers["X-Olla-Model"] == "my-chat"
    assert response.headers["X-Olla-Routing-Strategy"] == "strict"
    assert response.headers["X-Olla-Routing-Decision"] == "routed"
    assert response.headers["X-Olla-Routing-Reason"] == 'alias "my-chat" resolved to 1 endpoint(s)'


def test_routing_headers_say_what_was_decided(two_endpoints: FlaskClient,
                                              fake: responses.RequestsMock) -> None:
    fake.post(f"{CHAT_URL}/v1/chat/completions", json={"choices": []})
    fake.post(f"{CHAT_URL}/completion", json={"content": ""})
    chat = {"messages": [{"role": "user", "content": "x"}], "stream": False}
    routed = two_endpoints.post("/olla/llamacpp/v1/chat/completions", json={
        **chat, "model": "llama-3.1-8b-instruct-q4_k_m.gguf"})
    assert (routed.headers["X-Olla-Routing-Decision"],
            routed.headers["X-Olla-Routing-Reason"]) == ("routed", "model_found")
    missing = two_endpoints.post("/olla/llamacpp/v1/chat/completions",
                                 json={**chat, "model": "nope"})
    assert missing.status_code == 404
    assert (missing.headers["X-Olla-Routing-Strategy"],
            missing.headers["X-Olla-Routing-Decision"],
            missing.headers["X-Olla-Routing-Reason"]) == ("strict", "rejected",
                                                          "model_not_found")
    unnamed = two_endpoints.post("/olla/llamacpp/completion", json={"prompt": "x"})
    assert unnamed.status_code == 200 and "X-Olla-Routing-Decision" not in unnamed.headers


def test_stream_relayed_with_sse_headers(two_endpoints: FlaskClient,
                                         fake: responses.RequestsMock) -> None:
    events = b'data: {"content":"a","stop":false}\n\ndata: {"content":"","stop":true}\n\n'
    fake.post(f"{CHAT_URL}/completion", body=events, content_type="text/event-stream")
    response = two_endpoints.post("/olla/llamacpp/completion",
                                  json={"prompt": "x", "stream": True})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.data == events


def test_unexpected_error_is_json_500(two_endpoints: FlaskClient,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    app = two_endpoints.application
    monkeypatch.setattr(app.extensions["olla"].router, "candidates", boom)
    response = two_endpoints.post("/olla/llamacpp/tokenize", json={"content": "x"})
    assert response.status_code == 500
    assert error_of(response) == {"message": "Internal proxy error", "type": "server_error",
                                  "code": "internal_error"}


def test_modelless_request_moves_past_an_endpoint_lacking_the_feature(
        two_endpoints: FlaskClient, fake: responses.RequestsMock) -> None:
    refusal = {"error": {"code": 501, "message": "This server does not support embeddings.",
                         "type": "not_supported_error"}}
    chat = fake.post(f"{CHAT_URL}/embedding", json=refusal, status=501)
    embed = fake.post(f"{EMBED_URL}/embedding", json={"embedding": [0.1]})
    first = two_endpoints.post("/olla/llamacpp/embedding", json={"content": "x"})
    assert first.status_code == 200
    assert first.headers["X-Olla-Endpoint"] == "embed"
    second = two_endpoints.post("/olla/llamacpp/embedding", json={"content": "y"})
    assert second.headers["X-Olla-Endpoint"] == "embed"
    # Remembered: the chat endpoint is not asked again while another can serve.
    assert (chat.call_count, embed.call_count) == (1, 2)


def test_501_from_the_last_candidate_is_relayed(two_endpoints: FlaskClient,
                                                fake: responses.RequestsMock) -> None:
    refusal = {"error": {"code": 501, "message": "Infill is not supported by this model",
                         "type": "not_supported_error"}}
    for url in (CHAT_URL, EMBED_URL):
        fake.post(f"{url}/infill", json=refusal, status=501)
    response = two_endpoints.post("/olla/llamacpp/infill", json={"input_prefix": "x"})
    assert response.status_code == 501
    assert response.get_json() == refusal


def test_named_model_501_is_relayed_not_rerouted(two_endpoints: FlaskClient,
                                                 fake: responses.RequestsMock) -> None:
    chat = fake.post(f"{CHAT_URL}/infill", json={"error": {"code": 501}}, status=501)
    embed = fake.post(f"{EMBED_URL}/infill", json={})
    response = two_endpoints.post("/olla/llamacpp/infill", json={
        "model": "llama-3.1-8b-instruct-q4_k_m.gguf", "input_prefix": "x"})
    assert response.status_code == 501
    assert (chat.call_count, embed.call_count) == (1, 0)


def test_compressed_upstream_body_relayed_as_sent(two_endpoints: FlaskClient,
                                                  fake: responses.RequestsMock) -> None:
    import gzip

    packed = gzip.compress(b'{"tokens": [1, 2, 3]}')
    fake.post(f"{CHAT_URL}/tokenize", body=packed, content_type="application/json",
              headers={"Content-Encoding": "gzip"})
    response = two_endpoints.post("/olla/llamacpp/tokenize", json={"content": "x"},
                                  headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.data == packed


def test_upstream_asked_for_identity_encoding(two_endpoints: FlaskClient,
                                              fake: responses.RequestsMock) -> None:
    upstream = fake.post(f"{CHAT_URL}/tokenize", json={"tokens": [1]})
    two_endpoints.post("/olla/llamacpp/tokenize", json={"content": "x"},
                       headers={"Accept-Encoding": "gzip"})
    sent = upstream.calls[0].request.headers
    assert sent["Accept-Encoding"] == "identity"  # not the client's, nor requests' default
    assert not sent.get("User-Agent", "").startswith("python-requests")


TWIN_A, TWIN_B = "http://twin-a.test:8080", "http://twin-b.test:8080"


@pytest.fixture
def twins(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> FlaskClient:
    """Two endpoints serving the same model."""
    for url in (TWIN_A, TWIN_B):
        add_llamacpp(fake, url, "gemma", model_path="/m/gemma-3-270m-q4_k_m.gguf")
    app = make_app({"proxy": {"load_balancer": "priority"}, "endpoints": [
        {"url": TWIN_A, "name": "a", "priority": 90},
        {"url": TWIN_B, "name": "b", "priority": 80}]})
    return app.test_client()


LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


@pytest.mark.parametrize(("failure", "attempts", "marked"), [
    ({"body": REFUSED}, 1,
     True),
    # A reset may be a stale keep-alive connection: once more on a fresh one, then move on;
    # the request may be what broke it, so the endpoint is not marked down for it.
    ({"body": requests.ConnectionError(ConnectionResetError(104, "Connection reset"))}, 2,
     False),
    ({"body": requests.ConnectTimeout("connect timed out")}, 1, True),
    ({"json": LOADING, "status": 503}, 1, True),
])
def test_failover_to_the_next_endpoint_before_any_byte(
        twins: FlaskClient, fake: responses.RequestsMock, failure: dict[str, object],
        attempts: int, marked: bool) -> None:
    first = fake.post(f"{TWIN_A}/v1/chat/completions", **failure)  # type: ignore[arg-type]
    second = fake.post(f"{TWIN_B}/v1/chat/completions", json={"ok": True})
    response = twins.post("/olla/llamacpp/v1/chat/completions", json={
        "model": "gemma", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 200
    assert response.headers["X-Olla-Endpoint"] == "b"
    assert (first.call_count, second.call_count) == (attempts, 1)
    state = twins.application.extensions["olla"].registry.states["a"]
    assert (state.status in (Status.OFFLINE, Status.LOADING)) is marked
    if not marked:
        return
    # The failed endpoint is out of rotation until its next probe.
    again = twins.post("/olla/llamacpp/v1/chat/completions", json={
        "model": "gemma", "messages": [{"role": "user", "content": "y"}]})
    assert again.headers["X-Olla-Endpoint"] == "b"
    assert first.call_count == attempts


def test_each_endpoint_tried_once_then_503(twins: FlaskClient,
                                           fake: responses.RequestsMock) -> None:
    calls = [fake.post(f"{url}/completion", body=REFUSED)
             for url in (TWIN_A, TWIN_B)]
    response = twins.post("/olla/llamacpp/completion", json={"model": "gemma", "prompt": "x"})
    assert response.status_code == 503
    assert [c.call_count for c in calls] == [1, 1]
    message = error_of(response)["message"]
    assert "a:" in message and "b:" in message


def test_loading_everywhere_relays_the_last_503(twins: FlaskClient,
                                                fake: responses.RequestsMock) -> None:
    for url in (TWIN_A, TWIN_B):
        fake.post(f"{url}/completion", json=LOADING, status=503)
    response = twins.post("/olla/llamacpp/completion", json={"model": "gemma", "prompt": "x"})
    assert response.status_code == 503
    assert response.get_json() == LOADING


def test_other_5xx_is_relayed_not_retried(twins: FlaskClient,
                                          fake: responses.RequestsMock) -> None:
    first = fake.post(f"{TWIN_A}/completion", status=500,
                      json={"error": {"code": 500, "message": "boom", "type": "server_error"}})
    second = fake.post(f"{TWIN_B}/completion", json={})
    response = twins.post("/olla/llamacpp/completion", json={"model": "gemma", "prompt": "x"})
    assert response.status_code == 500
    assert (first.call_count, second.call_count) == (1, 0)


def test_stats_count_requests_and_timings(twins: FlaskClient,
                                          fake: responses.RequestsMock) -> None:
    fake.post(f"{TWIN_A}/completion", json={
        "content": "x", "timings": {"predicted_n": 8, "predicted_per_second": 42.5,
                                    "prompt_n": 3}})
    for _ in range(2):
        assert twins.post("/olla/llamacpp/completion",
                          json={"model": "gemma", "prompt": "x"}).status_code == 200
    services = twins.application.extensions["olla"]
    state = services.registry.states["a"]
    assert (state.requests, state.successes, state.in_flight) == (2, 2, 0)
    model = services.stats.models["gemma"]
    assert (model.requests, model.successes, model.failures) == (2, 2, 0)
    assert list(model.tokens_per_second) == [42.5, 42.5]
    assert (model.prompt_tokens, model.completion_tokens) == (6, 16)


def test_stream_timings_read_from_the_final_event(twins: FlaskClient,
                                                  fake: responses.RequestsMock) -> None:
    events = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
              b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":4,"completion_tokens":2},'
              b'"timings":{"predicted_n":2,"predicted_per_second":99.0}}\n\n'
              b"data: [DONE]\n\n")
    fake.post(f"{TWIN_A}/v1/chat/completions", body=events, content_type="text/event-stream")
    response = twins.post("/olla/llamacpp/v1/chat/completions", json={
        "model": "gemma", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert response.data == events
    model = twins.application.extensions["olla"].stats.models["gemma"]
    assert list(model.tokens_per_second) == [99.0]
    assert model.completion_tokens == 2
    assert twins.application.extensions["olla"].registry.states["a"].in_flight == 0


@pytest.mark.parametrize("piece", [5, 7, 64, 1000])
def test_events_read_in_pieces_are_still_seen_whole(twins: FlaskClient,
                                                    fake: responses.RequestsMock,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    piece: int) -> None:
    """A body without chunked framing is read as the socket has it, cutting events
    anywhere: the final event's timings are still found, an error event still counted."""
    from app import upstream

    monkeypatch.setattr(upstream, "READ_SIZE", piece)
    events = (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
              b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
              b'"timings":{"predicted_n":3,"predicted_per_second":77.0}}\n\n'
              b"data: [DONE]\n\n")
    fake.post(f"{TWIN_A}/v1/chat/completions", body=events, content_type="text/event-stream")
    chat = {"model": "gemma", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    assert twins.post("/olla/llamacpp/v1/chat/completions", json=chat).data == events
    model = twins.application.extensions["olla"].stats.models["gemma"]
    assert list(model.tokens_per_second) == [77.0] and model.successes == 1
    failing = b'data: {"error":{"code":500,"message":"boom","type":"server_error"}}\n\n'
    fake.replace(responses.POST, f"{TWIN_A}/v1/chat/completions", body=failing,
                 content_type="text/event-stream")
    assert twins.post("/olla/llamacpp/v1/chat/completions", json=chat).data == failing
    assert model.failures == 1


def test_client_gone_is_a_quiet_499(two_endpoints: FlaskClient,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from app.errors import ClientDisconnected

    def gone(*args: object, **kwargs: object) -> None:
        raise ClientDisconnected("bye")

    monkeypatch.setattr(two_endpoints.application.extensions["olla"].router, "candidates",
                        gone)
    response = two_endpoints.post("/olla/llamacpp/completion", json={"prompt": "x"})
    assert response.status_code == 499 and response.data == b""


def test_listing_never_shows_a_filesystem_path(fake: responses.RequestsMock,
                                               make_app: Callable[..., Flask]) -> None:
    path = "/root/.cache/models/gemma-3-270m-q4_k_m.gguf"
    add_llamacpp(fake, CHAT_URL, path, aliases=[path])
    body = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}]}).test_client().get(
        "/olla/llamacpp/v1/models").get_data(as_text=True)
    assert "/root" not in body
    assert json.loads(body)["data"][0]["aliases"] == ["gemma-3-270m-q4_k_m.gguf"]


def test_spellings_of_one_model_share_one_series_and_one_stats_row(
        two_endpoints: FlaskClient, fake: responses.RequestsMock) -> None:
    fake.post(f"{EMBED_URL}/v1/embeddings", json={"data": []})
    for name in ("nomic-embed-text-v1.5.Q4_K_M.gguf", " NOMIC-embed-text-v1.5.q4_k_m ",
                 "/srv/models/nomic-embed-text-v1.5.Q4_K_M.gguf", "nomic-embed-text-v1.5.Q4_K_M"):
        assert two_endpoints.post("/olla/llamacpp/v1/embeddings",
                                  json={"model": name, "input": "x"}).status_code == 200
    services = two_endpoints.application.extensions["olla"]
    assert list(services.stats.models) == ["nomic-embed-text-v1.5.Q4_K_M.gguf"]
    text = two_endpoints.get("/internal/metrics").get_data(as_text=True)
    series = [line for line in text.splitlines()
              if line.startswith("olla_requests_total{") and 'route="v1/embeddings"' in line]
    assert len(series) == 1 and 'model="nomic-embed-text-v1.5.Q4_K_M.gguf"' in series[0]
    assert series[0].endswith(" 4.0")


def test_a_non_streamed_answer_over_the_cap_is_502(fake: responses.RequestsMock,
                                                   make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "m.gguf")
    fake.post(f"{CHAT_URL}/v1/embeddings", body=b'{"data": "' + b"x" * 3000 + b'"}')
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}],
                    "proxy": {"max_response_size": 2048}})
    response = app.test_client().post("/olla/llamacpp/v1/embeddings", json={"input": "x"})
    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_too_large"
    assert app.extensions["olla"].registry.states["chat"].in_flight == 0


def test_a_request_that_kills_its_upstream_is_tried_on_one_more_then_502(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    urls = ["http://p1.test:8080", "http://p2.test:8080", "http://p3.test:8080"]
    posts = []
    for url in urls:
        add_llamacpp(fake, url, "gemma.gguf")
        posts.append(fake.post(f"{url}/tokenize", body=requests.ConnectionError(
            ConnectionResetError(104, "Connection reset by peer"))))
    app = make_app({"endpoints": [{"url": u, "name": f"p{i}"} for i, u in enumerate(urls)]})
    app.extensions["olla"].registry.refresh()
    for state in app.extensions["olla"].registry:
        state.status = Status.HEALTHY
    response = app.test_client().post("/olla/llamacpp/tokenize",
                                      json={"model": "gemma.gguf", "content": "poison"})
    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_error"
    assert "connection reset" in error_of(response)["message"]
    tried = [p.call_count > 0 for p in posts]
    assert sum(tried) == 2                      # one more endpoint, not the whole fleet
    assert all(s.routable for s in app.extensions["olla"].registry)  # none marked down
