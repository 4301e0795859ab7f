"""The dashboard in a real browser: Debian's headless Chromium, driven over the Chrome DevTools
protocol on a pipe (`--remote-debugging-pipe`: no websocket client, no browser download),
against `promptcache up` on the test's Valkey and PostgreSQL with a real worker and web process.

Chromium is installed by scripts/install-chromium (run by scripts/test); a missing browser
fails this test rather than skipping it.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis as syncredis

from ops.embedded_servers import free_port
from promptcache.keys import Keys
from schemas.events import Request, Result
from tests.helpers import wait_for


def _wait(predicate: Any, timeout: float, what: str) -> None:
    wait_for(predicate, timeout, what, interval=0.2)  # each check is an HTTP request


pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("PROMPTCACHE_TEST_CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-test-admin-token"


class Browser:
    """Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies out),
    messages separated by NUL bytes."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1700) -> None:
        to_browser_r, self._write_fd = os.pipe()
        self._read_fd, from_browser_w = os.pipe()
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                   "--disable-background-networking", "--disable-dev-shm-usage",
                   "--no-first-run", "--mute-audio", f"--user-data-dir={profile}",
                   f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"]
        # bash puts the pipe ends on fds 3 and 4, where Chromium expects them
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "chromium",
             *command], pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None
        self.width, self.height = width, height

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for reply in self._messages(deadline):
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply to {method} within {timeout}s")

    def _messages(self, deadline: float) -> list[dict[str, Any]]:
        ready, _, _ = select.select([self._read_fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            return []
        chunk = os.read(self._read_fd, 1 << 20)
        if not chunk:
            raise RuntimeError("Chromium closed the DevTools pipe: "
                               + (self.process.stderr.read().decode()[-2000:]
                                  if self.process.poll() is not None and self.process.stderr
                                  else "still running"))
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\0")
        return [json.loads(raw) for raw in complete if raw]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                          awaitPromise=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as exc:  # the page is still loading
                value = str(exc)[-300:]
                time.sleep(0.2)
                continue
            if value is True or (value and value is not False and not isinstance(value, str)):
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or expression} (last: {value!r})")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._write_fd)
        os.close(self._read_fd)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@pytest.fixture
def stack(redis_url: str, db: str, keys: Keys, tmp_path: Path):
    """`promptcache up` (one worker, the janitor, the web process) on the test's servers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROMPTCACHE_") and k not in ("CACHE_REDIS_URL",)}
    env.update(REDIS_URL=redis_url, DATABASE_URL=db, PROMPTCACHE_PREFIX=keys.prefix,
               PROMPTCACHE_DATA_DIR=str(tmp_path / "data"), PROMPTCACHE_WEB_PORT=str(port),
               PROMPTCACHE_GENERATOR_LATENCY_MS="300", PROMPTCACHE_HEALTH_INTERVAL="1s",
               PROMPTCACHE_ADMIN_TOKEN=TOKEN, PROMPTCACHE_LOG_FORMAT="json")
    up = subprocess.Popen([sys.executable, "-m", "ops", "up", "--workers", "1"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = up.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if line.startswith("promptcache is up"):
                break
        assert any(ln.startswith("promptcache is up") for ln in lines), "".join(lines)
        yield f"http://127.0.0.1:{port}"
    finally:
        up.send_signal(signal.SIGINT)
        try:
            _, err = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.communicate()
            raise
        assert up.returncode == 0, err[-3000:]


def test_dashboard_shows_real_figures_and_thumbnails_and_flagging_removes_an_image(
        stack: str, redis_url: str, keys: Keys, tmp_path: Path):
    assert shutil.which(CHROMIUM) or os.path.exists(CHROMIUM), (
        f"{CHROMIUM} is missing: scripts/install-chromium installs Debian's chromium")
    r = syncredis.Redis.from_url(redis_url)
    sent = [("b1", "a red lighthouse on a cliff"), ("b2", "a green tram in the rain"),
            ("b3", "an owl reading a map"), ("b4", "A red lighthouse on a cliff."),
            ("b5", "a  GREEN tram in the rain"), ("b6", "")]
    for request_id, prompt in sent[:3]:
        r.xadd(keys.requests, {"data": Request(request_id=request_id,
                                               prompt=prompt).model_dump_json()})
    _wait(lambda: r.xlen(keys.results) == 3, 60, "the three misses")
    for request_id, prompt in sent[3:5]:
        r.xadd(keys.requests, {"data": Request(request_id=request_id,
                                               prompt=prompt).model_dump_json()})
    r.xadd(keys.requests, {"data": json.dumps({"request_id": "b6", "prompt": ""})})
    _wait(lambda: r.xlen(keys.results) == 6, 60, "all six results")
    results = {x.request_id: x for x in (Result.model_validate_json(f[b"data"])
                                         for _, f in r.xrange(keys.results))}
    assert [results[f"b{i}"].cache for i in range(1, 7)] == [
        "miss", "miss", "miss", "exact", "exact", None]
    _wait(lambda: (json.loads(_get(f"{stack}/api/summary")[1])["database"] or {}).get(
        "requests") == 6, 30, "the persister to roll up six requests")

    browser = Browser(tmp_path / "chromium-profile")
    try:
        browser.open(stack + "/")
        browser.wait_for("document.body.dataset.loaded === 'true' && "
                         "document.querySelectorAll('.tile').length === 6", what="six tiles")
        browser.wait_for("[...document.querySelectorAll('img.thumb')].every("
                         "i => i.complete && i.naturalWidth > 0)", what="thumbnails loaded")
        shown = browser.evaluate("""JSON.stringify({
            requests: document.getElementById('requests').textContent,
            hitRate: document.getElementById('hit-rate').textContent,
            calls: document.getElementById('generator-calls').textContent,
            entries: document.getElementById('entries').textContent,
            storage: document.getElementById('storage').textContent,
            tiers: [...document.querySelectorAll('#latency tbody tr')].map(t => t.dataset.tier),
            health: Object.fromEntries([...document.querySelectorAll('#health .pill')]
                .map(p => [p.dataset.part, p.textContent])),
            tiles: [...document.querySelectorAll('.tile')].map(t => ({
                request: t.dataset.requestId, cache: t.dataset.cache,
                prompt: t.querySelector('.prompt').textContent,
                latency: t.querySelector('.latency').textContent,
                thumb: (t.querySelector('img.thumb') || {}).naturalWidth || 0}))})""")
        page = json.loads(shown)
        assert page["requests"] == "6" and page["hitRate"] == "40.0%", page
        assert page["calls"] == "3" and page["entries"] == "3", page
        assert page["storage"].endswith(("kB", "MB")), page
        assert set(page["tiers"]) == {"exact", "miss", "rejected"}, page
        assert all(": ok" in page["health"][p] for p in ("redis", "cache_store", "postgresql",
                                                          "generator")), page["health"]
        assert page["health"]["workers"] == "workers: 1"
        tiles = {t["request"]: t for t in page["tiles"]}
        assert sorted(tiles) == ["b1", "b2", "b3", "b4", "b5", "b6"]
        assert set(list(tiles)[:3]) == {"b4", "b5", "b6"}  # newest first
        assert [tiles[f"b{i}"]["cache"] for i in range(1, 7)] == [
            "miss", "miss", "miss", "exact", "exact", "rejected"]
        assert tiles["b1"]["prompt"].startswith("a red lighthouse on a cliff")
        assert all(tiles[f"b{i}"]["thumb"] > 0 for i in range(1, 6))
        assert tiles["b4"]["latency"].endswith("ms")
        browser.screenshot(tmp_path / "dashboard.png")

        # at 1280 px wide (a common window) no panel scrolls sideways: the latency and streams
        # tables, filled, fit their panels (issue 17)
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=1700,
                     deviceScaleFactor=1, mobile=False)
        browser.wait_for("window.innerWidth === 1280", what="the 1280 px viewport")
        assert browser.evaluate("document.querySelectorAll('#streams tbody tr').length") >= 5
        overflowing = browser.evaluate(
            "[...document.querySelectorAll('.panel, .card')]"
            ".filter(p => p.scrollWidth > p.clientWidth + 1)"
            ".map(p => (p.querySelector('h2, .label') || p).textContent.trim())")
        assert overflowing == [], overflowing
        browser.screenshot(tmp_path / "dashboard-1280.png")

        # which requests got the lighthouse: the miss that made it and the exact hit
        bad = results["b1"]
        browser.evaluate("document.querySelector('.tile[data-request-id=\"b1\"] .served-btn')"
                         ".click()")
        served = browser.wait_for(
            "document.querySelectorAll('.served-table tbody tr').length === 2 && "
            "[...document.querySelectorAll('.served-table tbody tr')].map(r => r.textContent)",
            what="the served-to table")
        assert "b1 (generated it)" in served[0] and "b4" in served[1]

        # flag it as bad: both tiles that showed it go, and the image is no longer served
        browser.evaluate(f"""(() => {{
            document.getElementById('token').value = {json.dumps(TOKEN)};
            document.querySelector('.tile[data-request-id="b1"] .flag').click();
            document.querySelector('.tile[data-request-id="b1"] .reason').value = 'bad hands';
            document.querySelector('.tile[data-request-id="b1"] .confirm-flag').click();
        }})()""")
        browser.wait_for("document.querySelectorAll('.tile').length === 4",
                         what="the flagged image's tiles to go")
        remaining = browser.evaluate(
            "[...document.querySelectorAll('.tile')].map(t => t.dataset.requestId)")
        assert sorted(remaining) == ["b2", "b3", "b5", "b6"]
        browser.wait_for("document.getElementById('entries').textContent === '2'",
                         what="the entry count to drop to 2")
        message = browser.evaluate("document.getElementById('message').textContent")
        assert message.startswith(f"flagged {bad.entry_id}"), message
        browser.screenshot(tmp_path / "dashboard-after-flag.png")
    finally:
        browser.close()
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    image_path = "/" + bad.image_url.split("/", 3)[3]  # type: ignore[union-attr]
    assert _get(stack + image_path)[0] in (404, 410)
    assert r.hget(keys.entries, bad.entry_id) is None
    r.close()
