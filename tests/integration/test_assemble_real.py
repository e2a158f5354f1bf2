"""The assembled answer against llama.cpp's own non-streamed answer, on a real llama-server.

Each case sends the request twice, straight to llama-server: as the client sent it (not
streamed), then as ``upstream_payload`` streams it, assembled. At temperature 0 with a fixed
seed both generate the same tokens, so the two answers must agree on every field except
those that change from one call to the next (``VOLATILE``), byte for byte once those are
grafted across.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from app.assemble import Assembler, applies, dumps, refusal, upstream_payload

from .procs import LlamaServer

pytestmark = pytest.mark.integration

ALIAS = "gemma-assemble"
SAMPLING = {"temperature": 0, "seed": 7}
HELLO = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
# Grammars make the tiny model end on its end-of-generation token ("stop"), end inside a
# UTF-8 character (U+13000 is 4 byte tokens), or fail after its first token (an end token
# the grammar needs is banned by ignore_eos: llama.cpp's own mid-stream error).
YES_IT_IS = 'root ::= "Yes it is"'
GLYPHS = 'root ::= "ab\U00013000\U00013000"'
DEAD_END = {"ignore_eos": True, "grammar": 'root ::= "yes"'}

# Paths (dot-separated, * for any list item) whose values differ between two calls.
VOLATILE = frozenset({
    "timings",                                   # measured
    "created",                                   # the clock
    "id",                                        # random per request
    "usage.prompt_tokens_details.cached_tokens",  # the prompt cache the first call filled
    "choices.*.message.tool_calls.*.id",         # random per call
    "usage.cache_read_input_tokens",             # Anthropic's: as cached_tokens above
    "usage.input_tokens",                        # Anthropic's: the prompt less the cached
})


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    server = LlamaServer(["--alias", ALIAS, "--n-parallel", "1", "--n-ctx", "1024",
                          "--threads", "1"])
    try:
        yield server.start().wait()
    finally:
        server.stop()


def non_streamed(llama: LlamaServer, route: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{llama.url}/{route}", json=body, timeout=60)


def assembled(llama: LlamaServer, route: str, body: dict[str, Any]
              ) -> tuple[Assembler, bytes]:
    """The streamed request assembled from the socket's chunks; also the raw stream."""
    with requests.post(f"{llama.url}/{route}", json=upstream_payload(route, body),
                       stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assembler = Assembler(route, body)
        raw = []
        for chunk in response.iter_content(chunk_size=None):
            raw.append(chunk)
            assembler.feed(chunk)
    return assembler, b"".join(raw)


def compare(mine: Any, theirs: Any, path: str = "") -> None:
    """Equal values and key order, except VOLATILE paths: same type (and keys) there."""
    if path in VOLATILE:
        assert type(mine) is type(theirs), path
        if isinstance(mine, dict):
            assert list(mine) == list(theirs), path
        return
    if isinstance(theirs, dict):
        assert isinstance(mine, dict), path
        assert list(mine) == list(theirs), path
        for key in theirs:
            compare(mine[key], theirs[key], f"{path}.{key}" if path else key)
    elif isinstance(theirs, list):
        assert isinstance(mine, list) and len(mine) == len(theirs), path
        for a, b in zip(mine, theirs, strict=True):
            compare(a, b, f"{path}.*" if path else "*")
    else:
        assert mine == theirs, f"{path}: {mine!r} != {theirs!r}"


def graft(theirs: Any, mine: Any, path: str = "") -> Any:
    """llama.cpp's answer with the VOLATILE values taken from ours."""
    if path in VOLATILE:
        return mine
    if isinstance(theirs, dict):
        return {k: graft(v, mine[k], f"{path}.{k}" if path else k) for k, v in theirs.items()}
    if isinstance(theirs, list):
        return [graft(a, b, f"{path}.*" if path else "*") for a, b in zip(theirs, mine,
                                                                          strict=True)]
    return theirs


def floats_rounded(text: bytes) -> bytes:
    """JSON text with every float rounded to 9 significant digits."""
    return re.sub(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?",
                  lambda m: f"{float(m.group()):.9g}".encode(), text)


def check(llama: LlamaServer, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """Both answers agree; returns the assembled one."""
    body = {**SAMPLING, **body}
    assert applies(route, body), refusal(route, body)
    direct = non_streamed(llama, route, body)
    assembler, raw = assembled(llama, route, body)
    status, answer = assembler.result()
    assert status == direct.status_code, direct.text
    assert assembler.failed is (status != 200)
    if status != 200:
        assert answer == direct.content
        return dict(json.loads(answer))
    # llama.cpp writes compact UTF-8 JSON in insertion order, as dumps() does (floats
    # aside: its Grisu2 now and then writes a digit more than Python's shortest repr, as
    # 2.11080221712 for 2.1108022171; they are the volatile timings, grafted below)
    assert floats_rounded(dumps(direct.json())) == floats_rounded(direct.content)
    mine, theirs = json.loads(answer), direct.json()
    compare(mine, theirs)
    assert dumps(graft(theirs, mine)) == answer
    # the same stream split at other boundaries gives the same answer
    one_by_one = Assembler(route, body)
    for i in range(len(raw)):
        one_by_one.feed(raw[i:i + 1])
    assert one_by_one.result() == (status, answer)
    return dict(mine)


@pytest.mark.parametrize("body", [
    {"prompt": "The sky is", "n_predict": 16},
    {"prompt": "The sky is", "n_predict": 12, "n_probs": 3},
    {"prompt": "List three colours:", "n_predict": 8, "n_probs": 2,
     "post_sampling_probs": True},
], ids=["plain", "n_probs", "post_sampling_probs"])
def test_native_completion(llama: LlamaServer, body: dict[str, Any]) -> None:
    answer = check(llama, "completion", body)
    assert answer["stop_type"] == "limit" and answer["tokens_predicted"] == body["n_predict"]
    assert answer["generation_settings"]["stream"] is False
    if "n_probs" in body:
        assert len(answer["completion_probabilities"]) == body["n_predict"]
    else:
        assert "completion_probabilities" not in answer


def test_native_completion_ends_on_its_end_token(llama: LlamaServer) -> None:
    answer = check(llama, "completion", {"prompt": "Is fire hot?", "n_predict": 12,
                                         "n_probs": 1, "grammar": YES_IT_IS})
    assert answer["content"] == "Yes it is" and answer["stop_type"] == "eos"
    assert answer["completion_probabilities"][-1]["token"] == ""  # the end token's


def test_native_completion_ends_inside_a_character(llama: LlamaServer) -> None:
    answer = check(llama, "completion", {"prompt": "Glyph:", "n_predict": 4,
                                         "grammar": GLYPHS})
    assert answer["content"] == "ab\ufffd"


@pytest.mark.parametrize("body", [
    {"prompt": "Once upon a time", "max_tokens": 16},
    {"prompt": "Once upon a time", "max_tokens": 12, "logprobs": 2},
    {"prompt": "Is fire hot?", "max_tokens": 12, "logprobs": 1, "grammar": YES_IT_IS},
    {"prompt": "Glyph:", "max_tokens": 4, "grammar": GLYPHS},
], ids=["length", "logprobs", "stop", "inside_a_character"])
def test_openai_completions(llama: LlamaServer, body: dict[str, Any]) -> None:
    answer = check(llama, "v1/completions", {"model": ALIAS, **body})
    choice = answer["choices"][0]
    assert answer["object"] == "text_completion"
    assert choice["finish_reason"] == ("stop" if "Yes" in body.get("grammar", "") else "length")
    assert answer["usage"]["completion_tokens"] <= body["max_tokens"]
    assert (choice["logprobs"] is None) is ("logprobs" not in body)


@pytest.mark.parametrize("body", [
    {"messages": HELLO, "max_tokens": 16},
    {"messages": [{"role": "user", "content": "Is fire hot?"}], "max_tokens": 12,
     "grammar": YES_IT_IS},
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
     "max_tokens": 16, "tools": [WEATHER_TOOL]},
    {"messages": HELLO, "max_tokens": 8, "stream_options": {"include_usage": False}},
], ids=["length", "stop", "tools", "client_stream_options"])
def test_openai_chat(llama: LlamaServer, body: dict[str, Any]) -> None:
    answer = check(llama, "v1/chat/completions", {"model": ALIAS, **body})
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")
    assert set(answer["usage"]) >= {"completion_tokens", "prompt_tokens", "total_tokens"}
    assert "timings" in answer


@pytest.mark.parametrize("body", [
    {"messages": HELLO, "max_tokens": 8},
    {"system": "Answer in French.", "messages": HELLO, "max_tokens": 10},
    {"messages": [{"role": "user", "content": "Is fire hot?"}], "max_tokens": 12,
     "grammar": YES_IT_IS},
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
     "max_tokens": 16, "tools": [{"name": "get_weather", "description": "The weather",
                                  "input_schema": WEATHER_TOOL["function"]["parameters"]}]},
], ids=["max_tokens", "system", "end_turn", "tools"])
def test_anthropic_messages(llama: LlamaServer, body: dict[str, Any]) -> None:
    answer = check(llama, "v1/messages", {"model": ALIAS, **body})
    assert answer["type"] == "message" and answer["role"] == "assistant"
    assert answer["stop_reason"] in ("end_turn", "max_tokens", "tool_use")
    assert answer["content"] and answer["usage"]["output_tokens"] > 0


