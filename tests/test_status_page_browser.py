"""The status page (``GET /`` on the admin listener) in a real headless Chromium.

Debian's ``chromium`` is started once for the module and driven over the Chrome DevTools
Protocol on its websocket, with aiohttp: no WebDriver, no extra packages.  Each test opens
its own tab, loads the page from an in-process ``Proxy`` with background load, and reads
what the page shows through its ``data-*`` attributes.  The browser runs under
``timeout`` in its own process group, which a ``finally`` kills.

``python -m tests.test_status_page_browser docs/status-page.png`` renders the README's
screenshot from a realistic rollout (two routes, a progressing and a rolled-back canary,
a minute of each ring's charts).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import parse_config
from proxy.routing.assign import bucket_of
from proxy.server import Proxy
from tests.conftest import Upstream
from tests.test_rollback_sockets import Load

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason="needs Debian's chromium at /usr/bin/chromium "
    "(apt-get install chromium chromium-driver; .ci/run installs it)",
)

REFRESH = 5.0  # the page's refresh period (body[data-refresh-ms])
BROWSER_LIFETIME = 300  # seconds: the browser stops by itself even if pytest is killed
VIEW_TOKEN = "viewer-page-token-0123456789"


# --------------------------------------------------------------------------- the browser


class Chromium:
    """A headless Chromium in its own process group, reachable over CDP on 127.0.0.1."""

    def __init__(self, profile: Path, lifetime: float = BROWSER_LIFETIME) -> None:
        self.profile = profile
        self.lifetime = lifetime
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws_url = ""
        self.log = profile / "chromium.log"

    def start(self) -> None:
        args = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions",
            "--disable-dev-shm-usage", "--no-proxy-server", "--mute-audio",
            "--hide-scrollbars", "--force-color-profile=srgb", "--window-size=1200,900",
            f"--user-data-dir={self.profile / 'data'}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            "about:blank",
        ]
        wrapper = shutil.which("timeout")
        if wrapper:  # kills the whole group (timeout's own) when the lifetime is up
            args = [wrapper, "-k", "5", str(int(self.lifetime)), *args]
        # Its home, config and cache (crash reports included) stay inside the profile.
        home = str(self.profile)
        env = {**os.environ, "HOME": home, "XDG_CONFIG_HOME": home, "XDG_CACHE_HOME": home}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, start_new_session=True)
        port_file = self.profile / "data" / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(OSError):
                lines = port_file.read_text().split()
                if len(lines) >= 2:
                    self.ws_url = f"ws://127.0.0.1:{lines[0]}{lines[1]}"
                    return
            time.sleep(0.05)
        raise RuntimeError(f"chromium did not open its DevTools port: {self.tail()}")

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class Cdp:
    """One DevTools websocket: numbered commands and their answers; events are recorded."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is None:
                self.events.append(data)
            elif not future.done():
                if "error" in data:
                    future.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None, limit: float = 15) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, limit)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Tab:
    """A browser tab attached with a flat session: navigate, evaluate, wait, screenshot."""

    def __init__(self, cdp: Cdp, target: str, session: str) -> None:
        self.cdp, self.target, self.session = cdp, target, session

    @classmethod
    async def open(cls, cdp: Cdp, width: int = 1200, height: int = 900) -> Tab:
        target = (await cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        attached = await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        tab = cls(cdp, target, attached["sessionId"])
        for domain in ("Page", "Runtime", "Log", "Network"):
            await tab.send(f"{domain}.enable")
        await tab.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return tab

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.send(method, params, session=self.session)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait("document.readyState === 'complete' && location.href !== 'about:blank'",
                        10)

    async def eval(self, expression: str) -> Any:
        answer = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in answer:
            raise AssertionError(f"page script failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait(self, expression: str, limit: float, step: float = 0.05) -> float:
        """Seconds until ``expression`` is truthy in the page; fails after ``limit``."""
        started = time.monotonic()
        while not await self.eval(expression):
            if time.monotonic() - started > limit:
                raise AssertionError(f"not within {limit}s: {expression}\n"
                                     f"page: {json.dumps(await self.snapshot())[:3000]}")
            await asyncio.sleep(step)
        return time.monotonic() - started

    async def snapshot(self) -> dict[str, Any]:
        return await self.eval(SNAPSHOT)  # type: ignore[no-any-return]

    async def screenshot(self, path: Path) -> None:
        height = await self.eval("Math.ceil(document.documentElement.scrollHeight)")
        await self.send("Emulation.setDeviceMetricsOverride", {
            "width": 1200, "height": int(height), "deviceScaleFactor": 1, "mobile": False})
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))

    def _of_session(self) -> Iterator[dict[str, Any]]:
        return (e for e in self.cdp.events if e.get("sessionId") == self.session)

    def problems(self) -> list[str]:
        """Script exceptions, console errors and CSP violations (network errors are expected:
        401s, a favicon 404, a stopped proxy)."""
        out = []
        for event in self._of_session():
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded":
                entry = params["entry"]
                if entry.get("level") == "error" and entry.get("source") != "network":
                    out.append(f"{entry.get('source')}: {entry.get('text')}")
        return out

    def requests(self) -> list[dict[str, Any]]:
        return [e["params"]["request"] for e in self._of_session()
                if e.get("method") == "Network.requestWillBeSent"]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.cdp.send("Target.closeTarget", {"targetId": self.target}, limit=5)


