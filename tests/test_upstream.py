"""The upstream pool: stale keep-alive connections, header filtering, error mapping."""

from __future__ import annotations

from http.client import RemoteDisconnected

import pytest
import requests
import responses

from app.config import Endpoint, ProxySettings
from app.errors import UpstreamError, UpstreamTimeout
from app.upstream import UpstreamConnectError, UpstreamPool, _closed_under_us

URL = "http://node.test:8080"
ENDPOINT = Endpoint(name="n", url=URL)


def stale() -> requests.ConnectionError:
    cause = RemoteDisconnected("Remote end closed connection without response")
    return requests.ConnectionError(
        requests.packages.urllib3.exceptions.ProtocolError("Connection aborted.", cause))


def test_a_connection_closed_under_us_is_retried_once(fake: responses.RequestsMock) -> None:
    first = fake.post(URL + "/completion", body=stale())
    pool = UpstreamPool((ENDPOINT,), ProxySettings())
    # responses answers every call to a URL with the first registered match until it is
    # replaced: emulate "the second attempt works" with a call counter.
    calls: list[int] = []

    def answer(request: object) -> tuple[int, dict[str, str], str]:
        calls.append(1)
        if len(calls) == 1:
            raise stale()
        return 200, {"Content-Type": "application/json"}, '{"ok": true}'

    fake.remove(first)
    fake.add_callback(responses.POST, URL + "/completion", callback=answer)
    upstream = pool.open(ENDPOINT, "POST", "/completion", body=b"{}")
    assert upstream.status == 200 and upstream.read() == b'{"ok": true}'
    assert len(calls) == 2


def test_stale_twice_is_a_connect_error(fake: responses.RequestsMock) -> None:
    fake.post(URL + "/completion", body=stale())
    pool = UpstreamPool((ENDPOINT,), ProxySettings())
    with pytest.raises(UpstreamConnectError):
        pool.open(ENDPOINT, "POST", "/completion", body=b"{}")
    assert len(fake.calls) == 2


def test_refused_is_not_retried(fake: responses.RequestsMock) -> None:
    fake.post(URL + "/completion", body=requests.ConnectionError(
        ConnectionRefusedError(111, "Connection refused")))
    pool = UpstreamPool((ENDPOINT,), ProxySettings())
    with pytest.raises(UpstreamConnectError):
        pool.open(ENDPOINT, "POST", "/completion", body=b"{}")
    assert len(fake.calls) == 1


def test_read_timeout_before_answer_is_a_timeout(fake: responses.RequestsMock) -> None:
    fake.post(URL + "/completion", body=requests.ReadTimeout("read timed out"))
    pool = UpstreamPool((ENDPOINT,), ProxySettings())
    with pytest.raises(UpstreamTimeout):
        pool.open(ENDPOINT, "POST", "/completion", body=b"{}")
    assert issubclass(UpstreamTimeout, UpstreamError)


@pytest.mark.parametrize(("exc", "expected"), [
    (RemoteDisconnected("x"), True),
    (ConnectionResetError(104, "reset"), True),
    (BrokenPipeError(32, "pipe"), True),
    (ConnectionRefusedError(111, "refused"), False),
    (TimeoutError("t"), False),
])
def test_closed_under_us_looks_through_wrappers(exc: BaseException, expected: bool) -> None:
    wrapped = requests.ConnectionError(requests.packages.urllib3.exceptions.ProtocolError(
        "Connection aborted.", exc))
    assert _closed_under_us(wrapped) is expected


def test_upstream_requests_ask_for_identity_encoding() -> None:
    from app.config import Endpoint
    from app.upstream import request_headers

    sent = request_headers({"Accept-Encoding": "gzip, br", "X-Keep": "1"},
                           Endpoint(name="a", url="http://a.test"))
    assert sent["Accept-Encoding"] == "identity" and sent["X-Keep"] == "1"
    assert [k for k in sent if k.lower() == "accept-encoding"] == ["Accept-Encoding"]


@pytest.mark.parametrize(("body", "said"), [
    (requests.ConnectionError(requests.packages.urllib3.exceptions.MaxRetryError(
        None, "/completion?key=sk-123", ConnectionRefusedError(111, "refused"))),
     "connection refused"),
    (requests.ConnectionError("HTTPConnectionPool(host='10.1.2.3', port=8080): failed"),
     "ConnectionError"),
    (requests.ConnectionError(OSError(-2, "Name or service not known")), "network error"),
])
def test_client_facing_messages_name_no_host_port_or_path(fake: responses.RequestsMock,
                                                          body: Exception, said: str) -> None:
    fake.post(URL + "/completion", body=body)
    pool = UpstreamPool((ENDPOINT,), ProxySettings())
    with pytest.raises(UpstreamConnectError) as raised:
        pool.open(ENDPOINT, "POST", "/completion", body=b"{}")
    message = raised.value.message
    assert message == f"upstream is not reachable: {said}"
    for secret in ("10.1.2.3", "8080", "/completion", "sk-123", URL.split("//")[1]):
        assert secret not in message


def test_an_answer_over_the_limit_is_refused_unread(fake: responses.RequestsMock) -> None:
    from app.errors import UpstreamTooLarge

    fake.get(URL + "/props", body=b"x" * 5000)
    fake.get(URL + "/slots", body=b"[" + b"1," * 3000 + b"1]",
             headers={"Transfer-Encoding": "chunked"})
    pool = UpstreamPool((ENDPOINT,), ProxySettings())
    assert pool.fetch(ENDPOINT, "/props", 2.0, limit=5000) == (200, b"x" * 5000)
    for path in ("/props", "/slots"):
        with pytest.raises(UpstreamTooLarge):
            pool.fetch(ENDPOINT, path, 2.0, limit=4000)
