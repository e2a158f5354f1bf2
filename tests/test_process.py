"""This worker's process figures (app/process.py)."""

from __future__ import annotations

import gc

from app.process import (
    duration_text,
    gc_timer,
    greenlet_health,
    memory_pressure,
    proc_status,
    process_figures,
)

STATUS = """Name:\tpython
VmPeak:\t  200000 kB
VmSize:\t  139000 kB
VmHWM:\t   50000 kB
VmRSS:\t   48000 kB
Threads:\t1
"""


def test_proc_status_reads_kilobytes_as_bytes() -> None:
    figures = proc_status(STATUS)
    assert figures["VmRSS"] == 48000 * 1024 and figures["VmHWM"] == 50000 * 1024
    assert "Threads" not in figures and "Name" not in figures


def test_memory_pressure_from_what_the_machine_has_left() -> None:
    assert memory_pressure(50, 100) == "LOW"
    assert memory_pressure(20, 100) == "MEDIUM"
    assert memory_pressure(5, 100) == "HIGH"
    assert memory_pressure(None, 100) == "UNKNOWN"


def test_olla_thresholds_for_greenlets() -> None:
    assert [greenlet_health(n) for n in (3, 101, 501, 1001)] == [
        "HEALTHY", "NORMAL", "ELEVATED", "CONCERNING"]


def test_go_style_durations() -> None:
    assert duration_text(0.35) == "350ms"
    assert duration_text(42.9) == "42s"
    assert duration_text(303) == "5m3s"
    assert duration_text(7205) == "2h0m5s"


def test_collections_are_timed() -> None:
    timer = gc_timer()
    before = timer.collections
    gc.collect()
    assert timer.collections == before + 1 and timer.last_wall is not None
    assert gc_timer() is timer and gc.callbacks.count(timer) == 1


def test_the_sections_and_their_figures() -> None:
    figures = process_figures(started=1000.0, connections=4, background=2, now=1062.5)
    assert figures["goroutines"] == {"health_status": "HEALTHY", "count": 6,
                                     "connections": 4, "background": 2}
    assert figures["runtime"]["uptime"] == "1m2s"
    assert figures["runtime"]["uptime_seconds"] == 62.5
    assert figures["memory"]["rss_bytes"] > 1 << 20
    collector = figures["garbage_collection"]
    assert collector["num_gc_cycles"] == sum(g["collections"] for g in collector["generations"])
    assert len(collector["generations"]) == len(gc.get_stats())
