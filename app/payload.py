"""A request body as the proxy accepts it: one JSON object within the limits, or a 400
naming what is wrong. No Flask.

llama.cpp's own parser refuses what Python's would let through (``NaN``, ``Infinity``, a
number that overflows to infinity, a lone surrogate), so those are refused here, where the
client gets a clear answer, rather than relayed to fail upstream. Nesting and list lengths
are bounded (``server.request_limits``) so that a hostile body costs the worker no more
than an honest one of the same size.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

from .config import RequestLimits
from .errors import InvalidRequest

# The lists a body may carry many items in, bounded by ``max_list_items``.
LONG_LISTS = ("messages", "prompt", "input", "tokens", "content")
# A \uD800-\uDFFF escape: only then can a decoded string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large (it overflows to infinity)")
    return value


# Built once: json.loads with hooks would build a decoder for every request.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)


def parse(body: bytes, limits: RequestLimits) -> dict[str, Any]:
    """The JSON object in the body, whatever the Content-Type (as llama.cpp does)."""
    if not body.strip():
        raise InvalidRequest("Invalid request: the body must be a JSON object")
    try:
        text = body.decode("utf-8")
        # A UTF-8 byte-order mark is skipped, as llama.cpp's parser and json.loads do.
        payload = _DECODER.decode(text[1:] if text.startswith("\ufeff") else text)
    except RecursionError as exc:
        raise _too_deep(limits) from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"Invalid JSON body: the body is not UTF-8 ({exc.reason} at byte "
                             f"{exc.start})") from exc
    except ValueError as exc:
        raise InvalidRequest(f"Invalid JSON body: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("Invalid request: the body must be a JSON object, not "
                             f"{type(payload).__name__ if payload is not None else 'null'}")
    # Each bracket opens at most one level: a body with fewer than the limit cannot be
    # deeper, and most bodies are checked by two byte counts.
    if body.count(b"[") + body.count(b"{") > limits.max_json_depth \
            and _depth(payload) > limits.max_json_depth:
        raise _too_deep(limits)
    for key in LONG_LISTS:
        value = payload.get(key)
        if isinstance(value, list) and len(value) > limits.max_list_items:
            raise InvalidRequest(
                f"Invalid request: '{key}' has {len(value)} items; at most "
                f"{limits.max_list_items} are accepted (server.request_limits.max_list_items)",
                code="too_many_items")
    if _SURROGATE_ESCAPE.search(body):
        where = _lone_surrogate(payload)
        if where is not None:
            raise InvalidRequest(f"Invalid request: '{where}' holds a lone UTF-16 surrogate "
                                 "(\\ud800-\\udfff without its pair), which is not text")
    return payload


def _too_deep(limits: RequestLimits) -> InvalidRequest:
    return InvalidRequest(f"Invalid request: the JSON is nested more than "
                          f"{limits.max_json_depth} levels deep "
                          "(server.request_limits.max_json_depth)", code="too_deep")


def _depth(document: Any) -> int:
    """How deeply lists and objects nest (iteratively: no recursion to run out of)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in value)
    return deepest


def _strings(document: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a document (keys too) with where it is."""
    stack: list[tuple[Any, str]] = [(document, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            yield where, value
        elif isinstance(value, dict):
            for key, item in value.items():
                here = f"{where}.{key}" if where else str(key)
                yield here, key
                stack.append((item, here))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


def _lone_surrogate(document: Any) -> str | None:
    """Where the first string holding a lone surrogate is, or None."""
    for where, text in _strings(document):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return (where or "(the body)").encode("utf-8", "backslashreplace").decode()
    return None
