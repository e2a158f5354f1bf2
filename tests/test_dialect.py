"""Error bodies and stream ends per dialect (app/dialect.py)."""

from __future__ import annotations

import json

import pytest

from app.dialect import ANTHROPIC, LLAMACPP, OPENAI, anthropic_type, for_path


@pytest.mark.parametrize(("status", "expected"), [
    (400, "invalid_request_error"), (401, "authentication_error"),
    (403, "permission_error"), (404, "not_found_error"), (405, "invalid_request_error"),
    (408, "invalid_request_error"), (413, "request_too_large"), (429, "rate_limit_error"),
    (500, "api_error"), (502, "api_error"), (503, "overloaded_error"),
    (504, "timeout_error")])
def test_anthropic_error_types_follow_its_table(status: int, expected: str) -> None:
    assert anthropic_type(status) == expected


def test_anthropic_error_body_has_its_shape_and_the_request_id() -> None:
    body = json.loads(ANTHROPIC.error_body(404, "Model not found: x", "invalid_request_error",
                                           "model_not_found", "abc123"))
    assert body == {"type": "error", "request_id": "abc123",
                    "error": {"type": "not_found_error", "message": "Model not found: x"}}


def test_the_spec_envelope_elsewhere() -> None:
    for dialect in (OPENAI, LLAMACPP):
        body = json.loads(dialect.error_body(503, "busy", "server_error", "slots_exhausted",
                                             "abc"))
        assert body == {"error": {"message": "busy", "type": "server_error",
                                  "code": "slots_exhausted"}}


def test_stream_errors_end_each_dialect_as_its_clients_expect() -> None:
    assert OPENAI.stream_error("broke").endswith(b"\n\ndata: [DONE]\n\n")
    assert not LLAMACPP.stream_error("broke").endswith(b"[DONE]\n\n")
    event = ANTHROPIC.stream_error("timed out", code="upstream_timeout", status=504)
    name, data = event.decode().strip().split("\n")
    assert name == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {
        "type": "error", "error": {"type": "timeout_error", "message": "timed out"}}


def test_llamacpp_errors_are_turned_into_anthropic_ones_on_its_routes() -> None:
    raw = (b'{"error":{"code":400,"message":"\'messages\' is required",'
           b'"type":"invalid_request_error"}}')
    assert json.loads(ANTHROPIC.upstream_error(raw, 400) or b"") == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'messages' is required"}}
    assert OPENAI.upstream_error(raw, 400) is None           # relayed as it is
    assert ANTHROPIC.upstream_error(b'{"id": "m"}', 200) is None
    assert ANTHROPIC.upstream_error(b"not json", 500) is None
    already = b'{"type":"error","error":{"type":"api_error","message":"x"}}'
    assert ANTHROPIC.upstream_error(already, 500) is None


def test_the_dialect_of_a_path() -> None:
    assert for_path("/olla/anthropic/v1/messages") is ANTHROPIC
    assert for_path("/olla/llamacpp/v1/messages") is OPENAI
    assert for_path("/olla/anthropicx/v1/messages") is OPENAI
