"""External checks on real processes: a real Prometheus scraping a test exporter whose
per-ring business gauge the test moves, a ring health check against a real upstream, a
pre_advance gate and a post_rollback hook served by a real aiohttp server, and a step's
min_duration across a real restart of a ringproxy subprocess.

Intervals are fractions of a second; every wait has a generous bound and every load loop
stops by itself.  Prometheus (Debian package ``prometheus``, installed by .ci/run) runs
as in test_prometheus_sockets, with a 1 s scrape interval.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.checks.results import Status
from proxy.config import parse_config
from proxy.rollout.judge import Finding, Outcome
from proxy.rollout.machine import Phase
from proxy.server import Proxy
from tests.conftest import Upstream, serve_app
from tests.test_metrics_sockets import refused_port
from tests.test_prometheus_sockets import Prometheus
from tests.test_rollback_sockets import Load, events_of, rollout_config, wait_for

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus not installed (Debian package 'prometheus'; .ci/run installs it)")


class Exporter:
    """A tiny application exporter: ``business_conversion{ring=...}`` gauges."""

    def __init__(self) -> None:
        self.gauges: dict[str, float] = {}
        self.scrapes = 0
        self._runner: web.AppRunner | None = None
        self.address = ""

    async def metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        lines = ["# TYPE business_conversion gauge"] + [
            f'business_conversion{{ring="{ring}"}} {value}' for ring, value in self.gauges.items()]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        self._runner, url = await serve_app(app)
        self.address = url.removeprefix("http://")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Hooks:
    """A webhook receiver: records every POST, answers ``status``."""

    def __init__(self) -> None:
        self.status = 500
        self.calls: dict[str, list[dict[str, Any]]] = {}
        # Per hook: (monotonic time, the status answered, the request's headers).
        self.answers: dict[str, list[tuple[float, int, dict[str, str]]]] = {}
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def hook(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.calls.setdefault(name, []).append(await request.json())
        status = self.status
        self.answers.setdefault(name, []).append((time.monotonic(), status,
                                                  dict(request.headers)))
        return web.Response(status=status, text="refused by the test"
                            if status >= 300 else "ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self.hook)
        self._runner, self.url = await serve_app(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def exporter() -> AsyncIterator[Exporter]:
    e = Exporter()
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    h = Hooks()
    await h.start()
    yield h
    await h.stop()


@pytest.fixture
async def prometheus(tmp_path: Path, exporter: Exporter,
                     client: aiohttp.ClientSession) -> AsyncIterator[Prometheus]:
    prom = Prometheus(tmp_path, exporter.address)
    try:
        await prom.start(client)
        yield prom
    finally:
        await prom.stop()


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Any]:
    proxies: list[Proxy] = []
    loads: list[Load] = []

    async def start(text: str, per_second: float = 0, workers: int = 5) -> tuple[Proxy, Load]:
        proxy = Proxy(parse_config(text, source=str(tmp_path / "c.yaml")))
        await proxy.start()
        proxies.append(proxy)
        load = Load(proxy.url, max(per_second, 1) / workers)
        if per_second:
            load.start(limit=40, workers=workers)
            loads.append(load)
        return proxy, load

    yield start
    for load in loads:
        await load.stop()
    for proxy in proxies:
        await proxy.stop()


def checks_block(*checks: str, extra: str = "") -> str:
    """Lines for the analysis section (rollout_config's ``extra``, 14 spaces in)."""
    body = "checks:\n" + "".join(f"                - {c}\n" for c in checks)
    return body + (f"              {extra}\n" if extra else "")


async def api_routes(proxy: Proxy, client: aiohttp.ClientSession) -> dict[str, Any]:
    async with client.get(proxy.admin_url + "/api/routes/api",
                          headers={"Host": "127.0.0.1"}) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


def ring_of(view: dict[str, Any], name: str) -> dict[str, Any]:
    route = view.get("route", view)
    return next(r for r in route["rings"] if r["name"] == name)


@needs_prometheus
@pytest.mark.timeout(90)
async def test_a_canary_whose_business_metric_drops_is_rolled_back(
    started: Any, prometheus: Prometheus, exporter: Exporter, stable: Upstream,
    canary: Upstream, client: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    exporter.gauges = {"canary": 0.9, "stable": 0.9}
    check = (f'{{name: conversion, min: 0.5, interval: 300ms, prometheus: {{url: '
             f'"{prometheus.url}", query: \'business_conversion{{ring="{{ring}}"}}\'}}}}')
    text = rollout_config(stable, canary, tmp_path, ring="progression: {steps: [20, 50], "
                          "min_step_duration: 1h}", extra=checks_block(check))
    proxy, _ = await started(text)
    key = ("api", "canary", "conversion")
    results = proxy.controller.checks.results
    await wait_for(lambda: key in results and results[key].status is Status.PASS, 30, 0.1)
    assert results[key].value == 0.9
    shown = ring_of(await api_routes(proxy, client), "canary")
    assert [(x["name"], x["status"], x["value"], x["bound"]) for x in
            shown["external_checks"]] == [("conversion", "pass", 0.9, ">= 0.5")]
    assert not events_of(proxy, "rollback")

    exporter.gauges["canary"] = 0.1  # the release stops converting
    took = await wait_for(lambda: bool(events_of(proxy, "rollback")), 30, 0.05)
    (event,) = events_of(proxy, "rollback")
    assert event.label == "conversion"
    assert "check conversion (prometheus) fails" in event.reason and "0.1" in event.reason
    assert event.numbers["conversion"]["status"] == "fail"
    assert proxy.controller.states["api"]["canary"].phase is Phase.ROLLED_BACK
    body, _ = proxy.metrics.exposition()
    assert b'ringproxy_rollbacks_total{reason="conversion",ring="canary",route="api"} 1.0' \
        in body
    assert b'ringproxy_external_checks_total{check="conversion",ring="canary",route="api",' \
        b'status="fail"}' in body
    print(f"\nbusiness metric drop: rolled back {took:.1f}s after the gauge moved")


@needs_prometheus
@pytest.mark.timeout(90)
async def test_a_canary_whose_prometheus_query_errors_holds_and_is_never_rolled_back(
    started: Any, prometheus: Prometheus, exporter: Exporter, stable: Upstream,
    canary: Upstream, client: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    exporter.gauges = {"canary": 0.0, "stable": 0.0}  # would fail every bound below
    stable.error_every = canary.error_every = 200
    prom = prometheus.url
    checks = [
        # A query Prometheus refuses (bad_data), no series, and no Prometheus at all.
        f'{{name: broken, min: 0.5, interval: 300ms, prometheus: {{url: "{prom}", '
        f'query: \'business_conversion{{ring="{{ring}}"}} +\'}}}}',
        f'{{name: empty, min: 0.5, interval: 300ms, prometheus: {{url: "{prom}", '
        f'query: \'business_conversion{{ring="none-{{ring}}"}}\'}}}}',
        f'{{name: away, min: 0.5, interval: 300ms, prometheus: {{url: '
        f'"http://127.0.0.1:{refused_port()}", query: up, timeout: 1s}}}}',
    ]
    # Healthy traffic and a 1 s step: without the checks the canary would advance.
    text = rollout_config(stable, canary, tmp_path, ring="progression: {steps: [20, 50], "
                          "min_step_duration: 1s}", latency="{p50: 1.5}",
                          latency_floor="250ms", increase=5, min_requests=100,
                          extra=checks_block(*checks))
    proxy, _ = await started(text, per_second=250)
    results = proxy.controller.checks.results
    names = ("broken", "empty", "away")
    await wait_for(lambda: all(
        (k := ("api", "canary", n)) in results and results[k].status is Status.NO_DATA
        for n in names), 30, 0.1)
    assert "query error" in results["api", "canary", "broken"].detail
    assert "empty result" in results["api", "canary", "empty"].detail
    assert "unreachable" in results["api", "canary", "away"].detail

    # The judge's own checks become sure of health; the missing data keeps holding.
    def judged_healthy() -> bool:
        verdict = proxy.controller.verdicts.get("api", {}).get("canary")
        return verdict is not None and all(
            c.finding is Finding.WITHIN for c in verdict.checks if c.name not in names)

    await wait_for(judged_healthy, 30, 0.1)
    await asyncio.sleep(2)  # ten more analysis rounds
    state = proxy.controller.states["api"]["canary"]
    assert (state.phase, state.step) == (Phase.PROGRESSING, 0)
    assert not events_of(proxy, "rollback") and not events_of(proxy, "advance")
    verdict = proxy.controller.verdicts["api"]["canary"]
    assert verdict.outcome is Outcome.UNDECIDED
    assert "not yet sure of" in verdict.reason and "broken" in verdict.reason
    shown = ring_of(await api_routes(proxy, client), "canary")
    assert {x["name"]: x["status"] for x in shown["external_checks"]} == dict.fromkeys(
        names, "no_data")
    assert {e.kind for e in events_of(proxy, "check_no_data")} == {"check_no_data"}
    body, _ = proxy.metrics.exposition()
    for name in names:
        assert (f'ringproxy_external_checks_total{{check="{name}",ring="canary",'
                f'route="api",status="no_data"}}').encode() in body


@pytest.mark.timeout(60)
async def test_a_failing_custom_health_check_on_the_canarys_pool_rolls_it_back(
    started: Any, hooks: Hooks, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    ring = textwrap.dedent("""\
        progression: {steps: [20, 50], min_step_duration: 1h}
                        health_checks: [{name: db, path: /status/503, interval: 500ms,
                                         timeout: 500ms, threshold: 3}]""")
    text = rollout_config(stable, canary, tmp_path, ring=ring,
                          extra=f'post_rollback: "{hooks.url}/after"')
    hooks.status = 200
    proxy, _ = await started(text)
    await wait_for(lambda: bool(events_of(proxy, "rollback")), 20, 0.05)
    (event,) = events_of(proxy, "rollback")
    assert event.label == "db"
    assert f"GET /status/503 on {canary.url} answered 503 (3 in a row)" in event.reason
    assert proxy.controller.states["api"]["canary"].phase is Phase.ROLLED_BACK
    # The probes reached the canary's own server, on the path the check names.
    assert sum(1 for r in canary.requests if r["target"] == "/status/503") >= 3
    assert not any(r["target"] == "/status/503" for r in stable.requests)
    # post_rollback is told, fire and forget.
    await wait_for(lambda: bool(hooks.calls.get("after")), 10, 0.05)
    (told,) = hooks.calls["after"]
    assert (told["type"], told["kind"], told["ring"]) == ("post_rollback", "rollback", "canary")
    assert "db" in told["reason"]


@pytest.mark.timeout(90)
async def test_a_pre_advance_gate_answering_500_holds_the_step_and_200_lets_it_advance(
    started: Any, hooks: Hooks, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    stable.error_every = canary.error_every = 200
    gate = f'pre_advance: {{url: "{hooks.url}/gate", timeout: 2s, interval: 300ms}}'
    text = rollout_config(stable, canary, tmp_path, ring="progression: {steps: [20, 50], "
                          "min_step_duration: 1s}", latency="{p50: 1.5}",
                          latency_floor="250ms", increase=5, min_requests=100, extra=gate)
    hooks.status = 500
    proxy, _ = await started(text, per_second=250)
    await wait_for(lambda: len(hooks.calls.get("gate", [])) >= 3, 40, 0.05)
    # Tried again once per interval (300 ms), never more often: no flooding.
    times = [at for at, _, _ in hooks.answers["gate"]]
    assert all(b - a >= 0.25 for a, b in itertools.pairwise(times)), times
    state = proxy.controller.states["api"]["canary"]
    assert (state.phase, state.step, state.weight) == (Phase.PROGRESSING, 0, 2000)
    assert not events_of(proxy, "advance") and not events_of(proxy, "rollback")
    failed = events_of(proxy, "gate_failed")
    assert failed and "HTTP 500: refused by the test" in failed[0].reason
    asked = hooks.calls["gate"][0]
    assert (asked["type"], asked["ring"], asked["step"], asked["weight"], asked["outcome"]) \
        == ("pre_advance", "canary", 0, 20.0, "healthy")

    hooks.status = 200
    await wait_for(lambda: bool(events_of(proxy, "completed") or events_of(proxy, "advance")),
                   20, 0.05)
    (advance,) = events_of(proxy, "advance")
    assert advance.to_weight == 5000 and "pre_advance hook passed" in advance.reason
    assert events_of(proxy, "gate_passed")
    # Exactly one call for step 0 was answered 200, and it was the last for that step.
    step0 = [(body["step"], status) for body, (_, status, _) in
             zip(hooks.calls["gate"], hooks.answers["gate"], strict=True) if body["step"] == 0]
    assert [status for _, status in step0].count(200) == 1, step0
    assert step0[-1][1] == 200, step0


@pytest.mark.timeout(120)
async def test_a_steps_min_duration_survives_a_restart(
    spawn: Any, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    stable.error_every = canary.error_every = 200
    hold = 20.0  # the first step's own min_duration, in seconds
    ring = f"progression: {{steps: [{{weight: 20, min_duration: {hold:g}s}}, 50]}}"
    config = tmp_path / "ringproxy.yaml"
    config.write_text(rollout_config(stable, canary, tmp_path, ring=ring,
                                     latency="{p50: 1.5}", latency_floor="250ms", increase=5,
                                     min_requests=100))
    state_file, audit = tmp_path / "state.json", tmp_path / "audit.jsonl"

    def saved() -> dict[str, Any] | None:
        if not state_file.exists():
            return None
        ring: dict[str, Any] = json.loads(state_file.read_text())["routes"]["api"]["canary"]
        return ring

    first = await spawn("run", "--config", str(config))
    await first.wait_listening()
    load = Load(first.url, 50)
    load.start(limit=20, workers=5)
    try:
        await wait_for(lambda: saved() is not None, 10, 0.05)  # saved at start
        began = saved()
        assert began is not None and began["step"] == 0
        since = began["step_since"]
        await asyncio.sleep(3)  # healthy traffic, well inside the step's 20 s
    finally:
        await load.stop()
    code, _, err = await first.finish(signal.SIGINT)
    assert code == 0, err
    assert not audit.exists() or "advance" not in audit.read_text()

    # Down until the step's 20 s are over: time in a step counts while the proxy is down.
    await asyncio.sleep(max(0.0, since + hold + 1 - time.time()))
    second = await spawn("run", "--config", str(config))
    await second.wait_listening()
    restarted = time.time()
    again = saved()
    assert again is not None and again["step_since"] == since and again["step"] == 0
    load = Load(second.url, 50)
    load.start(limit=30, workers=5)
    try:
        await wait_for(lambda: audit.exists() and "advance" in audit.read_text(), 30, 0.05)
    finally:
        await load.stop()
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    (advance,) = [e for e in events if e["kind"] == "advance"]
    # Advanced on the saved clock: the step's 20 s were over, counted from its start in
    # the first run, and it did not wait 20 s more after the restart.
    assert advance["time"] - since >= hold
    assert advance["time"] < restarted + hold, (advance["time"] - restarted, advance["reason"])
    elapsed = float(advance["reason"].split("healthy after ")[1].split("s")[0])
    assert elapsed >= hold
    print(f"\nadvanced {advance['time'] - restarted:.1f}s after the restart, "
          f"{advance['time'] - since:.1f}s into the step")
    code, _, err = await second.finish(signal.SIGINT)
    assert code == 0, err


HOOK_TOKEN = "t0ken-4b7e19c2d8"
PATH_SECRET = "p4th-secret-91ac3e"
QUERY_SECRET = "qu3ry-secret-5d20f7"


@pytest.mark.timeout(60)
async def test_a_webhook_check_is_posted_the_rings_state_and_a_non_2xx_rolls_it_back(
    started: Any, hooks: Hooks, stable: Upstream, canary: Upstream, tmp_path: Path,
    client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RP_TEST_HOOK", HOOK_TOKEN)
    monkeypatch.setenv("RP_TEST_PATH", PATH_SECRET)
    monkeypatch.setenv("RP_TEST_QUERY", QUERY_SECRET)
    # Secrets in a header, in a URL's query (the check) and in its path (post_rollback).
    check = (f'{{name: smoke, interval: 200ms, threshold: 2, webhook: {{url: '
             f'"{hooks.url}/smoke?token=${{RP_TEST_QUERY}}", timeout: 2s, '
             f'headers: {{X-Token: "${{RP_TEST_HOOK}}"}}}}}}')
    text = rollout_config(stable, canary, tmp_path, ring="progression: {steps: [20, 50], "
                          "min_step_duration: 1h}", extra=checks_block(
                              check, extra=f'post_rollback: "{hooks.url}/after-'
                              '${RP_TEST_PATH}"'))
    hooks.status = 204
    proxy, _ = await started(text)
    def told_of(ring: str) -> list[dict[str, Any]]:
        return [c for c in hooks.calls.get("smoke", []) if c["ring"] == ring]

    # Every ring being rolled out is checked (the pinned staff ring too, not the baseline).
    await wait_for(lambda: len(told_of("canary")) >= 3 and bool(told_of("staff")), 20, 0.05)
    assert not told_of("stable")
    assert not events_of(proxy, "rollback")
    told = told_of("canary")[0]
    assert (told["type"], told["check"], told["route"], told["ring"], told["phase"],
            told["step"], told["weight"]) == ("check", "smoke", "api", "canary", "progressing",
                                              0, 20.0)
    hooks.status = 503
    await wait_for(lambda: bool(events_of(proxy, "rollback")), 20, 0.05)
    event = events_of(proxy, "rollback")[0]
    assert event.label == "smoke" and "HTTP 503: refused by the test" in event.reason
    # The header from ${RP_TEST_HOOK} reached the hook, on every call.
    assert all(headers.get("X-Token") == HOOK_TOKEN
               for _, _, headers in hooks.answers["smoke"])
    await wait_for(lambda: bool(hooks.calls.get(f"after-{PATH_SECRET}")), 10, 0.05)
    # ... and no secret is anywhere in the API, the status page or the events.
    origin = hooks.url  # http://127.0.0.1:PORT: all that is shown of each URL
    seen: dict[str, str] = {}
    for url in ("/", "/api/routes", "/api/routes/api", "/api/events"):
        async with client.get(proxy.admin_url + url, headers={"Host": "127.0.0.1"}) as r:
            assert r.status == 200, (url, r.status)
            seen[url] = await r.text()
    seen["history"] = json.dumps(list(proxy.controller.history))
    for where, shown in seen.items():
        for secret in (HOOK_TOKEN, PATH_SECRET, QUERY_SECRET):
            assert secret not in shown, (where, secret)
    view = await api_routes(proxy, client)
    analysis = view.get("route", view)["analysis"]
    assert [x["url"] for x in analysis["external"]] == [origin]
    assert analysis["post_rollback"] == origin
