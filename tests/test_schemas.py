"""Unit tests for app/schemas.py: the fields each POST route checks, and the 400 message."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from marshmallow import Schema

from app.schemas import (
    ChatCompletionSchema,
    CompletionSchema,
    CountTokensSchema,
    DetokenizeSchema,
    EmbeddingSchema,
    InfillSchema,
    MessagesSchema,
    OpenAICompletionSchema,
    OpenAIEmbeddingSchema,
    RerankSchema,
    ResponsesSchema,
    TokenizeSchema,
    check,
    validation_message,
)

# Each POST route's schema and the smallest body it accepts.
ROUTES: dict[str, tuple[Schema, dict[str, Any]]] = {
    "completion": (CompletionSchema(), {"prompt": "The future of AI is"}),
    "v1/completions": (OpenAICompletionSchema(), {"prompt": "Explain GGUF quantization:"}),
    "v1/chat/completions": (ChatCompletionSchema(),
                            {"messages": [{"role": "user", "content": "Hi"}]}),
    "infill": (InfillSchema(), {"input_prefix": "def fibonacci(n):\n    "}),
    "embedding": (EmbeddingSchema(), {"content": "llama.cpp enables efficient inference"}),
    "v1/embeddings": (OpenAIEmbeddingSchema(), {"input": "llama.cpp enables efficient inference"}),
    "tokenize": (TokenizeSchema(), {"content": "Hello, world!"}),
    "detokenize": (DetokenizeSchema(), {"tokens": [9906, 11, 1917]}),
    "v1/responses": (ResponsesSchema(), {"input": "Say hi"}),
    "v1/messages": (MessagesSchema(), {"messages": [{"role": "user", "content": "Hi"}]}),
    "v1/messages/count_tokens": (CountTokensSchema(),
                                 {"messages": [{"role": "user", "content": "Hi"}]}),
    "v1/rerank": (RerankSchema(), {"query": "gguf", "documents": ["a", "b"]}),
}
# Routes that take generation (sampling) parameters.
SAMPLING_ROUTES = ["completion", "v1/completions", "v1/chat/completions", "infill"]


def errors_for(route: str, **changes: Any) -> dict[str, Any]:
    """Validate the route's minimal body with ``changes`` applied."""
    schema, minimal = ROUTES[route]
    errors: dict[str, Any] = schema.validate({**minimal, **changes})
    return errors


def message_for(route: str, **changes: Any) -> str:
    """The 400 message for a body that must be rejected."""
    errors = errors_for(route, **changes)
    assert errors, f"{changes} should be rejected on {route}"
    return validation_message(errors)


# --- the spec's request bodies ---------------------------------------------------------------