def test_anthropic_stop_sequences_are_refused() -> None:
    assert refusal("v1/messages", {"stop_sequences": ["END"]}) == "stop words"


@pytest.mark.parametrize("route", ["completion", "v1/completions", "v1/chat/completions"])
def test_error_mid_stream_is_llamacpps_error_answer(llama: LlamaServer, route: str) -> None:
    body = {"prompt": "Answer:", "n_predict": 6, **DEAD_END}
    if route == "v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "Answer:"}], "max_tokens": 6,
                **DEAD_END}
    answer = check(llama, route, body)
    assert answer["error"]["code"] == 500 and answer["error"]["type"] == "server_error"


def test_infill_fails_before_any_event(llama: LlamaServer) -> None:
    """Gemma has no FIM tokens: streamed or not, a plain 501 JSON answer, which the caller
    relays as is (an Assembler only ever sees SSE)."""
    body = {"input_prefix": "def f():", "input_suffix": "\n", "n_predict": 8}
    assert applies("infill", body)
    direct = non_streamed(llama, "infill", body)
    streamed = non_streamed(llama, "infill", upstream_payload("infill", body))
    assert direct.status_code == streamed.status_code == 501
    assert direct.content == streamed.content
    assert streamed.headers["Content-Type"].startswith("application/json")


