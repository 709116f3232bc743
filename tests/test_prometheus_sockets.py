"""A real Prometheus server scrapes a running proxy; every dashboard query must answer.

Prometheus (Debian package ``prometheus``, installed by .ci/run) runs on 127.0.0.1 with a
1 s scrape interval and its TSDB in a temp dir; the proxy and its upstreams run in this
test's event loop.  The test paces traffic at known rates through several rings, then
evaluates every PromQL expression of config/grafana/ringproxy-dashboard.json through the
HTTP API at a moment inside the traffic: each must return a non-empty result, and the
per-ring request rate must agree with what was sent within 10 %.  An operator's rollback
afterwards must show in the dashboard's annotations.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.rollout.machine import Trigger
from proxy.server import Proxy
from tests.conftest import ROOT, ProxyFactory, Upstream
from tests.test_metrics_sockets import config, refused_port

PROMETHEUS = shutil.which("prometheus")
DASHBOARD = ROOT / "config" / "grafana" / "ringproxy-dashboard.json"

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not installed (Debian package 'prometheus'; .ci/run installs it)",
)

LIMIT_S = 30  # the whole test, Prometheus start included (typically ~18 s)
TRAFFIC_S = 12.0  # paced traffic
RANGE = "8s"  # what $__rate_interval stands for in the queries
EVAL_AT = 11.0  # seconds into the traffic: the whole range lies inside it
API = {"Host": "api.test"}
BETA = {**API, "X-Pick": "beta"}
BROKEN = {**API, "X-Pick": "broken"}
WEB = {"Host": "web.test"}
# (route, ring, path, headers, requests per second)
STREAMS = [
    ("api", "main", "/sized", API, 30),
    ("api", "beta", "/sized", BETA, 10),
    ("api", "beta", "/status/500", BETA, 4),
    ("api", "beta", "/hang", BETA, 2),  # 504 after the ring's 300 ms timeout
    ("api", "broken", "/sized", BROKEN, 10),  # 502, connection refused
    ("web", "main", "/sized", WEB, 10),
    ("-", "-", "/sized", {"Host": "nowhere.test"}, 5),  # no route: 404
]
RATES = {("api", "main"): 30.0, ("api", "beta"): 16.0, ("api", "broken"): 10.0,
         ("web", "main"): 10.0}
QUERY_TIMEOUT = aiohttp.ClientTimeout(total=5)
# Grafana's variables as the dashboard would send them with "All" rings of both routes.
VARIABLES = {
    "__rate_interval": RANGE, "__interval": "1s", "__range": "20s",
    "route": "(api|web)", "ring": ".*",
    "job": "ringproxy", "namespace": ".*", "instance": ".*",
}
# The api route is analysed (so its rings have phases and verdicts) with tolerances no
# traffic here can break: nothing is rolled back while the rates are measured.
ANALYSIS = ("    analysis: {interval: 1s, max_error_rate_increase: 100, latency: {p99: 1000}, "
            "latency_floor: 60s}\n")


def expressions(dashboard: dict[str, Any], annotations: bool = False) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target, rows' nested panels included; with
    ``annotations``, also ("annotation: NAME", expr) for each Prometheus annotation."""
    found = []
    if annotations:
        found = [(f"annotation: {a['name']}", a["expr"])
                 for a in dashboard["annotations"]["list"] if a.get("expr")]
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel["title"], target["expr"]))
    return found