# Request bodies copied from the spec's curl examples (olla-llamacpp-api.txt).
SPEC_BODIES = [
    ("completion", r'''{
    "prompt": "The future of AI is",
    "n_predict": 200,
    "temperature": 0.7,
    "top_k": 40,
    "top_p": 0.9,
    "repeat_penalty": 1.1,
    "stream": false
  }'''),
    ("completion", r'''{
    "prompt": "Generate a JSON object with name and age:",
    "n_predict": 100,
    "temperature": 0.7,
    "grammar": "root ::= \"{\" ws \"\\\"name\\\":\" ws string \",\" ws \"\\\"age\\\":\" ws number ws \"}\" ws\nstring ::= \"\\\"\" [^\"]* \"\\\"\"\nnumber ::= [0-9]+\nws ::= [ \\t\\n]*"
  }'''),  # noqa: E501
    ("v1/completions", r'''{
    "model": "llama-3.1-8b-instruct-q4_k_m.gguf",
    "prompt": "Explain GGUF quantization benefits:",
    "max_tokens": 200,
    "temperature": 0.7,
    "top_p": 0.9,
    "stream": false
  }'''),
    ("v1/chat/completions", r'''{
    "model": "llama-3.1-8b-instruct-q4_k_m.gguf",
    "messages": [
      {
        "role": "system",
        "content": "You are a helpful AI assistant specialising in efficient LLM deployment."
      },
      {
        "role": "user",
        "content": "What are the best practices for deploying llama.cpp in production?"
      }
    ],
    "temperature": 0.7,
    "max_tokens": 300,
    "stream": false
  }'''),
    ("embedding", r'''{
    "content": "llama.cpp enables efficient LLM inference with GGUF quantization"
  }'''),
    ("v1/embeddings", r'''{
    "model": "nomic-embed-text-v1.5.Q4_K_M.gguf",
    "input": "llama.cpp enables efficient LLM inference with GGUF quantization",
    "encoding_format": "float"
  }'''),
    ("v1/embeddings", r'''{
    "model": "nomic-embed-text-v1.5.Q4_K_M.gguf",
    "input": [
      "First document to embed",
      "Second document to embed",
      "Third document to embed"
    ]
  }'''),
    ("tokenize", r'''{
    "content": "Hello, world! This is a test."
  }'''),
    ("detokenize", r'''{
    "tokens": [9906, 11, 1917, 0, 1115, 374, 264, 1296, 13]
  }'''),
    ("infill", r'''{
    "input_prefix": "def fibonacci(n):\n    \"\"\"Calculate fibonacci number\"\"\"\n    if n <= 1:\n        return n\n    ",
    "input_suffix": "\n    return result",
    "n_predict": 100,
    "temperature": 0.2,
    "stop": ["\n\n"]
  }'''),  # noqa: E501
    ("infill", r'''{
    "input_prefix": "async function fetchUserData(userId) {\n    try {\n        ",
    "input_suffix": "\n    } catch (error) {\n        console.error(error);\n    }\n}",
    "n_predict": 100,
    "temperature": 0.2
  }'''),
]


@pytest.mark.parametrize(("route", "body"), SPEC_BODIES,
                         ids=[f"{r}-{i}" for i, (r, _) in enumerate(SPEC_BODIES)])
def test_spec_request_bodies_are_valid(route: str, body: str) -> None:
    schema, _ = ROUTES[route]
    payload = json.loads(body)
    assert schema.validate(payload) == {}
    # Validation checks, it never converts: what is loaded is what was sent.
    assert schema.load(payload) == payload


@pytest.mark.parametrize("route", ROUTES)
def test_minimal_bodies_are_valid(route: str) -> None:
    assert errors_for(route) == {}


# --- required fields -----------------------------------------------------------------------


@pytest.mark.parametrize(("route", "field"), [
    ("completion", "prompt"),
    ("v1/completions", "prompt"),
    ("v1/chat/completions", "messages"),
    ("infill", "input_prefix"),
    ("embedding", "content"),
    ("v1/embeddings", "input"),
    ("tokenize", "content"),
    ("detokenize", "tokens"),
])
def test_required_field(route: str, field: str) -> None:
    schema, _ = ROUTES[route]
    errors = schema.validate({"temperature": 0.5, "model": "m"} if route in SAMPLING_ROUTES
                             else {"model": "m"})
    assert validation_message(errors) == f"Invalid parameter: {field} is required"


@pytest.mark.parametrize(("route", "field", "rule"), [
    ("completion", "prompt", "must not be null"),
    ("v1/completions", "prompt", "must not be null"),
    ("v1/chat/completions", "messages", "must not be null"),
    ("infill", "input_prefix", "must not be null"),
    ("v1/embeddings", "input", "must not be null"),
    ("tokenize", "content", "must not be null"),
    ("detokenize", "tokens", "must not be null"),
    ("embedding", "content", "is required"),
])
def test_required_field_must_not_be_null(route: str, field: str, rule: str) -> None:
    assert message_for(route, **{field: None}) == f"Invalid parameter: {field} {rule}"


# --- sampling parameters: types and ranges -------------------------------------------------


