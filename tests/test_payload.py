"""Request bodies: what is accepted, and a 400 naming the field or the limit for the rest."""

from __future__ import annotations

import json

import pytest

from app import payload
from app.config import RequestLimits
from app.errors import InvalidRequest
from app.payload import parse

LIMITS = RequestLimits()


@pytest.fixture(autouse=True, params=["one call", "walked"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: bodies parsed in one C call, and walked (as a body over
    ``SMALL`` is), with pieces small enough that the walk goes into every container and
    cuts every string."""
    if request.param == "walked":
        monkeypatch.setattr(payload, "SMALL", 0)
        monkeypatch.setattr(payload, "PIECES", (4, 9))
        monkeypatch.setattr(payload, "STRING_PIECE", 7)
    return str(request.param)


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
def test_too_many_items_in_a_long_list_is_400(key: str, mode: str) -> None:
    limits = RequestLimits(max_list_items=3)
    assert len(parse(json.dumps({key: [1, 2, 3]}).encode(), limits)[key]) == 3
    error = refused(json.dumps({key: [1, 2, 3, 4]}).encode(), limits)
    count = "4" if mode == "one call" else "more than 3"  # a walk stops at the fourth
    assert error.code == "too_many_items" and f"'{key}' has {count} items" in error.message


@pytest.mark.parametrize(("body", "where"), [
    (b'{"a": {"b": [[1, 2, 3, 4]]}}', "a.b[0]"),
    (b'{"a": [{"k1": 1, "k2": 2, "k3": 3, "k4": 4}]}', "a[0]"),
    (b'[1, 2, 3, 4]', "(the body)"),
])
def test_every_list_and_object_is_bounded_wherever_it_is(body: bytes, where: str) -> None:
    error = refused(body, RequestLimits(max_list_items=3))
    assert error.code == "too_many_items" and f"'{where}' has" in error.message


def test_the_values_in_a_body_are_bounded() -> None:
    limits = RequestLimits(max_json_values=10)
    # The object, the list, eight numbers: ten values.
    assert parse(b'{"a": [1, 2, 3, 4, 5, 6, 7, 8]}', limits)["a"][-1] == 8
    error = refused(b'{"a": [1, 2, 3, 4, 5, 6, 7, 8], "b": "x"}', limits)
    assert error.code == "too_many_values" and "max_json_values" in error.message
    # Commas inside strings are text, not values.
    assert parse(json.dumps({"a": ["x, " * 50] * 8}).encode(), limits)["a"][0] == "x, " * 50


DOCUMENTS = [
    {"model": "m", "messages": [{"role": "user", "content": "héllo 模型 \U0001f600"}]},
    {"prompt": "a\\\"b\\\\\n\\u0041" * 5, "n": [1, -2.5e-3, 0, 10**30, True, False, None]},
    {"nested": [[[[]]], {}, [{}], {"a": {"b": {"c": []}}}], "": "", " k ": "v"},
    {"escapes": "\\" * 13 + "\"" * 7 + "\t\r\b\f/" + "\u00e9\U0001f600" * 4},
    {"long": "x" * 100 + "\U0001f600" + "y" * 33, "k" * 40: ["z" * 25] * 6},
]


@pytest.mark.parametrize("document", DOCUMENTS)
@pytest.mark.parametrize("indent", [None, 2])
def test_a_body_parses_as_json_loads_parses_it(document: dict[str, object],
                                              indent: int | None) -> None:
    text = json.dumps(document, indent=indent, ensure_ascii=False)
    assert parse(text.encode(), LIMITS) == json.loads(text)
    escaped = json.dumps(document, indent=indent)  # every non-ASCII character a \u escape
    assert parse(escaped.encode(), LIMITS) == json.loads(escaped)


def test_a_surrogate_pair_cut_between_two_pieces_is_one_character(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payload, "SMALL", 0)
    monkeypatch.setattr(payload, "PIECES", (4,))
    for pad in range(14):  # the cut falls at every place in and around the pair
        monkeypatch.setattr(payload, "STRING_PIECE", 6 + pad % 7)
        text = "a" * pad + r"\ud83d\ude00" + "b"
        assert parse(b'{"p": "' + text.encode() + b'"}', LIMITS)["p"] == json.loads(
            '"' + text + '"')


@pytest.mark.parametrize("body", [
    b'{"a": 1,}', b'{"a" 1}', b'{"a": [1 2]}', b'{"a": [1,]}', b'{a: 1}', b'{"a": "x}',
    b'{"a": "\\x"}', b'{"a": "\\u12"}', b'{"a": tru}', b'{"a": 1} x', b'{"a": "\x01"}',
    b'{"a": [' + b'"' + b"y" * 40 + b'",' + b"]}",
])
def test_malformed_json_is_400(body: bytes) -> None:
    assert refused(body).message.startswith("Invalid JSON body:")


def test_a_walk_pauses_for_the_other_greenlets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payload, "PAUSE_EVERY", 0.0)
    pauses: list[int] = []
    body = json.dumps({"messages": [{"role": "user", "content": "a"}] * 5000}).encode()
    assert len(body) > payload.SMALL or payload.SMALL == 0
    parse(body + b" " * payload.SMALL, LIMITS, lambda: pauses.append(1))
    assert len(pauses) >= 5000  # at least once a message


@pytest.mark.parametrize("body", [b"", b"   ", b"[]", b"null", b'"text"', b"12"])
def test_a_body_that_is_not_an_object_is_400(body: bytes) -> None:
    assert "must be a JSON object" in refused(body).message


def test_a_utf8_byte_order_mark_is_skipped() -> None:
    assert parse(b'\xef\xbb\xbf{"prompt": "x"}', LIMITS) == {"prompt": "x"}
