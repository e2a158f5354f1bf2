"""Session fixtures: real llama.cpp servers (xllamacpp + Gemma 3 270M) and the proxy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from .procs import LlamaServer, Proxy, running

API_KEY = "test-secret-key"
CHAT_ALIAS = "gemma-chat"


@pytest.fixture(scope="session")
def llama_servers() -> Iterator[dict[str, LlamaServer]]:
    """Three real servers: chat (alias), embeddings (no alias: listed by file name), auth."""
    with running({
        "chat": LlamaServer(["--alias", CHAT_ALIAS, "--n-parallel", "2", "--n-ctx", "2048"]),
        "embed": LlamaServer(["--embedding", "--n-parallel", "2"]),
        "auth": LlamaServer(["--alias", "gemma-secure", "--api-key", API_KEY,
                             "--n-parallel", "1", "--n-ctx", "1024"]),
    }) as servers:
        yield dict(servers)


@pytest.fixture(scope="session")
def llama_chat(llama_servers: dict[str, LlamaServer]) -> LlamaServer:
    return llama_servers["chat"]


@pytest.fixture(scope="session")
def llama_embed(llama_servers: dict[str, LlamaServer]) -> LlamaServer:
    return llama_servers["embed"]


@pytest.fixture(scope="session")
def llama_auth(llama_servers: dict[str, LlamaServer]) -> LlamaServer:
    return llama_servers["auth"]


@pytest.fixture(scope="session")
def start_proxy() -> Iterator[Callable[..., Proxy]]:
    """Factory: a proxy under gunicorn with the given config; all are stopped at the end."""
    started: list[Proxy] = []

    def start(config: dict[str, Any], **kwargs: Any) -> Proxy:
        proxy = Proxy(config, **kwargs)
        started.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


@pytest.fixture(scope="session")
def proxy(start_proxy: Callable[..., Proxy], llama_chat: LlamaServer,
          llama_embed: LlamaServer) -> Proxy:
    """The proxy in front of the chat and the embedding server."""
    return start_proxy({"endpoints": [
        {"url": llama_chat.url, "name": "llamacpp-chat", "type": "llamacpp", "priority": 90},
        {"url": llama_embed.url, "name": "llamacpp-embed", "type": "llamacpp", "priority": 80},
    ]})


@pytest.fixture
def client(proxy: Proxy) -> Iterator[openai.OpenAI]:
    """The real openai SDK pointed at the session proxy's /olla/llamacpp/v1."""
    sdk = openai.OpenAI(base_url=f"{proxy.url}/olla/llamacpp/v1", api_key="not-needed",
                        max_retries=0, timeout=60)
    yield sdk
    sdk.close()