@pytest.mark.parametrize("route", SAMPLING_ROUTES)
@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 0),
    ("temperature", 0.0),
    ("temperature", 0.7),
    ("temperature", 2),
    ("temperature", 2.0),
    ("top_p", 0),
    ("top_p", 0.95),
    ("top_p", 1),
    ("top_k", 0),
    ("top_k", 40),
    ("min_p", 0.05),
    ("n_predict", -1),
    ("n_predict", 0),
    ("n_predict", 512),
    ("max_tokens", -1),
    ("max_tokens", 300),
    ("repeat_penalty", 1.1),
    ("repeat_last_n", 64),
    ("penalize_nl", True),
    ("seed", -1),
    ("seed", 1234567890),
    ("stop", "\n"),
    ("stop", ["\n\n", "def "]),
    ("stop", []),
    ("stream", True),
    ("stream", False),
    ("grammar", ""),
    ("model", "llama-3.1-8b-instruct-q4_k_m.gguf"),
])
def test_valid_sampling_values(route: str, field: str, value: Any) -> None:
    assert errors_for(route, **{field: value}) == {}


NUMBER_0_2 = "must be a number between 0.0 and 2.0"
NUMBER_0_1 = "must be a number between 0.0 and 1.0"


@pytest.mark.parametrize("route", SAMPLING_ROUTES)
@pytest.mark.parametrize(("field", "value", "rule"), [
    ("temperature", -0.1, NUMBER_0_2),
    ("temperature", 2.01, NUMBER_0_2),
    ("temperature", 100, NUMBER_0_2),
    ("temperature", "0.7", NUMBER_0_2),
    ("temperature", True, NUMBER_0_2),
    ("temperature", [0.7], NUMBER_0_2),
    ("temperature", math.nan, NUMBER_0_2),
    ("top_p", -0.01, NUMBER_0_1),
    ("top_p", 1.5, NUMBER_0_1),
    ("top_p", False, NUMBER_0_1),
    ("top_p", "0.9", NUMBER_0_1),
    ("min_p", 2, NUMBER_0_1),
    ("top_k", -1, "must be an integer >= 0"),
    ("top_k", 40.0, "must be an integer >= 0"),
    ("top_k", "40", "must be an integer >= 0"),
    ("top_k", True, "must be an integer >= 0"),
    ("n_predict", -2, "must be an integer >= -1"),
    ("n_predict", 1.5, "must be an integer >= -1"),
    ("n_predict", "200", "must be an integer >= -1"),
    ("n_predict", False, "must be an integer >= -1"),
    ("max_tokens", -2, "must be an integer >= -1"),
    ("max_tokens", 200.0, "must be an integer >= -1"),
    ("max_tokens", True, "must be an integer >= -1"),
    ("seed", 1.5, "must be an integer"),
    ("seed", True, "must be an integer"),
    ("repeat_penalty", -1, "must be a number >= 0"),
    ("stop", 5, "must be a string or a list of strings"),
    ("stop", ["\n", 1], "must be a string or a list of strings"),
    ("stop", [["\n"]], "must be a string or a list of strings"),
    ("stop", {"word": "\n"}, "must be a string or a list of strings"),
    ("stream", "true", "must be a boolean"),
    ("stream", "false", "must be a boolean"),
    ("stream", 1, "must be a boolean"),
    ("stream", 0, "must be a boolean"),
    ("penalize_nl", "yes", "must be a boolean"),
    ("grammar", 5, "must be a string"),
    ("model", 5, "must be a string"),
])
def test_invalid_sampling_values(route: str, field: str, value: Any, rule: str) -> None:
    errors = errors_for(route, **{field: value})
    assert list(errors) == [field]
    assert validation_message(errors) == f"Invalid parameter: {field} {rule}"


def test_temperature_message_matches_the_spec_example() -> None:
    # Spec: "Invalid parameter: temperature must be between 0.0 and 2.0".
    message = message_for("v1/chat/completions", temperature=2.5)
    assert message.startswith("Invalid parameter: temperature must be")
    assert "between 0.0 and 2.0" in message


def test_nan_from_a_json_body_is_rejected() -> None:
    payload = json.loads('{"prompt": "x", "temperature": NaN}')
    errors = CompletionSchema().validate(payload)
    assert "0.0 and 2.0" in validation_message(errors)