# What the page shows, read through its data-* attributes.
SNAPSHOT = r"""(() => {
  const cells = (row) => Object.fromEntries(
    [...row.querySelectorAll(':scope > td[data-field]')].map((td) => [td.dataset.field, {
      text: td.innerText.trim(), ...td.dataset,
      sub: Object.fromEntries([...td.querySelectorAll('[data-field]')].map(
        (n) => [n.dataset.field, {text: n.innerText.trim(), value: n.dataset.value}])),
    }]));
  const banner = document.querySelector('[data-banner]');
  return {
    state: document.body.dataset.state,
    updated: Number(document.querySelector('[data-field="updated"]').dataset.value || 0),
    updatedText: document.querySelector('[data-field="updated"]').textContent,
    revision: document.querySelector('[data-field="revision"]').textContent,
    banner: banner.hidden ? null : banner.textContent,
    auth: !document.querySelector('[data-auth]').hidden,
    authMessage: document.querySelector('[data-auth-message]').textContent,
    routesShown: !document.querySelector('[data-routes]').hidden,
    routes: Object.fromEntries([...document.querySelectorAll('[data-route]')].map((sec) => [
      sec.dataset.route, {
        rings: Object.fromEntries([...sec.querySelectorAll('table.rings tr[data-ring]')].map(
          (tr) => [tr.dataset.ring, cells(tr)])),
        events: [...sec.querySelectorAll('tr[data-event]')].map(cells),
      }])),
  };
})()"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    with tempfile.TemporaryDirectory(prefix="ringproxy-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        browser = Chromium(Path(profile))
        try:
            browser.start()
            yield browser
        finally:
            browser.stop()


@pytest.fixture
async def browser(chromium: Chromium) -> AsyncIterator[Callable[[], Awaitable[Tab]]]:
    """Opens tabs on the module's browser; closes them and the connection afterwards."""
    client = aiohttp.ClientSession()
    ws = await client.ws_connect(chromium.ws_url, max_msg_size=0)
    cdp = Cdp(ws)
    tabs: list[Tab] = []

    async def open_tab() -> Tab:
        tab = await Tab.open(cdp)
        tabs.append(tab)
        return tab

    try:
        yield open_tab
    finally:
        for tab in tabs:
            await tab.close()
        await cdp.close()
        await client.close()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[tuple[Proxy, Load]]]]:
    """Start an in-process proxy with bounded background load; both stop afterwards."""
    proxies: list[Proxy] = []
    loads: list[Load] = []

    async def start(text: str, per_second: float = 200, workers: int = 4) -> tuple[Proxy, Load]:
        """``workers=0``: no background load (the test sends what it counts)."""
        proxy = Proxy(parse_config(text, source=str(tmp_path / "c.yaml")))
        await proxy.start()
        proxies.append(proxy)
        load = Load(proxy.url, per_second / max(workers, 1))
        if workers:
            load.start(limit=40, workers=workers)
        loads.append(load)
        return proxy, load

    try:
        yield start
    finally:
        for load in loads:
            await load.stop()
        for proxy in proxies:
            if proxy.admin_url:
                await proxy.stop()


