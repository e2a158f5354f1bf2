"""The spec's OpenAI SDK examples, with the real `openai` client, through the proxy."""

from __future__ import annotations

import openai
import pytest

from .conftest import CHAT_ALIAS

pytestmark = pytest.mark.integration

EMBED_MODEL = "gemma-3-270m-q4_k_m.gguf"


def test_chat_completion(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=CHAT_ALIAS,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Explain GGUF quantization"}],
        temperature=0.7, max_tokens=12)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 12


def test_streaming_chat_completion(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=CHAT_ALIAS, messages=[{"role": "user", "content": "Count to 10 slowly"}],
        max_tokens=16, stream=True)
    pieces = []
    finish = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert len(pieces) >= 2
    assert finish in ("length", "stop")


def test_completion(client: openai.OpenAI) -> None:
    response = client.completions.create(model=CHAT_ALIAS, prompt="Explain GGUF quantization:",
                                         max_tokens=10, temperature=0.7)
    assert response.object == "text_completion"
    assert response.choices[0].text


def test_embeddings_with_a_list_input(client: openai.OpenAI) -> None:
    response = client.embeddings.create(
        model=EMBED_MODEL,
        input=["First document to embed", "Second document to embed",
               "Third document to embed"])
    assert [d.index for d in response.data] == [0, 1, 2]
    assert len({len(d.embedding) for d in response.data}) == 1
    assert len(response.data[0].embedding) > 100
    assert response.data[0].embedding != response.data[1].embedding


def test_models_list(client: openai.OpenAI) -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == sorted([CHAT_ALIAS, EMBED_MODEL])


def test_sdk_sees_spec_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="unknown-model.gguf",
                                       messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model=CHAT_ALIAS, temperature=3.5,
                                       messages=[{"role": "user", "content": "x"}])
    assert invalid.value.body["code"] == "invalid_parameter"  # type: ignore[index]
