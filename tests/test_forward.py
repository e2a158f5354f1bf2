"""The request owner: every slot taken is given back on every path out, and every header
that goes out is valid (fake upstreams; the real-server side is in tests/integration)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from app.guard import safe_headers
from app.services import Services, services_of

from .conftest import CHAT_URL, add_llamacpp

MODEL = "gemma-3-270m-q4_k_m.gguf"
CHAT = {"messages": [{"role": "user", "content": "x"}]}

# A refused connection, as requests reports one (what it wraps says so).
REFUSED = requests.ConnectionError(ConnectionRefusedError(111, "Connection refused"))


@pytest.fixture
def app(fake: responses.RequestsMock, make_app: Callable[..., Flask]) -> Flask:
    add_llamacpp(fake, CHAT_URL, MODEL)
    return make_app({"endpoints": [{"url": CHAT_URL, "name": "chat"}]})


def idle(app: Flask) -> Services:
    """The services, once every lease is back: nothing held, nothing in the book."""
    svc = services_of(app)
    state = svc.registry.states["chat"]
    assert state.in_flight == 0, "a slot was not given back"
    assert len(svc.dispatcher.book) == 0, "a lease is still in the book"
    return svc


@pytest.mark.parametrize("name", [f"\u000b{MODEL}", f"{MODEL}\u3000", f" {MODEL} ",
                                  MODEL.upper()])
def test_odd_model_names_route_and_are_never_echoed_raw(app: Flask,
                                                        fake: responses.RequestsMock,
                                                        name: str) -> None:
    events = b'data: {"content":"a","stop":false}\n\ndata: {"content":"","stop":true}\n\n'
    fake.post(f"{CHAT_URL}/completion", body=events, content_type="text/event-stream")
    response = app.test_client().post("/olla/llamacpp/completion",
                                      json={"model": name, "prompt": "x", "stream": True})
    assert response.status_code == 200 and response.data == events
    assert response.headers["X-Olla-Model"] == MODEL  # the fleet's name, in one form
    idle(app)


def test_a_non_latin1_name_that_routes_nowhere_is_404_json(app: Flask) -> None:
    response = app.test_client().post("/olla/llamacpp/v1/chat/completions",
                                      json={"model": "模型\r\nX-Evil: 1", **CHAT})
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "model_not_found"
    assert all("\n" not in v and "\r" not in v for _, v in response.headers.items())
    idle(app)


def test_safe_headers_encodes_what_a_server_would_refuse() -> None:
    good = [("X-Olla-Model", "gemma"), ("Content-Type", "application/json")]
    assert safe_headers(good) is good
    fixed = safe_headers([("X-A", "a\u000bb"), ("X-B", "é模"), ("Bad Name", "x"),
                          ("X-C", "line\r\nX-Injected: 1")])
    assert fixed == [("X-A", "a%0Bb"), ("X-B", "%C3%A9%E6%A8%A1"),
                     ("X-C", "line%0D%0AX-Injected: 1")]


def _environ(app: Flask, body: bytes, path: str) -> dict[str, Any]:
    from werkzeug.test import EnvironBuilder

    return EnvironBuilder(path=path, method="POST", data=body,
                          content_type="application/json").get_environ()


def test_a_response_the_server_refuses_still_gives_everything_back(
        app: Flask, fake: responses.RequestsMock) -> None:
    """As when gunicorn refuses a header: start_response raises after the view returned."""
    events = b'data: {"content":"a","stop":false}\n\ndata: {"content":"","stop":true}\n\n'
    fake.post(f"{CHAT_URL}/completion", body=events, content_type="text/event-stream")
    environ = _environ(app, b'{"prompt": "x", "stream": true}', "/olla/llamacpp/completion")

    def refuse(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        raise RuntimeError("invalid header")

    with pytest.raises(RuntimeError, match="invalid header"):
        app.wsgi_app(environ, refuse)
    idle(app)


def test_an_error_escaping_flask_is_json_500_and_gives_back(
        app: Flask, fake: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug after the view (here: in a response hook) still ends in the JSON envelope."""
    fake.post(f"{CHAT_URL}/tokenize", json={"tokens": [1]})

    def broken_hook(response: Any) -> Any:
        raise RuntimeError("a bug in a hook")

    app.after_request_funcs.setdefault(None, []).insert(0, broken_hook)
    monkeypatch.setattr(app, "handle_exception", lambda exc: (_ for _ in ()).throw(exc))
    seen: list[Any] = []
    body = app.wsgi_app(_environ(app, b'{"content": "x"}', "/olla/llamacpp/tokenize"),
                        lambda status, headers, exc_info=None: seen.append((status, headers)))
    assert seen[0][0].startswith("500")
    assert b"".join(body) == (b'{"error": {"message": "Internal proxy error", "type": '
                              b'"server_error", "code": "internal_error"}}')
    idle(app)


