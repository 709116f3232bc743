"""The admin API and the CLI's remote commands against a running proxy (real sockets)."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.admin.api import REQUIREMENTS_KEY, admin_app
from proxy.admin.auth import Access
from proxy.admin.series import SHOWN
from proxy.admin.views import advance_progress
from proxy.config import load_config, parse_config
from proxy.errors import RolloutConflict
from proxy.rollout.evidence import Evidence, Tally
from proxy.rollout.judge import Finding, Outcome, alpha_shares, judge, judge_marks
from proxy.routing.assign import bucket_of
from proxy.server import Proxy
from tests.conftest import RINGPROXY, ROOT, Upstream

ADMIN = "admin-token-0123456789abcdef"
OPS = "operator-token-0123456789abcd"
OPS_LIMITED = "operator-limited-0123456789ab"
VIEW = "viewer-token-0123456789abcdef"
TOKENS = {"RP_ADMIN": ADMIN, "RP_OPS": OPS, "RP_OPS_LIMITED": OPS_LIMITED, "RP_VIEW": VIEW}


def config_text(stable: Upstream, canary: Upstream, tmp_path: Path, tokens: bool = True) -> str:
    token_yaml = (
        "  tokens:\n"
        "    - {env: RP_ADMIN, role: admin}\n"
        "    - {env: RP_OPS, role: operator}\n"
        "    - {env: RP_OPS_LIMITED, role: operator, routes: [api], rings: [beta]}\n"
        "    - {env: RP_VIEW, role: viewer}\n"
    ) if tokens else ""
    return (
        "listen: 127.0.0.1:0\n"
        "admin:\n"
        "  listen: 127.0.0.1:0\n"
        + token_yaml
        + textwrap.dedent(f"""\
        access_log: {{enabled: false}}
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        pools:
          stable: {{servers: ["{stable.url}"]}}
          canary: {{servers: ["{canary.url}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis: {{interval: 10s, max_error_rate: 5}}
            rings:
              - name: canary
                pool: canary
                progression:
                  steps: [5, {{weight: 20, approval: required}}, 50]
                  min_step_duration: 1h
              - {{name: beta, pool: canary, weight: 10,
                  rules: [{{attr: "header:X-Beta", exists: true}}]}}
              - {{name: stable, pool: stable}}
        """)
    )


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in TOKENS.items():
        monkeypatch.setenv(k, v)
    return dict(TOKENS)


@pytest.fixture
async def admin(stable: Upstream, canary: Upstream, tmp_path: Path,
                token_env: dict[str, str]) -> AsyncIterator[Proxy]:
    path = tmp_path / "ringproxy.yaml"
    path.write_text(config_text(stable, canary, tmp_path))
    proxy = Proxy(load_config(path))
    await proxy.start()
    yield proxy
    await proxy.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(proxy: Proxy, method: str, path: str, token: str | None = VIEW,
               body: object | None = None) -> tuple[int, dict]:
    headers = bearer(token) if token else {}
    async with aiohttp.ClientSession() as client, client.request(
        method, proxy.admin_url + path, json=body, headers=headers
    ) as r:
        return r.status, await r.json()


async def test_health_ready_and_metrics_need_no_token(admin: Proxy) -> None:
    for path in ("/healthz", "/readyz"):
        status, body = await call(admin, "GET", path, token=None)
        assert status == 200
    assert body["ready"] is True and body["revision"] == admin.config.revision
    async with aiohttp.ClientSession() as client, client.get(admin.admin_url + "/metrics") as r:
        assert r.status == 200 and "ringproxy_requests_total" in await r.text()


async def test_routes_view(admin: Proxy, client: aiohttp.ClientSession) -> None:
    for i in range(20):
        async with client.get(admin.url + "/app", headers={"X-User-Id": f"u{i}"}) as r:
            assert r.status == 200
    status, body = await call(admin, "GET", "/api/routes")
    assert status == 200 and body["revision"] == admin.config.revision
    (route,) = body["routes"]
    assert route["name"] == "api" and route["analysis"]["baseline"] == "stable"
    rings = {r["name"]: r for r in route["rings"]}
    assert list(rings) == ["canary", "beta", "stable"]
    canary = rings["canary"]
    assert (canary["weight"], canary["phase"], canary["step"], canary["steps"]) == (
        5.0, "progressing", 0, [5.0, 20.0, 50.0])
    assert canary["range"] == [0, 500] and canary["pool"] == "canary"
    assert rings["beta"]["rules"] == ["header:x-beta exists true"]
    assert rings["stable"]["baseline"] and rings["stable"]["default"]
    assert rings["stable"]["weight"] == 85.0
    total = sum(r["traffic"]["requests"] for r in rings.values())
    assert total == 20
    status, one = await call(admin, "GET", "/api/routes/api")
    assert status == 200 and [r["name"] for r in one["rings"]] == list(rings)


def evidence(requests: int, errors: int, delays: list[float]) -> Evidence:
    tally = Tally()
    for i in range(requests):
        tally.record(i < errors, delays[i % len(delays)])
    return tally.evidence()


async def test_routes_view_carries_the_verdicts_evidence(admin: Proxy) -> None:
    # A verdict of the judge on known evidence, as the controller keeps it: the API answers
    # each check as its as_dict(), the counts since the step began, and the settings.
    analysis = admin.config.routes[0].analysis
    assert analysis is not None
    ring = evidence(400, 24, [0.030, 0.032, 0.035, 0.090])
    base = evidence(4000, 40, [0.020, 0.021, 0.022, 0.025])
    verdict = judge(ring, base, analysis.criteria)
    assert verdict.outcome is Outcome.ROLLBACK  # the p-values and progress are worth showing
    assert {c.finding for c in verdict.checks} >= {Finding.WORSE, Finding.UNDECIDED}
    for _ in range(3):  # a controller round in between replaces it: put it back, ask again
        admin.controller.verdicts["api"] = {"canary": verdict}
        status, body = await call(admin, "GET", "/api/routes/api")
        if admin.controller.verdicts["api"].get("canary") is verdict:
            break
    assert status == 200
    rings = {r["name"]: r for r in body["rings"]}
    shown = rings["canary"]["verdict"]
    assert shown["outcome"] == "rollback" and shown["reason"] == verdict.reason
    assert (shown["requests"], shown["baseline_requests"]) == (400, 4000)
    assert [c["name"] for c in shown["checks"]] == [
        "error_rate_increase", "error_rate", "p50", "p95", "p99"]
    # JSON's round trip of each check is exactly the judge's own dict, and its advance
    assert shown["checks"] == json.loads(json.dumps(
        [{**c.as_dict(), "advance": round(advance_progress(c), 4)} for c in verdict.checks]))
    by_name = {c["name"]: c for c in shown["checks"]}
    assert by_name["error_rate_increase"]["numbers"] == {
        "errors": 24, "requests": 400, "baseline_errors": 40, "baseline_requests": 4000}
    for check in shown["checks"]:
        assert 0 <= check["progress"] <= 1
        assert (check["progress"] == 1) == (check["finding"] == "worse"), check
        assert check["alpha"] == pytest.approx(
            analysis.criteria.alpha * alpha_shares(analysis.criteria)[check["name"]])
    assert rings["canary"]["evidence"] == {
        "requests": 400, "errors": 24, "baseline_requests": 4000, "baseline_errors": 40}
    assert rings["canary"]["starved"] is False
    assert rings["beta"]["verdict"] is None and rings["beta"]["evidence"] is None
    assert body["analysis"] == {
        "interval": 10.0, "baseline": "stable", "alpha": 0.01, "max_blind": 600.0,
        "min_requests": 100, "latency_floor": 0.02, "error_statuses": "5xx",
        "checks": [
            {"name": "error_rate_increase", "kind": "error_rate_increase", "quantile": None,
             "limit": 0.01, "text": "error rate at most 1 points above the baseline's"},
            {"name": "error_rate", "kind": "error_rate", "quantile": None, "limit": 0.05,
             "text": "error rate at most 5%"},
            {"name": "p50", "kind": "latency", "quantile": 0.5, "limit": 1.5,
             "text": "p50 at most 1.5x the baseline's (and 20 ms above it)"},
            {"name": "p95", "kind": "latency", "quantile": 0.95, "limit": 1.5,
             "text": "p95 at most 1.5x the baseline's (and 20 ms above it)"},
            {"name": "p99", "kind": "latency", "quantile": 0.99, "limit": 2.0,
             "text": "p99 at most 2x the baseline's (and 20 ms above it)"},
        ],
        "fast_rollback": None,
        "external": [], "pre_advance": None, "post_rollback": None,
    }


def judged_config(stable: Upstream, canary: Upstream, tmp_path: Path) -> str:
    return textwrap.dedent(f"""\
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
              interval: 100ms
              alpha: 0.01
              max_error_rate_increase: 2
              max_error_rate: 30
              latency: off
              min_requests: 20
              error_statuses: [5xx, 429]
            rings:
              - {{name: canary, pool: canary, weight: 50}}
              - {{name: stable, pool: stable}}
        """)


async def test_live_verdict_numbers_are_the_judges_on_the_counts_shown(
    stable: Upstream, canary: Upstream, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    # Real traffic, the controller judging on its own: the verdict /api/routes shows is the
    # judge's on the counts it shows (latency off: the counts are all the evidence).
    proxy = Proxy(parse_config(judged_config(stable, canary, tmp_path)))
    await proxy.start()
    try:
        canary.error_every = 10  # 10 % against none, 2 points allowed: undecided
        users = (f"user-{i}" for i in range(100_000))
        to_canary = [u for u in users if bucket_of("api", u) < 5000][:140]
        to_stable = [u for u in (f"other-{i}" for i in range(100_000))
                     if bucket_of("api", u) >= 5000][:140]
        for user in to_canary + to_stable:
            async with client.get(proxy.url + "/app", headers={"X-User-Id": user}) as r:
                await r.read()
        assert (canary.app_hits, stable.app_hits) == (140, 140)
        ring: dict = {}
        for _ in range(100):  # until a round has judged all of it
            status, body = await call(proxy, "GET", "/api/routes", token=None)
            assert status == 200
            ring = {r["name"]: r for r in body["routes"][0]["rings"]}["canary"]
            if ring["evidence"] and ring["evidence"]["baseline_requests"] == 140 \
                    and ring["evidence"]["requests"] == 140:
                break
            await asyncio.sleep(0.05)
        assert ring["evidence"] == {"requests": 140, "errors": 14, "baseline_requests": 140,
                                    "baseline_errors": 0}, ring
        analysis = proxy.config.routes[0].analysis
        assert analysis is not None
        # Within its first 5 minutes a step has one mark, its start (number 1).
        again = judge_marks([(1, Evidence(140, 14), Evidence(140, 0))], analysis.criteria)
        assert ring["verdict"]["checks"] == json.loads(json.dumps(
            [{**c.as_dict(), "advance": round(advance_progress(c), 4)} for c in again.checks]))
        assert ring["verdict"]["outcome"] == again.outcome.value == "undecided"
        assert ring["verdict"]["reason"] == again.reason
        increase = ring["verdict"]["checks"][0]
        assert increase["name"] == "error_rate_increase" and 0 < increase["progress"] < 1
        assert body["routes"][0]["analysis"]["error_statuses"] == "5xx, 429"
    finally:
        await proxy.stop()


async def test_series_endpoint_counts_each_second_of_each_ring(
    admin: Proxy, client: aiohttp.ClientSession, canary: Upstream
) -> None:
    # Known requests over a few seconds; the sampler's points add up to them, per ring,
    # with the live weight; ``since`` returns only what came after.
    canary.error_every = 4
    sent = {"canary": 0, "beta": 0, "stable": 0}
    users = [f"u{i}" for i in range(200)]
    for second in range(3):
        for user in users[second * 40:(second + 1) * 40]:
            async with client.get(admin.url + "/app", headers={"X-User-Id": user}) as r:
                await r.read()
            bucket = bucket_of("api", user)
            sent["canary" if bucket < 500 else "beta" if bucket < 1500 else "stable"] += 1
        await asyncio.sleep(0.5)
    assert canary.app_hits == sent["canary"] + sent["beta"] and sent["canary"] > 0
    body: dict = {}
    for _ in range(60):  # the sampler reads each second once it is over
        status, body = await call(admin, "GET", "/api/routes/api/series")
        assert status == 200
        counted = {r["name"]: sum(r["points"]["requests"]) for r in body["rings"]}
        if counted == sent:
            break
        await asyncio.sleep(0.1)
    assert counted == sent, body
    assert body["route"] == "api" and body["baseline"] == "stable" and body["since"] is None
    assert body["resolution"] == 1.0 and body["coarse_resolution"] == 10.0
    rings = {r["name"]: r for r in body["rings"]}
    # a young proxy: the axis starts at its first point (15 minutes once it has them)
    assert body["start"] == rings["canary"]["points"]["t"][0] > body["now"] - SHOWN
    assert list(rings) == ["canary", "beta", "stable"] and rings["stable"]["baseline"]
    assert rings["canary"]["phase"] == "progressing" and rings["canary"]["step_since"]
    points = rings["canary"]["points"]
    assert set(points) == {"t", "seconds", "requests", "errors", "rps", "error_rate", "p95",
                           "p99", "weight"}
    assert all(len(col) == len(points["t"]) for col in points.values())
    assert points["t"] == sorted(points["t"]) and set(points["seconds"]) == {1.0}
    assert all(b - a == pytest.approx(1.0, abs=1e-3) for a, b in zip(
        points["t"], points["t"][1:], strict=False))
    errors = {r["name"]: sum(r["points"]["errors"]) for r in body["rings"]}
    assert errors["canary"] + errors["beta"] == canary.app_hits // 4 and not errors["stable"]
    assert set(points["weight"]) == {5.0} and set(rings["stable"]["points"]["weight"]) == {85.0}
    assert set(rings["beta"]["points"]["weight"]) == {10.0}
    busy = [i for i, n in enumerate(points["requests"]) if n]
    assert all(points["p95"][i] is not None for i in busy)
    assert all(points["rps"][i] == points["requests"][i] for i in busy)
    # an event lands in the series of its route
    status, _ = await call(admin, "POST", "/api/routes/api/rings/canary/pause", OPS,
                           {"reason": "look at the charts"})
    assert status == 200
    last = points["t"][-1]
    status, later = await call(admin, "GET", f"/api/routes/api/series?since={last}")
    assert status == 200 and later["since"] == last
    assert all(t > last for r in later["rings"] for t in r["points"]["t"])
    assert [(e["ring"], e["kind"], e["reason"]) for e in later["events"]] == [
        ("canary", "pause", "look at the charts")]


async def test_explain_endpoint(admin: Proxy) -> None:
    status, body = await call(admin, "GET", "/api/explain?route=api&header=X-Beta:1")
    assert status == 200 and (body["ring"], body["reason"]) == ("beta", "rule")
    from proxy.routing.assign import bucket_of

    user = next(f"u{i}" for i in range(500) if bucket_of("api", f"u{i}") < 500)
    status, body = await call(admin, "GET", f"/api/explain?route=api&header=X-User-Id:{user}")
    assert (body["ring"], body["bucket"]) == ("canary", bucket_of("api", user))
    # The same answer as `ringproxy explain` (proxy.routing.explain), on the live table.
    assert body["ranges"] == {"canary": [0, 500], "beta": [500, 1500]}
    status, body = await call(admin, "POST", "/api/routes/api/rings/beta/weight", ADMIN,
                              {"weight": 20})
    assert status == 200
    status, body = await call(admin, "GET", f"/api/explain?route=api&header=X-User-Id:{user}")
    assert body["ranges"] == {"canary": [0, 500], "beta": [500, 2500]}
    status, body = await call(admin, "GET", "/api/explain?route=api")
    assert (body["ring"], body["reason"], body["bucket"]) == ("stable", "default", None)
    assert body["note"] == "no stickiness key (header:x-user-id): the default ring"


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/explain", 400, "the route parameter is required"),
        ("/api/explain?route=api&header=novalue", 400, "expected NAME:VALUE"),
        ("/api/explain?route=api&ip=999.1.1.1", 400, "is not an IP address"),
        ("/api/explain?route=nope", 404, "unknown route 'nope'"),
        ("/api/routes/nope", 404, "unknown route 'nope'"),
        ("/api/events?since=yesterday", 400, "expected a Unix time"),
        ("/api/routes/api/series?since=yesterday", 400,
         "since='yesterday': expected a Unix time in seconds"),
        ("/api/routes/api/series?since=nan", 400, "expected a Unix time"),
        ("/api/routes/nope/series", 404, "unknown route 'nope'"),
        ("/api/nothing", 404, "no such endpoint"),
    ],
)
async def test_bad_reads(admin: Proxy, path: str, status: int, message: str) -> None:
    got, body = await call(admin, "GET", path)
    assert got == status and message in body["error"]


@pytest.mark.parametrize(
    ("token", "method", "path", "status", "message"),
    [
        (None, "GET", "/api/routes", 401, "missing bearer token"),
        ("wrong-token-wrong-token", "GET", "/api/routes", 401, "invalid token"),
        (VIEW, "POST", "/api/routes/api/rings/canary/pause", 403, "a viewer token may not"),
        (OPS_LIMITED, "POST", "/api/routes/api/rings/canary/pause", 403,
         "may not act on api/canary"),
        (OPS, "POST", "/api/reload", 403, "only an admin token may reload"),
        (VIEW, "POST", "/api/reload", 403, "only an admin token may reload"),
        (None, "GET", "/api/routes/api/series", 401, "missing bearer token"),
        (None, "GET", "/api/routes/nope/series", 401, "missing bearer token"),
        # 401 before 404 before 403: strangers learn nothing, callers hear what is missing
        (None, "POST", "/api/routes/api/rings/nope/pause", 401, "missing bearer token"),
        (VIEW, "POST", "/api/routes/api/rings/nope/pause", 404, "has no ring 'nope'"),
        (OPS_LIMITED, "POST", "/api/routes/web/rings/beta/pause", 404, "unknown route 'web'"),
        (VIEW, "POST", "/api/routes/api/rings/canary/explode", 404, "unknown action"),
    ],
)
async def test_auth_failures(admin: Proxy, token, method, path, status, message) -> None:
    got, body = await call(admin, method, path, token=token)
    assert got == status and message in body["error"]


async def test_actions_conflicts_and_the_audit_trail(admin: Proxy) -> None:
    # 409: nothing to approve yet
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/approve", OPS)
    assert status == 409 and "cannot approve ring 'canary': it is progressing" in body["error"]
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/promote", OPS,
                              {"reason": "looks good"})
    assert status == 200
    assert [(e["kind"], e["to_weight"], e["actor"]) for e in body["events"]] == [
        ("advance", 20.0, "operator:RP_OPS")]
    assert body["ring"]["weight"] == 20.0
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/pause", ADMIN)
    assert status == 200 and body["ring"]["phase"] == "paused"
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/pause", ADMIN)
    assert status == 409 and "it is paused" in body["error"]
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/resume", ADMIN)
    assert status == 200 and body["ring"]["phase"] == "progressing"
    # the limited operator may act on beta
    status, body = await call(admin, "POST", "/api/routes/api/rings/beta/weight", OPS_LIMITED,
                              {"weight": 12.5, "reason": "more beta"})
    assert status == 200 and body["ring"]["weight"] == 12.5
    for bad, message in [({}, 'weight needs {"weight": PERCENT}'),
                         ({"weight": 101}, "is not a percentage"),
                         ({"weight": 1.234}, "0.01 steps"),
                         ({"weight": 90}, "above 100 %")]:
        status, body = await call(admin, "POST", "/api/routes/api/rings/beta/weight", OPS, bad)
        assert status in (400, 409) and message in body["error"], body
    status, body = await call(admin, "POST", "/api/routes/api/rings/stable/rollback", ADMIN)
    assert status == 409 and "is the baseline" in body["error"]
    status, body = await call(admin, "POST", "/api/routes/api/rings/nope/pause", ADMIN)
    assert status == 404 and "has no ring 'nope'" in body["error"]
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/explode", ADMIN)
    assert status == 404 and "unknown action" in body["error"]
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/rollback", ADMIN,
                              {"reason": "pager went off"})
    assert status == 200 and body["ring"]["weight"] == 0.0
    async with aiohttp.ClientSession() as client, client.post(
        admin.admin_url + "/api/routes/api/rings/canary/resume",
        data=b"{not json", headers=bearer(ADMIN),
    ) as r:
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
    async with aiohttp.ClientSession() as client, client.post(
        admin.admin_url + "/api/routes/api/rings/canary/resume",
        data=b"[" * 100_000 + b"]" * 100_000, headers=bearer(ADMIN),
    ) as r:  # nesting deeper than the decoder's recursion: a 400, not a 500
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
    status, body = await call(admin, "GET", "/api/events?route=api")
    kinds = [(e["ring"], e["kind"], e["actor"]) for e in body["events"]]
    assert kinds == [("canary", "advance", "operator:RP_OPS"),
                     ("canary", "pause", "admin:RP_ADMIN"),
                     ("canary", "resume", "admin:RP_ADMIN"),
                     ("beta", "set_weight", "operator:RP_OPS_LIMITED"),
                     ("canary", "rollback", "admin:RP_ADMIN")]
    assert body["events"][-1]["reason"] == "pager went off"
    since = body["events"][2]["time"]
    status, body = await call(admin, "GET", f"/api/events?since={since}")
    assert [e["kind"] for e in body["events"]] == ["set_weight", "rollback"]


async def test_reload_endpoint(admin: Proxy, tmp_path: Path) -> None:
    path = tmp_path / "ringproxy.yaml"
    path.write_text(path.read_text().replace("max_error_rate: 5", "max_error_rate: 6"))
    status, body = await call(admin, "POST", "/api/reload", ADMIN)
    assert status == 200 and body["changed"] and body["trigger"] == "api:admin:RP_ADMIN"
    path.write_text(path.read_text().replace("pool: canary", "pool: v9", 1))
    status, body = await call(admin, "POST", "/api/reload", ADMIN)
    assert status == 422 and "config rejected" in body["error"] and "unknown pool 'v9'" in \
        body["error"]


async def test_without_tokens_the_api_is_read_only_from_loopback(
    stable: Upstream, canary: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy(load_config_text(config_text(stable, canary, tmp_path, tokens=False), tmp_path))
    await proxy.start()
    try:
        assert any("no tokens configured" in r.message for r in caplog.records)
        status, _ = await call(proxy, "GET", "/api/routes", token=None)
        assert status == 200
        status, body = await call(proxy, "POST", "/api/routes/api/rings/canary/pause", None)
        assert status == 403 and "read-only" in body["error"]
    finally:
        await proxy.stop()


def test_every_endpoint_declares_who_may_call_it(admin: Proxy) -> None:
    # Endpoints are registered through ENDPOINTS only, each behind its requirement: a route
    # added to the router any other way has no requirement and fails here.
    app = admin_app(admin)
    requirements = app[REQUIREMENTS_KEY]
    declared = {}
    for route in app.router.routes():
        assert route.handler in requirements, f"{route.method} {route.resource} is unguarded"
        assert route.resource is not None
        declared[route.method, route.resource.canonical] = requirements[route.handler].access
    reads = ["/api/routes", "/api/routes/{route}", "/api/routes/{route}/series",
             "/api/explain", "/api/events", "/api/routes/{route}/rings",
             "/api/routes/{route}/rings/{ring}", "/api/pools", "/api/pools/{pool}"]
    public = ["/", "/favicon.ico", "/healthz", "/readyz", "/metrics"]
    assert declared == {
        **{(m, p): Access.PUBLIC for p in public for m in ("GET", "HEAD")},
        **{(m, p): Access.READ for p in reads for m in ("GET", "HEAD")},
        ("POST", "/api/routes/{route}/rings/{ring}/{action}"): Access.ACT,
        ("POST", "/api/reload"): Access.ADMIN,
        # The Rings API: a ring's writes act on that ring; pools are the admin's.
        ("POST", "/api/routes/{route}/rings"): Access.ACT,
        **{(m, "/api/routes/{route}/rings/{ring}"): Access.ACT
           for m in ("PUT", "PATCH", "DELETE")},
        ("POST", "/api/pools"): Access.ADMIN,
        **{(m, "/api/pools/{pool}"): Access.ADMIN for m in ("PUT", "PATCH", "DELETE")},
    }


async def test_errors_answer_with_their_status_from_the_exception_tree(
    admin: Proxy, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    # RolloutConflict maps to 409 in proxy/errors.py; the API answers with that status.
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/approve", ADMIN)
    assert status == RolloutConflict.status == 409 and "cannot approve" in body["error"]
    # Every ApiError answers {"error": ...} with its own status.
    status, body = await call(admin, "POST", "/api/routes", ADMIN)
    assert status == 405 and body["error"] == "POST is not allowed on /api/routes"
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/pause", ADMIN,
                              ["not", "an", "object"])
    assert status == 400 and body["error"] == "the body must be a JSON object"
    status, body = await call(admin, "POST", "/api/routes/api/rings/canary/pause", ADMIN,
                              {"reason": 7})
    assert status == 400 and body["error"] == "reason must be a string"
    # A proxy started from a config text has no file to reload: 409 from an ApiError.
    proxy = Proxy(parse_config(config_text(stable, canary, tmp_path), environ=TOKENS))
    await proxy.start()
    try:
        status, body = await call(proxy, "POST", "/api/reload", ADMIN)
        assert status == 409 and body["error"] == (
            "this proxy was not started from a config file; nothing to reload")
    finally:
        await proxy.stop()


def load_config_text(text: str, tmp_path: Path):
    path = tmp_path / "plain.yaml"
    path.write_text(text)
    return load_config(path)


async def acli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *RINGPROXY, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={"PATH": "/usr/bin:/bin", **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_remote_commands(admin: Proxy) -> None:
    env = {"RINGPROXY_ADMIN_URL": admin.admin_url, "RINGPROXY_ADMIN_TOKEN": ADMIN}
    code, out, err = await acli("status", env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"revision {admin.config.revision}"
    assert lines[1].split() == ["ROUTE", "RING", "POOL", "SERVERS", "WEIGHT", "PHASE", "STEP",
                                "REQ/S", "ERR", "P95", "VERDICT", "EVIDENCE"]
    assert lines[2].split()[:8] == ["api", "canary", "canary", "1/1", "up", "5%", "progressing",
                                    "1/3"]
    code, out, err = await acli("status", "--json", env=env)
    assert json.loads(out)["routes"][0]["name"] == "api"
    code, out, err = await acli("promote", "api", "canary", "--reason", "ok", env=env)
    assert code == 0 and "api/canary: advance 5% -> 20% (progressing)" in out
    code, out, err = await acli("approve", "api", "canary", env=env)
    assert code == 1 and err.strip() == (
        "ringproxy approve: cannot approve ring 'canary': it is progressing (HTTP 409)")
    for action in ("pause", "resume", "rollback"):
        code, out, err = await acli(action, "api", "canary", env=env)
        assert code == 0, err
    code, out, err = await acli("weight", "api", "beta", "7.5", env=env)
    assert code == 0 and "beta is now paused at 7.5%" in out
    code, out, err = await acli("events", "--route", "api", env=env)
    assert code == 0 and out.splitlines()[0].split()[:4] == ["TIME", "ROUTE", "RING", "KIND"]
    assert len(out.splitlines()) == 1 + 5
    code, out, err = await acli("reload", env=env)
    assert code == 0 and out.startswith("unchanged: revision")
    # errors: a one-line message and a non-zero exit
    code, out, err = await acli("status", "--token", "nope-nope-nope-nope", env=env)
    assert code == 1 and err.strip() == "ringproxy status: invalid token (HTTP 401)"
    code, out, err = await acli("status", "--admin", "http://127.0.0.1:1", env=env)
    assert code == 1 and "cannot reach the admin API at http://127.0.0.1:1" in err
    code, out, err = await acli("weight", "api", "beta", "lots", env=env)
    assert code == 2


async def test_cli_status_shows_the_verdict_and_its_lead_check(admin: Proxy) -> None:
    analysis = admin.config.routes[0].analysis
    assert analysis is not None
    base = evidence(4000, 40, [0.020, 0.021])
    undecided = judge(evidence(300, 21, [0.020, 0.021]), base, analysis.criteria)
    lead = max(undecided.checks, key=lambda c: c.progress)
    assert undecided.outcome is Outcome.UNDECIDED and 0 < lead.progress < 1
    worse = judge(evidence(400, 60, [0.020, 0.021]), base, analysis.criteria)
    assert worse.outcome is Outcome.ROLLBACK
    env = {"RINGPROXY_ADMIN_URL": admin.admin_url, "RINGPROXY_ADMIN_TOKEN": VIEW}
    for verdict, expected in [
        (undecided, ["undecided", lead.name, f"{lead.progress * 100:.0f}%", "to", "rollback"]),
        (worse, ["rollback", worse.checks[0].name, "worse"]),
    ]:
        for _ in range(3):  # a controller round in between replaces it: put it back
            admin.controller.verdicts["api"] = {"canary": verdict}
            code, out, err = await acli("status", env=env)
            if admin.controller.verdicts["api"].get("canary") is verdict:
                break
        assert code == 0, err
        canary_line = next(line for line in out.splitlines() if line.startswith("api  "))
        assert canary_line.split()[-len(expected):] == expected, canary_line


async def test_a_starved_ring_in_the_api_the_events_and_the_cli(
    stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    # No traffic: the canary cannot be judged; after max_blind it is starved (an event, the
    # flag in its view, the CLI says so) and it does not advance.
    text = judged_config(stable, canary, tmp_path).replace(
        "{name: canary, pool: canary, weight: 50}",
        "{name: canary, pool: canary, progression: {steps: [5, 50], min_step_duration: 1s}}",
    ).replace("min_requests: 20", "min_requests: 20\n      max_blind: 1s")
    proxy = Proxy(parse_config(text))
    await proxy.start()
    try:
        ring: dict = {}
        for _ in range(100):
            status, body = await call(proxy, "GET", "/api/routes", token=None)
            assert status == 200
            ring = body["routes"][0]["rings"][0]
            if ring["starved"]:
                break
            await asyncio.sleep(0.1)
        assert (ring["name"], ring["starved"], ring["phase"], ring["step"]) == (
            "canary", True, "progressing", 0), ring
        status, body = await call(proxy, "GET", "/api/events", token=None)
        starved = [e for e in body["events"] if e["kind"] == "analysis_starved"]
        assert [(e["ring"], e["to_weight"]) for e in starved] == [("canary", 5.0)]
        code, out, err = await acli("status", env={"RINGPROXY_ADMIN_URL": proxy.admin_url})
        assert code == 0, err
        line = next(line for line in out.splitlines() if line.startswith("api  "))
        assert "starved" in line.split(), line  # VERDICT: "undecided, starved"
    finally:
        await proxy.stop()


def test_cli_module_runs_without_an_event_loop() -> None:
    # The remote commands use urllib only; importing them pulls in no server code.
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", "import sys, proxy.admin.client; "
         "print(sorted(m for m in sys.modules if m.startswith('proxy')))"],
        capture_output=True, text=True, check=True, cwd=ROOT)
    assert "proxy.server" not in result.stdout and "proxy.dataplane.handler" not in result.stdout


async def test_status_page_and_favicon_are_served_without_a_token(admin: Proxy) -> None:
    async with aiohttp.ClientSession() as client:
        async with client.get(admin.admin_url + "/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            page = await r.text()
        async with client.get(admin.admin_url + "/favicon.ico") as r:
            assert r.status == 204
    assert "/api/routes" in page and "<script" in page
    assert "http://" not in page and "https://" not in page  # no external assets
