"""Processes the integration tests own: real llama.cpp servers and the proxy under gunicorn."""

from __future__ import annotations

import functools
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
NGINX_SITE = ROOT / "deploy" / "nginx.conf"
NGINX_UPSTREAM = "server 127.0.0.1:40114;"   # in deploy/nginx.conf, replaced for a run
NGINX_LISTEN = "listen 80;"
LAUNCHER = Path(__file__).with_name("llamacpp_server.py")


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0,
              ok: Sequence[int] = (200,)) -> None:
    """Wait until ``url`` answers with one of ``ok``, or fail if the process died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            last = requests.get(url, timeout=1)
            if last.status_code in ok:
                return
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout} s: {last}")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> None:
    """``sig`` (SIGTERM), then SIGKILL, and reap."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@functools.cache
def model_path() -> str:
    """The Gemma GGUF, assembled once for every server the tests start."""
    from app.embedded import model_file

    return str(model_file())


@dataclass
class LlamaServer:
    """A real llama-server on the Gemma model, in its own process."""

    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        """Start (or restart) on the same port and wait for /health."""
        self.process = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--port", str(self.port), "--model", model_path(),
             *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def wait(self) -> LlamaServer:
        assert self.process is not None
        wait_http(self.url + "/health", self.process)
        return self

    def kill(self) -> None:
        """Kill at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def slots(self, api_key: str | None = None) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        response = requests.get(self.url + "/slots", headers=headers, timeout=5)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def metrics(self) -> dict[str, float]:
        """llama.cpp's own Prometheus figures (``--metrics``), without the ``llamacpp:``
        prefix."""
        response = requests.get(self.url + "/metrics", timeout=5)
        response.raise_for_status()
        out: dict[str, float] = {}
        for line in response.text.splitlines():
            if line.startswith("llamacpp:"):
                name, value = line.split()
                out[name.removeprefix("llamacpp:")] = float(value)
        return out

    def busy_slots(self, api_key: str | None = None) -> int:
        return sum(1 for s in self.slots(api_key) if s.get("is_processing"))


K = TypeVar("K")


@contextmanager
def running(servers: Mapping[K, LlamaServer]) -> Iterator[Mapping[K, LlamaServer]]:
    """Start the servers side by side (they load at once), wait for all, stop all after."""
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@dataclass
class Proxy:
    """The proxy under gunicorn (gevent worker), with a YAML config of its own."""

    config: dict[str, Any]
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    config_path: Path | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        handle, path = tempfile.mkstemp(suffix=".yaml", prefix="olla-test-")
        os.close(handle)
        self.config_path = Path(path)
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.config_path.with_suffix(".log")
        env = {**os.environ, "OLLA_CONFIG_FILE": str(self.config_path), **self.env}
        env.pop("OLLA_EMBEDDED_URL", None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "python:app.gunicorn_conf",
                 "--bind", f"127.0.0.1:{self.port}", *self.extra_args, "app.wsgi:app"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        # Up once it answers (a model list, 503 without endpoints, 401 with API keys).
        wait_http(self.url + "/olla/llamacpp/v1/models", self.process, timeout=30,
                  ok=(200, 401, 503))
        return self

    def stop(self) -> None:
        # SIGINT is gunicorn's quick shutdown: SIGTERM would wait for idle keep-alive
        # connections that test clients leave open.
        if self.process is not None:
            stop_process(self.process, sig=signal.SIGINT)
        for path in (self.config_path, self.log_path):
            if path is not None and path.exists():
                path.unlink()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        """The gunicorn workers' process ids (the master's children)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


def redis_binary() -> str:
    """The redis-server executable (``make test`` installs Debian's)."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)
    if found is None:
        raise RuntimeError("redis-server is not installed: run `make test` (it installs it) "
                           "or apt-get install redis-server")
    return found


@dataclass
class RedisServer:
    """A real redis-server on a free loopback port, nothing persisted."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        self.process = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)
            self.process = None

    def flush(self) -> None:
        """Forget every key (between tests sharing one server)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(16)


def nginx_binary() -> str | None:
    """The nginx executable, if installed."""
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def nginx_site_config(upstream_port: int, listen_port: int) -> str:
    """deploy/nginx.conf pointed at ``upstream_port`` and listening on a loopback port;
    ValueError if the file no longer has exactly one of the lines replaced."""
    text = NGINX_SITE.read_text()
    for needle in (NGINX_UPSTREAM, NGINX_LISTEN):
        if text.count(needle) != 1:
            raise ValueError(f"{NGINX_SITE}: expected exactly one `{needle}`")
    text = text.replace(NGINX_UPSTREAM, f"server 127.0.0.1:{upstream_port};")
    return text.replace(NGINX_LISTEN, f"listen 127.0.0.1:{listen_port};")


def nginx_main_config(prefix: Path, worker_connections: int | None = None,
                      error_level: str = "info") -> str:
    """A main nginx.conf with one worker that keeps every file nginx writes under
    ``prefix`` and includes ``prefix/site.conf``."""
    user = ""
    if os.geteuid() == 0:
        # Workers would run as "nobody", which cannot enter a 0700 temporary directory.
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} "
                f"{grp.getgrgid(os.getegid()).gr_name};\n")
    limits = ""
    events = "events {}\n"
    if worker_connections:
        limits = f"worker_rlimit_nofile {worker_connections * 2};\n"
        events = f"events {{ worker_connections {worker_connections}; }}\n"
    temp = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}daemon off;\nmaster_process on;\nworker_processes 1;\n{limits}"
            f"pid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} {error_level};\n"
            f"{events}http {{\n    access_log off;\n{temp}"
            f"    include {prefix / 'site.conf'};\n}}\n")
