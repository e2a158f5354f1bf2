"""A request body as the proxy accepts it: one JSON object within the limits, or a 400
naming what is wrong. No Flask.

llama.cpp's own parser refuses what Python's would let through (``NaN``, ``Infinity``, a
number that overflows to infinity, a lone surrogate), so those are refused here, where the
client gets a clear answer, rather than relayed to fail upstream. Nesting, items per list
and values in all are bounded (``server.request_limits``) so that a hostile body costs the
worker no more than an honest one of the same size.

A body of up to ``SMALL`` bytes is parsed in one call of Python's C parser (a few ms at
worst). A larger one is walked: containers in Python, every value that fits in a piece of
the text by the C parser, long strings piece by piece, with ``pause`` called every
``PAUSE_EVERY`` seconds, so that a 100 MiB body never holds the worker (and the streams it
relays) for more than a few milliseconds at a time, and the limits stop it as soon as one
is passed.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator
from json.decoder import JSONDecodeError
from typing import Any

from .config import RequestLimits
from .errors import InvalidRequest

SMALL = 64 * 1024          # bytes parsed in one C call
PIECES = (256, 16 * 1024)  # characters tried for one value before walking into it
STRING_PIECE = 1 << 20     # characters of a long string decoded at once
PAUSE_EVERY = 0.002        # seconds of parsing between pauses
# A \uD800-\uDFFF escape: only then can a decoded string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SPACE = re.compile(r"[ \t\n\r]*").match


def _skip(text: str, at: int) -> int:
    """Where the next non-blank character after ``at`` is."""
    found = _SPACE(text, at)
    return found.end() if found is not None else at


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large (it overflows to infinity)")
    return value


# Built once: json.loads with hooks would build a decoder for every request.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)
# The C scanner under json.loads (not in the typing stubs): a value at an index, and a
# string's rest after its opening quote, each with where it ends.
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def parse(body: bytes, limits: RequestLimits,
          pause: Callable[[], None] | None = None) -> dict[str, Any]:
    """The JSON object in the body, whatever the Content-Type (as llama.cpp does)."""
    if not body.strip():
        raise InvalidRequest("Invalid request: the body must be a JSON object")
    try:
        text = body.decode("utf-8")
        # A UTF-8 byte-order mark is skipped, as llama.cpp's parser and json.loads do.
        text = text[1:] if text.startswith("\ufeff") else text
        if len(body) <= SMALL:
            payload = _DECODER.decode(text)
            _check_small(payload, text, limits)
        else:
            payload = _Walk(text, limits, pause).document()
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
    return payload


def _too_deep(limits: RequestLimits) -> InvalidRequest:
    return InvalidRequest(f"Invalid request: the JSON is nested more than "
                          f"{limits.max_json_depth} levels deep "
                          "(server.request_limits.max_json_depth)", code="too_deep")


def _too_many_items(where: str, count: str, limits: RequestLimits) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid request: '{where or '(the body)'}' has {count} items; at most "
        f"{limits.max_list_items} are accepted (server.request_limits.max_list_items)",
        code="too_many_items")


def _too_many_values(limits: RequestLimits) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid request: the body holds more than {limits.max_json_values} JSON values "
        "(server.request_limits.max_json_values)", code="too_many_values")


def _lone_surrogate_error(where: str) -> InvalidRequest:
    shown = (where or "(the body)").encode("utf-8", "backslashreplace").decode()
    return InvalidRequest(f"Invalid request: '{shown}' holds a lone UTF-16 surrogate "
                          "(\\ud800-\\udfff without its pair), which is not text")


class _Walk:
    """One body's parse: where it is, how many values it has seen, when it last paused."""

    def __init__(self, text: str, limits: RequestLimits,
                 pause: Callable[[], None] | None) -> None:
        self.text = text
        self.limits = limits
        self.pause = pause
        self.values = 0
        self.since = time.perf_counter()

    def tick(self) -> None:
        if self.pause is not None and time.perf_counter() - self.since > PAUSE_EVERY:
            self.pause()
            self.since = time.perf_counter()

    def document(self) -> Any:
        text = self.text
        start = _skip(text, 0)
        value, end = self.value(start, 1, "")
        end = _skip(text, end)
        if end != len(text):
            raise JSONDecodeError("Extra data", text, end)
        return value

    def value(self, at: int, depth: int, where: str) -> tuple[Any, int]:
        """The value starting at ``at`` (checked against the limits) and where it ends."""
        text = self.text
        self.tick()
        for size in PIECES:
            piece = text[at:at + size]
            cut = len(piece) == size  # the value may go on past the piece
            try:
                value, end = _SCAN(piece, 0)
            except StopIteration:
                if cut:
                    continue
                raise JSONDecodeError("Expecting value", text, at) from None
            except JSONDecodeError as exc:
                if cut:
                    continue
                raise JSONDecodeError(exc.msg, text, at + exc.pos) from None
            if cut and type(value) in (int, float) and not piece[end:].strip("0123456789eE+-."):
                continue  # a number may go on past the piece ("1.5e" of "1.5e309")
            self.checked(value, depth, where, piece, end)
            return value, at + end
        # Longer than the largest piece: walk into it.
        first = text[at]
        if first == "{":
            return self.object(at, depth, where)
        if first == "[":
            return self.array(at, depth, where)
        self.count(1)
        if first == '"':
            return self.string(at, where)
        try:
            return _SCAN(text, at)  # type: ignore[no-any-return]  # a number that long
        except StopIteration:
            raise JSONDecodeError("Expecting value", text, at) from None

    def checked(self, value: Any, depth: int, where: str, piece: str, end: int) -> None:
        """Count a value the C parser made, refusing it if it passes a limit."""
        self.count(_shape(value, depth, where, self.limits)
                   if isinstance(value, (dict, list)) else 1)
        if _SURROGATE_ESCAPE.search(piece, 0, end):
            found = _lone_surrogate(value, where)
            if found is not None:
                raise _lone_surrogate_error(found)

    def count(self, values: int) -> None:
        self.values += values
        if self.values > self.limits.max_json_values:
            raise _too_many_values(self.limits)

    def object(self, at: int, depth: int, where: str) -> tuple[dict[str, Any], int]:
        text, members = self.text, {}
        at, done = self.opened(at, depth, "}")
        while not done:
            if not text.startswith('"', at):
                raise JSONDecodeError("Expecting property name enclosed in double quotes",
                                      text, at)
            key, at = self.key(at, where)  # keys are not counted as values
            at = _skip(text, at)
            if not text.startswith(":", at):
                raise JSONDecodeError("Expecting ':' delimiter", text, at)
            members[key], at = self.value(_skip(text, at + 1), depth + 1,
                                          f"{where}.{key}" if where else key)
            self.at_most(len(members), where)
            at, done = self.next_item(at, "}")
        return members, at

    def array(self, at: int, depth: int, where: str) -> tuple[list[Any], int]:
        items: list[Any] = []
        at, done = self.opened(at, depth, "]")
        while not done:
            value, at = self.value(at, depth + 1, f"{where}[{len(items)}]")
            items.append(value)
            self.at_most(len(items), where)
            at, done = self.next_item(at, "]")
        return items, at

    def opened(self, at: int, depth: int, close: str) -> tuple[int, bool]:
        """A list or object opened at ``at``: where its first item is (or after its end),
        and whether it is empty."""
        if depth > self.limits.max_json_depth:
            raise _too_deep(self.limits)
        self.count(1)
        at = _skip(self.text, at + 1)
        if self.text.startswith(close, at):
            return at + 1, True
        return at, False

    def next_item(self, at: int, close: str) -> tuple[int, bool]:
        """After an item: where the next one is (or after the end), and whether it ended."""
        text = self.text
        at = _skip(text, at)
        if text.startswith(",", at):
            return _skip(text, at + 1), False
        if text.startswith(close, at):
            return at + 1, True
        raise JSONDecodeError("Expecting ',' delimiter", text, at)

    def at_most(self, items: int, where: str) -> None:
        if items > self.limits.max_list_items:
            limit = self.limits.max_list_items
            raise _too_many_items(where, f"more than {limit}", self.limits)

    def key(self, at: int, where: str) -> tuple[str, int]:
        """An object's key and where it ends."""
        piece = self.text[at:at + PIECES[-1]]
        try:
            key, end = _scanstring(piece, 1)
        except JSONDecodeError as exc:
            if len(piece) < PIECES[-1]:
                raise JSONDecodeError(exc.msg, self.text, at + exc.pos) from None
            return self.string(at, where)
        if "\\u" in piece[:end] and _has_lone_surrogate(key):
            raise _lone_surrogate_error(f"{where}.{key}" if where else key)
        return key, at + end

    def string(self, at: int, where: str) -> tuple[str, int]:
        """A string longer than a piece, decoded a piece at a time."""
        text = self.text
        close = at + 1
        while True:  # the closing quote: the first one not escaped
            close = text.find('"', close)
            if close < 0:
                raise JSONDecodeError("Unterminated string starting at", text, at)
            if _backslashes_before(text, at + 1, close) % 2 == 0:
                break
            close += 1
            self.tick()
        parts: list[str] = []
        escaped: list[int] = []  # the parts whose text has a \\u escape
        start = at + 1
        while start < close:
            stop = min(start + STRING_PIECE, close)
            if stop < close:
                stop = _escape_boundary(text, start, stop)
            raw = text[start:stop]
            try:
                part, _ = _scanstring('"' + raw + '"', 1)
            except JSONDecodeError as exc:
                raise JSONDecodeError(exc.msg, text, start + exc.pos - 1) from None
            if parts and part and "\udc00" <= part[0] <= "\udfff" \
                    and "\ud800" <= parts[-1][-1:] <= "\udbff":
                # A surrogate pair split between two pieces is one character.
                high, low = parts[-1][-1], part[0]
                parts[-1] = parts[-1][:-1] + chr(
                    0x10000 + ((ord(high) - 0xD800) << 10) + (ord(low) - 0xDC00))
                part = part[1:]
            if "\\u" in raw:
                escaped.append(len(parts))
            parts.append(part)
            start = stop
            self.tick()
        for index in escaped:
            if _has_lone_surrogate(parts[index]):
                raise _lone_surrogate_error(where)
            self.tick()
        return "".join(parts), close + 1


