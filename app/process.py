"""This worker's process figures for ``GET /internal/process``: memory, the garbage
collector, greenlets and the runtime, in Olla's sections (``handler_process.go``).

Olla reports Go's heap and goroutines; the Python equivalents are the process's resident
memory (from ``/proc/self/status``), CPython's collector (``gc.get_stats`` and a callback
that times each collection) and the greenlets serving connections. Where a Go figure has
no Python counterpart it is left out rather than faked. Flask-free.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class GcTimer:
    """Time spent in CPython's collector, from ``gc.callbacks`` (two calls per collection:
    a cost of well under a microsecond each)."""

    total: float = 0.0
    collections: int = 0
    last_wall: float | None = None
    _began: float = 0.0

    def __call__(self, phase: str, info: Mapping[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began:
            self.total += time.perf_counter() - self._began
            self.collections += 1
            self.last_wall = time.time()
            self._began = 0.0


_TIMER: GcTimer | None = None


def gc_timer() -> GcTimer:
    """The process's one GcTimer, installed on first use."""
    global _TIMER
    if _TIMER is None:
        _TIMER = GcTimer()
        gc.callbacks.append(_TIMER)
    return _TIMER


def proc_status(text: str | None = None) -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``VmSize``... of ``/proc/self/status`` in bytes (empty where
    there is no /proc)."""
    if text is None:
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[name] = int(parts[0]) * 1024
    return out


def memory_pressure(available: int | None, total: int | None) -> str:
    """Olla's LOW/MEDIUM/HIGH, from the machine's available memory (what decides whether
    this process can grow), not a Go heap ratio."""
    if not available or not total:
        return "UNKNOWN"
    free = available / total
    return "HIGH" if free < 0.1 else "MEDIUM" if free < 0.3 else "LOW"


def _meminfo() -> dict[str, int]:
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            return proc_status(f.read())
    except OSError:
        return {}


def greenlet_health(count: int) -> str:
    """Olla's goroutine thresholds, applied to greenlets."""
    if count > 1000:
        return "CONCERNING"
    if count > 500:
        return "ELEVATED"
    if count > 100:
        return "NORMAL"
    return "HEALTHY"


def duration_text(seconds: float) -> str:
    """Go's duration text as Olla prints it: ``350ms``, ``42s``, ``5m3s``, ``2h0m5s``."""
    if seconds < 1:
        return f"{seconds * 1000:.3g}ms"
    whole = int(seconds)
    hours, minutes, secs = whole // 3600, whole // 60 % 60, whole % 60
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def process_figures(started: float, connections: int, background: int,
                    now: float | None = None, iso: Any = None) -> dict[str, Any]:
    """The sections of ``/internal/process`` for this worker. ``connections``: greenlets
    serving a client connection now; ``background``: the proxy's own (health checks,
    lease renewal, shared-state listener)."""
    now = time.time() if now is None else now
    status = proc_status()
    machine = _meminfo()
    timer = gc_timer()
    generations = gc.get_stats()
    greenlets = connections + background
    return {
        "pid": os.getpid(),
        "memory": {
            "rss_bytes": status.get("VmRSS"),
            "peak_rss_bytes": status.get("VmHWM"),
            "virtual_bytes": status.get("VmSize"),
            "allocated_blocks": sys.getallocatedblocks(),
            "memory_pressure": memory_pressure(machine.get("MemAvailable"),
                                               machine.get("MemTotal")),
        },
        "garbage_collection": {
            "last_gc": iso(timer.last_wall) if iso else timer.last_wall,
            "total_gc_time": duration_text(timer.total),
            "total_gc_time_ms": round(timer.total * 1000, 3),
            "avg_gc_pause": duration_text(timer.total / timer.collections)
            if timer.collections else None,
            "num_gc_cycles": sum(g["collections"] for g in generations),
            "timed_gc_cycles": timer.collections,
            "generations": [{"collections": g["collections"], "collected": g["collected"],
                             "uncollectable": g["uncollectable"]} for g in generations],
            "thresholds": list(gc.get_threshold()),
        },
        "goroutines": {
            "health_status": greenlet_health(greenlets),
            "count": greenlets,
            "connections": connections,
            "background": background,
        },
        "runtime": {
            "uptime": duration_text(now - started),
            "uptime_seconds": round(now - started, 3),
            "python_version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "num_cpu": os.cpu_count(),
        },
    }
