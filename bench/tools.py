"""The processes of the proxy-overhead benchmark: the C fake upstream and stream client
(compiled on first use into ``bench/build/``), a real nginx running ``deploy/nginx.conf``,
and samplers for CPU and memory."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.core import (
    BenchError,
    children_cpu_seconds,
    cpu_seconds,
    machine_busy_seconds,
    process_tree,
)
from tests.integration.procs import (
    free_port,
    nginx_binary,
    nginx_main_config,
    nginx_site_config,
    stop_process,
    wait_http,
)

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"
NGINX_WORKER_CONNECTIONS = 8192  # 1000 streams need 2000 connections (client + upstream)
READY_TIMEOUT = 10.0


# ---------------------------------------------------------------------------------------------
# The C programs.


def build_native(name: str) -> Path:
    """Compile ``bench/<name>.c`` into ``bench/build/<name>`` unless the binary is newer."""
    source = BENCH_DIR / f"{name}.c"
    binary = BUILD_DIR / name
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        raise BenchError("a C compiler (gcc or cc) is needed to build the fake upstream and "
                         "the stream client: apt-get install gcc")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".tmp")
    command = [compiler, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-o", str(partial),
               str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise BenchError(f"compiling {source.name} failed:\n{result.stderr}")
    partial.replace(binary)
    return binary


@dataclass
class FakeUpstream:
    """The llama.cpp-shaped fake (bench/fake_upstream.c) on a free loopback port."""

    tokens: int = 32
    interval_ms: int = 20
    first_token_ms: int = 20
    plain_delay_ms: int = 0
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeUpstream:
        """Start it and wait for its "ready <port>" line."""
        binary = build_native("fake_upstream")
        self.process = subprocess.Popen(
            [str(binary), "--port", "0", "--tokens", str(self.tokens),
             "--interval-ms", str(self.interval_ms), "--first-token-ms",
             str(self.first_token_ms), "--plain-delay-ms", str(self.plain_delay_ms)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], READY_TIMEOUT)
        line = self.process.stdout.readline().decode() if ready else ""
        if not line.startswith("ready "):
            self.stop()
            raise BenchError(f"the fake upstream did not start (said {line!r})")
        self.port = int(line.split()[1])
        wait_http(self.url + "/health", self.process, timeout=READY_TIMEOUT)
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        if self.process is not None:
            stop_process(self.process, timeout=5)
            if self.process.stdout is not None:
                self.process.stdout.close()


# ---------------------------------------------------------------------------------------------
# nginx.


def nginx_executable() -> str:
    """The nginx executable."""
    found = nginx_binary()
    if found is None:
        raise BenchError("nginx is not installed (apt-get install nginx-light)")
    return found


@dataclass
class Nginx:
    """A real nginx with deploy/nginx.conf in front of ``upstream_port``."""

    upstream_port: int
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    prefix: Path | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        """Write the configs to a temp dir, check them with ``nginx -t``, start, wait."""
        binary = nginx_executable()
        self.prefix = Path(tempfile.mkdtemp(prefix="olla-bench-nginx-"))
        self.prefix.chmod(0o755)  # nginx's workers may run as another user
        try:
            site = nginx_site_config(self.upstream_port, self.port)
        except ValueError as exc:
            raise BenchError(str(exc)) from exc
        (self.prefix / "site.conf").write_text(site)
        (self.prefix / "nginx.conf").write_text(
            nginx_main_config(self.prefix, NGINX_WORKER_CONNECTIONS, "warn"))
        command = [binary, "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf"),
                   "-e", str(self.prefix / "error.log")]
        check = subprocess.run([*command, "-t"], capture_output=True, timeout=30, check=False)
        if check.returncode != 0:
            raise BenchError(f"nginx -t rejected the config:\n{check.stderr.decode()}")
        with open(self.prefix / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=stderr,
                                            start_new_session=True)
        wait_http(self.url + "/health", self.process, timeout=15)
        return self

    def log(self) -> str:
        """The tail of nginx's error log."""
        path = self.prefix / "error.log" if self.prefix else None
        return path.read_text()[-4000:] if path and path.exists() else ""

    def stop(self) -> None:
        """Fast shutdown, then kill the process group we started; remove the temp dir."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Memory and CPU.


def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak RSS (VmHWM) of ``pid`` to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Peak RSS of one process over a block: VmRSS sampled every ``period`` seconds, and
    the kernel's VmHWM (reset at the start when the kernel allows it)."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid = pid
        self.period = period
        self.peak_kib = 0
        self.start_kib = 0
        self.hwm_kib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _status_kib(self.pid, "VmRSS")
            if rss is not None:
                self.peak_kib = max(self.peak_kib, rss)
            self._stop.wait(self.period)

    @contextmanager
    def measure(self) -> Iterator[RssSampler]:
        """Sample during the block; afterwards ``peak_kib`` is the highest RSS seen."""
        hwm_reset = reset_peak_rss(self.pid)
        self.start_kib = _status_kib(self.pid, "VmRSS") or 0
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            if hwm_reset:
                self.hwm_kib = _status_kib(self.pid, "VmHWM")
                if self.hwm_kib is not None:
                    self.peak_kib = max(self.peak_kib, self.hwm_kib)


def runqueue_wait_seconds(pid: int) -> float:
    """Seconds the main thread of ``pid`` spent runnable but waiting for a CPU
    (/proc/<pid>/schedstat; 0 when the kernel does not keep schedstats)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class CpuMeter:
    """CPU use by role over a block, in % of one core: each server's process tree, this
    process's reaped children (the load generator), and the rest of the machine; and, for
    ``waiting``, how much of the time that process was ready to run but had no CPU."""

    roles: dict[str, Sequence[int]]
    waiting: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def measure(self, into: dict[str, float]) -> Iterator[None]:
        """Fill ``into`` with each role's CPU use during the block."""
        trees = {role: [p for pid in pids for p in process_tree(pid)]
                 for role, pids in self.roles.items()}

        def sample() -> dict[str, float]:
            out = {role: cpu_seconds(pids) for role, pids in trees.items()}
            out["client"] = children_cpu_seconds()
            for role, pid in self.waiting.items():
                out[f"_wait_{role}"] = runqueue_wait_seconds(pid)
            out["_busy"] = machine_busy_seconds()
            out["_wall"] = time.monotonic()
            return out

        before = sample()
        yield
        after = sample()
        wall = max(after["_wall"] - before["_wall"], 1e-9)
        used = {k: after[k] - before[k] for k in before if not k.startswith("_")}
        for role, seconds in used.items():
            into[role] = round(100 * seconds / wall, 1)
        other = after["_busy"] - before["_busy"] - sum(used.values())
        into["other"] = round(100 * max(other, 0.0) / wall, 1)
        for role in self.waiting:
            waited = after[f"_wait_{role}"] - before[f"_wait_{role}"]
            into[f"{role}_waiting"] = round(100 * waited / wall, 1)
