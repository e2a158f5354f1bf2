"""llama-server's newer APIs under the prefix, through the proxy to real llama.cpp: the
OpenAI Responses API with the real openai SDK, Anthropic Messages and its token count,
and rerank (no reranking model ships on PyPI: the server's own 501 is relayed as it is);
and Olla's unified routes (/olla/proxy/v1/*, /olla/models/{id})."""

from __future__ import annotations

import openai
import pytest
import requests

from .conftest import CHAT_ALIAS
from .procs import LlamaServer, Proxy

pytestmark = pytest.mark.integration


def test_the_responses_api_with_the_openai_sdk(client: openai.OpenAI, proxy: Proxy,
                                               llama_chat: LlamaServer) -> None:
    response = client.responses.create(model=CHAT_ALIAS, input="Say hello",
                                       max_output_tokens=8)
    assert response.object == "response" and response.output_text
    assert response.usage is not None and response.usage.output_tokens <= 8
    # Streamed as client.responses.create gives it (the SDK's responses.stream() helper
    # needs a content_index llama.cpp's events do not carry: its limit, not the proxy's).
    kinds, text = [], []
    for event in client.responses.create(model=CHAT_ALIAS, input="Count to five",
                                         max_output_tokens=12, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text.append(event.delta)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(text)
    assert llama_chat.busy_slots() == 0


def test_responses_are_validated_before_anything_goes_upstream(proxy: Proxy) -> None:
    answer = requests.post(proxy.url + "/olla/llamacpp/v1/responses", timeout=10,
                           json={"model": CHAT_ALIAS, "input": 42})
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == (
        "Invalid parameter: input must be a string or a list of input items")


def test_anthropic_messages_and_count_tokens(proxy: Proxy) -> None:
    base = proxy.url + "/olla/llamacpp/v1/messages"
    message = requests.post(base, timeout=30, json={
        "model": CHAT_ALIAS, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]})
    assert message.status_code == 200, message.text
    body = message.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert message.headers["X-Olla-Endpoint"] == "llamacpp-chat"
    counted = requests.post(base + "/count_tokens", timeout=10, json={
        "model": CHAT_ALIAS, "messages": [{"role": "user", "content": "Hi"}]})
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    missing = requests.post(base, timeout=10, json={"model": CHAT_ALIAS})
    assert missing.status_code == 400
    assert missing.json()["error"]["message"] == "Invalid parameter: messages is required"


@pytest.mark.parametrize("route", ["v1/rerank", "rerank", "reranking"])
def test_rerank_relays_the_servers_own_answer(proxy: Proxy, route: str) -> None:
    answer = requests.post(f"{proxy.url}/olla/llamacpp/{route}", timeout=10, json={
        "model": CHAT_ALIAS, "query": "what is gguf", "documents": ["a format", "a fish"]})
    # Gemma is no reranker and the server was not started with --reranking: llama.cpp's
    # 501, relayed faithfully.
    assert answer.status_code == 501
    assert answer.json()["error"]["type"] == "not_supported_error"
    assert "reranking" in answer.json()["error"]["message"]


def test_olla_unified_routes_with_the_openai_sdk(proxy: Proxy) -> None:
    from .test_openai_sdk import EMBED_MODEL

    sdk = openai.OpenAI(base_url=f"{proxy.url}/olla/proxy/v1", api_key="not-needed",
                        max_retries=0, timeout=60)
    try:
        assert {m.id for m in sdk.models.list()} >= {CHAT_ALIAS, EMBED_MODEL}
        chat = sdk.chat.completions.create(model=CHAT_ALIAS, max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content is not None
        vectors = sdk.embeddings.create(model=EMBED_MODEL, input="Text to embed")
        assert len(vectors.data[0].embedding) > 100
    finally:
        sdk.close()
    one = requests.get(f"{proxy.url}/olla/models/{CHAT_ALIAS}", timeout=10)
    assert one.status_code == 200 and one.json()["id"] == CHAT_ALIAS
    assert one.json()["olla"]["availability"][0]["endpoint"] == "llamacpp-chat"
    missing = requests.get(f"{proxy.url}/olla/models/nothing-like-it", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
