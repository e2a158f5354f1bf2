"""The Anthropic routes under /olla/anthropic/ (passthrough to llama.cpp's /v1/messages)
against fake upstreams; the real SDK is in tests/integration/test_anthropic_real.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from app.config import ConfigError, settings_from_mapping

from .conftest import CHAT_URL, add_llamacpp

MESSAGE = {"model": "gemma", "max_tokens": 8,
           "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "gemma",
          "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
          "usage": {"cache_read_input_tokens": 20, "input_tokens": 5, "output_tokens": 2}}


@pytest.fixture
def app(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> Flask:
    add_llamacpp(fake, CHAT_URL, "gemma")
    return make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}],
                     "translators": {"anthropic": {"max_message_size": 2048}}})


def anthropic_error(response: Any) -> dict[str, str]:
    body = response.get_json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["request_id"] == response.headers["X-Olla-Request-Id"]
    return body["error"]  # type: ignore[no-any-return]


def post(client: FlaskClient, path: str, body: Any, **headers: str) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/olla/anthropic/" + path, data=raw, headers=headers)


STREAM = b"".join(
    b"event: " + kind.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"
    for kind, data in [
        ("message_start", {"type": "message_start", "message": {
            **ANSWER, "content": [], "stop_reason": None,
            "usage": {"cache_read_input_tokens": 20, "input_tokens": 5,
                      "output_tokens": 0}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Hel"}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "lo"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"})])


def test_a_stream_is_passed_through_byte_for_byte(app: Flask,
                                                  fake: responses.RequestsMock) -> None:
    upstream = fake.post(CHAT_URL + "/v1/messages", body=STREAM,
                         content_type="text/event-stream")
    raw = json.dumps({**MESSAGE, "stream": True, "metadata": {"user_id": "u1"},
                      "top_k": 5}).encode()
    answer = post(app.test_client(), "v1/messages", raw)
    assert answer.status_code == 200 and answer.data == STREAM
    assert upstream.calls[0].request.body == raw   # unknown fields untouched
    assert answer.headers["X-Olla-Mode"] == "passthrough"


def test_a_message_is_assembled_from_llamacpps_stream(app: Flask,
                                                      fake: responses.RequestsMock) -> None:
    upstream = fake.post(CHAT_URL + "/v1/messages", body=STREAM,
                         content_type="text/event-stream")
    raw = json.dumps({**MESSAGE, "top_k": 5}).encode()
    answer = post(app.test_client(), "v1/messages", raw)
    assert answer.status_code == 200 and answer.get_json() == ANSWER
    sent = json.loads(upstream.calls[0].request.body)
    assert sent == {**MESSAGE, "top_k": 5, "stream": True}
    assert answer.headers["X-Olla-Mode"] == "passthrough"
    assert answer.headers["X-Olla-Endpoint"] == "chat"


def test_count_tokens_is_passed_to_llamacpp(app: Flask, fake: responses.RequestsMock) -> None:
    fake.post(CHAT_URL + "/v1/messages/count_tokens", json={"input_tokens": 26})
    answer = post(app.test_client(), "v1/messages/count_tokens",
                  {"model": "gemma", "messages": MESSAGE["messages"]})
    assert answer.get_json() == {"input_tokens": 26}
    assert answer.headers["X-Olla-Mode"] == "passthrough"


def test_models_in_anthropic_shape(app: Flask) -> None:
    body = app.test_client().get("/olla/anthropic/v1/models").get_json()
    assert body["has_more"] is False and body["first_id"] == body["last_id"] == "gemma"
    [model] = body["data"]
    assert model["type"] == "model" and model["id"] == model["display_name"] == "gemma"
    assert model["created_at"].endswith("Z")


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"model": "gemma", "max_tokens": 8}, 400, "invalid_request_error"),
    (b"{not json", 400, "invalid_request_error"),
    ({**MESSAGE, "model": "nope"}, 404, "not_found_error"),
    ({**MESSAGE, "messages": [{"role": "user", "content": "x" * 4000}]}, 413,
     "request_too_large"),
])
def test_errors_are_in_anthropic_shape(app: Flask, body: Any, status: int, kind: str) -> None:
    answer = post(app.test_client(), "v1/messages", body)
    assert answer.status_code == status
    assert anthropic_error(answer)["type"] == kind


def test_unknown_routes_and_wrong_methods_are_anthropic_errors(app: Flask) -> None:
    client = app.test_client()
    missing = client.post("/olla/anthropic/v1/complete", data=b"{}")
    assert missing.status_code == 404
    assert anthropic_error(missing)["type"] == "not_found_error"
    wrong = client.get("/olla/anthropic/v1/messages")
    assert wrong.status_code == 405
    assert anthropic_error(wrong)["type"] == "invalid_request_error"


def test_llamacpp_errors_come_back_in_anthropic_shape(app: Flask,
                                                      fake: responses.RequestsMock) -> None:
    fake.post(CHAT_URL + "/v1/messages", status=400, json={
        "error": {"code": 400, "message": "the prompt is too long", "type":
                  "exceed_context_size_error"}})
    answer = post(app.test_client(), "v1/messages", MESSAGE)
    assert answer.status_code == 400 and answer.headers["X-Olla-Mode"] == "passthrough"
    assert answer.get_json()["error"] == {"type": "invalid_request_error",
                                          "message": "the prompt is too long"}


def test_the_same_route_under_the_prefix_keeps_the_spec_envelope(
        app: Flask, fake: responses.RequestsMock) -> None:
    answer = app.test_client().post("/olla/llamacpp/v1/messages",
                                    data=json.dumps({"model": "gemma"}))
    assert answer.status_code == 400
    assert set(answer.get_json()["error"]) == {"message", "type", "code"}


def test_anthropic_requests_are_counted_as_passthrough(app: Flask,
                                                       fake: responses.RequestsMock) -> None:
    fake.post(CHAT_URL + "/v1/messages", json=ANSWER)
    client = app.test_client()
    post(client, "v1/messages", MESSAGE)
    post(client, "v1/messages", {"model": "gemma"})
    stats = client.get("/internal/stats/translators").get_json()
    [anthropic] = stats["translators"]
    assert anthropic["translator_name"] == "anthropic"
    assert (anthropic["total_requests"], anthropic["successful_requests"],
            anthropic["failed_requests"], anthropic["passthrough_requests"],
            anthropic["translation_requests"], anthropic["non_streaming_requests"]) == (
        2, 1, 1, 2, 0, 2)
    assert anthropic["passthrough_rate"] == 100.0 and anthropic["success_rate"] == 50.0
    assert stats["summary"]["total_requests"] == 2


def test_the_routes_can_be_turned_off(fake: responses.RequestsMock,
                                      make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "gemma")
    client = make_app({"endpoints": [{"url": CHAT_URL}],
                       "translators": {"anthropic": {"enabled": False}}}).test_client()
    answer = post(client, "v1/messages", MESSAGE)
    assert answer.status_code == 404
    assert "translators.anthropic.enabled" in anthropic_error(answer)["message"]


def test_translation_and_the_inspector_are_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="passthrough_enabled"):
        settings_from_mapping({"translators": {"anthropic": {"passthrough_enabled": False}}},
                              environ={})
    with pytest.raises(ConfigError, match="inspector"):
        settings_from_mapping({"translators": {"anthropic": {"inspector": {"enabled": True}}}},
                              environ={})
    default = settings_from_mapping({}, environ={}).anthropic
    assert (default.enabled, default.passthrough_enabled, default.max_message_size) == (
        True, True, 10 * 1024 * 1024)


def test_api_keys_as_the_anthropic_sdk_sends_them(fake: responses.RequestsMock,
                                                  make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "gemma")
    upstream = fake.post(CHAT_URL + "/v1/messages", body=STREAM,
                         content_type="text/event-stream")
    client = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}],
                       "auth": {"api_keys": [{"name": "claude", "key": "sk-ant-0123456789",
                                              "models": ["gemma"]}]}}).test_client()
    missing = post(client, "v1/messages", MESSAGE)
    assert missing.status_code == 401
    assert anthropic_error(missing)["type"] == "authentication_error"
    wrong_model = post(client, "v1/messages", {**MESSAGE, "model": "other"},
                       **{"X-API-Key": "sk-ant-0123456789"})
    assert wrong_model.status_code == 403
    assert anthropic_error(wrong_model)["type"] == "permission_error"
    answer = post(client, "v1/messages", MESSAGE, **{"X-API-Key": "sk-ant-0123456789",
                                                     "anthropic-version": "2023-06-01"})
    assert answer.status_code == 200 and answer.get_json() == ANSWER
    sent = upstream.calls[0].request.headers
    assert "X-API-Key" not in sent and sent["anthropic-version"] == "2023-06-01"
