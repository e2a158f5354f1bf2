"""Build llama.cpp's non-streamed answer from its SSE stream.

llama-server notices that a client left a non-streamed generation only when the generation
ends, so the slot stays busy; a streamed one is cancelled at its next write. The proxy
therefore sends non-streamed generation requests upstream as streams (``upstream_payload``)
and assembles the answer llama.cpp would have sent (``Assembler``): same fields, same values,
same field order, serialised the way llama.cpp (nlohmann::ordered_json) serialises them.

What the pinned llama-server streams, measured against its own non-streamed answers:
- native ``completion``/``infill``: partial events carry ``content`` pieces (and
  ``completion_probabilities`` per token); the final ``"stop": true`` event carries every
  other field of the answer, with ``content`` "", ``tokens`` [] and
  ``generation_settings.stream`` true.
- ``v1/completions``: text chunks, then a chunk with ``finish_reason``, ``usage`` and
  ``timings``, then ``[DONE]``.
- ``v1/chat/completions``: a role delta, content/reasoning/tool-call deltas, a chunk with
  ``finish_reason``, then ``usage`` and ``timings`` in a chunk with no choices (only when
  ``stream_options.include_usage`` is set), then ``[DONE]``.
- ``v1/messages`` (Anthropic): ``message_start`` carries the message with empty content
  and its input usage; each content block comes as ``content_block_start``, deltas
  (``text_delta``, ``input_json_delta``, ``thinking_delta``, ``signature_delta``) and
  ``content_block_stop``; ``message_delta`` has the stop reason and output tokens; then
  ``message_stop``.
- a failure after the headers: ``data: {"error": {...}}`` (older builds: a bare
  ``error: {...}`` field) and the stream ends; non-streamed, llama.cpp answers
  ``{"error": {...}}`` with the error's ``code`` as the HTTP status.
- a failure before the first token (bad parameter, prompt too long, infill on a model without
  FIM tokens) is a plain JSON answer, not SSE, and no business of this module.

Where the stream loses information the non-streamed answer has, ``refusal`` names the
request and the caller sends it upstream as it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROUTES: frozenset[str] = frozenset(
    {"completion", "infill", "v1/completions", "v1/chat/completions", "v1/messages"})
NATIVE_ROUTES: frozenset[str] = frozenset({"completion", "infill"})
OPENAI_ROUTES: frozenset[str] = frozenset({"v1/completions", "v1/chat/completions"})
CONTENT_TYPE = "application/json; charset=utf-8"  # what llama-server labels its answers

# What nlohmann::json writes in place of an incomplete UTF-8 sequence at the end of a string.
REPLACEMENT = "\ufffd"
_EOL = re.compile(rb"\r\n|\r|\n")


class IncompleteStream(Exception):
    """The stream ended (or broke) before its terminal event: there is no answer to give."""


def _several_prompts(prompt: Any) -> bool:
    """llama.cpp reads a list without numbers as several prompts (a list with a number is
    one prompt of tokens); several prompts get a JSON list back and interleaved streams."""
    return (isinstance(prompt, list) and len(prompt) > 1
            and not any(isinstance(p, (int, float)) and not isinstance(p, bool)
                        for p in prompt))


def _has_stop_words(stop: Any) -> bool:
    if isinstance(stop, str):
        return bool(stop)
    return isinstance(stop, list) and any(word for word in stop)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def refusal(route: str, payload: dict[str, Any]) -> str | None:
    """Why this request must not be assembled from a stream (None when it may)."""
    if route not in ROUTES:
        return "not a generation route"
    if payload.get("stream") is True:
        return "the client asked for a stream"
    if payload.get("n", 1) not in (None, 1) or payload.get("n_cmpl", 1) not in (None, 1):
        # Several choices come back interleaved; how llama.cpp merges them (a list on
        # native routes, one usage for all on OpenAI ones) differs between builds.
        return "several choices (n)"
    if route != "v1/chat/completions" and _several_prompts(payload.get("prompt")):
        return "several prompts"
    if _has_stop_words(payload.get("stop")) or _has_stop_words(payload.get("stop_sequences")):
        # Text that could begin a stop word is held back; when the generation then ends at
        # its token limit, the stream never sends that text but the answer has it. And
        # non-streamed, the stop word's tokens are cut from the probabilities.
        return "stop words"
    if route in NATIVE_ROUTES:
        if payload.get("response_fields"):
            # The stream's final event is filtered too: it loses "stop" and most figures.
            return "response_fields"
        if payload.get("return_tokens"):
            # Tokens that end inside a UTF-8 character are never streamed.
            return "return_tokens"
    if route == "v1/chat/completions" and (
            payload.get("logprobs") or _positive(payload.get("n_probs"))):
        # A token that adds no delta (the end-of-generation token, held-back text) loses
        # its log-probability in the stream.
        return "logprobs on chat"
    return None


def applies(route: str, payload: dict[str, Any]) -> bool:
    """True when this non-streamed generation request should go upstream as a stream and be
    assembled here."""
    return refusal(route, payload) is None


def upstream_payload(route: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The payload to send upstream: the client's, streamed, plus what the stream needs to
    carry every figure of the non-streamed answer."""
    out = dict(payload)
    out["stream"] = True
    if route in OPENAI_ROUTES:
        # Chat streams carry usage only when asked; harmless on completions.
        options = payload.get("stream_options")
        out["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                 "include_usage": True}
    if route == "v1/completions":
        # Each chunk then says how many tokens were generated so far, which tells when
        # the last tokens ended inside a UTF-8 character and were never streamed. The
        # OpenAI-shaped answer does not show this setting.
        out["timings_per_token"] = True
    return out


def dumps(document: Any) -> bytes:
    """JSON bytes as llama.cpp writes them: compact, UTF-8, keys in insertion order."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class Assembler:
    """Feed it the upstream SSE body, chunk by chunk as it arrives; ``result()`` is the
    non-streamed answer (HTTP status, JSON body)."""

    def __init__(self, route: str, payload: dict[str, Any]) -> None:
        if route not in ROUTES:
            raise ValueError(f"not a generation route: {route}")
        self.route = route
        self.payload = payload
        # SSE parsing
        self._line_start: list[bytes] = []  # the current line so far, across chunks
        self._after_cr = False              # last chunk ended in "\r": skip a leading "\n"
        self._data: list[str] = []
        self._error_field: list[str] = []
        # what the events said
        self._done = False
        self._error: dict[str, Any] | None = None
        self._broken: str | None = None
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._probs: list[Any] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self._role: str | None = None
        self._generated = 0                 # tokens generated as of the last partial event
        self._uncounted = False             # a partial event did not say how many
        self._blocks: dict[int, dict[str, Any]] = {}  # Anthropic content blocks by index
        self._json_parts: dict[int, list[str]] = {}   # a tool_use block's input, in pieces
        self._final: dict[str, Any] | None = None   # native stop event / OpenAI finish chunk
        self._usage: dict[str, Any] | None = None   # OpenAI chunk with usage (may be _final)

    @property
    def done(self) -> bool:
        """The terminal event was seen (the final event, ``[DONE]``, or an error event):
        nothing more needs reading."""
        return self._done

    @property
    def failed(self) -> bool:
        """The stream carried an error event; ``result()`` is llama.cpp's error answer."""
        return self._error is not None

    def feed(self, chunk: bytes) -> None:
        """Take the next raw bytes off the socket (any split: mid-event, mid-character)."""
        if self._done or self._broken or not chunk:
            return
        if self._after_cr:
            self._after_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        start = 0
        for match in _EOL.finditer(chunk):
            line = chunk[start:match.start()]
            if self._line_start:
                self._line_start.append(line)
                line = b"".join(self._line_start)
                self._line_start = []
            start = match.end()
            self._line(line)
            if self._done or self._broken:
                return
            if start == len(chunk) and match.group() == b"\r":
                self._after_cr = True
        if start < len(chunk):
            self._line_start.append(chunk[start:])

    def result(self) -> tuple[int, bytes]:
        """(HTTP status, JSON body) of the non-streamed answer. Raises IncompleteStream when
        the stream ended without its terminal event or was not what llama.cpp sends."""
        if self._broken:
            raise IncompleteStream(self._broken)
        if self._error is not None:
            code = self._error.get("code")
            status = code if isinstance(code, int) and 400 <= code <= 599 else 500
            return status, dumps({"error": self._error})
        if not self._done:
            raise IncompleteStream("the upstream stream ended before its final event")
        if self._final is None:
            raise IncompleteStream("the upstream stream ended without a finishing chunk")
        if self.route == "v1/messages":
            return 200, dumps(self._message_answer(self._final))
        if self.route in NATIVE_ROUTES:
            return 200, dumps(self._native_answer(self._final))
        if self.route == "v1/completions":
            return 200, dumps(self._completion_answer(self._final))
        return 200, dumps(self._chat_answer(self._final))

    # --- SSE ---

    def _line(self, raw: bytes) -> None:
        if not raw:
            self._dispatch()
            return
        if raw.startswith(b":"):  # a comment: llama.cpp's pings, our relay's keepalives
            return
        name, _, value = raw.decode("utf-8", "replace").partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "error":
            self._error_field.append(value)

    def _dispatch(self) -> None:
        if self._error_field:
            text = "\n".join(self._error_field)
            self._error_field = []
            self._data = []
            try:
                error = json.loads(text)
            except ValueError:
                error = text
            self._fail(error)
            return
        if not self._data:
            return
        text = "\n".join(self._data)
        self._data = []
        if text == "[DONE]":
            self._done = True
            return
        try:
            event = json.loads(text)
        except ValueError:
            self._broken = f"the upstream sent an event that is not JSON: {text[:200]!r}"
            return
        if event is None:  # llama.cpp sends `data: null` between the tasks of one request
            return
        if not isinstance(event, dict):
            self._broken = f"the upstream sent an unexpected event: {text[:200]!r}"
            return
        if "error" in event:
            self._fail(event["error"])
        elif self.route == "v1/messages":
            self._message_event(event)
        elif self.route in NATIVE_ROUTES:
            self._native_event(event)
        elif self.route == "v1/completions":
            self._completion_event(event)
        else:
            self._chat_event(event)

    # --- Anthropic Messages ---

    def _message_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self._final = dict(event["message"])
        elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            index = event.get("index", len(self._blocks))
            self._blocks[index] = dict(event["content_block"])
        elif kind == "content_block_delta" and isinstance(event.get("delta"), dict):
            self._message_delta(event.get("index", 0), event["delta"])
        elif kind == "content_block_stop":
            index = event.get("index", 0)
            parts = self._json_parts.pop(index, None)
            if parts is not None and index in self._blocks:
                text = "".join(parts)
                try:
                    self._blocks[index]["input"] = json.loads(text) if text else {}
                except ValueError:
                    self._broken = f"a tool_use block's input is not JSON: {text[:200]!r}"
        elif kind == "message_delta" and self._final is not None:
            delta = event.get("delta")
            if isinstance(delta, dict):
                self._final.update(delta)
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._final["usage"] = {**(self._final.get("usage") or {}), **usage}
        elif kind == "message_stop":
            self._done = True

    def _message_delta(self, index: int, delta: dict[str, Any]) -> None:
        block = self._blocks.setdefault(index, {"type": "text", "text": ""})
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + str(delta.get("text", ""))
        elif kind == "input_json_delta":
            self._json_parts.setdefault(index, []).append(str(delta.get("partial_json", "")))
        elif kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
        elif kind == "signature_delta":
            block["signature"] = block.get("signature", "") + str(delta.get("signature", ""))

    def _message_answer(self, final: dict[str, Any]) -> dict[str, Any]:
        answer = dict(final)
        answer["content"] = [self._blocks[i] for i in sorted(self._blocks)]
        return answer

    def _fail(self, error: Any) -> None:
        if not isinstance(error, dict):
            error = {"code": 500, "message": str(error), "type": "server_error"}
        self._error = error
        self._done = True

    def _count(self, generated: Any) -> None:
        if not isinstance(generated, int):
            self._uncounted = True
        elif generated > self._generated:
            self._generated = generated

    # --- native completion / infill ---

    def _native_event(self, event: dict[str, Any]) -> None:
        if event.get("stop") is True:
            self._final = event
            self._done = True
            return
        piece = event.get("content")
        if isinstance(piece, str) and piece:
            self._content.append(piece)
        probs = event.get("completion_probabilities")
        if isinstance(probs, list):
            self._probs.extend(probs)
        self._count(event.get("tokens_predicted"))

    def _unsent_tail(self, generated: Any) -> str:
        """U+FFFD when the last tokens ended inside a UTF-8 character: llama.cpp never
        streams those bytes (nor an event for their tokens), and writes the non-streamed
        answer with them replaced. Every other token gets an event, even an empty one."""
        if not self._uncounted and isinstance(generated, int) and generated > self._generated:
            return REPLACEMENT
        return ""

    def _native_answer(self, final: dict[str, Any]) -> dict[str, Any]:
        answer = dict(final)
        last = final.get("content")
        answer["content"] = ("".join(self._content) + (last if isinstance(last, str) else "")
                             + self._unsent_tail(final.get("tokens_predicted")))
        settings = answer.get("generation_settings")
        if isinstance(settings, dict):
            answer["generation_settings"] = {**settings, "stream": False}
        if self._probs:
            answer["completion_probabilities"] = self._probs
        return answer

    # --- OpenAI completions ---

    def _completion_event(self, event: dict[str, Any]) -> None:
        if isinstance(event.get("usage"), dict):
            self._usage = event
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices:
            return
        finished = False
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            piece = choice.get("text")
            if isinstance(piece, str) and piece:
                self._content.append(piece)
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                self._probs.extend(logprobs["content"])
            finished = finished or choice.get("finish_reason") is not None
        if finished:
            self._final = event
        else:
            # per-token timings (upstream_payload asks for them) count the tokens
            timings = event.get("timings")
            self._count(timings.get("predicted_n") if isinstance(timings, dict) else None)

    def _usage_fields(self, answer: dict[str, Any]) -> None:
        """usage and timings from the chunk that carried usage, when that is another."""
        if self._usage is not None and self._usage is not self._final:
            for key in ("usage", "timings"):
                if key in self._usage:
                    answer[key] = self._usage[key]

    def _completion_answer(self, final: dict[str, Any]) -> dict[str, Any]:
        answer = dict(final)
        choice = dict(final["choices"][0])
        usage = self._usage.get("usage") if self._usage is not None else None
        generated = usage.get("completion_tokens") if isinstance(usage, dict) else None
        choice["text"] = "".join(self._content) + self._unsent_tail(generated)
        choice["logprobs"] = {"content": self._probs} if self._probs else None
        answer["choices"] = [choice]
        self._usage_fields(answer)
        return answer

    # --- OpenAI chat ---

    def _chat_event(self, event: dict[str, Any]) -> None:
        if isinstance(event.get("usage"), dict):
            self._usage = event
        choices = event.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._chat_delta(delta)
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                self._probs.extend(logprobs["content"])
            if choice.get("finish_reason") is not None:
                self._final = event

    def _chat_delta(self, delta: dict[str, Any]) -> None:
        role = delta.get("role")
        if isinstance(role, str):
            self._role = role
        for key, pieces in (("content", self._content),
                            ("reasoning_content", self._reasoning)):
            piece = delta.get(key)
            if isinstance(piece, str) and piece:
                pieces.append(piece)
        calls = delta.get("tool_calls")
        if not isinstance(calls, list):
            return
        for call in calls:
            if not isinstance(call, dict):
                continue
            index = call.get("index", 0)
            entry = self._tool_calls.setdefault(
                index if isinstance(index, int) else 0,
                {"type": "function", "name": "", "arguments": [], "id": ""})
            if isinstance(call.get("type"), str):
                entry["type"] = call["type"]
            if isinstance(call.get("id"), str) and call["id"]:
                entry["id"] = call["id"]
            function = call.get("function")
            if isinstance(function, dict):
                # llama.cpp sends the whole name (again, when it grows), arguments in pieces
                if isinstance(function.get("name"), str) and function["name"]:
                    entry["name"] = function["name"]
                if isinstance(function.get("arguments"), str):
                    entry["arguments"].append(function["arguments"])

    def _chat_answer(self, final: dict[str, Any]) -> dict[str, Any]:
        finishing = final["choices"][0]
        # common_chat_msg::to_json_oaicompat: role, content ("" when empty), reasoning,
        # tool calls (an id only when there is one).
        message: dict[str, Any] = {"role": self._role or "assistant",
                                   "content": "".join(self._content)}
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        if self._tool_calls:
            calls = []
            for index in sorted(self._tool_calls):
                entry = self._tool_calls[index]
                call: dict[str, Any] = {
                    "type": entry["type"],
                    "function": {"name": entry["name"],
                                 "arguments": "".join(entry["arguments"])}}
                if entry["id"]:
                    call["id"] = entry["id"]
                calls.append(call)
            message["tool_calls"] = calls
        choice: dict[str, Any] = {"finish_reason": finishing.get("finish_reason"),
                                  "index": finishing.get("index", 0), "message": message}
        if self._probs:
            choice["logprobs"] = {"content": self._probs}
        # The chunks' keys come in another order than the answer's.
        source = dict(final)
        if self._usage is not None and self._usage is not final:
            source.update({k: v for k, v in self._usage.items() if k != "choices"})
        answer: dict[str, Any] = {"choices": [choice]}
        for key in ("created", "model", "system_fingerprint"):
            if key in source:
                answer[key] = source[key]
        answer["object"] = "chat.completion"
        for key in ("usage", "id", "timings"):
            if key in source:
                answer[key] = source[key]
        for key, value in source.items():
            if key not in answer and key not in ("choices", "object"):
                answer[key] = value
        return answer
