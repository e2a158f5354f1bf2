"""Request schemas for llama.cpp's native and OpenAI payloads.

Schemas check the fields the spec documents and nothing more: unknown fields are
allowed (llama.cpp accepts far more than any schema lists) and the proxy forwards the
client's original bytes, so validation never changes what llama.cpp receives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, validates_schema

_REQUIRED = {"required": "is required", "null": "must not be null"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_token_or_text(v: Any) -> bool:
    return _is_int(v) or isinstance(v, str)


def _is_prompt_item(v: Any) -> bool:
    return (_is_token_or_text(v) or isinstance(v, dict)
            or (isinstance(v, list) and all(_is_token_or_text(t) for t in v)))


def _is_prompt(v: Any) -> bool:
    """llama.cpp prompts: text, tokens, mixed lists, lists of those, or multimodal objects."""
    if isinstance(v, list):
        return all(_is_prompt_item(i) for i in v)
    return isinstance(v, (str, dict))


def _is_str_or_str_list(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))


class Checked(fields.Field[Any]):
    """A field whose value must satisfy a predicate; no coercion, the value is kept as sent."""

    def __init__(self, check: Callable[[Any], bool], rule: str, **kwargs: Any) -> None:
        kwargs.setdefault("allow_none", not kwargs.get("required", False))
        super().__init__(error_messages=dict(_REQUIRED), **kwargs)
        self.check = check
        self.rule = rule

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> Any:
        if not self.check(value):
            raise ValidationError(self.rule)
        return value


def Number(lo: float | None = None, hi: float | None = None, **kw: Any) -> Checked:
    """A JSON number (not a boolean, not a string), optionally within [lo, hi]."""
    if lo is not None and hi is not None:
        rule = f"must be a number between {lo:.1f} and {hi:.1f}"
    elif lo is not None:
        rule = f"must be a number >= {lo:g}"
    else:
        rule = "must be a number"
    return Checked(lambda v: _is_number(v) and (lo is None or v >= lo) and (hi is None or v <= hi),
                   rule, **kw)


def Int(lo: int | None = None, **kw: Any) -> Checked:
    """A JSON integer, optionally >= lo."""
    rule = "must be an integer" if lo is None else f"must be an integer >= {lo}"
    return Checked(lambda v: _is_int(v) and (lo is None or v >= lo), rule, **kw)


def Bool(**kw: Any) -> Checked:
    """A JSON boolean (true or false, not 0/1 or a string)."""
    return Checked(lambda v: isinstance(v, bool), "must be a boolean", **kw)


def Str(**kw: Any) -> Checked:
    """A JSON string."""
    return Checked(lambda v: isinstance(v, str), "must be a string", **kw)


def StrOrList(**kw: Any) -> Checked:
    """A string or a list of strings."""
    return Checked(_is_str_or_str_list, "must be a string or a list of strings", **kw)


def Prompt(**kw: Any) -> Checked:
    """Any prompt form llama.cpp accepts."""
    return Checked(_is_prompt, "must be a string, a list of tokens or strings, or an object",
                   **kw)


class Payload(Schema):
    """Base: unknown fields pass, and the body's values are checked, never converted."""

    class Meta:
        unknown = INCLUDE


class Sampling(Payload):
    """Generation fields shared by the native and OpenAI routes."""

    model = Str()
    temperature = Number(0.0, 2.0)
    top_p = Number(0.0, 1.0)
    top_k = Int(0)
    min_p = Number(0.0, 1.0)
    typical_p = Number(0.0, 1.0)
    n_predict = Int(-1)
    max_tokens = Int(-1)
    repeat_penalty = Number(0.0)
    repeat_last_n = Int(-1)
    presence_penalty = Number(-2.0, 2.0)
    frequency_penalty = Number(-2.0, 2.0)
    penalize_nl = Bool()
    stop = StrOrList()
    stream = Bool()
    seed = Int()
    grammar = Str()
    n_probs = Int(0)
    cache_prompt = Bool()
    id_slot = Int(-1)
    json_schema = Checked(lambda v: isinstance(v, (dict, bool)), "must be an object")


class CompletionSchema(Sampling):
    """POST /completion (native)."""

    prompt = Prompt(required=True)


class OpenAICompletionSchema(Sampling):
    """POST /v1/completions."""

    prompt = Prompt(required=True)