# --- what the stream loses, hence refusal() ---

def test_why_stop_words_are_refused(llama: LlamaServer) -> None:
    """Text that may begin a stop word is held back; at the token limit it is never sent."""
    body = {**SAMPLING, "prompt": "The sky is", "n_predict": 4, "stop": [" the 2"]}
    assert refusal("completion", body) == "stop words"
    direct = non_streamed(llama, "completion", body).json()
    assembler, _ = assembled(llama, "completion", body)
    mine = json.loads(assembler.result()[1])
    assert direct["content"] == mine["content"] + " the"


def test_why_chat_logprobs_are_refused(llama: LlamaServer) -> None:
    """The end token adds no delta, so the stream drops its log-probability."""
    body = {**SAMPLING, "messages": [{"role": "user", "content": "Is fire hot?"}],
            "max_tokens": 8, "logprobs": True, "top_logprobs": 1, "grammar": YES_IT_IS}
    assert refusal("v1/chat/completions", body) == "logprobs on chat"
    direct = non_streamed(llama, "v1/chat/completions", body).json()
    assembler, _ = assembled(llama, "v1/chat/completions", body)
    mine = json.loads(assembler.result()[1])
    theirs = direct["choices"][0]["logprobs"]["content"]
    assert mine["choices"][0]["logprobs"]["content"] == theirs[:-1]
    assert theirs[-1]["token"] == ""


def test_why_return_tokens_is_refused(llama: LlamaServer) -> None:
    """Tokens that end inside a UTF-8 character get no event of their own."""
    body = {**SAMPLING, "prompt": "Glyph:", "n_predict": 8, "return_tokens": True,
            "grammar": GLYPHS}
    assert refusal("completion", body) == "return_tokens"
    direct = non_streamed(llama, "completion", body).json()
    _, raw = assembled(llama, "completion", body)
    streamed = [token for line in raw.split(b"\n") if line.startswith(b"data: ")
                for token in json.loads(line[6:])["tokens"]]
    assert len(direct["tokens"]) == direct["tokens_predicted"] > len(streamed)
