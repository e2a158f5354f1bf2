"""The gunicorn worker: gevent's own, with the errors gunicorn answers by itself (a request
line or header over ``server.request_limits.max_header_size``, a malformed request) in the
spec's JSON envelope instead of gunicorn's HTML page.

``gunicorn.conf.py`` names it as ``worker_class``. Imported by gunicorn's master as gevent's
worker is (it imports nothing of the app's request path).
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

# gunicorn's own statuses -> the envelope's type and code.
CODES = {
    400: ("invalid_request_error", "bad_request"),
    403: ("invalid_request_error", "forbidden"),
    414: ("invalid_request_error", "request_line_too_long"),
    417: ("invalid_request_error", "expectation_failed"),
    431: ("invalid_request_error", "headers_too_large"),
    501: ("invalid_request_error", "not_implemented"),
}


def write_json_error(sock: Any, status: int, reason: str, message: str) -> None:
    """gunicorn's ``util.write_error`` with a JSON body."""
    type_, code = CODES.get(status, ("server_error", "internal_error"))
    text = message or reason
    if status == 431:
        text = f"Request header fields too large: {message}"
    elif status == 414:
        text = f"Request line too long: {message}"
    body = json.dumps({"error": {"message": text, "type": type_, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


class Worker(GeventWorker):  # type: ignore[misc]
    """gevent's worker, answering its own errors in JSON."""

    def init_process(self) -> None:
        """In the worker process only: gunicorn's error writer becomes ours."""
        util.write_error = write_json_error
        super().init_process()
