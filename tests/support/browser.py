"""A real browser for tests: Debian's headless Chromium driven through chromedriver's W3C
WebDriver HTTP API (no client library needed). Nothing it loads may come from the network: the
flags turn off Chromium's own background connections, and tests only open 127.0.0.1."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--window-size=1100,1400",
]


def missing() -> str | None:
    """Why no browser can run here (None when one can)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        return "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Browser:
    def __init__(self, base: str, session: str) -> None:
        self.base, self.session = base, session

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base}/session/{self.session}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=60) as answer:
            return json.loads(answer.read())["value"]

    def cdp(self, command: str, **params: Any) -> Any:
        return self._call("POST", "/goog/cdp/execute", {"cmd": command, "params": params})

    def send_header(self, name: str, value: str) -> None:
        """Every request the page makes from now on carries this header."""
        self.cdp("Network.enable")
        self.cdp("Network.setExtraHTTPHeaders", headers={name: value})

    def emulate_phone(self, width: int = 390, height: int = 844) -> None:
        """A phone's screen from now on (a narrow viewport, touch, mobile layout rules)."""
        self.cdp(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=2,
            mobile=True,
        )

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [next(iter(element.values())) for element in found]

    def text(self, css: str) -> str:
        [element] = self.find_all(css)[:1]
        return str(self._call("GET", f"/element/{element}/text"))

    def script(self, source: str) -> Any:
        return self._call("POST", "/execute/sync", {"script": source, "args": []})

    def screenshot(self, target: Path) -> Path:
        target.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return target

    def wait_for(self, css: str, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find_all(css)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing matches {css!r} within {timeout}s")
            time.sleep(0.05)


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    port = _free_port()
    with tempfile.TemporaryDirectory() as profile:
        driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/status", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            capabilities = {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {
                            "binary": CHROMIUM,
                            "args": [*FLAGS, f"--user-data-dir={profile}"],
                        },
                    }
                }
            }
            request = urllib.request.Request(
                f"{base}/session",
                data=json.dumps(capabilities).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                session = json.loads(answer.read())["value"]["sessionId"]
            browser = Browser(base, session)
            try:
                yield browser
            finally:
                with contextlib.suppress(OSError):
                    browser._call("DELETE", "")
        finally:
            driver.terminate()
            try:
                driver.wait(10)
            except subprocess.TimeoutExpired:
                driver.kill()
