"""Olla's Anthropic routes through the proxy to real llama.cpp, with the real anthropic
SDK: a message, a streamed message, a token count, the model list, a tool-use round trip,
errors in Anthropic's shape, cancellation and the figures."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import pytest
import requests

from .conftest import CHAT_ALIAS
from .procs import LlamaServer, Proxy

pytestmark = pytest.mark.integration

WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}


@pytest.fixture
def sdk(proxy: Proxy) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=f"{proxy.url}/olla/anthropic", api_key="unused",
                                 max_retries=0, timeout=60)
    yield client
    client.close()


def test_a_message(sdk: anthropic.Anthropic, llama_chat: LlamaServer) -> None:
    raw = sdk.messages.with_raw_response.create(
        model=CHAT_ALIAS, max_tokens=8, messages=[{"role": "user", "content": "Say hi"}])
    assert raw.headers["X-Olla-Mode"] == "passthrough"
    assert raw.headers["X-Olla-Endpoint"] == "llamacpp-chat"
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens <= 8 and message.usage.input_tokens > 0
    assert llama_chat.busy_slots() == 0


def test_a_streamed_message(sdk: anthropic.Anthropic, llama_chat: LlamaServer) -> None:
    with sdk.messages.stream(model=CHAT_ALIAS, max_tokens=10,
                             messages=[{"role": "user", "content": "Count to five"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces and "".join(pieces) == final.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason in {"max_tokens", "end_turn"}
    assert final.usage.output_tokens <= 10
    assert llama_chat.busy_slots() == 0


def test_count_tokens_and_models(sdk: anthropic.Anthropic) -> None:
    short = sdk.messages.count_tokens(model=CHAT_ALIAS,
                                      messages=[{"role": "user", "content": "hi"}])
    longer = sdk.messages.count_tokens(
        model=CHAT_ALIAS, messages=[{"role": "user", "content": "hi " * 50}])
    assert 0 < short.input_tokens < longer.input_tokens
    assert CHAT_ALIAS in [model.id for model in sdk.models.list()]


def test_a_tool_use_round_trip(sdk: anthropic.Anthropic) -> None:
    """Gemma 3 270M never emits a tool_use block itself (its GGUF has no tool-call
    template), so the round trip is the client's half: tools, a tool_use turn and its
    tool_result reach llama.cpp untouched and come back as a Message."""
    message = sdk.messages.create(
        model=CHAT_ALIAS, max_tokens=16, tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": "Sunny, 21 degrees"}]},
        ])
    assert message.type == "message" and message.content
    assert message.usage.input_tokens > 20  # the tool turns were part of the prompt


def test_errors_in_anthropic_shape(sdk: anthropic.Anthropic, proxy: Proxy) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk.messages.create(model="no-such-model", max_tokens=8,
                            messages=[{"role": "user", "content": "hi"}])
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    invalid = requests.post(proxy.url + "/olla/anthropic/v1/messages", timeout=10,
                            json={"model": CHAT_ALIAS, "max_tokens": 8})
    assert invalid.status_code == 400
    assert invalid.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in invalid.json()["error"]["message"]


def test_a_client_that_leaves_a_stream_frees_the_slot(proxy: Proxy,
                                                      llama_chat: LlamaServer) -> None:
    with requests.post(proxy.url + "/olla/anthropic/v1/messages", stream=True, timeout=30,
                       json={"model": CHAT_ALIAS, "max_tokens": 400, "stream": True,
                             "messages": [{"role": "user", "content": "Tell a long story"}]}
                       ) as answer:
        events = answer.iter_lines()
        assert next(line for line in events if line.startswith(b"event:")) == \
            b"event: message_start"
        assert llama_chat.busy_slots() == 1
    deadline = time.monotonic() + 10
    while llama_chat.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llama_chat.busy_slots() == 0


def test_a_client_that_leaves_a_non_streamed_message_frees_the_slot(
        proxy: Proxy, llama_chat: LlamaServer) -> None:
    """Sent upstream as a stream and assembled (llama.cpp would otherwise generate all 400
    tokens for nobody): the slot is free soon after the client gives up."""
    with pytest.raises(requests.Timeout):
        requests.post(proxy.url + "/olla/anthropic/v1/messages", timeout=(5, 1.5),
                      json={"model": CHAT_ALIAS, "max_tokens": 400,
                            "messages": [{"role": "user", "content": "Tell a long story"}]})
    deadline = time.monotonic() + 5
    while llama_chat.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert llama_chat.busy_slots() == 0


def test_the_figures(sdk: anthropic.Anthropic, proxy: Proxy) -> None:
    before = requests.get(proxy.url + "/internal/stats/translators", timeout=10).json()
    sdk.messages.create(model=CHAT_ALIAS, max_tokens=4,
                        messages=[{"role": "user", "content": "Say hi"}])
    sdk.messages.create(model=CHAT_ALIAS, max_tokens=4,
                        messages=[{"role": "user", "content": "Say hi"}])
    after = requests.get(proxy.url + "/internal/stats/translators", timeout=10).json()
    [was], [now] = before["translators"], after["translators"]
    assert now["total_requests"] - was["total_requests"] == 2
    assert now["passthrough_requests"] == now["total_requests"]
    metrics = requests.get(proxy.url + "/internal/metrics", timeout=10).text
    cached = [line for line in metrics.splitlines()
              if line.startswith("olla_prompt_cached_tokens_total{")
              and f'model="{CHAT_ALIAS}"' in line]
    assert cached and float(cached[0].rsplit(" ", 1)[1]) > 0  # the same prompt, twice
    process = requests.get(proxy.url + "/internal/process", timeout=10).json()
    assert process["memory"]["rss_bytes"] > 1 << 20
    assert process["goroutines"]["connections"] >= 1  # this request's
    assert json.dumps(process)