async def api(proxy: Proxy, path: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as client, \
            client.get(proxy.admin_url + path, headers=headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def page_config(
    stable: Upstream, canary: Upstream, tmp_path: Path, *, ring: str = "weight: 50",
    analysis: str = "",
) -> str:
    """Staff (pinned, by rule), a canary and the stable baseline; the judge's settings."""
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        pools:
          stable: {{servers: ["{stable.url}"]}}
          canary: {{servers: ["{canary.url}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis:
              interval: 500ms
              alpha: 0.01
              min_requests: 20
              max_error_rate: 5
              max_error_rate_increase: 2
              latency: {{p95: 2}}
              latency_floor: 20ms
              {analysis}
            rings:
              - name: staff
                pool: canary
                pinned: true
                rules: [{{attr: "header:X-Staff", exists: true}}]
              - name: canary
                pool: canary
                {ring}
              - name: stable
                pool: stable
    """)


async def send(url: str, users: list[str], workers: int = 4) -> None:
    """One request per user, ``workers`` at a time; every answer is read."""
    queue = list(reversed(users))

    async def work(client: aiohttp.ClientSession) -> None:
        while queue:
            user = queue.pop()
            async with client.get(url + "/app", headers={"X-User-Id": user}) as r:
                await r.read()

    async with aiohttp.ClientSession() as client:
        await asyncio.gather(*(work(client) for _ in range(workers)))


def users_in(route: str, lo: int, hi: int, n: int, prefix: str) -> list[str]:
    """``n`` user ids whose buckets on ``route`` are in [lo, hi)."""
    found = (f"{prefix}-{i}" for i in range(1_000_000))
    return [u for u in found if lo <= bucket_of(route, u) < hi][:n]


# What the page shows under each judged ring: the starved warning, counts and check gauges.
EVIDENCE = r"""(() => Object.fromEntries([...document.querySelectorAll('tr[data-evidence]')].map(
  (tr) => {
    const counts = tr.querySelector('[data-field=evidence]');
    const starved = tr.querySelector('[data-field=starved]');
    return [tr.dataset.evidence, {
      ringRowAbove: tr.previousElementSibling && tr.previousElementSibling.dataset.ring,
      counts: counts && {text: counts.innerText.trim(), requests: counts.dataset.requests,
                         errors: counts.dataset.errors},
      starved: starved && {text: starved.innerText.trim(),
                           visible: starved.getBoundingClientRect().height > 0},
      checks: [...tr.querySelectorAll('[data-check]')].map((c) => {
        const gauge = c.querySelector('.gauge');
        const fill = gauge.firstElementChild;
        const adv = c.querySelector('.gauge-adv');
        return {name: c.dataset.check, finding: c.dataset.finding,
                advance: Number(adv.dataset.advance),
                advanceShown: adv.firstElementChild.getBoundingClientRect().width /
                  adv.getBoundingClientRect().width,
                advanceRight: Math.abs(adv.firstElementChild.getBoundingClientRect().right -
                                       adv.getBoundingClientRect().right) < 0.5,
                advancePct: c.querySelector('.check-adv').innerText.trim(),
                progress: Number(c.dataset.progress), title: c.title,
                text: c.querySelector('.check-text').innerText.trim(),
                pct: c.querySelector('.check-pct').innerText.trim(),
                meter: Number(gauge.getAttribute('aria-valuenow')),
                shown: fill.getBoundingClientRect().width / gauge.getBoundingClientRect().width,
                fill: getComputedStyle(fill).backgroundColor};
      }),
    }];
  })))()"""


async def settled(tab: Tab) -> None:
    """Let the gauges' width transitions finish (0.4 s)."""
    await tab.wait("document.getAnimations().length === 0", 3)


def check_words(check: dict[str, Any]) -> str:
    """What the page must say under a check's gauge."""
    pct = round(check["progress"] * 100)
    if check["finding"] == "worse":
        return "beyond tolerance: rollback"
    if check["finding"] == "within":
        return f"within tolerance (evidence {pct} % toward rollback)" if pct else \
            "within tolerance"
    return f"evidence {pct} % of the way to rollback" if pct else "undecided"


def close(shown: float, actual: float, rel: float, absolute: float) -> bool:
    return abs(shown - actual) <= max(absolute, rel * abs(actual))


def with_second_route(text: str) -> str:
    """The rollout config plus a route that gets no traffic (every route is shown)."""
    return text + (
        "  - name: static\n"
        "    match: {host: static.example.com, path_prefix: /assets}\n"
        "    rings:\n"
        "      - {name: everyone, pool: stable}\n"
    )


# Every chart of a route's ring rows: its axes and each drawn line's vertices in pixels.
CHARTS = r"""((route) => Object.fromEntries([...document.querySelectorAll(
    `[data-charts="${route}"] [data-chart-ring]`)].map((row) => [row.dataset.chartRing,
  Object.fromEntries([...row.querySelectorAll('svg[data-chart]')].map((svg) => [
    svg.dataset.chart, {
      axes: Object.fromEntries(['x0', 'x1', 'y0', 'y1', 'left', 'right', 'top', 'bottom'].map(
        (k) => [k, Number(svg.dataset[k])])),
      lines: [...svg.querySelectorAll('path[data-series]')].map((p) => ({
        series: p.dataset.series, of: p.dataset.of, d: p.getAttribute('d'),
        hidden: p.getAttribute('visibility') === 'hidden',
        stroke: getComputedStyle(p).stroke})),
      events: [...svg.querySelectorAll('g[data-event]')].map((g) => ({
        kind: g.dataset.event, time: Number(g.dataset.time),
        title: g.querySelector('title').textContent})),
    }]))])))"""


def drawn(chart: dict[str, Any], line: dict[str, Any]) -> list[list[tuple[float, float]]]:
    """A line's segments as (Unix time, value), mapped back through the chart's axes."""
    a = chart["axes"]
    segments: list[list[tuple[float, float]]] = []
    for op, x, y in re.findall(r"([ML])(-?[\d.]+),(-?[\d.]+)", line["d"]):
        t = a["x0"] + (float(x) - a["left"]) / (a["right"] - a["left"]) * (a["x1"] - a["x0"])
        v = a["y0"] + (a["bottom"] - float(y)) / (a["bottom"] - a["top"]) * (a["y1"] - a["y0"])
        if op == "M":
            segments.append([])
        segments[-1].append((t, v))
    return segments


def pixel(chart: dict[str, Any]) -> tuple[float, float]:
    """The time and the value half a pixel's rounding (0.05 px, plus float noise) stands for."""
    a = chart["axes"]
    return ((a["x1"] - a["x0"]) / (a["right"] - a["left"]) * 0.06,
            (a["y1"] - a["y0"]) / (a["bottom"] - a["top"]) * 0.06)


SMOOTH = 10.0  # seconds of the page's trailing rates
QUIET = 3.0  # no error rate where a ring had no requests for this long


def trailing(points: dict[str, list[Any]]) -> dict[str, list[float | None]]:
    """Requests/s and the error rate at each API point over the SMOOTH seconds up to its
    end, from the API's counts (what the page draws for those two); no error rate where
    the ring had no requests for QUIET seconds."""
    rps: list[float | None] = []
    rate: list[float | None] = []
    for t, seconds in zip(points["t"], points["seconds"], strict=True):
        inside = [k for k, tk in enumerate(points["t"]) if t + seconds - SMOOTH - 1e-6 <= tk <= t]
        recent = sum(n for tk, n in zip(points["t"], points["requests"], strict=True)
                     if t + seconds - QUIET - 1e-6 <= tk <= t)
        requests = sum(points["requests"][k] for k in inside)
        errors = sum(points["errors"][k] for k in inside)
        span = sum(points["seconds"][k] for k in inside)
        rps.append(requests / span if span else None)
        rate.append(errors / requests if recent else None)
    return {"rps": rps, "error_rate": rate}


def assert_drawn_as(chart: dict[str, Any], line: dict[str, Any],
                    points: dict[str, list[Any]], column: str) -> int:
    """The line's vertices are the API's non-null points of ``column`` (the trailing rates
    for rps and error_rate), in order, over the time the line covers (gaps where those
    are null); returns how many were compared."""
    dt, dv = pixel(chart)
    segments = drawn(chart, line)
    vertices = [p for seg in segments for p in seg]
    assert vertices, f"nothing drawn for {line['series']}"
    first, last = vertices[0][0], vertices[-1][0]
    values = trailing(points)[column] if column in ("rps", "error_rate") else points[column]
    want = [(t, v) for t, v in zip(points["t"], values, strict=True)
            if v is not None and first - dt <= t <= last + dt]
    assert len(vertices) == len(want), (line["series"], line["of"], len(vertices), len(want))
    for (t, v), (wt, wv) in zip(vertices, want, strict=True):
        assert abs(t - wt) <= dt and abs(v - wv) <= dv, (line["series"], (t, v), (wt, wv))
    # a gap in the drawing is a null in the API's points, and the other way round
    nulls = sum(1 for t, v in zip(points["t"], values, strict=True)
                if v is None and first < t < last)
    assert (len(segments) > 1) == (nulls > 0), (line["series"], len(segments), nulls)
    return len(want)


def step_runs(values: list[float], tolerance: float) -> list[float]:
    """A step line's levels: consecutive repeats (within ``tolerance``) removed."""
    out: list[float] = []
    for v in values:
        if not out or abs(out[-1] - v) > tolerance:
            out.append(v)
    return out


# --------------------------------------------------------------------------- tests


async def test_the_page_shows_every_ring_with_the_numbers_of_the_api(
    browser, running, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    stable.error_every = canary.error_every = 40  # 2.5 % errors: numbers worth comparing
    ring = "progression: {steps: [10, 25, 50], min_step_duration: 10m}"
    text = with_second_route(page_config(stable, canary, tmp_path, ring=ring))
    proxy, load = await running(text, per_second=120)
    await asyncio.sleep(1.5)  # some traffic in the window first
    # ... then none: the page's numbers and the API's are read moments apart, and must be
    # the same numbers (under live traffic a loaded machine's delay between the two reads
    # would be the difference).
    await load.stop()
    tab = await browser()
    started = time.monotonic()
    await tab.goto(proxy.admin_url + "/")
    await tab.wait("document.body.dataset.state === 'ok'", 5)
    print(f"\nstatus page: first data {time.monotonic() - started:.2f}s after navigating")
    assert await tab.eval("document.body.dataset.refreshMs") == str(int(REFRESH * 1000))
    await tab.eval("window.sameDocument = true")

    for round_ in range(2):
        page = await tab.snapshot()
        truth = await api(proxy, "/api/routes")
        assert page["state"] == "ok" and page["banner"] is None and not page["auth"]
        assert page["revision"] == truth["revision"]
        assert list(page["routes"]) == [r["name"] for r in truth["routes"]]
        for route in truth["routes"]:
            shown = page["routes"][route["name"]]["rings"]
            assert list(shown) == [r["name"] for r in route["rings"]], "every ring, in order"
            for ring_ in route["rings"]:
                row, name = shown[ring_["name"]], f"{route['name']}/{ring_['name']}"
                assert row["pool"]["text"] == ring_["pool"]
                if ring_["weight"] is None:
                    assert row["weight"]["value"] == "" and row["weight"]["text"] == "rules"
                else:
                    assert float(row["weight"]["value"]) == ring_["weight"], name
                    assert row["weight"]["text"] == f"{ring_['weight']:g}%", name
                assert row["phase"]["value"] == ring_["phase"], name
                assert row["phase"]["text"] == ring_["phase"].replace("_", " "), name
                traffic = ring_["traffic"]
                requests = int(row["rps"]["requests"])
                assert close(requests, traffic["requests"], 0.15, 12), (name, requests, traffic)
                assert close(float(row["rps"]["value"]), traffic["rps"], 0.15, 1.2), name
                assert close(int(row["error_rate"]["errors"]), traffic["errors"], 0.2, 2), name
                if traffic["requests"] >= 50:  # a rate worth comparing
                    assert close(float(row["error_rate"]["value"]),
                                 traffic["error_rate"] * 100, 0, 1.5), (name, row, traffic)
                    assert row["error_rate"]["text"].split("%")[0].replace(".", "").isdigit()
                if traffic["p95"] is not None and row["p95"]["value"]:
                    assert close(float(row["p95"]["value"]), traffic["p95"] * 1000, 1.0, 5), name
                    assert row["p95"]["text"].split()[1] == "ms"
                assert close(int(row["inflight"]["value"]), ring_["inflight"], 0, 6), name
                if ring_["steps"]:
                    assert row["step"]["value"] == str(ring_["step"] + 1)
                    assert row["step"]["text"].startswith(f"{ring_['step'] + 1} / 3")
        api_page = page["routes"]["api"]["rings"]
        # p95 next to the baseline's: the same number as the baseline ring's own p95
        assert api_page["canary"]["p95"]["sub"]["baseline_p95"]["value"] == \
            api_page["stable"]["p95"]["value"]
        assert "baseline" in api_page["stable"]["name"]["text"]
        assert "pinned" in api_page["staff"]["name"]["text"]
        assert api_page["canary"]["phase"]["value"] == "progressing"
        assert float(api_page["canary"]["weight"]["value"]) == 10.0
        assert int(api_page["stable"]["rps"]["requests"]) > 50
        assert page["routes"]["static"]["rings"]["everyone"]["rps"]["requests"] == "0"
        assert page["routes"]["api"]["events"] == []
        # Every judged ring has its check gauges, in the judge's order, under its row.
        gauges = await tab.eval(EVIDENCE)
        judged = {r["name"]: r for r in truth["routes"][0]["rings"] if r["verdict"]}
        assert set(gauges) <= {"canary", "staff"} and "canary" in judged
        for name, ring_ in judged.items():
            assert [c["name"] for c in gauges[name]["checks"]] == [
                c["name"] for c in ring_["verdict"]["checks"]] == ["error_rate_increase",
                                                                 "error_rate", "p95"]
            assert gauges[name]["ringRowAbove"] == name
        if round_ == 0:  # then wait for the page's own refresh: the same document, new data
            before = page["updated"]
            waited = await tab.wait(f"document.body.dataset.state === 'ok' && Number("
                                    f"document.querySelector('[data-field=updated]')"
                                    f".dataset.value) > {before}", REFRESH + 2)
            print(f"status page: refreshed itself after {waited:.2f}s more")
            assert await tab.eval("window.sameDocument") is True, "the page was reloaded"
    assert tab.problems() == []


async def test_the_charts_draw_the_series_of_the_api(
    browser, running, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    # Background load with some errors and latency for a few seconds, in dark mode: every
    # line of every ring's charts, read back through its axes, is the API's series.
    stable.error_every, canary.error_every = 50, 8
    stable.delay, canary.delay = 0.004, 0.012
    ring = "progression: {steps: [20, 50], min_step_duration: 10m}"
    proxy, _ = await running(page_config(stable, canary, tmp_path, ring=ring), per_second=150)
    tab = await browser()
    await tab.send("Emulation.setEmulatedMedia", {
        "features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    await asyncio.sleep(3.2)  # a few seconds of points first
    await tab.goto(proxy.admin_url + "/")
    await tab.wait("document.body.dataset.state === 'ok' && "
                   "!!document.querySelector('[data-charts=api] path[data-of=ring]')", 5)
    await tab.eval("window.ratePath = document.querySelector('[data-charts=api] "
                   "[data-chart-ring=canary] svg[data-chart=rps] path[data-of=ring]')")
    before = await tab.eval("window.ratePath.getAttribute('d')")
    await asyncio.sleep(1.1)  # one more second sampled; the next refresh asks ?since=
    clicked = await tab.eval("document.querySelector('[data-field=updated]').dataset.value")
    await tab.eval("document.querySelector('[data-action=refresh]').click()")
    await tab.wait("document.querySelector('[data-field=updated]').dataset.value !== "
                   f"{json.dumps(clicked)}", 5)
    charts = await tab.eval(f"{CHARTS}('api')")
    truth = await api(proxy, "/api/routes/api/series")
    series = {r["name"]: r["points"] for r in truth["rings"]}
    assert truth["baseline"] == "stable" and list(charts) == ["staff", "canary", "stable"]
    compared = 0
    for name, ring_charts in charts.items():
        assert set(ring_charts) == {"rps", "error_rate", "latency", "weight"}, name
        for kind, chart in ring_charts.items():
            a = chart["axes"]
            assert a["x0"] == truth["start"] and a["x1"] <= truth["now"], (name, kind)
            for line in chart["lines"]:
                of = name if line["of"] == "ring" else "stable"
                assert line["of"] == "ring" or name != "stable", "the baseline has no twin"
                points = series[of]
                if line["hidden"]:
                    assert not any(v is not None for v in points[line["series"]]), (name, kind)
                    continue
                if line["series"] == "weight":  # a step line: its levels, in order
                    dv = pixel(chart)[1]
                    shown_levels = step_runs([v for _, v in drawn(chart, line)[0]], dv)
                    levels = step_runs([w for w in points["weight"] if w is not None], dv)
                    assert len(shown_levels) == len(levels[-len(shown_levels):]), name
                    assert all(abs(a - b) <= dv for a, b in zip(
                        shown_levels, levels[-len(shown_levels):], strict=True)), name
                    continue
                compared += assert_drawn_as(chart, line, points, line["series"])
        lines = {(ln["series"], ln["of"]) for c in ring_charts.values() for ln in c["lines"]}
        if name == "stable":
            assert ("rps", "baseline") not in lines
        else:
            assert {("rps", "baseline"), ("error_rate", "baseline"), ("p95", "baseline"),
                    ("p99", "baseline")} <= lines, name
    assert compared > 40, compared
    canary_rate = series["canary"]["rps"]
    assert sum(canary_rate) > 0 and any(e for e in series["canary"]["errors"])
    assert charts["canary"]["weight"]["lines"][0]["d"].count("L") > 2
    assert "no sticky share" in await tab.eval(
        "document.querySelector('[data-chart-ring=staff] svg[data-chart=weight]').textContent")
    # dark mode: the ring's lines in the dark accent, the page dark
    stroke = charts["canary"]["rps"]["lines"][-1]["stroke"]
    assert stroke == "rgb(110, 161, 255)", stroke
    assert await tab.eval("getComputedStyle(document.body).backgroundColor") == \
        "rgb(18, 22, 29)"
    # in place: the same path node, now longer
    assert await tab.eval("window.ratePath.isConnected && window.ratePath === document"
                          ".querySelector('[data-charts=api] [data-chart-ring=canary] "
                          "svg[data-chart=rps] path[data-of=ring]')") is True
    assert len(await tab.eval("window.ratePath.getAttribute('d')")) > len(before)
    # the time half of an advance, under the evidence: the step's minimum time left
    routes = await api(proxy, "/api/routes/api")
    canary_view = next(r for r in routes["rings"] if r["name"] == "canary")
    assert canary_view["min_step_duration"] == 600.0
    wait = await tab.eval("(() => { const n = document.querySelector("
                          "'tr[data-evidence=canary] [data-field=step_wait]'); "
                          "return n && {text: n.textContent, left: Number(n.dataset.value)}; })()")
    assert wait["text"].startswith(" · advances after 10 min in the step ("), wait
    assert 600 - canary_view["seconds_in_step"] - 2 <= wait["left"] <= 600, wait
    since = [r["url"] for r in tab.requests() if "/series" in r["url"]]
    assert "?since=" not in since[0] and any("?since=" in u for u in since[1:]), since
    assert tab.problems() == []


async def test_the_page_shows_a_rollback_within_its_refresh_period(
    browser, running, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    text = page_config(stable, canary, tmp_path, ring="weight: 20")
    proxy, load = await running(text)
    tab = await browser()
    await tab.goto(proxy.admin_url + "/")
    await tab.wait("document.body.dataset.state === 'ok'", 5)
    canary_row = "document.querySelector('[data-route=api] tr[data-ring=canary]')"
    assert await tab.eval(f"{canary_row}.querySelector('[data-field=phase]').dataset.value") \
        == "steady"

    canary.error_every = 3
    broken_at = time.time()
    deadline = time.monotonic() + 10
    while not [e for e in proxy.controller.events if e.kind == "rollback"]:
        assert time.monotonic() < deadline, "no rollback within 10 s"
        await asyncio.sleep(0.02)
    rollback = next(e for e in proxy.controller.events if e.kind == "rollback")
    await tab.wait(
        f"{canary_row}.querySelector('[data-field=phase]').dataset.value === 'rolled_back' "
        f"&& {canary_row}.querySelector('[data-field=weight]').dataset.value === '0'",
        REFRESH + 1.5)
    seen_at = time.time()
    print(f"\nrollback {rollback.time - broken_at:.2f}s after the canary broke; on the page "
          f"{seen_at - rollback.time:.2f}s after the rollback")
    assert seen_at - rollback.time <= REFRESH + 1.5  # one refresh period (and a margin)
    # the same refresh put a marker on each of the canary's charts, its reason on hover
    charts = (await tab.eval(f"{CHARTS}('api')"))["canary"]
    for kind, chart in charts.items():
        (marker,) = [e for e in chart["events"] if e["kind"] == "rollback"]
        assert marker["time"] == rollback.time, kind
        assert marker["title"].endswith(f"(20% → 0%): {rollback.reason}"), marker
        a = chart["axes"]
        assert a["x0"] <= marker["time"] <= a["x1"] + 5
    assert all(not c["events"] for c in (await tab.eval(f"{CHARTS}('api')"))["stable"].values())
    assert charts["rps"]["lines"][-1]["stroke"] == "rgb(37, 99, 235)"  # light mode's accent

    page = await tab.snapshot()
    rings = page["routes"]["api"]["rings"]
    assert rings["canary"]["phase"]["text"] == "rolled back"
    # The verdict cell says why: the rollback's reason (the evidence of the worse check).
    reason = f"{canary_row}.querySelector('[data-field=verdict]')"
    await tab.wait(f"{reason}.title === {json.dumps(rollback.reason)}", REFRESH + 1.5)
    assert (await tab.snapshot())["routes"]["api"]["rings"]["canary"]["verdict"]["sub"][
        "verdict_reason"]["text"] == rollback.reason
    assert rings["canary"]["weight"]["text"] == "0%"
    assert float(rings["stable"]["weight"]["value"]) == 100.0
    assert rings["staff"]["phase"]["value"] == "steady"  # pinned: kept
    event = page["routes"]["api"]["events"][0]  # newest first
    assert event["kind"]["value"] == "rollback" and event["ring"]["value"] == "canary"
    assert (float(event["weight"]["from"]), float(event["weight"]["value"])) == (20.0, 0.0)
    assert event["weight"]["text"] == "20% → 0%"
    assert event["actor"]["value"] == "analysis"
    assert event["reason"]["value"] == rollback.reason
    assert float(event["time"]["value"]) == rollback.time
    assert event["time"]["text"].endswith(time.strftime("%H:%M:%S", time.localtime(rollback.time)))
    truth = await api(proxy, "/api/events")  # oldest first; the page shows the newest first
    assert [(e["time"], e["kind"]) for e in reversed(truth["events"])][:10] == [
        (float(e["time"]["value"]), e["kind"]["value"]) for e in page["routes"]["api"]["events"]]

    # The admin API goes away: a clear banner, and the last data stays on the page.
    await load.stop()
    await proxy.stop()
    proxy.admin_url = ""  # stopped: the fixture leaves it
    waited = await tab.wait("document.body.dataset.state === 'error'", REFRESH + 2)
    page = await tab.snapshot()
    print(f"status page: error banner {waited:.2f}s after the admin API stopped")
    assert page["banner"] is not None and "Refresh failed" in page["banner"]
    assert f"Showing data from {page['updatedText']}" in page["banner"]
    assert page["routes"]["api"]["rings"]["canary"]["phase"]["value"] == "rolled_back"
    assert tab.problems() == []


async def test_the_check_gauges_show_the_judges_progress_from_the_api(
    browser, running, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    # Known traffic, then none: the evidence stands still, so the page and the API must
    # show the very same numbers.  The canary's errors are 6.7 % against the baseline's 1 %
    # with 1 point allowed: evidence part of the way to a rollback, not all of it.
    stable.error_every, canary.error_every = 100, 15
    text = page_config(stable, canary, tmp_path, ring="weight: 50").replace(
        "max_error_rate_increase: 2", "max_error_rate_increase: 1").replace(
        "latency_floor: 20ms", "latency_floor: 300ms")  # the latency check stays quiet
    proxy, _ = await running(text, workers=0)
    tab = await browser()
    await tab.goto(proxy.admin_url + "/")
    await tab.wait("document.body.dataset.state === 'ok'", 5)
    await send(proxy.url, users_in("api", 0, 5000, 300, "c") + users_in("api", 5000, 10000,
                                                                          1000, "s"))
    assert (canary.app_hits, stable.app_hits) == (300, 1000)
    ring: dict[str, Any] = {}
    deadline = time.monotonic() + 10
    while not ((ring.get("evidence") or {}).get("requests") == 300
               and ring["evidence"]["baseline_requests"] == 1000):
        assert time.monotonic() < deadline, f"no verdict on all of it: {ring}"
        await asyncio.sleep(0.1)
        ring = (await api(proxy, "/api/routes"))["routes"][0]["rings"][1]
    await tab.eval("window.canaryRow = document.querySelector('[data-route=api] "
                   "tr[data-ring=canary]')")
    before = await tab.eval("document.querySelector('[data-field=updated]').dataset.value")
    await tab.eval("document.querySelector('[data-action=refresh]').click()")
    await tab.wait("document.querySelector('[data-field=updated]').dataset.value !== "
                   f"{json.dumps(before)}", 5)
    await settled(tab)
    truth = (await api(proxy, "/api/routes"))["routes"][0]["rings"][1]
    assert truth["name"] == "canary" and truth["evidence"] == {
        "requests": 300, "errors": 20, "baseline_requests": 1000, "baseline_errors": 10}
    assert truth["evidence"] == ring["evidence"]
    verdict = truth["verdict"]
    assert verdict == ring["verdict"], "the evidence stood still, so did the verdict"
    increase = verdict["checks"][0]
    assert increase["name"] == "error_rate_increase" and increase["finding"] == "undecided"
    assert 0.1 < increase["progress"] < 0.9, increase  # part of the way

    shown = (await tab.eval(EVIDENCE))["canary"]
    assert shown["ringRowAbove"] == "canary"
    assert [c["name"] for c in shown["checks"]] == [c["name"] for c in verdict["checks"]]
    for got, want in zip(shown["checks"], verdict["checks"], strict=True):
        pct = round(want["progress"] * 100)
        assert got["progress"] == want["progress"] and got["finding"] == want["finding"], got
        assert got["title"] == want["detail"]  # the numbers on hover
        assert got["text"] == check_words(want)
        assert got["pct"] == f"{pct} %" and got["meter"] == pct
        assert abs(got["shown"] - want["progress"]) <= 0.015, (got, want)  # the bar itself
        # toward an advance: the left half, filled from the middle
        assert got["advance"] == want["advance"] and got["advanceRight"], got
        assert got["advancePct"] == f"{round(want['advance'] * 100)} %"
        assert abs(got["advanceShown"] - want["advance"]) <= 0.03, (got, want)
    assert shown["checks"][0]["text"] == f"evidence {round(increase['progress'] * 100)} % " \
        "of the way to rollback"
    assert shown["counts"]["requests"] == str(truth["evidence"]["requests"])
    assert shown["counts"]["errors"] == str(truth["evidence"]["errors"])
    assert f"{truth['evidence']['requests']:,} requests" in shown["counts"]["text"]
    assert shown["starved"] is None
    page = (await tab.snapshot())["routes"]["api"]["rings"]
    assert page["canary"]["verdict"]["value"] == verdict["outcome"] == "undecided"
    assert page["canary"]["verdict"]["sub"]["verdict_lead"]["text"] == \
        f"error_rate_increase: {round(increase['progress'] * 100)} % to rollback"
    assert "stable" not in await tab.eval(EVIDENCE), "the baseline is not judged"

    # The next refresh changes the page in place: the same row, no rebuilt table.
    before = await tab.eval("document.querySelector('[data-field=updated]').dataset.value")
    await tab.eval("document.querySelector('[data-action=refresh]').click()")
    await tab.wait("document.querySelector('[data-field=updated]').dataset.value !== "
                   f"{json.dumps(before)}", 5)
    assert await tab.eval("window.canaryRow === document.querySelector('[data-route=api] "
                          "tr[data-ring=canary]') && window.canaryRow.isConnected") is True
    assert tab.problems() == []


async def test_the_page_warns_of_a_starved_ring(
    browser, running, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    # A canary that gets no traffic cannot be judged: after max_blind it is starved, and
    # the page says so (and it does not advance).
    ring = "progression: {steps: [5, 50], min_step_duration: 1s}"
    text = page_config(stable, canary, tmp_path, ring=ring, analysis="max_blind: 1s")
    proxy, _ = await running(text, workers=0)
    tab = await browser()
    await tab.goto(proxy.admin_url + "/")
    deadline = time.monotonic() + 10
    ring_view: dict[str, Any] = {}
    while not ring_view.get("starved"):
        assert time.monotonic() < deadline, f"not starved: {ring_view}"
        await asyncio.sleep(0.1)
        ring_view = (await api(proxy, "/api/routes"))["routes"][0]["rings"][1]
    assert ring_view["name"] == "canary" and ring_view["phase"] == "progressing"
    assert ring_view["step"] == 0, "a starved ring does not advance"
    await tab.eval("document.querySelector('[data-action=refresh]').click()")
    await tab.wait("!!document.querySelector('tr[data-evidence=canary] [data-field=starved]')",
                   REFRESH + 1.5)
    shown = (await tab.eval(EVIDENCE))["canary"]
    assert shown["starved"]["visible"]
    assert shown["starved"]["text"].startswith("⚠ analysis starved: undecided for ")
    assert "not advancing" in shown["starved"]["text"]
    assert "the alarm is at 1 s" in shown["starved"]["text"]
    await tab.wait("[...document.querySelectorAll('[data-route=api] tr[data-event]')]"
                   ".some((tr) => tr.dataset.event === 'analysis_starved')", REFRESH + 1.5)
    page = (await tab.snapshot())["routes"]["api"]
    assert "starved" in page["rings"]["canary"]["verdict"]["text"]
    event = next(e for e in page["events"] if e["kind"]["value"] == "analysis_starved")
    assert event["ring"]["value"] == "canary" and event["kind"]["text"] == "analysis starved"
    assert tab.problems() == []


async def test_the_page_asks_for_a_token_and_shows_data_after_it_is_given(
    browser, running, monkeypatch: pytest.MonkeyPatch, stable: Upstream, canary: Upstream,
    tmp_path: Path
) -> None:
    monkeypatch.setenv("RP_PAGE_VIEWER", VIEW_TOKEN)
    text = page_config(stable, canary, tmp_path).replace(
        "admin: {listen: 127.0.0.1:0}",
        "admin: {listen: 127.0.0.1:0, tokens: [{env: RP_PAGE_VIEWER, role: viewer}]}")
    proxy, _ = await running(text, per_second=40, workers=2)
    tab = await browser()
    await tab.goto(proxy.admin_url + "/")
    await tab.wait("document.body.dataset.state === 'auth'", 5)
    page = await tab.snapshot()
    assert page["auth"] and not page["routesShown"] and page["routes"] == {}
    assert "401" in page["authMessage"] and "missing bearer token" in page["authMessage"]

    submit = ("(() => { const i = document.querySelector('[data-auth-input]'); i.value = %s; "
              "document.querySelector('[data-auth-form]').requestSubmit(); })()")
    await tab.eval(submit % json.dumps("not-the-token-0123456789"))
    await tab.wait("document.querySelector('[data-auth-message]').textContent"
                   ".includes('refused')", 5)
    assert await tab.eval("document.body.dataset.state") == "auth"
    await tab.eval(submit % json.dumps(VIEW_TOKEN))
    await tab.wait("document.body.dataset.state === 'ok'", 5)
    page = await tab.snapshot()
    assert not page["auth"]
    assert list(page["routes"]["api"]["rings"]) == ["staff", "canary", "stable"]
    assert await tab.eval("sessionStorage.getItem('ringproxy.admin-token')") == VIEW_TOKEN

    # A fresh tab with the token in the fragment: straight to the data; the fragment is gone.
    second = await browser()
    await second.goto(f"{proxy.admin_url}/#token={VIEW_TOKEN}")
    await second.wait("document.body.dataset.state === 'ok'", 5)
    assert await second.eval("location.hash") == ""
    assert float((await second.snapshot())["routes"]["api"]["rings"]["canary"]["weight"]
                 ["value"]) == 50.0

    for t in (tab, second):
        calls = [r for r in t.requests() if "/api/" in r["url"]]
        assert calls, "the page called the API"
        for request in calls:
            assert VIEW_TOKEN not in request["url"] and "token" not in request["url"]
        authorised = [r for r in calls if r["headers"].get("Authorization")]
        assert authorised and all(r["headers"]["Authorization"] in (
            f"Bearer {VIEW_TOKEN}", "Bearer not-the-token-0123456789") for r in authorised)
        assert t.problems() == []
    second_calls = [r for r in second.requests() if "/api/" in r["url"]]
    assert all(r["headers"].get("Authorization") == f"Bearer {VIEW_TOKEN}"
               for r in second_calls)


# --------------------------------------------------------------------------- screenshot


def screenshot_config(ups: dict[str, Upstream], tmp: Path) -> str:
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        state: {{path: "{tmp / 'state.json'}", audit: "{tmp / 'audit.jsonl'}"}}
        pools:
          api-v41: {{servers: ["{ups['api-v41'].url}"]}}
          api-v42: {{servers: ["{ups['api-v42'].url}"]}}
          checkout-v17: {{servers: ["{ups['checkout-v17'].url}"]}}
          checkout-v18: {{servers: ["{ups['checkout-v18'].url}"]}}
        routes:
          - name: api
            match: {{host: api.example.com}}
            sticky: {{key: ["header:X-User-Id"]}}
            analysis:
              interval: 500ms
              min_requests: 30
              max_error_rate: 5
              max_error_rate_increase: 2
              latency: {{p50: 1.5, p95: 2}}
              latency_floor: 20ms
            rings:
              - name: staff
                pool: api-v42
                pinned: true
                rules: [{{attr: "header:X-Staff", exists: true}}]
              - name: canary
                pool: api-v42
                progression:
                  steps: [10, 25, 50, {{weight: 75, approval: required}}]
                  min_step_duration: 4s
              - name: stable
                pool: api-v41
          - name: checkout
            match: {{host: checkout.example.com}}
            sticky: {{key: ["header:X-User-Id"]}}
            analysis:
              interval: 500ms
              min_requests: 30
              max_error_rate: 5
              max_error_rate_increase: 2
              error_statuses: [5xx, 429]
            rings:
              - name: beta
                pool: checkout-v18
                rules: [{{attr: "header:X-Beta", equals: "true"}}]
              - name: canary
                pool: checkout-v18
                weight: 10
              - name: stable
                pool: checkout-v17
    """)


async def _traffic(url: str, until: float) -> None:
    rng = random.Random(7)
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < until:
            host = rng.choice(["api.example.com"] * 3 + ["checkout.example.com"])
            headers = {"Host": host, "X-User-Id": f"user-{rng.randrange(5000)}"}
            if rng.random() < 0.03:
                headers["X-Staff" if host.startswith("api") else "X-Beta"] = "true"
            async with client.get(url + "/app", headers=headers) as r:
                await r.read()
            await asyncio.sleep(0.02)


async def make_screenshot(out: Path) -> None:
    ups = {name: Upstream(name) for name in ("api-v41", "api-v42", "checkout-v17", "checkout-v18")}
    for up in ups.values():
        await up.start()
    ups["api-v41"].delay, ups["api-v42"].delay = 0.012, 0.016
    ups["checkout-v17"].delay, ups["checkout-v18"].delay = 0.030, 0.034
    ups["api-v41"].error_every, ups["api-v42"].error_every = 400, 300
    ups["checkout-v17"].error_every = 500
    with tempfile.TemporaryDirectory(prefix="ringproxy-shot-", ignore_cleanup_errors=True) as tmp:
        browser = Chromium(Path(tmp), lifetime=120)
        proxy = Proxy(parse_config(screenshot_config(ups, Path(tmp))))
        await proxy.start()
        until = time.monotonic() + 120
        load = [asyncio.ensure_future(_traffic(proxy.url, until)) for _ in range(6)]
        try:
            browser.start()
            async with aiohttp.ClientSession() as client:
                cdp = Cdp(await client.ws_connect(browser.ws_url, max_msg_size=0))
                tab = await Tab.open(cdp)
                await tab.goto(proxy.admin_url + "/")
                await asyncio.sleep(30)  # half a minute of healthy history on the charts
                ups["checkout-v18"].error_every = 8  # the checkout canary goes bad (12.5 %)
                deadline = time.monotonic() + 70
                def unfolded() -> bool:  # the checkout canary is rolled back, the api
                    # canary judged on enough of its own traffic to show its evidence
                    api_verdict = proxy.controller.verdicts.get("api", {}).get("canary")
                    return (proxy.controller.states["checkout"]["canary"].phase.value
                            == "rolled_back" and api_verdict is not None
                            and api_verdict.requests >= 200)

                while not unfolded():
                    assert time.monotonic() < deadline, (
                        f"the scenario did not unfold: {proxy.controller.states}, "
                        f"{[e.text for e in proxy.controller.events]}")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(15)  # the charts show the canary's traffic gone
                before = await tab.eval("document.querySelector('[data-field=updated]')"
                                        ".dataset.value")
                await tab.eval("document.querySelector('[data-action=refresh]').click()")
                await tab.wait("document.querySelector('[data-field=updated]').dataset.value "
                               f"!== {json.dumps(before)}", 5)
                await tab.screenshot(out)
                problems = tab.problems()
                await cdp.close()
            assert not problems, problems
        finally:
            browser.stop()
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
            await proxy.stop()
            for up in ups.values():
                await up.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(make_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "status-page.png")))


async def test_the_page_shows_a_server_out_of_rotation_as_one_hosts_fault(
    browser, running, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    # The canary pool's second server refuses its health checks: out of rotation, while
    # the pool's other server is in; the pool cell says so and its title lists both.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: refuses
    text = page_config(stable, canary, tmp_path).replace(
        f'canary: {{servers: ["{canary.url}"]}}',
        f'canary: {{servers: ["{canary.url}", "{dead}"], health: {{path: /, interval: 100ms, '
        f'timeout: 100ms, unhealthy_threshold: 1}}}}')
    proxy, _ = await running(text, workers=0)
    deadline = time.monotonic() + 5
    while (await api(proxy, "/api/routes"))["routes"][0]["rings"][1]["health"]["available"] != 1:
        assert time.monotonic() < deadline, "the dead server was not taken out"
        await asyncio.sleep(0.05)
    tab = await browser()
    await tab.goto(proxy.admin_url + "/")
    selector = "[data-route=api] tr[data-ring=canary] [data-field=servers_up]"
    await tab.wait(f"!!document.querySelector('{selector}')", REFRESH + 1.5)
    shown = await tab.eval(f"(() => {{ const e = document.querySelector('{selector}'); "
                           "return [e.textContent, e.title, e.dataset.value]; })()")
    assert shown[0] == "1/2 up · one host unhealthy"
    assert f"{dead}: unhealthy" in shown[1] and f"{canary.url}: healthy" in shown[1]
    assert shown[2] == "1"
    assert tab.problems() == []
