"""Who may use it and how much, against real llama.cpp under real gunicorn: API keys with
the real OpenAI SDK, fair shares on a 1-slot server, tokens per minute from llama.cpp's own
usage, limits and max_concurrent shared by two workers through a real Redis, CORS."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest
import requests

from .conftest import API_KEY, CHAT_ALIAS
from .procs import LlamaServer, Proxy

pytestmark = pytest.mark.integration

SECURE_ALIAS = "gemma-secure"   # the 1-slot server that needs API_KEY (conftest's "auth")
KEYS = {"heavy": "sk-heavy-0123456789abcdef", "light": "sk-light-0123456789abcdef",
        "scoped": "sk-scoped-0123456789abcde", "thrifty": "sk-thrifty-0123456789abcd"}


@pytest.fixture(scope="module")
def keyed(start_proxy: Callable[..., Proxy], llama_auth: LlamaServer,
          llama_chat: LlamaServer) -> Proxy:
    return start_proxy({
        "auth": {"api_keys": [
            {"name": "heavy", "key": KEYS["heavy"]},
            {"name": "light", "key": KEYS["light"]},
            {"name": "scoped", "key": KEYS["scoped"], "models": [CHAT_ALIAS]},
            {"name": "thrifty", "key": KEYS["thrifty"], "tokens_per_minute": 60}]},
        "server": {"cors": {"enabled": True, "allowed_origins": ["http://app.example"]}},
        "proxy": {"queue": {"max_size": 50, "timeout": "120s"}},
        "endpoints": [
            # The endpoint's own key goes upstream; clients present the proxy's keys.
            {"url": llama_auth.url, "name": "secure",
             "headers": {"Authorization": f"Bearer {API_KEY}"}},
            {"url": llama_chat.url, "name": "chat"}]})


def client(proxy: Proxy, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/olla/llamacpp/v1", api_key=key, max_retries=0)


def test_the_openai_sdk_with_good_wrong_missing_and_out_of_scope_keys(keyed: Proxy) -> None:
    good = client(keyed, KEYS["light"])
    try:
        answer = good.chat.completions.create(
            model=SECURE_ALIAS, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
        assert answer.choices[0].message.content is not None
        assert {m.id for m in good.models.list()} >= {SECURE_ALIAS, CHAT_ALIAS}
    finally:
        good.close()
    bad = client(keyed, "sk-not-a-key")
    try:
        with pytest.raises(openai.AuthenticationError) as raised:
            bad.chat.completions.create(model=SECURE_ALIAS, max_tokens=2,
                                        messages=[{"role": "user", "content": "hi"}])
        assert raised.value.status_code == 401
        assert raised.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    finally:
        bad.close()
    # Missing (the SDK refuses to send none): as curl would.
    missing = requests.post(keyed.url + "/olla/llamacpp/v1/chat/completions", timeout=10,
                            json={"model": SECURE_ALIAS, "messages": [
                                {"role": "user", "content": "hi"}]})
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"]
    assert missing.json()["error"]["type"] == "authentication_error"
    scoped = client(keyed, KEYS["scoped"])
    try:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            scoped.chat.completions.create(model=SECURE_ALIAS, max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
        assert denied.value.body["code"] == "model_not_allowed"  # type: ignore[index]
        assert [m.id for m in scoped.models.list()] == [CHAT_ALIAS]
        assert scoped.chat.completions.create(
            model=CHAT_ALIAS, max_tokens=2,
            messages=[{"role": "user", "content": "hi"}]).choices
    finally:
        scoped.close()


def test_a_flood_from_one_key_does_not_starve_another(keyed: Proxy,
                                                      llama_auth: LlamaServer) -> None:
    """On the 1-slot server: one key sends 20 streams at once, another 2 a moment later.
    The light key's requests start within two and four slot turns of arriving."""
    started: list[tuple[str, float]] = []
    lock = threading.Lock()

    def stream(key: str, label: str) -> None:
        response = requests.post(
            keyed.url + "/olla/llamacpp/v1/chat/completions", timeout=180, stream=True,
            headers={"Authorization": f"Bearer {KEYS[key]}"},
            json={"model": SECURE_ALIAS, "stream": True, "max_tokens": 12,
                  "messages": [{"role": "user", "content": f"Count to twenty ({label})"}]})
        with response:
            assert response.status_code == 200, response.text
            first = True
            for line in response.iter_lines():
                if first and line.startswith(b"data: "):
                    with lock:
                        started.append((label, time.monotonic()))
                    first = False

    threads = [threading.Thread(target=stream, args=("heavy", f"h{i}")) for i in range(20)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(started) < 2:  # the flood is running and queued
        assert time.monotonic() < deadline
        time.sleep(0.05)
    arrived_after = len(started)
    light = [threading.Thread(target=stream, args=("light", f"l{i}")) for i in range(2)]
    for thread in light:
        thread.start()
        time.sleep(0.05)
    for thread in threads + light:
        thread.join(180)
    order = [label for label, _ in sorted(started, key=lambda s: s[1])]
    assert len(order) == 22, order
    # Turns counted from the first stream to start after the light key's requests came in
    # (the one holding the slot then, and one more that may have been granted already).
    after = order[arrived_after:]
    first, second = after.index("l0"), after.index("l1")
    print(f"\nfair shares on 1 slot: order {order}; light key started at turns "
          f"{first + 1} and {second + 1} after arriving")
    assert first < 2 and second < 4, order
    assert llama_auth.busy_slots(API_KEY) == 0


def test_tokens_per_minute_counts_llamacpps_usage_in_streams(keyed: Proxy) -> None:
    thrifty = client(keyed, KEYS["thrifty"])
    try:
        used = 0
        for _ in range(10):
            try:
                stream = thrifty.chat.completions.create(
                    model=CHAT_ALIAS, max_tokens=20, stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": "Tell me a story"}])
            except openai.RateLimitError as exc:
                assert exc.status_code == 429
                assert exc.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
                assert "tokens_per_minute" in exc.message
                assert int(exc.response.headers["Retry-After"]) >= 1
                break
            for chunk in stream:
                if chunk.usage is not None:
                    used += chunk.usage.total_tokens
        else:
            pytest.fail("never refused: tokens were not counted")
        assert used >= 60  # refused only once the minute's 60 tokens were spent
    finally:
        thrifty.close()


def test_a_cors_preflight_is_answered_without_a_key_or_an_upstream(keyed: Proxy) -> None:
    preflight = requests.options(keyed.url + "/olla/llamacpp/v1/chat/completions", timeout=5,
                                 headers={"Origin": "http://app.example",
                                          "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://app.example"
    answer = requests.post(keyed.url + "/olla/llamacpp/v1/chat/completions", timeout=30,
                           headers={"Origin": "http://app.example",
                                    "Authorization": f"Bearer {KEYS['light']}"},
                           json={"model": CHAT_ALIAS, "max_tokens": 2,
                                 "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert "X-Olla-Model" in answer.headers["Access-Control-Expose-Headers"]


def test_two_workers_share_limits_and_max_concurrent_through_redis(
        start_proxy: Callable[..., Proxy], llama_chat: LlamaServer, redis_url: str) -> None:
    proxy = start_proxy({
        "auth": {"api_keys": [
            {"name": "counted", "key": KEYS["light"], "requests_per_minute": 6},
            {"name": "capped", "key": KEYS["heavy"], "max_concurrent": 1}]},
        "state": {"redis_url": redis_url},
        "endpoints": [{"url": llama_chat.url, "name": "chat"}]}, extra_args=["--workers", "2"])
    # A limit of 6 a minute admits 6 in all, whichever worker each request reaches (each
    # request on a connection of its own: gunicorn spreads them over both workers).
    codes = []
    for _ in range(12):
        with requests.Session() as session:
            codes.append(session.post(
                proxy.url + "/olla/llamacpp/tokenize", timeout=10, json={"content": "hi"},
                headers={"Authorization": f"Bearer {KEYS['light']}",
                         "Connection": "close"}).status_code)
    assert codes.count(200) == 6 and codes.count(429) == 6, codes
    # max_concurrent 1, fleet-wide: four streams at once on a 2-slot server, never two
    # running together.
    busy: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            busy.append(llama_chat.busy_slots())
            time.sleep(0.02)

    def stream(results: list[Any]) -> None:
        response = requests.post(proxy.url + "/olla/llamacpp/v1/chat/completions",
                                 timeout=120, headers={"Authorization": f"Bearer {KEYS['heavy']}"},
                                 json={"model": CHAT_ALIAS, "max_tokens": 24, "stream": False,
                                       "messages": [{"role": "user", "content": "Count"}]})
        results.append(response.status_code)

    watcher = threading.Thread(target=watch)
    watcher.start()
    results: list[Any] = []
    streams = [threading.Thread(target=stream, args=(results,)) for _ in range(4)]
    for thread in streams:
        thread.start()
    for thread in streams:
        thread.join(120)
    stop.set()
    watcher.join(5)
    assert results == [200] * 4
    assert max(busy) == 1, busy
