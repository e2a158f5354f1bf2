"""The dashboard in a real headless Chromium (Debian's, through selenium), in front of two
real llama.cpp servers: no console errors, both endpoints with their states, a slot bar
filled by a running stream, charts with points, an endpoint stopped shown offline within
10 s, and a phone's width without sideways scrolling."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver

from .browser import ALIAS, chrome, real_fleet, rendered
from .procs import LlamaServer, Proxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Proxy, dict[str, LlamaServer]]]:
    with real_fleet() as found:
        yield found


@pytest.fixture
def driver() -> Iterator[webdriver.Chrome]:
    browser = chrome()
    yield browser
    browser.quit()


# Read in one script between two redraws: an element found now may be replaced by the
# next redraw (every 2 s) before a later call reads it.
PAGE = """
const cards = {};
for (const c of document.querySelectorAll("article.card")) {
  cards[c.dataset.name] = {state: c.dataset.state,
                           text: c.querySelector(".state").textContent,
                           bar: c.querySelector(".bar > span").style.width,
                           slots: c.querySelector(".slots").textContent};
}
const charts = {};
for (const c of document.querySelectorAll(".chart")) {
  charts[c.querySelector("h3").textContent] = {
    points: Number(c.dataset.points), drawn: c.querySelectorAll("polyline, circle").length};
}
return {cards, charts, errors: document.getElementById("errors").textContent};
"""


def page(driver: webdriver.Chrome) -> Any:
    return driver.execute_script(PAGE)


def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.2)


def stream_in_background(proxy: Proxy, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        with requests.post(proxy.url + "/olla/llamacpp/v1/chat/completions", stream=True,
                           timeout=120, json={"model": ALIAS, "stream": True,
                                              "max_tokens": 600, "messages": [
                                                  {"role": "user",
                                                   "content": "Tell a very long story"}]}
                           ) as answer:
            for _ in answer.iter_lines():
                if stop.is_set():
                    return
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_dashboard_in_a_real_browser(fleet: tuple[Proxy, dict[str, LlamaServer]],
                                         driver: webdriver.Chrome, tmp_path: Path) -> None:
    proxy, servers = fleet
    # A finished request and a refused one, so that the charts and the errors have data.
    chat = proxy.url + "/olla/llamacpp/v1/chat/completions"
    assert requests.post(chat, timeout=60, json={"model": ALIAS, "max_tokens": 4, "messages": [
        {"role": "user", "content": "hi"}]}).status_code == 200
    assert requests.post(chat, timeout=10, json={"model": "no-such-model", "messages": [
        {"role": "user", "content": "hi"}]}).status_code == 404
    stop = threading.Event()
    streaming = stream_in_background(proxy, stop)
    try:
        until(lambda: sum(s.busy_slots() for s in servers.values()) == 1, 20,
              "the stream holds a slot")
        driver.get(proxy.url + "/internal/ui/")
        state = rendered(driver)
        assert state["error"] is None
        shown = page(driver)
        for name in servers:
            assert shown["cards"][name]["state"] == "healthy"
            assert "healthy" in shown["cards"][name]["text"]

        def busy_bar() -> Any:
            cards = page(driver)["cards"]
            return [c for c in cards.values() if c["bar"] not in ("", "0%", "0.0%")
                    and c["slots"].startswith("1 / 2")]
        assert until(busy_bar, 10, "a slot bar that is not empty")

        def charted() -> Any:
            charts = page(driver)["charts"]
            ttfb = charts.get("Time to first byte", {"points": 0, "drawn": 0})
            return charts if ttfb["points"] > 0 and ttfb["drawn"] > 0 else None
        charts = until(charted, 10, "a time-to-first-byte chart with points")
        assert charts["Requests per second by outcome"]["points"] > 0
        assert "model_not_found" in page(driver)["errors"]
        driver.save_screenshot(str(tmp_path / "dashboard.png"))
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000

        # An endpoint stopped: its card says so within 10 s (probes every second).
        idle = next(n for n, s in servers.items() if s.busy_slots() == 0)
        servers[idle].stop()
        stopped = time.monotonic()
        until(lambda: page(driver)["cards"][idle]["state"] == "offline", 10,
              f"{idle} shown offline")
        print(f"\n{idle} shown offline {time.monotonic() - stopped:.1f} s after it stopped")
        assert "offline" in page(driver)["cards"][idle]["text"]
        # No console errors at all (a missing favicon would be one).
        logs = driver.get_log("browser")
        assert not [entry for entry in logs if entry["level"] == "SEVERE"], logs
    finally:
        stop.set()
        streaming.join(30)
        for server in servers.values():
            if server.process is None or server.process.poll() is not None:
                server.start().wait()


def test_a_phone_width_needs_no_sideways_scrolling(
        fleet: tuple[Proxy, dict[str, LlamaServer]]) -> None:
    proxy, _ = fleet
    phone = chrome(390, 844)
    try:
        phone.get(proxy.url + "/internal/ui/")
        rendered(phone)
        wide = phone.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert wide[0] <= wide[1] + 1, wide
        assert not [e for e in phone.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        phone.quit()


def test_the_fleet_history_through_redis(start_proxy: Any, redis_url: str,
                                         fleet: tuple[Proxy, dict[str, LlamaServer]]) -> None:
    """Two workers, one Redis: the page's 15 minutes are the fleet's, whichever worker
    answers."""
    _, servers = fleet
    proxy = start_proxy({"endpoints": [{"url": s.url, "name": n} for n, s in servers.items()],
                         "state": {"redis_url": redis_url}}, extra_args=["--workers", "2"])
    data_url = proxy.url + "/internal/ui/data"

    def answered() -> int:
        return sum(requests.get(data_url, timeout=10).json()["history"]["requests"]["ok"])
    time.sleep(2.5)  # the start-up's own requests (readiness) are in Redis by now
    before = answered()
    chat = proxy.url + "/olla/llamacpp/v1/chat/completions"
    for _ in range(6):
        assert requests.post(chat, timeout=60, json={
            "model": ALIAS, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    until(lambda: answered() >= before + 6, 10, "the six requests in the shared history")
    data = requests.get(data_url, timeout=10).json()
    assert data["history"]["shared"] is True
    # Every worker answers with the fleet's figures (each read goes to either worker).
    assert {answered() for _ in range(20)} == {before + 6}
    assert len(proxy.worker_pids()) == 2