def _check_small(payload: Any, text: str, limits: RequestLimits) -> None:
    """The limits on a body parsed in one go. Each bracket opens one level, and every value
    but the first follows a comma or an opening bracket: most bodies are cleared by three
    counts of characters."""
    brackets = text.count("[") + text.count("{")
    bound = text.count(",") + brackets + 1
    if (brackets > limits.max_json_depth or bound > limits.max_list_items
            or bound > limits.max_json_values) and isinstance(payload, (dict, list)) \
            and _shape(payload, 1, "", limits) > limits.max_json_values:
        raise _too_many_values(limits)
    if _SURROGATE_ESCAPE.search(text):
        found = _lone_surrogate(payload)
        if found is not None:
            raise _lone_surrogate_error(found)


def _backslashes_before(text: str, start: int, at: int) -> int:
    """How many backslashes come right before ``at`` (not looking before ``start``)."""
    window = text[max(start, at - 64):at]
    run = len(window) - len(window.rstrip("\\"))
    if run == len(window) and at - 64 > start:  # the run may go on
        window = text[start:at]
        run = len(window) - len(window.rstrip("\\"))
    return run


def _escape_boundary(text: str, start: int, stop: int) -> int:
    """``stop``, or an earlier place, so that no escape is cut at it (``start`` is a place
    between escapes)."""
    last = text.rfind("\\", max(start, stop - 5), stop)
    if last < 0 or _backslashes_before(text, start, last + 1) % 2 == 0:
        return stop  # no backslash near, or it ends a \\ pair
    needs = 6 if text.startswith("u", last + 1) else 2
    return last if last + needs > stop else stop


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shape(document: Any, depth: int, where: str, limits: RequestLimits) -> int:
    """How many values a list or object holds (itself included), refusing it if it nests
    deeper than the limit or a list or object in it has too many items (iteratively: no
    recursion to run out of)."""
    values = 1
    stack: list[tuple[Any, int, str]] = [(document, depth, where)]
    while stack:
        value, level, here = stack.pop()
        if level > limits.max_json_depth:
            raise _too_deep(limits)
        if len(value) > limits.max_list_items:
            raise _too_many_items(here, str(len(value)), limits)
        values += len(value)
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, (dict, list)):
                    stack.append((item, level + 1, f"{here}.{key}" if here else key))
        else:
            for index, item in enumerate(value):
                if isinstance(item, (dict, list)):
                    stack.append((item, level + 1, f"{here}[{index}]"))
    return values


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


def _lone_surrogate(document: Any, path: str = "") -> str | None:
    """Where the first string holding a lone surrogate is, or None."""
    for where, text in _strings(document, path):
        if _has_lone_surrogate(text):
            return where
    return None