# --- optional fields: null is accepted, unknown fields pass --------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_null_is_accepted_for_every_optional_field(route: str) -> None:
    schema, minimal = ROUTES[route]
    optional = [name for name, f in schema.fields.items()
                if not f.required and name not in minimal]
    assert optional or route == "detokenize"
    assert errors_for(route, **dict.fromkeys(optional)) == {}


LLAMACPP_EXTRAS: dict[str, Any] = {
    "n_probs": 5,
    "grammar": 'root ::= "yes" | "no"',
    "json_schema": {"type": "object", "properties": {"name": {"type": "string"}}},
    "logit_bias": [[15043, 1.0], [" Hello", False]],
    "cache_prompt": True,
    "id_slot": 0,
    "x_made_up_field": {"nested": [1, "two", None]},
}


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_and_llamacpp_specific_fields_pass_untouched(route: str) -> None:
    schema, minimal = ROUTES[route]
    payload = {**minimal, **LLAMACPP_EXTRAS}
    assert schema.validate(payload) == {}
    assert schema.load(payload) == payload


@pytest.mark.parametrize("route", ROUTES)
def test_openai_logit_bias_and_other_unknown_fields_pass(route: str) -> None:
    extras = {"logit_bias": {"15043": -100}, "user": "u-1", "response_format": {"type": "text"},
              "samplers": ["top_k", "temperature"], "dry_multiplier": 0.8}
    assert errors_for(route, **extras) == {}


# --- prompts (/completion, /v1/completions, /tokenize, /embedding, /v1/embeddings) ---------

PROMPT_FIELDS = [("completion", "prompt"), ("v1/completions", "prompt"),
                 ("tokenize", "content"), ("embedding", "content"), ("embedding", "input"),
                 ("v1/embeddings", "input")]
VALID_PROMPTS = [
    "The future of AI is",
    "",
    [12, 34, 56],
    ["first prompt", "second prompt"],
    [12, " and text ", 34],
    [[12, 34, 56], [78, 90]],
    [[12, "mixed"], "text", 99],
    {"prompt_string": "Describe this image: <__media__>", "multimodal_data": ["aGVsbG8="]},
    [{"prompt_string": "Describe <__media__>", "multimodal_data": ["aGVsbG8="]}, "plain"],
]
INVALID_PROMPTS = [5, 1.5, True, [1.5], [True], [None], [[[1]]], [["a", None]], [[1.0]]]


@pytest.mark.parametrize(("route", "field"), PROMPT_FIELDS)
@pytest.mark.parametrize("prompt", VALID_PROMPTS)
def test_valid_prompt_forms(route: str, field: str, prompt: Any) -> None:
    assert errors_for(route, **{field: prompt}) == {}


@pytest.mark.parametrize(("route", "field"), PROMPT_FIELDS)
@pytest.mark.parametrize("prompt", INVALID_PROMPTS)
def test_invalid_prompt_forms(route: str, field: str, prompt: Any) -> None:
    message = message_for(route, **{field: prompt})
    assert message == (f"Invalid parameter: {field} must be a string, a list of tokens or "
                       "strings, or an object")


