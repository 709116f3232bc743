"""Automatic rollback and progression against real upstreams whose errors and latency the
test controls, through the real proxy.  Intervals are a fraction of a second, so each
scenario runs in seconds; every load loop is bounded and stops by itself.  Bounds are
generous (a busy 2-core machine); the exact timings are the benchmark's (and
test_controller's, on an injected clock)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.config import parse_config
from proxy.metrics import CODE_CLASSES
from proxy.rollout.judge import Outcome
from proxy.rollout.machine import Phase
from proxy.server import Proxy
from tests.conftest import Upstream


def rollout_config(
    stable: Upstream, canary: Upstream, tmp_path: Path, *, ring: str = "weight: 50",
    interval: str = "200ms", min_requests: int = 20, listen: str = "127.0.0.1:0",
    latency: str = "{p99: 2}", latency_floor: str = "20ms", increase: int = 1,
    canary_policy: str = "{}", extra: str = "",
) -> str:
    return textwrap.dedent(f"""
        listen: {listen}
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
              interval: {interval}
              min_requests: {min_requests}
              max_error_rate_increase: {increase}
              latency: {latency}
              latency_floor: {latency_floor}
              {extra}
            rings:
              - name: staff
                pool: canary
                pinned: true
                rules: [{{attr: "header:X-Staff", exists: true}}]
              - name: canary
                pool: canary
                policy: {canary_policy}
                {ring}
              - name: stable
                pool: stable
    """)


class TailUpstream(Upstream):
    """An upstream whose every ``tail_every``-th /app answer takes ``tail`` seconds more."""

    def __init__(self, name: str, tail_every: int, tail: float) -> None:
        super().__init__(name)
        self.tail_every, self.tail = tail_every, tail
        self.arrived = 0

    async def app_endpoint(self, request: web.Request) -> web.Response:
        self.arrived += 1
        if self.arrived % self.tail_every == 0:
            await asyncio.sleep(self.tail)
        return await super().app_endpoint(request)


class Load:
    """Bounded background traffic from many users; records every response."""

    def __init__(self, url: str, per_second: float = 200, users: int = 2000) -> None:
        self.url = url
        self.pause = 1 / per_second
        self.users = users
        self.responses: list[tuple[float, int, str]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self, limit: float, seed: int) -> None:
        rng = random.Random(seed)  # each worker its own users
        deadline = time.monotonic() + limit
        async with aiohttp.ClientSession() as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                user = f"user-{rng.randrange(self.users)}"
                async with client.get(self.url + "/app", headers={"X-User-Id": user}) as r:
                    await r.read()
                    self.responses.append((time.time(), r.status, r.headers.get("X-Upstream", "")))
                await asyncio.sleep(self.pause)

    def start(self, limit: float = 30.0, workers: int = 4) -> None:
        self._task = asyncio.ensure_future(self._all(limit, workers))

    async def _all(self, limit: float, workers: int) -> None:
        await asyncio.gather(*(self._run(limit, seed) for seed in range(workers)))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


@pytest.fixture
async def rollout(tmp_path: Path) -> AsyncIterator:
    started: list[Proxy] = []
    loads: list[Load] = []

    async def start(text: str, per_second: float = 200, workers: int = 4) -> tuple[Proxy, Load]:
        proxy = Proxy(parse_config(text, source=str(tmp_path / "c.yaml")))
        await proxy.start()
        started.append(proxy)
        load = Load(proxy.url, per_second / workers)
        load.start(workers=workers)
        loads.append(load)
        return proxy, load

    yield start
    for load in loads:
        await load.stop()
    for proxy in started:
        await proxy.stop()


async def wait_for(predicate, limit: float, step: float = 0.02) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit}s")
        await asyncio.sleep(step)
    return time.monotonic() - started


def events_of(proxy: Proxy, kind: str, ring: str = "canary") -> list:
    return [e for e in proxy.controller.events if e.kind == kind and e.ring == ring]


async def test_a_canary_with_20_percent_errors_is_rolled_back_and_gets_no_more_traffic(
    rollout, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    canary.error_every = 5  # 20 % of its answers are 500s
    proxy, load = await rollout(rollout_config(stable, canary, tmp_path))
    await wait_for(lambda: events_of(proxy, "rollback"), 15)
    event = events_of(proxy, "rollback")[0]
    assert canary.first_error_at is not None
    elapsed = event.time - canary.first_error_at
    assert elapsed <= 10, elapsed  # about 1 s on an idle machine
    assert event.label == "error_rate_increase" and event.to_weight == 0
    assert event.reason.startswith("error rate ")
    print(f"\n20 % errors: rolled back {elapsed:.2f}s after the first bad response, "
          f"{canary.app_hits} requests reached the canary pool in all")
    # afterwards no request of a non-pinned ring reaches the canary pool: once those it
    # took before the rollback are done, 150 more of the load's (half of them the
    # canary's at 50 %, were it still served) add none...
    ring = next(r for r in proxy.runtime.rings["api"] if r.name == "canary")
    await wait_for(lambda: ring.inflight == 0, 5)
    before, seen = canary.app_hits, len(load.responses)
    await wait_for(lambda: len(load.responses) >= seen + 150, 10)
    assert canary.app_hits == before, "the rolled-back canary still gets traffic"
    assert proxy.controller.states["api"]["canary"].phase is Phase.ROLLED_BACK
    # ...but the pinned staff ring keeps its pool
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/app", headers={"X-Staff": "1"}) as r:
            assert r.headers["X-Upstream"] == "canary"
        async with client.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
    assert ('ringproxy_rollbacks_total{reason="error_rate_increase",ring="canary",route="api"} '
            '1.0') in text
    assert 'ringproxy_ring_phase{phase="rolled_back",ring="canary",route="api"} 1.0' in text
    assert 'ringproxy_ring_weight_percent{ring="canary",route="api"} 0.0' in text
    assert ('ringproxy_ring_evidence_progress{check="error_rate_increase",ring="canary",'
            'route="api"} 1.0') in text
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(a["ring"], a["kind"]) for a in audit] == [("canary", "rollback")]
    increase = audit[0]["numbers"]["error_rate_increase"]
    assert increase["finding"] == "worse" and increase["errors"] >= 3


async def test_a_tail_latency_canary_is_rolled_back(
    rollout, stable: Upstream, tmp_path: Path
) -> None:
    # Every 5th canary answer takes 300 ms more: its median is the stable one's, its p95
    # is not.  (A 3 % tail is test_controller's: the p99 needs thousands of requests.)
    slow = TailUpstream("canary", tail_every=5, tail=0.3)
    await slow.start()
    try:
        text = rollout_config(stable, slow, tmp_path, latency="{p50: 1.5, p95: 2}")
        proxy, _ = await rollout(text, per_second=300, workers=12)
        took = await wait_for(lambda: events_of(proxy, "rollback"), 30)
        event = events_of(proxy, "rollback")[0]
        assert event.label == "p95", event.reason
        assert "slower than" in event.reason
        assert proxy.controller.verdicts["api"]["canary"].checks[1].name == "p50"
        print(f"\n20 % of answers +300 ms: rolled back after {took:.1f}s")
    finally:
        await slow.stop()


async def test_a_client_filling_max_concurrency_never_rolls_back_the_canary(
    rollout, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    # A slow client holds every slot of the canary ring: everyone else on it gets the
    # proxy's own 503.  Those are refusals, not errors of the canary's version.
    text = rollout_config(stable, canary, tmp_path, canary_policy="{max_concurrency: 2}")
    proxy, load = await rollout(text)
    async with aiohttp.ClientSession() as client:
        users = []
        for i in range(40):
            async with client.get(proxy.url + "/app", headers={"X-User-Id": f"u{i}"}) as r:
                if r.headers.get("X-Upstream") == "canary":
                    users.append(f"u{i}")
        assert len(users) >= 2
        holds = [asyncio.ensure_future(client.get(proxy.url + "/hang",
                                                  headers={"X-User-Id": u}))
                 for u in users[:2]]
        await wait_for(lambda: proxy.runtime.rings["api"][1].inflight == 2, 5)
        recorder = proxy.metrics._recorders[("api", "canary", "canary")]
        refused = CODE_CLASSES.index("refused")
        await wait_for(lambda: recorder.requests[refused] >= 100, 10)
        await asyncio.sleep(1)  # five more analysis rounds with the ring full
        for hold in holds:
            hold.cancel()
        await asyncio.gather(*holds, return_exceptions=True)
    await asyncio.sleep(1)  # and the canary serves again
    await load.stop()
    assert not events_of(proxy, "rollback"), events_of(proxy, "rollback")[0].reason
    assert proxy.controller.states["api"]["canary"].phase is Phase.STEADY
    verdict = proxy.controller.verdicts["api"]["canary"]
    assert verdict.outcome is not Outcome.ROLLBACK
    assert recorder.requests[refused] >= 100
    assert recorder.tally.errors == 0  # none of them judged


async def test_a_healthy_canary_advances_through_every_step(
    rollout, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    stable.error_every = canary.error_every = 200  # 0.5 % errors on both sides
    ring = "progression: {steps: [20, 35, 50], min_step_duration: 1s}"
    # Both pools share this test's event loop, so their latencies are alike; a 2-core CI
    # machine under load makes them noisy, so the latency floor is wide.
    text = rollout_config(stable, canary, tmp_path, ring=ring, latency="{p50: 1.5}",
                          latency_floor="250ms", increase=5, min_requests=100)
    proxy, load = await rollout(text, per_second=250, workers=5)
    took = await wait_for(
        lambda: proxy.controller.states["api"]["canary"].phase is Phase.COMPLETED, 40)
    advances = events_of(proxy, "advance")
    assert [e.to_weight for e in advances] == [3500, 5000]
    assert not events_of(proxy, "rollback")
    assert all("healthy after" in e.reason for e in advances)
    print(f"\nA/A at 250 req/s: completed after {took:.1f}s")
    seen = len(load.responses)
    await wait_for(lambda: len(load.responses) >= seen + 150, 10)
    await load.stop()
    last = [up for *_, up in load.responses[seen:]]
    assert len(last) >= 150
    canary_share = last.count("canary") / len(last)
    assert 0.3 < canary_share < 0.7, canary_share  # about 50 % at the last step


async def test_a_rollback_survives_kill_9(
    spawn, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    canary.error_every = 2
    config = tmp_path / "ringproxy.yaml"
    config.write_text(rollout_config(stable, canary, tmp_path))
    audit = tmp_path / "audit.jsonl"
    proc = await spawn("run", "--config", str(config))
    await proc.wait_listening()
    load = Load(proc.url, 50)
    load.start(limit=20, workers=4)
    try:
        await wait_for(lambda: audit.exists() and "rollback" in audit.read_text(), 10)
    finally:
        await load.stop()
    proc.proc.send_signal(signal.SIGKILL)
    await proc.proc.wait()

    again = await spawn("run", "--config", str(config))
    await again.wait_listening()
    before = canary.app_hits
    async with aiohttp.ClientSession() as client:
        for i in range(100):
            async with client.get(again.url + "/app", headers={"X-User-Id": f"u{i}"}) as r:
                assert r.status == 200 and r.headers["X-Upstream"] == "stable"
    assert canary.app_hits == before
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(x["ring"], x["kind"]) for x in lines] == [("canary", "rollback")]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["routes"]["api"]["canary"]["phase"] == "rolled_back"
    code, _, err = await again.finish(signal.SIGINT)  # (SIGTERM drains first)
    assert code == 0, err


async def test_a_corrupt_state_file_stops_the_start_unless_fresh_state(
    stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    from tests.conftest import cli

    config = tmp_path / "ringproxy.yaml"
    config.write_text(rollout_config(stable, canary, tmp_path))
    (tmp_path / "state.json").write_text("{torn")
    result = cli("run", "--config", str(config), timeout=20)
    assert result.returncode == 1
    assert "the state file is corrupt" in result.stderr and "--fresh-state" in result.stderr


async def test_operator_rollback_is_kept_across_unrelated_reloads_and_reset_by_a_new_version(
    stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    from proxy.config import load_config
    from proxy.rollout.machine import Trigger

    path = tmp_path / "c.yaml"
    text = rollout_config(stable, canary, tmp_path, ring="weight: 50", interval="10s")
    path.write_text(text)
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        events = await proxy.controller.act("api", "canary", Trigger.ROLLBACK, "bad deploy",
                                            actor="alice")
        assert [(e.kind, e.actor, e.reason) for e in events] == [
            ("rollback", "alice", "bad deploy")]
        path.write_text(text.replace("min_requests: 20", "min_requests: 30"))  # unrelated
        assert (await proxy.reloader.reload("test")).changed
        assert proxy.controller.states["api"]["canary"].phase is Phase.ROLLED_BACK
        assert proxy.runtime.table.routes["api"].range_of("canary") is None
        # a new canary version (its pool's servers change): the rollout starts over
        other = Upstream("canary-v2")
        await other.start()
        try:
            path.write_text(text.replace(canary.url, other.url))
            assert (await proxy.reloader.reload("test")).changed
            assert proxy.controller.states["api"]["canary"].phase is Phase.STEADY
            assert proxy.runtime.table.routes["api"].range_of("canary") == (0, 5000)
        finally:
            await other.stop()
    finally:
        await proxy.stop()


async def test_events_are_posted_to_webhooks_with_retries(
    stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    from aiohttp import web

    from proxy.rollout.machine import Trigger

    received: list[dict] = []
    calls = [0]

    async def hook(request: web.Request) -> web.Response:
        calls[0] += 1
        if calls[0] == 1:
            return web.Response(status=503)  # the first attempt fails: retried
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    text = rollout_config(stable, canary, tmp_path, interval="10s") + (
        f'webhooks:\n  - {{url: "http://127.0.0.1:{port}/hook", timeout: 2s, retries: 2}}\n')
    proxy = Proxy(parse_config(text))
    await proxy.start()
    try:
        await proxy.controller.act("api", "canary", Trigger.ROLLBACK, "manual test")
        await wait_for(lambda: received, 10)
    finally:
        await proxy.stop()
        await runner.cleanup()
    (body,) = received
    assert calls[0] == 2
    assert (body["route"], body["ring"], body["kind"], body["phase"]) == (
        "api", "canary", "rollback", "rolled_back")
    assert body["from_weight"] == 50.0 and body["to_weight"] == 0.0
    assert body["text"] == "ringproxy api/canary rollback 50% -> 0% (rolled_back): manual test"


async def test_the_fast_path_rolls_back_without_waiting_for_the_interval(
    rollout, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    canary.error_every = 1  # every answer is a 500
    fast = "fast_rollback: {max_error_rate: 50, min_requests: 5, window: 1s}"
    # A 100-point tolerance turns the error check off (its quick look every 0.1 s would
    # otherwise catch every-answer-a-500 first): only the fast path acts before 30 s.
    text = rollout_config(stable, canary, tmp_path, interval="30s", extra=fast, increase=100)
    proxy, _ = await rollout(text)
    took = await wait_for(lambda: events_of(proxy, "rollback"), 10)
    assert took < 5, took  # the analysis interval is 30 s
    event = events_of(proxy, "rollback")[0]
    assert event.label == "fast_error_rate" and event.reason.startswith("fast rollback: ")
