"""Headless Chromium for the dashboard: Debian's ``chromium`` driven through its own
``chromedriver`` by selenium (nothing downloaded), and the dashboard's screenshot and
figures.

    .venv/bin/python -m tests.integration.browser docs/dashboard.png   # make screenshot
    .venv/bin/python -m tests.integration.browser --measure [--endpoints 2,20]

The screenshot: two real llama.cpp servers behind the proxy, a minute of chat traffic (a
stream always running, a request for a model nobody serves now and then), then the page at
a laptop's width. ``--measure``: the page's data payload and render time with N endpoints
(scripted llama.cpp-shaped upstreams; what is measured is the page, not the servers).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from .procs import LlamaServer, Proxy, running
from .scripted_upstream import ScriptedUpstream

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ALIAS = "gemma-ui"


def chrome(width: int = 1280, height: int = 1000) -> webdriver.Chrome:
    """Headless Chromium with its console log readable (``driver.get_log("browser")``)."""
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def rendered(driver: webdriver.Chrome, at_least: int = 1, timeout: float = 15.0) -> Any:
    """Wait until the page has rendered ``at_least`` times; its ``window.__olla``."""
    deadline = time.monotonic() + timeout
    while True:
        state = driver.execute_script("return window.__olla || null")
        if state and state["renders"] >= at_least:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard did not render: {state}")
        time.sleep(0.1)


class Traffic:
    """Chat requests through the proxy in a thread until stopped: a stream now and then
    (so that a slot is busy) and a request for an unknown model (an error to show)."""

    def __init__(self, proxy: Proxy, model: str = ALIAS) -> None:
        self.proxy, self.model = proxy, model
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(60)

    def _run(self) -> None:
        url = self.proxy.url + "/olla/llamacpp/v1/chat/completions"
        turn = 0
        while not self.stopping.is_set():
            turn += 1
            model = "no-such-model" if turn % 5 == 0 else self.model
            body = {"model": model, "stream": True, "max_tokens": 48,
                    "messages": [{"role": "user", "content": f"Tell me about day {turn}"}]}
            try:
                with requests.post(url, json=body, stream=True, timeout=60) as answer:
                    for _ in answer.iter_lines():
                        if self.stopping.is_set():
                            break
            except requests.RequestException:
                time.sleep(0.2)


def proxy_config(urls: dict[str, str], check_interval: str = "1s") -> dict[str, Any]:
    return {"endpoints": [{"url": url, "name": name, "check_interval": check_interval}
                          for name, url in urls.items()]}


@contextmanager
def real_fleet() -> Iterator[tuple[Proxy, dict[str, LlamaServer]]]:
    """Two real llama.cpp servers of one model and the proxy in front."""
    servers = {name: LlamaServer(["--alias", ALIAS, "--n-parallel", "2", "--n-ctx", "2048",
                                  "--threads", "1"]) for name in ("llama-a", "llama-b")}
    with running(servers):
        proxy = Proxy(proxy_config({n: s.url for n, s in servers.items()}))
        try:
            proxy.start()
            yield proxy, servers
        finally:
            proxy.stop()


def screenshot(path: Path, seconds: float = 60.0) -> None:
    """The dashboard after ``seconds`` of traffic on a real fleet, saved as PNG."""
    with real_fleet() as (proxy, _), Traffic(proxy):
        time.sleep(seconds)
        driver = chrome(1280, 1400)
        try:
            driver.get(proxy.url + "/internal/ui/")
            rendered(driver, at_least=2)
            path.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(path))
        finally:
            driver.quit()
    print(f"wrote {path}")


def measure(counts: list[int], loads: int = 10) -> None:
    """Payload size and render time of the page with N scripted endpoints."""
    for count in counts:
        upstreams = [ScriptedUpstream().start() for _ in range(count)]
        proxy = Proxy(proxy_config({f"llama-{i:02d}": u.url for i, u in enumerate(upstreams)}))
        driver = None
        try:
            proxy.start()
            for _ in range(20):  # a little history
                requests.post(proxy.url + "/olla/llamacpp/v1/chat/completions", timeout=10,
                              json={"model": "scripted.gguf",
                                    "messages": [{"role": "user", "content": "hi"}]})
            time.sleep(2)
            driver = chrome()
            driver.get(proxy.url + "/internal/ui/")
            renders, sizes = [], []
            for i in range(loads):
                state = rendered(driver, at_least=i + 1, timeout=30)
                renders.append(state["lastRenderMs"])
                sizes.append(state["lastPayloadBytes"])
            renders.sort()
            data = requests.get(proxy.url + "/internal/ui/data", timeout=10,
                                headers={"Accept-Encoding": "gzip"})
            print(f"{count} endpoints: payload {sizes[-1]} bytes ({len(data.content)} on the "
                  f"wire), render p50 {renders[len(renders) // 2]:.1f} ms, "
                  f"max {renders[-1]:.1f} ms over {loads} renders")
        finally:
            if driver is not None:
                driver.quit()
            proxy.stop()
            for upstream in upstreams:
                upstream.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.browser",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--endpoints", default="2,20")
    args = parser.parse_args(argv)
    if args.measure:
        measure([int(n) for n in args.endpoints.split(",")])
    else:
        screenshot(args.path, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
