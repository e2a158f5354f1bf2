"""A llama.cpp-shaped upstream on a raw socket that misbehaves on cue.

Polls (``/health``, ``/v1/models``, ``/props``, ``/slots``) answer like llama.cpp's, or, with
``huge_polls``, far over the proxy's poll cap. A POST does what its body's ``x_script``
field says (the proxy forwards unknown fields untouched):

- ``ticks``: a chunked SSE stream, one event every ``x_interval`` seconds, ``x_n`` of them
  (each ``x_size`` bytes longer than a token);
- ``close_delimited``: an SSE stream without framing (no length, not chunked), ended by
  closing; one event, then the rest once the test calls ``release()``;
- ``one_write``: ``x_n`` events (the last with ``timings``) in one chunk of one write, then
  the end of the body once the test calls ``release()``;
- ``legacy_error``: one event, then an older llama.cpp's bare ``error: {...}`` field;
- ``reset_after_body``: reads the whole request, then resets the connection;
- ``break_mid_stream``: one chunked event, then resets the connection;
- anything else: a small JSON completion.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from typing import Any

MODEL = "scripted.gguf"
TIMINGS = {"prompt_n": 3, "predicted_n": 5, "prompt_ms": 1.0, "predicted_ms": 2.0,
           "predicted_per_second": 2500.0}


def event(content: str, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": None}
    return b"data: " + json.dumps({"choices": [choice], **extra}).encode() + b"\n\n"


class ScriptedUpstream:
    """Serves on a loopback port in daemon threads; ``stop()`` closes everything."""

    def __init__(self, huge_polls: bool = False) -> None:
        self.huge_polls = huge_polls
        self.gate = threading.Event()
        self.posts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScriptedUpstream:
        self.thread.start()
        return self

    def release(self) -> None:
        self.gate.set()

    def stop(self) -> None:
        self.stopping = True
        self.gate.set()
        self.listener.close()
        for sock in self.connections:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        try:
            while not self.stopping:
                line = reader.readline()
                if not line:
                    return
                method, path = line.decode("latin-1").split()[:2]
                headers = {}
                while (header := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", "0")))
                if method == "GET":
                    self._poll(sock, path)
                    continue
                self.posts += 1
                if not self._post(sock, json.loads(body or b"{}")):
                    return
        except OSError:
            return
        finally:
            reader.close()
            sock.close()

    def _send(self, sock: socket.socket, status: str, body: bytes,
              content_type: str = "application/json") -> None:
        sock.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def _poll(self, sock: socket.socket, path: str) -> None:
        filler = "x" * (20 << 20) if self.huge_polls else ""
        documents: dict[str, Any] = {
            "/health": {"status": "ok"},
            "/v1/models": {"object": "list", "data": [{"id": MODEL, "object": "model"}]},
            "/props": {"total_slots": 2, "default_generation_settings": {"n_ctx": 512},
                       "filler": filler},
            "/slots": [{"id": 0, "is_processing": False, "filler": filler},
                       {"id": 1, "is_processing": False}],
        }
        path = path.split("?", 1)[0]
        if path in documents:
            self._send(sock, "200 OK", json.dumps(documents[path]).encode())
        elif path == "/metrics":
            self._send(sock, "200 OK", b"# " + filler.encode() + b"\n", "text/plain")
        else:
            self._send(sock, "404 Not Found", b'{"error": {"code": 404}}')

    def _post(self, sock: socket.socket, body: dict[str, Any]) -> bool:
        """Answer one POST; False when the connection is done with."""
        script = body.get("x_script")
        n = int(body.get("x_n", 5))
        sse = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        if script == "ticks":
            sock.sendall((sse + "Transfer-Encoding: chunked\r\n\r\n").encode())
            pad = "x" * int(body.get("x_size", 0))
            for i in range(n):
                if self.stopping:
                    return False
                data = event(f"t{i}{pad}", **({"timings": TIMINGS} if i == n - 1 else {}))
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                time.sleep(float(body.get("x_interval", 0.02)))
            done = b"data: [DONE]\n\n"
            sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            return True
        if script == "close_delimited":
            sock.sendall((sse + "Connection: close\r\n\r\n").encode() + event("first"))
            self.gate.wait(30)
            sock.sendall(event("second", timings=TIMINGS) + b"data: [DONE]\n\n")
            return False
        if script == "one_write":
            events = b"".join(event(f"e{i}", **({"timings": TIMINGS} if i == n - 1 else {}))
                              for i in range(n)) + b"data: [DONE]\n\n"
            sock.sendall((sse + "Transfer-Encoding: chunked\r\n\r\n").encode()
                         + b"%x\r\n%s\r\n" % (len(events), events))
            self.gate.wait(30)
            sock.sendall(b"0\r\n\r\n")
            return True
        if script == "legacy_error":
            sock.sendall((sse + "Transfer-Encoding: chunked\r\n\r\n").encode())
            for data in (event("one"), b'error: {"code": 500, "message": "boom", '
                                      b'"type": "server_error"}\n\n'):
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            sock.sendall(b"0\r\n\r\n")
            return True
        if script == "break_mid_stream":
            sock.sendall((sse + "Transfer-Encoding: chunked\r\n\r\n").encode())
            data = event("one")
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
            time.sleep(0.1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if script == "reset_after_body":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        self._send(sock, "200 OK", json.dumps({
            "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}], "timings": TIMINGS}).encode())
        return True