def substitute(expr: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"dashboard uses an unknown variable ${name} in {expr}")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        self.log = self.dir / "prometheus.log"
        (self.dir / "prometheus.yml").write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "ringproxy",
                                "static_configs": [{"targets": [target]}]}],
        }))
        self.url = f"http://127.0.0.1:{refused_port()}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, client: aiohttp.ClientSession) -> None:
        assert PROMETHEUS is not None
        # coreutils' timeout ends Prometheus by itself even if this test process dies hard
        # (it passes our SIGTERM on, too).
        watchdog = [shutil.which("timeout") or "timeout", "-k", "5", str(LIMIT_S + 30)]
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *(watchdog if shutil.which("timeout") else []),
                PROMETHEUS,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--storage.tsdb.retention.time=1h",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.returncode is not None:
                raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with client.get(self.url + "/-/ready", timeout=QUERY_TIMEOUT) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def get(self, client: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with client.get(self.url + path, params=params, timeout=QUERY_TIMEOUT) as r:
            body = await r.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    async def query(self, client: aiohttp.ClientSession, expr: str, at: float) -> list[Any]:
        data = await self.get(client, "/api/v1/query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", (expr, data)
        return list(data["result"])


def by_ring(result: list[Any]) -> dict[tuple[str, str], float]:
    return {(r["metric"]["route"], r["metric"]["ring"]): float(r["value"][1]) for r in result}


async def paced(client: aiohttp.ClientSession, url: str, path: str, headers: dict[str, str],
                rate: float, start: float) -> int:
    """Send ``rate`` requests per second from ``start`` (loop time) for TRAFFIC_S."""
    loop = asyncio.get_running_loop()

    async def one() -> None:
        async with client.get(url + path, headers=headers) as r:
            await r.read()

    tasks = []
    for i in range(int(TRAFFIC_S * rate)):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return len(tasks)


@pytest.mark.timeout(LIMIT_S + 30)  # a backstop: asyncio.timeout below ends it cleanly
async def test_dashboard_queries_answer_from_a_real_prometheus_scraping_the_proxy(
    tmp_path: Path, make_proxy: ProxyFactory, stable: Upstream, canary: Upstream,
    client: aiohttp.ClientSession,
) -> None:
    text = config(stable.url, canary.url, refused_port(), beta_limit=None)
    api = "    match: {host: api.test}\n"
    assert api in text
    proxy = await make_proxy(text.replace(api, api + ANALYSIS))
    prometheus = Prometheus(tmp_path, proxy.admin_url.removeprefix("http://"))
    try:
        async with asyncio.timeout(LIMIT_S):
            await check_dashboard(prometheus, proxy, client)
    finally:
        await prometheus.stop()


async def check_dashboard(
    prometheus: Prometheus, proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    await prometheus.start(client)
    # Wait for the first successful scrape, so the traffic's start is recorded.
    deadline = time.monotonic() + 10
    while not await prometheus.query(client, 'up{job="ringproxy"} == 1', time.time()):
        assert time.monotonic() < deadline, "prometheus never scraped the proxy"
        await asyncio.sleep(0.2)

    loop = asyncio.get_running_loop()
    t0_loop, t0_wall = loop.time() + 0.2, time.time() + 0.2
    await asyncio.gather(*(paced(client, proxy.url, path, headers, rate, t0_loop)
                           for _, _, path, headers, rate in STREAMS))
    at = t0_wall + EVAL_AT
    await asyncio.sleep(max(0.0, at + 1.5 - time.time()))  # a scrape after `at` is stored

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    results: dict[str, list[Any]] = {}
    for title, expr in exprs:
        query = substitute(expr)
        result = await prometheus.query(client, query, at)
        assert result, f"panel {title!r}: empty result for {query}"
        results[expr] = result

    def panel(title: str, target: int = 0) -> list[Any]:
        return [results[e] for t, e in exprs if t == title][target]

    # Requests/s per ring agrees with what was sent.
    rates = by_ring(panel("Requests/s per ring"))
    assert rates.keys() == RATES.keys()
    for ring, sent in RATES.items():
        assert abs(rates[ring] - sent) <= 0.1 * sent, (ring, rates[ring], sent, rates)

    errors = by_ring(panel("Error rate per ring"))
    assert errors["api", "broken"] == 1.0 and errors["api", "main"] == 0.0
    assert abs(errors["api", "beta"] - 6 / 16) <= 0.1 * 6 / 16, errors

    p99 = by_ring(panel("Latency p50 / p95 / p99 per ring", 2))
    assert 0.1 < p99["api", "beta"] <= 0.5, p99  # an eighth of beta waited 300 ms
    assert p99["api", "main"] < 0.1, p99

    kinds = {(r["metric"]["ring"], r["metric"]["kind"]): float(r["value"][1])
             for r in panel("Upstream errors by kind") if r["metric"]["route"] == "api"}
    assert abs(kinds["broken", "connect"] - 10) <= 1, kinds
    assert abs(kinds["beta", "timeout"] - 2) <= 0.2, kinds

    weights = by_ring(panel("Ring weights"))
    assert weights == {
        (r.route, r.name): r.weight
        for rings in proxy.runtime.rings.values() for r in rings if r.weight is not None
    }
    inflight = by_ring(panel("In-flight requests per ring"))
    assert inflight.keys() == RATES.keys()

    # Phases: every ring is steady (1 in the timeline's value mapping).
    assert by_ring(panel("Ring phase timeline")) == dict.fromkeys(RATES, 1.0)

    # Canary vs baseline: error rate, p95, p99 of every ring, each its own column.
    side = {i: by_ring(panel("Canary vs baseline", i)) for i in range(3)}
    assert side[0].keys() == side[1].keys() == side[2].keys() == RATES.keys()
    assert side[0]["api", "broken"] == 1.0 and side[0]["api", "main"] == 0.0
    assert side[2]["api", "beta"] > 0.1 > side[2]["api", "main"], side

    # The judge's last verdict for each analysed ring but the baseline, per check.
    verdicts = {(r["metric"]["ring"], r["metric"]["check"]): r["metric"]["finding"]
                for r in panel("Analysis: last verdict per check")}
    assert {ring for ring, _ in verdicts} == {"beta", "broken"}, verdicts
    assert set(verdicts.values()) <= {"within", "undecided"}, verdicts
    p_values = panel("Analysis: last verdict per check", 1)
    assert {(r["metric"]["ring"], r["metric"]["check"]) for r in p_values} == verdicts.keys()
    assert all(0 <= float(r["value"][1]) <= 1 for r in p_values)
    assert panel("Analysis: evidence toward a rollback per check")

    unrouted = panel("Requests with no route")
    assert len(unrouted) == 1 and abs(float(unrouted[0]["value"][1]) - 5) <= 0.5, unrouted
    build = panel("Replicas: version and config revision")
    assert [r["metric"]["version"] for r in build] == [importlib.metadata.version("ringproxy")]

    # The template variables' label_values() queries find the config's names.
    jobs = await prometheus.get(client, "/api/v1/label/job/values",
                                **{"match[]": "ringproxy_build_info"})
    assert jobs == ["ringproxy"]
    instances = await prometheus.get(client, "/api/v1/label/instance/values",
                                     **{"match[]": 'ringproxy_build_info{job="ringproxy"}'})
    assert instances == [proxy.admin_url.removeprefix("http://")]
    routes = await prometheus.get(client, "/api/v1/label/route/values",
                                  **{"match[]": "ringproxy_requests_total"})
    assert routes == ["api", "web"]
    rings = await prometheus.get(client, "/api/v1/label/ring/values",
                                 **{"match[]": 'ringproxy_requests_total{route=~"api"}'})
    assert rings == ["beta", "broken", "main"]

    # An operator rolls beta back: the annotations mark it.  Its rollbacks_total series
    # was there at 0 from the start, so increase() sees this first rollback.
    await proxy.controller.act("api", "beta", Trigger.ROLLBACK, "test", actor="test")
    await asyncio.sleep(2.5)  # two scrapes
    marks = {name.removeprefix("annotation: "): await prometheus.query(
                 client, substitute(expr), time.time())
             for name, expr in expressions(dashboard, annotations=True)[:-len(exprs)]}
    assert [r["metric"] for r in marks["Rollbacks"]] == [
        {"route": "api", "ring": "beta", "reason": "manual"}]
    assert {"route": "api", "ring": "beta", "phase": "rolled_back"} in [
        r["metric"] for r in marks["Rollout phases"]]
    assert marks.keys() == {"Rollbacks", "Rollout phases", "Rollout steps"}
