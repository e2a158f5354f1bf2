"""Request bodies: what is accepted, and a 400 naming the field or the limit for the rest."""

from __future__ import annotations

import json

import pytest

from app.config import RequestLimits
from app.errors import InvalidRequest
from app.payload import parse

LIMITS = RequestLimits()


def refused(body: bytes, limits: RequestLimits = LIMITS) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse(body, limits)
    assert raised.value.status == 400
    return raised.value


def test_an_ordinary_body_is_parsed_as_it_is() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo 模型"}],
            "temperature": 0.7, "stop": ["\n"], "n_predict": 8}
    assert parse(json.dumps(body).encode(), LIMITS) == body


@pytest.mark.parametrize("depth", [100_000, 5_000, 1_200])
def test_a_body_nested_deeper_than_python_can_parse_is_400(depth: int) -> None:
    error = refused(b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}")
    assert error.code == "too_deep" and "max_json_depth" in error.message


def test_the_nesting_limit_holds_below_the_parsers_own() -> None:
    limits = RequestLimits(max_json_depth=10)
    ok = b'{"a": ' + b"[" * 8 + b"]" * 8 + b"}"
    assert parse(ok, limits)["a"] == [[[[[[[[]]]]]]]]
    deep = b'{"a": ' + b'{"b": ' * 12 + b"1" + b"}" * 12 + b"}"
    assert refused(deep, limits).code == "too_deep"
    many_but_flat = json.dumps({"messages": [{"role": "user"}] * 50}).encode()
    assert len(parse(many_but_flat, limits)["messages"]) == 50  # 51 brackets, 3 deep


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1.5e309"])
def test_a_number_that_overflows_to_infinity_is_400(number: bytes) -> None:
    error = refused(b'{"prompt": "x", "repeat_penalty": ' + number + b"}")
    assert "overflows to infinity" in error.message and number.decode() in error.message


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_400(constant: bytes) -> None:
    assert "not valid JSON" in refused(b'{"temperature": ' + constant + b"}").message


def test_invalid_utf8_is_400() -> None:
    error = refused(b'{"prompt": "caf\xe9"}')
    assert "not UTF-8" in error.message


@pytest.mark.parametrize(("body", "where"), [
    (b'{"prompt": "a\\ud800b"}', "prompt"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
    (b'{"\\ud83d": 1}', "\\ud83d"),  # in a key: named with the surrogate escaped
])
def test_a_lone_surrogate_is_400_naming_the_field(body: bytes, where: str) -> None:
    error = refused(body)
    assert "lone UTF-16 surrogate" in error.message and f"'{where}'" in error.message
    error.message.encode("utf-8")  # the answer itself is text


def test_a_surrogate_pair_is_text() -> None:
    assert parse(b'{"prompt": "\\ud83d\\ude00"}', LIMITS)["prompt"] == "\U0001f600"


@pytest.mark.parametrize("key", ["messages", "prompt", "input", "tokens", "content"])
def test_too_many_items_in_a_long_list_is_400(key: str) -> None:
    limits = RequestLimits(max_list_items=3)
    assert len(parse(json.dumps({key: [1, 2, 3]}).encode(), limits)[key]) == 3
    error = refused(json.dumps({key: [1, 2, 3, 4]}).encode(), limits)
    assert error.code == "too_many_items" and f"'{key}' has 4 items" in error.message


@pytest.mark.parametrize("body", [b"", b"   ", b"[]", b"null", b'"text"', b"12"])
def test_a_body_that_is_not_an_object_is_400(body: bytes) -> None:
    assert "must be a JSON object" in refused(body).message


def test_a_utf8_byte_order_mark_is_skipped() -> None:
    assert parse(b'\xef\xbb\xbf{"prompt": "x"}', LIMITS) == {"prompt": "x"}