class Messages(fields.Field[Any]):
    """A non-empty list of message objects, each with a string ``role``; errors keyed by
    index, as a nested schema reports them. A plain loop: a list of 262144 messages is
    checked in milliseconds, where a nested schema takes seconds."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(error_messages=dict(_REQUIRED), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: Any) -> Any:
        if not isinstance(value, list):
            raise ValidationError("must be a non-empty list of objects")
        if not value:
            raise ValidationError("must be a non-empty list")
        for index, message in enumerate(value):
            if type(message) is dict and type(message.get("role")) is str:
                continue
            if message is None:
                problem: Any = ["must not be null"]
            elif not isinstance(message, dict):
                problem = ["must be an object"]
            elif "role" not in message:
                problem = {"role": ["is required"]}
            elif message["role"] is None:
                problem = {"role": ["must not be null"]}
            elif not isinstance(message["role"], str):
                problem = {"role": ["must be a string"]}
            else:
                continue  # a dict or str subclass: what json never makes, but valid
            raise ValidationError({index: problem})
        return value


class ChatCompletionSchema(Sampling):
    """POST /v1/chat/completions."""

    messages = Messages(required=True)


def _is_responses_input(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(i, dict) for i in v))


class ResponsesSchema(Sampling):
    """POST /v1/responses (the OpenAI Responses API, llama.cpp's own)."""

    input = Checked(_is_responses_input, "must be a string or a list of input items",
                    required=True)
    instructions = Str()
    max_output_tokens = Int(1)


class MessagesSchema(Sampling):
    """POST /v1/messages (Anthropic Messages, llama.cpp's own)."""

    messages = Messages(required=True)
    max_tokens = Int(1)
    system = Checked(lambda v: isinstance(v, (str, list)), "must be a string or a list")


class CountTokensSchema(Payload):
    """POST /v1/messages/count_tokens."""

    model = Str()
    messages = Messages(required=True)


class RerankSchema(Payload):
    """POST /v1/rerank, /rerank, /reranking: a query and the documents to order."""

    model = Str()
    query = Str(required=True)
    documents = Checked(lambda v: isinstance(v, list) and all(isinstance(d, (str, dict))
                                                               for d in v),
                        "must be a list of documents", required=True)
    top_n = Int(1)


class InfillSchema(Sampling):
    """POST /infill."""

    input_prefix = Str(required=True)
    input_suffix = Str()
    input_extra = Checked(
        lambda v: isinstance(v, list) and all(isinstance(c, dict) for c in v),
        "must be a list of objects")
    prompt = Str()


class EmbeddingSchema(Payload):
    """POST /embedding (native): ``content`` (or OpenAI's ``input``)."""

    model = Str()
    content = Prompt()
    input = Prompt()

    @validates_schema
    def _needs_content(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if data.get("content") is None and data.get("input") is None:
            raise ValidationError("is required", "content")


class OpenAIEmbeddingSchema(Payload):
    """POST /v1/embeddings."""

    model = Str()
    input = Prompt(required=True)
    encoding_format = Checked(lambda v: v in ("float", "base64"),
                              'must be "float" or "base64"')


class TokenizeSchema(Payload):
    """POST /tokenize."""

    content = Prompt(required=True)
    add_special = Bool()
    with_pieces = Bool()
    parse_special = Bool()


class DetokenizeSchema(Payload):
    """POST /detokenize."""

    tokens = Checked(lambda v: isinstance(v, list) and all(_is_int(t) for t in v),
                     "must be a list of integer token ids", required=True)


def _first_error(messages: Any, path: str = "") -> tuple[str, str]:
    """The first (field path, rule) in marshmallow's nested error dict."""
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        if isinstance(key, int):
            label = f"{path}[{key}]"
        elif key == "_schema":
            label = path
        else:
            label = f"{path}.{key}" if path else str(key)
        return _first_error(value, label)
    if isinstance(messages, list) and messages:
        return _first_error(messages[0], path)
    return path, str(messages)


def validation_message(errors: Mapping[str, Any]) -> str:
    """Human text naming the field and the rule, as in the spec's 400 example."""
    fields_sorted = {k: errors[k] for k in sorted(errors, key=str)}
    path, rule = _first_error(fields_sorted)
    return f"Invalid parameter: {path} {rule}".rstrip()


@functools.lru_cache(maxsize=1024)
def _focused(schema_class: type[Schema], names: frozenset[str]) -> Schema:
    return schema_class(only=names)


def check(schema: Schema, payload: Mapping[str, Any]) -> dict[str, Any]:
    """``schema.validate(payload)``, checking only the fields the payload has (and the
    required ones): the same errors, without visiting the twenty-odd absent optional fields
    on every request. Schemas for each set of present fields are built once and cached."""
    declared = schema.fields
    names = frozenset(name for name in payload if name in declared) | _required(type(schema))
    return _focused(type(schema), names).validate(payload)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=64)
def _required(schema_class: type[Schema]) -> frozenset[str]:
    return frozenset(n for n, f in schema_class().fields.items() if f.required)
