"""The README's run command with no endpoints: an embedded llama.cpp answers the spec's
curl and OpenAI SDK examples at once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from .procs import ROOT, free_port, stop_process, wait_http

pytestmark = pytest.mark.integration

SPEC_CHAT_MODEL = "llama-3.1-8b-instruct-q4_k_m.gguf"
SPEC_EMBED_MODEL = "nomic-embed-text-v1.5.Q4_K_M.gguf"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = tmp_path_factory.mktemp("demo") / "config.yaml"
    config.write_text("endpoints: []\nembedded:\n  n_parallel: 2\n  n_ctx: 4096\n")
    port = free_port()
    log = config.with_suffix(".log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--config", str(config), "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/olla/llamacpp/v1/models", process, timeout=120)
        yield url
    finally:
        # SIGINT: gunicorn's quick shutdown (SIGTERM would wait for idle keep-alive
        # connections); on_exit then stops the embedded llama.cpp.
        stop_process(process, timeout=20, sig=signal.SIGINT)
        log.close()
        text = Path(log.name).read_text()
        assert "Traceback" not in text, text


def test_spec_curl_examples(demo: str) -> None:
    base = demo + "/olla/llamacpp"
    models = requests.get(base + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["gemma-3-270m-q4_k_m.gguf"]
    completion = requests.post(base + "/completion", timeout=60, json={
        "prompt": "The future of AI is", "n_predict": 20, "temperature": 0.7, "top_k": 40,
        "top_p": 0.9, "repeat_penalty": 1.1, "stream": False}).json()
    assert completion["content"] and completion["stop"] is True
    chat = requests.post(base + "/v1/chat/completions", timeout=60, json={
        "model": SPEC_CHAT_MODEL, "messages": [
            {"role": "system", "content": "You are a helpful AI assistant."},
            {"role": "user", "content": "What are the best practices for llama.cpp?"}],
        "temperature": 0.7, "max_tokens": 30, "stream": False})
    assert chat.status_code == 200, chat.text
    assert chat.headers["X-Olla-Model"] == SPEC_CHAT_MODEL
    tokens = requests.post(base + "/tokenize", timeout=10,
                           json={"content": "Hello, world! This is a test."}).json()["tokens"]
    text = requests.post(base + "/detokenize", timeout=10, json={"tokens": tokens}).json()
    assert text["content"].strip() == "Hello, world! This is a test."
    embedding = requests.post(base + "/embedding", timeout=30, json={
        "content": "llama.cpp enables efficient LLM inference with GGUF quantization"})
    assert embedding.status_code == 200, embedding.text
    infill = requests.post(base + "/infill", timeout=30, json={
        "input_prefix": "def fibonacci(n):\n    ", "input_suffix": "\n    return result",
        "n_predict": 100, "temperature": 0.2, "stop": ["\n\n"]})
    assert infill.status_code == 501  # Gemma has no FIM tokens; llama.cpp's answer, relayed
    assert infill.json()["error"]["type"] == "not_supported_error"


def test_spec_openai_sdk_example(demo: str) -> None:
    client = openai.OpenAI(base_url=demo + "/olla/llamacpp/v1", api_key="not-needed",
                           max_retries=0)
    try:
        response = client.chat.completions.create(
            model=SPEC_CHAT_MODEL,
            messages=[{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": "Explain GGUF quantization"}],
            temperature=0.7, max_tokens=20)
        assert response.choices[0].message.content
        stream = client.chat.completions.create(
            model=SPEC_CHAT_MODEL, messages=[{"role": "user", "content": "Count to 10 slowly"}],
            stream=True, max_tokens=10)
        assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) >= 2
        embeddings = client.embeddings.create(model=SPEC_EMBED_MODEL, input="Text to embed")
        assert len(embeddings.data[0].embedding) > 100
    finally:
        client.close()


def test_the_embedded_backend_answers_only_the_proxy(demo: str) -> None:
    endpoints = requests.get(demo + "/internal/status/endpoints", timeout=5).json()["endpoints"]
    assert len(endpoints) == 1 and "Bearer" not in json.dumps(endpoints)
    embedded = endpoints[0]["url"].rstrip("/")
    assert embedded.startswith("http://127.0.0.1:")
    # Directly, without the key only the proxy holds: refused.
    assert requests.get(embedded + "/slots", timeout=5).status_code == 401
    direct = requests.post(embedded + "/v1/chat/completions", timeout=10, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert direct.status_code == 401
    # The key is not on the embedded server's command line, which any local user can read.
    port = embedded.rsplit(":", 1)[1].encode()
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"app.embedded" in text and b"--port " + port in text:
            lines.append(text)
    assert len(lines) == 1 and b"key" not in lines[0], lines
    # Through the proxy: served (the proxy sends the key, not the client's own).
    slots = requests.get(demo + "/internal/status/endpoints", timeout=5).json()
    assert slots["endpoints"][0]["status"] == "healthy"
    chat = requests.post(demo + "/olla/llamacpp/v1/chat/completions", timeout=30,
                         headers={"Authorization": "Bearer a-clients-own-key"},
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 200, chat.text


def test_embedded_backend_does_not_outlive_its_master(tmp_path: Path) -> None:
    """Even a master killed outright (no on_exit) leaves no llama.cpp behind."""
    config = tmp_path / "config.yaml"
    config.write_text("endpoints: []\nembedded:\n  n_parallel: 1\n  n_ctx: 1024\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--config", str(config), "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/olla/llamacpp/v1/models", process, timeout=120)
        children = [line.split()[0] for line in subprocess.run(
            ["ps", "-o", "pid=,args=", "--ppid", str(process.pid)], capture_output=True,
            text=True, check=False).stdout.splitlines() if "app.embedded" in line]
        assert len(children) == 1
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{children[0]}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{children[0]}").exists(), "embedded llama.cpp outlived the master"
