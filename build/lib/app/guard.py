"""The WSGI layer around the Flask app: every header that goes out is a valid header, and
whatever escapes Flask still gives back what its request held.

Flask turns exceptions in views into responses, but not those raised while the response
starts (``start_response``: gunicorn refuses a header value with a control character) or in
its own hooks. Those would reach gunicorn, which answers with an HTML 500, and the request's
slot, upstream connection and client watch would be left to the lease book's backstop.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

log = logging.getLogger(__name__)

FORWARD_KEY = "olla.forward"       # environ key: the request's Forward, once it has one
# RFC 9110 field-name and field-value, as gunicorn checks them.
_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
_ENCODE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")

StartResponse = Callable[..., Any]


def safe_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` as they are when every one is valid; otherwise a copy in which invalid
    values are percent-encoded and headers with invalid names are left out."""
    # One match over all names and one over all values (a tab joins values: allowed inside
    # one, and never inside a name): a response's dozen headers cost about a microsecond.
    if _NAME.fullmatch("".join(n for n, _ in headers)) and \
            _VALUE.fullmatch("\t".join(v for _, v in headers)):
        return headers
    fixed = []
    for name, value in headers:
        if not _NAME.fullmatch(name):
            log.warning("dropped a response header with an invalid name")
            continue
        if not _VALUE.fullmatch(value):
            value = quote(value, safe=_ENCODE_SAFE + " ")
        fixed.append((name, value))
    return fixed


_INTERNAL = json.dumps({"error": {"message": "Internal proxy error", "type": "server_error",
                                  "code": "internal_error"}}).encode()


class Guard:
    """Wraps ``app.wsgi_app``."""

    def __init__(self, wsgi_app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
                 ) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any],
                 start_response: StartResponse) -> Iterable[bytes]:
        started: list[bool] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            started.append(True)
            return start_response(status, safe_headers(headers), exc_info)

        try:
            return self.wsgi_app(environ, start)
        except Exception:
            log.exception("unhandled error outside the request handler")
            forward = environ.pop(FORWARD_KEY, None)
            if forward is not None:
                forward.close(ok=False)
            if started:
                raise  # the server has a half-started response: only it can end it
            start_response("500 INTERNAL SERVER ERROR",
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(_INTERNAL)))])
            return [_INTERNAL]