# --- /v1/chat/completions messages ---------------------------------------------------------


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                  {"type": "image_url", "image_url": {"url": "data:..."}}]}],
    [{"role": "assistant", "content": None,
      "tool_calls": [{"id": "1", "type": "function",
                      "function": {"name": "f", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "1", "content": "42"}],
    [{"role": "user", "content": "Hi", "name": "alice", "x_extra": 1}],
])
def test_valid_messages(messages: list[dict[str, Any]]) -> None:
    assert errors_for("v1/chat/completions", messages=messages) == {}


@pytest.mark.parametrize(("messages", "message"), [
    ([], "messages must be a non-empty list"),
    ("Hello", "messages must be a non-empty list of objects"),
    ({"role": "user", "content": "Hi"}, "messages must be a non-empty list of objects"),
    (["Hello"], "messages[0] must be an object"),
    ([None], "messages[0] must not be null"),
    ([{}], "messages[0].role is required"),
    ([{"content": "Hi"}], "messages[0].role is required"),
    ([{"role": None, "content": "Hi"}], "messages[0].role must not be null"),
    ([{"role": 5, "content": "Hi"}], "messages[0].role must be a string"),
    ([{"role": "user", "content": "Hi"}, {"content": "again"}], "messages[1].role is required"),
    ([{"role": "user", "content": "Hi"}, ["user", "Hi"]], "messages[1] must be an object"),
])
def test_invalid_messages(messages: Any, message: str) -> None:
    assert message_for("v1/chat/completions", messages=messages) == f"Invalid parameter: {message}"


# --- route-specific fields -----------------------------------------------------------------


@pytest.mark.parametrize(("route", "changes", "message"), [
    ("infill", {"input_prefix": 5}, "input_prefix must be a string"),
    ("infill", {"input_prefix": ["def f():"]}, "input_prefix must be a string"),
    ("infill", {"input_suffix": 5}, "input_suffix must be a string"),
    ("infill", {"input_extra": {"filename": "a.py"}}, "input_extra must be a list of objects"),
    ("infill", {"input_extra": ["a.py"]}, "input_extra must be a list of objects"),
    ("infill", {"prompt": [1, 2]}, "prompt must be a string"),
    ("tokenize", {"add_special": "true"}, "add_special must be a boolean"),
    ("tokenize", {"with_pieces": 1}, "with_pieces must be a boolean"),
    ("tokenize", {"parse_special": "false"}, "parse_special must be a boolean"),
    ("detokenize", {"tokens": "9906 11"}, "tokens must be a list of integer token ids"),
    ("detokenize", {"tokens": [9906, "11"]}, "tokens must be a list of integer token ids"),
    ("detokenize", {"tokens": [9906, 11.0]}, "tokens must be a list of integer token ids"),
    ("detokenize", {"tokens": [True, False]}, "tokens must be a list of integer token ids"),
    ("detokenize", {"tokens": [[9906]]}, "tokens must be a list of integer token ids"),
    ("detokenize", {"tokens": {"0": 9906}}, "tokens must be a list of integer token ids"),
    ("v1/embeddings", {"encoding_format": "hex"}, 'encoding_format must be "float" or "base64"'),
    ("v1/embeddings", {"encoding_format": 1}, 'encoding_format must be "float" or "base64"'),
    ("v1/embeddings", {"model": ["a"]}, "model must be a string"),
    ("embedding", {"model": 5}, "model must be a string"),
])
def test_invalid_route_specific_fields(route: str, changes: dict[str, Any], message: str) -> None:
    assert message_for(route, **changes) == f"Invalid parameter: {message}"


@pytest.mark.parametrize(("route", "changes"), [
    ("infill", {"input_suffix": "\n    return result",
                "input_extra": [{"filename": "utils.py", "text": "def helper(): ..."}],
                "prompt": "", "stop": ["\n\n"]}),
    ("infill", {"input_prefix": ""}),
    ("tokenize", {"add_special": False, "with_pieces": True, "parse_special": True}),
    ("detokenize", {"tokens": []}),
    ("v1/embeddings", {"encoding_format": "base64"}),
    ("v1/embeddings", {"input": [[9906, 11], [1917]]}),
])
def test_valid_route_specific_fields(route: str, changes: dict[str, Any]) -> None:
    assert errors_for(route, **changes) == {}


@pytest.mark.parametrize("payload", [
    {"content": "Hello"},
    {"input": "Hello"},
    {"input": ["a", "b"]},
    {"content": None, "input": "Hello"},
    {"content": "Hello", "input": None},
])
def test_native_embedding_takes_content_or_input(payload: dict[str, Any]) -> None:
    assert EmbeddingSchema().validate(payload) == {}


@pytest.mark.parametrize("payload", [{}, {"model": "m"}, {"content": None, "input": None}])
def test_native_embedding_needs_content_or_input(payload: dict[str, Any]) -> None:
    errors = EmbeddingSchema().validate(payload)
    assert validation_message(errors) == "Invalid parameter: content is required"


# --- validation_message --------------------------------------------------------------------


@pytest.mark.parametrize(("errors", "message"), [
    ({"temperature": ["must be a number between 0.0 and 2.0"]},
     "Invalid parameter: temperature must be a number between 0.0 and 2.0"),
    # Several fields: the first by name, so the message does not depend on field order.
    ({"top_p": ["rule p"], "n_predict": ["rule n"], "temperature": ["rule t"]},
     "Invalid parameter: n_predict rule n"),
    ({"stop": ["first rule", "second rule"]}, "Invalid parameter: stop first rule"),
    ({"messages": {1: {"role": ["is required"]}}},
     "Invalid parameter: messages[1].role is required"),
    ({"messages": {0: {"_schema": ["must be an object"]}}},
     "Invalid parameter: messages[0] must be an object"),
    ({"a": {"b": {"c": ["bad"]}}}, "Invalid parameter: a.b.c bad"),
])
def test_validation_message(errors: dict[str, Any], message: str) -> None:
    assert validation_message(errors) == message


def test_validation_message_is_stable_whatever_the_field_order() -> None:
    payload = {"prompt": "x", "top_p": 3, "temperature": 9, "n_predict": -5}
    reordered = dict(reversed(list(payload.items())))
    schema = CompletionSchema()
    first = validation_message(schema.validate(payload))
    assert first == validation_message(schema.validate(reordered))
    assert first == "Invalid parameter: n_predict must be an integer >= -1"


@pytest.mark.parametrize("payload", [
    {"prompt": "x"},
    {"prompt": "x", "temperature": 3},
    {"prompt": "x", "temperature": 0.5, "top_k": -1, "stop": [1], "unknown": {"a": 1}},
    {"n_predict": 4},
    {"messages": [{"content": "no role"}], "stream": "yes"},
    {"messages": []},
    {"content": None, "input": None},
    {"tokens": ["a"]},
    {},
])
@pytest.mark.parametrize("schema_class", [CompletionSchema, ChatCompletionSchema,
                                          EmbeddingSchema, DetokenizeSchema, InfillSchema])
def test_check_finds_exactly_what_full_validation_finds(schema_class: type,
                                                        payload: dict[str, Any]) -> None:
    schema = schema_class()
    assert check(schema, payload) == schema.validate(payload)


@pytest.mark.parametrize(("route", "changes", "message"), [
    ("v1/responses", {"input": None}, "input must not be null"),
    ("v1/responses", {"input": 5}, "input must be a string or a list of input items"),
    ("v1/responses", {"input": ["x"]}, "input must be a string or a list of input items"),
    ("v1/responses", {"max_output_tokens": 0}, "max_output_tokens must be an integer >= 1"),
    ("v1/messages", {"messages": []}, "messages must be a non-empty list"),
    ("v1/messages", {"messages": [{"content": "hi"}]}, "messages[0].role is required"),
    ("v1/messages", {"max_tokens": "8"}, "max_tokens must be an integer >= 1"),
    ("v1/messages/count_tokens", {"messages": "hi"},
     "messages must be a non-empty list of objects"),
    ("v1/rerank", {"query": 5}, "query must be a string"),
    ("v1/rerank", {"documents": "a"}, "documents must be a list of documents"),
    ("v1/rerank", {"top_n": 0}, "top_n must be an integer >= 1"),
])
def test_newer_routes_check_their_fields(route: str, changes: dict[str, Any], message: str) -> None:
    assert message_for(route, **changes) == f"Invalid parameter: {message}"


@pytest.mark.parametrize(("route", "field"), [
    ("v1/responses", "input"), ("v1/messages", "messages"),
    ("v1/messages/count_tokens", "messages"), ("v1/rerank", "query"), ("v1/rerank", "documents"),
])
def test_newer_routes_need_their_fields(route: str, field: str) -> None:
    schema, minimal = ROUTES[route]
    body = {k: v for k, v in minimal.items() if k != field}
    assert validation_message(schema.validate(body)) == f"Invalid parameter: {field} is required"