@pytest.mark.parametrize("failure", ["connect", "garbage", "bug"])
def test_each_upstream_failure_gives_the_slot_back(app: Flask, fake: responses.RequestsMock,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   failure: str) -> None:
    client: FlaskClient = app.test_client()
    if failure == "connect":
        fake.post(f"{CHAT_URL}/tokenize", body=REFUSED)
        expected = 503
    elif failure == "garbage":
        fake.post(f"{CHAT_URL}/tokenize", body=requests.exceptions.ChunkedEncodingError(
            "invalid chunk"))
        expected = 502
    else:
        def bug(*args: object, **kwargs: object) -> None:
            raise ZeroDivisionError("a bug in the request path")

        monkeypatch.setattr(services_of(app).pool, "open", bug)
        expected = 500
    response = client.post("/olla/llamacpp/tokenize", json={"content": "x"})
    assert response.status_code == expected
    assert set(response.get_json()["error"]) == {"message", "type", "code"}
    idle(app)


def test_a_stream_that_breaks_mid_way_gives_the_slot_back(app: Flask,
                                                          fake: responses.RequestsMock
                                                          ) -> None:
    class Breaking(io.RawIOBase):
        def __init__(self) -> None:
            self.sent = False

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            if self.sent:
                raise ConnectionResetError("reset mid-stream")
            self.sent = True
            data = b'data: {"content":"a","stop":false}\n\n'
            buffer[:len(data)] = data
            return len(data)

    fake.post(f"{CHAT_URL}/completion", body=io.BufferedReader(Breaking()),
              content_type="text/event-stream")
    response = app.test_client().post("/olla/llamacpp/completion",
                                      json={"prompt": "x", "stream": True})
    assert b'"code": "upstream_error"' in response.data
    idle(app)


def test_a_stream_never_read_gives_the_slot_back(app: Flask,
                                                 fake: responses.RequestsMock) -> None:
    events = b'data: {"content":"a","stop":false}\n\ndata: {"content":"","stop":true}\n\n'
    fake.post(f"{CHAT_URL}/completion", body=events, content_type="text/event-stream")
    response = app.test_client().post("/olla/llamacpp/completion",
                                      json={"prompt": "x", "stream": True}, buffered=False)
    assert services_of(app).registry.states["chat"].in_flight == 1
    response.close()                 # the client left before the body was read
    idle(app)


@pytest.mark.parametrize(("route", "body", "tail"), [
    ("completion", {"prompt": "x", "stream": True}, b""),
    ("v1/chat/completions", {**CHAT, "stream": True}, b"data: [DONE]\n\n"),
])
def test_an_older_bare_error_field_is_relayed_as_a_data_event(
        app: Flask, fake: responses.RequestsMock, route: str, body: dict[str, object],
        tail: bytes) -> None:
    events = (b'data: {"content":"a","stop":false}\n\n'
              b'error: {"code":500,"message":"slot failed","type":"server_error"}\n\n')
    fake.post(f"{CHAT_URL}/{route}", body=events, content_type="text/event-stream")
    response = app.test_client().post(f"/olla/llamacpp/{route}", json=body)
    assert response.data == (b'data: {"content":"a","stop":false}\n\n'
                             b'data: {"error": {"code": 500, "message": "slot failed", '
                             b'"type": "server_error"}}\n\n' + tail)
    model = services_of(app).stats.models[MODEL]
    assert (model.successes, model.failures) == (0, 1)  # counted as an error
    idle(app)


def test_a_data_error_event_is_relayed_as_it_is_and_counted(
        app: Flask, fake: responses.RequestsMock) -> None:
    events = (b'data: {"content":"a","stop":false}\n\n'
              b'data: {"error":{"code":500,"message":"boom","type":"server_error"}}\n\n')
    fake.post(f"{CHAT_URL}/completion", body=events, content_type="text/event-stream")
    response = app.test_client().post("/olla/llamacpp/completion",
                                      json={"prompt": "x", "stream": True})
    assert response.data == events
    assert services_of(app).stats.models[MODEL].failures == 1
    idle(app)
