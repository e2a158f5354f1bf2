"""A llama.cpp-shaped SSE upstream that waits after its first event until told to go on.

Real llama.cpp generates too fast to prove, by timing alone, that nothing between it and
the client buffers a stream. This upstream sends one event, then blocks until the test
has *read* that event through the proxy (``release()``), then finishes. If anything in
between buffered, the client would never see the first event and the test would time out.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "gated-model.gguf"


class GatedUpstream:
    """Serves /health, /v1/models, /props and streaming POSTs on a loopback port."""

    def __init__(self, hold_seconds: float = 20.0, die_first: bool = False) -> None:
        self.gate = threading.Event()
        self.first_sent = threading.Event()
        self.hold_seconds = hold_seconds
        self.die_first = die_first
        self.requests: list[dict[str, Any]] = []
        self.open_sockets: list[Any] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._json(200, {"status": "ok"})
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [
                        {"id": MODEL, "object": "model", "created": 1, "owned_by": "llamacpp"}]})
                elif self.path == "/props":
                    self._json(200, {"total_slots": 1, "model_path": "/m/" + MODEL})
                else:
                    self._json(404, {"error": {"code": 404, "message": "File Not Found",
                                               "type": "not_found_error"}})

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                upstream.requests.append({"path": self.path, "body": body,
                                          "headers": dict(self.headers)})
                upstream.open_sockets.append(self.connection)
                if self.path == "/embedding":
                    # A non-streamed answer cut short: the server dies mid-body.
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"embedding": [0.1, ')
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                # Test knobs in the body: x_delay_first (seconds of "prompt processing"
                # before the first event), x_die_first (close before any event),
                # x_garbage (broken chunked framing after one event).
                if body.get("x_garbage"):
                    self._chunk(b'data: {"content":"first","stop":false}\n\n')
                    self.wfile.write(b"zz-not-a-chunk-size\r\n\x00\xff garbage\r\n")
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if upstream.die_first or body.get("x_die_first"):
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                delay = float(body.get("x_delay_first", 0))
                if upstream.gate.wait(delay) if delay else False:
                    delay = 0
                try:
                    self._chunk(b'data: {"content":"first","stop":false}\n\n')
                except OSError:
                    return
                upstream.first_sent.set()
                released = upstream.gate.wait(upstream.hold_seconds)
                tail = b'data: {"content":"","stop":true,"released":%s}\n\n' % (
                    b"true" if released else b"false")
                try:
                    self._chunk(tail)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> GatedUpstream:
        self.thread.start()
        return self

    def release(self) -> None:
        self.gate.set()

    def reset(self) -> None:
        self.gate.clear()
        self.first_sent.clear()

    def stop(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
