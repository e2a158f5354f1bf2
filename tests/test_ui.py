"""The dashboard's routes (app/views/ui.py) and its data (app.status.ui_data), against fake
upstreams; the page itself is tested in a real browser (tests/integration/test_ui_browser.py)."""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Callable

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from app.dispatch import Waiter
from app.services import services_of
from app.views.ui import ASSETS, FILES

from .conftest import CHAT_URL, EMBED_URL, add_llamacpp

OUTSIDE = {"environ_base": {"REMOTE_ADDR": "192.0.2.44"}}


@pytest.fixture
def fleet(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> Flask:
    add_llamacpp(fake, CHAT_URL, "gemma", aliases=["gemma", "chat"])
    add_llamacpp(fake, EMBED_URL, "Nomic-Embed.gguf")
    fake.post(CHAT_URL + "/v1/chat/completions", json={
        "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4,
                                 "prompt_tokens_details": {"cached_tokens": 6}}})
    return make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"},
                                   {"url": EMBED_URL, "name": "embed"}],
                     "proxy": {"assemble_non_streamed": False}})


def test_the_page_its_assets_and_the_redirect(fleet: Flask) -> None:
    client = fleet.test_client()
    moved = client.get("/internal/ui")
    assert moved.status_code == 307 and moved.headers["Location"].endswith("/internal/ui/")
    page = client.get("/internal/ui/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for asset in ("favicon.svg", "app.css", "app.js"):
        assert f'"{asset}"' in html
        answer = client.get("/internal/ui/" + asset)
        assert answer.status_code == 200 and answer.data == (ASSETS / asset).read_bytes()
    assert client.get("/internal/ui/app.js").mimetype in {"text/javascript",
                                                          "application/javascript"}
    assert "http" not in (ASSETS / "index.html").read_text().replace("http://www.w3", "")
    missing = client.get("/internal/ui/../config.py")
    assert missing.status_code == 404
    unknown = client.get("/internal/ui/secret.txt")
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "not_found"
    assert {p.name for p in ASSETS.iterdir()} == FILES


def test_nothing_comes_from_elsewhere() -> None:
    """Works offline: no CDN, no remote font or script."""
    for name in FILES:
        text = (ASSETS / name).read_text().replace("http://www.w3.org/2000/svg", "")
        found = re.findall(r"https?://\S+|(?:src|href)=[\"']//\S+|url\(\s*['\"]?//", text)
        assert not found, (name, found)


def test_the_page_is_behind_the_internal_policy(fleet: Flask) -> None:
    client = fleet.test_client()
    for path in ("/internal/ui/", "/internal/ui/data", "/internal/ui/app.js"):
        assert client.get(path, **OUTSIDE).status_code == 403, path  # type: ignore[arg-type]
        assert client.get(path).status_code == 200, path


def chat(client: FlaskClient, model: str) -> int:
    return client.post("/olla/llamacpp/v1/chat/completions", data=json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}]})).status_code


def test_the_data(fleet: Flask) -> None:
    client = fleet.test_client()
    assert chat(client, "gemma") == 200
    assert chat(client, "nope") == 404
    services_of(fleet).history.clock = lambda: 2e9  # the second of those is over
    data = client.get("/internal/ui/data").get_json()
    assert client.get("/internal/ui/data").headers["Cache-Control"] == "no-store"
    names = [e["name"] for e in data["endpoints"]]
    assert sorted(names) == ["chat", "embed"]
    chat_endpoint = data["endpoints"][names.index("chat")]
    assert chat_endpoint["models"] == ["gemma"] and chat_endpoint["total_slots"] == 2
    assert {"status", "slots_in_use", "in_flight", "queued", "issues", "url"} <= set(
        chat_endpoint)
    assert data["queue"]["depth"] == 0 and data["queue"]["models"] == []
    history = data["history"]
    assert len(history["requests"]["ok"]) == history["seconds"] == 900
    assert data["errors"][0]["code"] == "model_not_found"
    assert data["errors"][0]["time"].endswith("Z")
    assert "hi" not in json.dumps(data["errors"])


def test_queue_per_model_with_its_longest_wait(fleet: Flask) -> None:
    svc = services_of(fleet)
    state = svc.registry.states["chat"]
    svc.dispatcher.queues["gemma"] = deque([Waiter("gemma", [state], arrived=0.0)])
    svc.dispatcher.queues["nomic-embed"] = deque([Waiter("nomic-embed", [state]),
                                                  Waiter("nomic-embed", [state])])
    data = fleet.test_client().get("/internal/ui/data").get_json()
    rows = {row["model"]: row for row in data["queue"]["models"]}
    assert rows["gemma"]["depth"] == 1 and rows["gemma"]["longest_wait_ms"] > 1000
    # Queued by the name as compared (no .gguf, lower case), shown by the fleet's name.
    assert rows["Nomic-Embed.gguf"]["depth"] == 2
    svc.dispatcher.queues.clear()


def test_a_large_relayed_error_is_listed_without_reading_its_body(
        fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> None:
    add_llamacpp(fake, CHAT_URL, "gemma")
    fake.post(CHAT_URL + "/v1/chat/completions", status=400, json={
        "error": {"code": 400, "message": "x" * 70_000, "type": "invalid_request_error"}})
    fake.post(CHAT_URL + "/v1/chat/completions", status=400, json={
        "error": {"code": 400, "message": "short", "type": "invalid_request_error"}})
    app = make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}],
                    "proxy": {"assemble_non_streamed": False}})
    client = app.test_client()
    assert chat(client, "gemma") == 400
    assert chat(client, "gemma") == 400
    errors = client.get("/internal/ui/data").get_json()["errors"]
    assert [e["code"] for e in errors] == ["400", ""]  # newest first
