"""Three real ringproxy processes sharing one rollout through one real redis-server.

Each test starts the members as subprocesses (``spawn``) with a short lease (1 s) and
short analysis intervals, against real aiohttp upstreams on 127.0.0.1, and checks what
every member serves with real requests.  Bounds are generous (a busy 2-core machine); the
propagation latency itself is measured by ``loadtests/fleet_propagation.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Running, Upstream
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 - a fixture

TOKEN = "fleet-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def member_config(
    directory: Path, stable: Upstream, canary: Upstream, *, steps: str = "[10, 50, 100]",
    min_step: str = "1h", increase: int = 1, latency: str = "{p99: 2}",
    fast: str = "~",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ringproxy.yaml"
    path.write_text(textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin:
          listen: 127.0.0.1:0
          tokens: [{{env: FLEET_TEST_TOKEN, role: operator}}]
        access_log: {{enabled: false}}
        shutdown_grace: 2s
        drain_delay: 0s
        state:
          path: "{directory / 'state.json'}"
          audit: "{directory / 'audit.jsonl'}"
          backend: redis
          url: ${{FLEET_TEST_REDIS}}
          prefix: "test:"
          lease: 1s
        pools:
          stable: {{servers: ["{stable.url}"]}}
          canary: {{servers: ["{canary.url}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis:
              interval: 200ms
              min_requests: 20
              max_error_rate_increase: {increase}
              latency: {latency}
              latency_floor: 250ms
              fast_rollback: {fast}
            rings:
              - name: canary
                pool: canary
                progression: {{steps: {steps}, min_step_duration: {min_step}}}
              - name: stable
                pool: stable
    """))
    return path


class Fleet:
    def __init__(self, spawn: Callable[..., Awaitable[Running]], tmp_path: Path,
                 stable: Upstream, canary: Upstream) -> None:
        self.spawn, self.tmp_path = spawn, tmp_path
        self.stable, self.canary = stable, canary
        self.members: list[Running] = []
        self.admin: list[str] = []
        self.client = aiohttp.ClientSession()

    async def start(self, count: int = 3, **config: Any) -> None:
        for i in range(count):
            path = member_config(self.tmp_path / f"m{i}", self.stable, self.canary, **config)
            running = await self.spawn("run", "--config", str(path), "--no-watch")
            await running.wait_listening()
            admin = await running.wait_listening(re.compile(rb"admin listening on (\S+)"))
            self.members.append(running)
            self.admin.append(admin.group(1).decode())

    async def restart(self, i: int) -> None:
        """Stop member ``i`` (SIGTERM) and start it again on the same config and files."""
        await self.members[i].finish(signal.SIGTERM)
        path = self.tmp_path / f"m{i}" / "ringproxy.yaml"
        running = await self.spawn("run", "--config", str(path), "--no-watch")
        await running.wait_listening()
        admin = await running.wait_listening(re.compile(rb"admin listening on (\S+)"))
        self.members[i] = running
        self.admin[i] = admin.group(1).decode()

    async def routes(self, i: int) -> dict[str, Any]:
        async with self.client.get(self.admin[i] + "/api/routes", headers=AUTH) as r:
            assert r.status == 200
            data: dict[str, Any] = await r.json()
            return data

    async def canary_state(self, i: int) -> tuple[str, float | None]:
        data = await self.routes(i)
        ring = next(r for r in data["routes"][0]["rings"] if r["name"] == "canary")
        return ring["phase"], ring["weight"]

    async def fleet_info(self, i: int) -> dict[str, Any]:
        info: dict[str, Any] = (await self.routes(i))["fleet"]
        return info

    async def leader(self, limit: float = 10.0, alive: list[int] | None = None) -> int:
        """The index of the member that leads (waits until exactly one says so)."""
        alive = alive if alive is not None else list(range(len(self.members)))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            leading = [i for i in alive if (await self.fleet_info(i))["leading"]]
            if len(leading) == 1:
                return leading[0]
            await asyncio.sleep(0.05)
        raise AssertionError("no single leader")

    async def act(self, i: int, verb: str, **body: Any) -> aiohttp.ClientResponse:
        url = f"{self.admin[i]}/api/routes/api/rings/canary/{verb}"
        async with self.client.post(url, headers=AUTH, json=body) as r:
            await r.read()
            return r

    async def events(self, i: int) -> list[dict[str, Any]]:
        async with self.client.get(self.admin[i] + "/api/events", headers=AUTH) as r:
            events: list[dict[str, Any]] = (await r.json())["events"]
            return [e for e in events if e.get("ring") == "canary"]

    async def served(self, i: int, users: range) -> dict[str, str]:
        """Which upstream each user reaches through member ``i`` (real requests)."""
        out = {}
        for n in users:
            async with self.client.get(self.members[i].url + "/app",
                                       headers={"X-User-Id": f"user-{n}"}) as r:
                await r.read()
                assert r.status in (200, 500), r.status
                out[f"user-{n}"] = r.headers.get("X-Upstream", "")
        return out


@pytest.fixture
async def fleet(spawn, tmp_path: Path, stable: Upstream, canary: Upstream,
                redis_server: RedisServer,  # noqa: F811
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fleet]:
    monkeypatch.setenv("FLEET_TEST_REDIS", redis_server.url)
    monkeypatch.setenv("FLEET_TEST_TOKEN", TOKEN)
    made = Fleet(spawn, tmp_path, stable, canary)
    yield made
    await made.client.close()


async def until(check: Callable[[], Awaitable[bool]], limit: float, step: float = 0.02) -> float:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit}s")
        await asyncio.sleep(step)
    return time.monotonic() - started


def stream_events(redis: RedisServer) -> list[dict[str, Any]]:
    """The fleet's audit trail as Redis holds it (read with the test's own socket)."""
    raw = redis.command("XRANGE", "test:events", "-", "+")
    return [json.loads(chunk[chunk.index(b"{"):chunk.rindex(b"}") + 1])
            for chunk in raw.split(b"$5\r\nevent\r\n")[1:]]


async def test_a_promote_through_one_member_is_served_by_all_three(
    fleet: Fleet, redis_server: RedisServer,  # noqa: F811
) -> None:
    await fleet.start(3)
    leader = await fleet.leader()
    follower = (leader + 1) % 3  # the action goes to a member that does not lead
    before = [await fleet.served(i, range(200)) for i in range(3)]
    assert before[0] == before[1] == before[2]  # the same users on the canary everywhere
    assert 5 <= list(before[0].values()).count("canary") <= 40  # about 10 %
    sent = time.monotonic()
    r = await fleet.act(follower, "promote", reason="looks good")
    assert r.status == 200

    async def all_promoted() -> bool:
        return all([(await fleet.canary_state(i))[1] == 50 for i in range(3)])

    took = await until(all_promoted, 5.0)
    print(f"\npromote applied by all three members {took * 1000:.0f} ms after the answer "
          f"({(time.monotonic() - sent) * 1000:.0f} ms after sending)")
    after = [await fleet.served(i, range(200)) for i in range(3)]
    assert after[0] == after[1] == after[2]
    share = list(after[0].values()).count("canary")
    assert 70 <= share <= 130, share  # about 50 %
    # One decision, one event, the same trail through every member.
    advances = [e for e in stream_events(redis_server) if e["kind"] == "advance"]
    assert len(advances) == 1 and advances[0]["to_weight"] == 50
    for i in range(3):
        kinds = [e["kind"] for e in await fleet.events(i)]
        assert kinds.count("advance") == 1, (i, kinds)


async def test_a_bad_canary_behind_three_members_is_rolled_back_once(
    fleet: Fleet, redis_server: RedisServer, canary: Upstream,  # noqa: F811
) -> None:
    await fleet.start(3, steps="[50, 100]")
    await fleet.leader()
    canary.error_every = 2  # half of the canary's answers are 500s

    async def load(i: int) -> None:
        for n in range(150):
            await fleet.served(i, range(n * 3, n * 3 + 3))
            if all([(await fleet.canary_state(j))[0] == "rolled_back" for j in range(3)]):
                return

    await asyncio.wait_for(asyncio.gather(*(load(i) for i in range(3))), 60)
    for i in range(3):
        assert (await fleet.canary_state(i))[0] == "rolled_back"
    hits = canary.app_hits
    for i in range(3):
        served = await fleet.served(i, range(100))
        assert set(served.values()) == {"stable"}
    assert canary.app_hits == hits  # nobody sends to it any more
    rollbacks = [e for e in stream_events(redis_server) if e["kind"] == "rollback"]
    assert len(rollbacks) == 1, rollbacks
    for i in range(3):
        kinds = [e["kind"] for e in await fleet.events(i)]
        assert kinds.count("rollback") == 1, (i, kinds)
        saved = json.loads((fleet.tmp_path / f"m{i}" / "state.json").read_text())
        assert saved["routes"]["api"]["canary"]["phase"] == "rolled_back"


async def test_kill_9_of_the_leader_hands_the_lead_on_and_loses_no_decision(
    fleet: Fleet, redis_server: RedisServer,  # noqa: F811
) -> None:
    await fleet.start(3, steps="[10, 20, 30, 40]")
    leader = await fleet.leader()
    assert (await fleet.act(leader, "promote")).status == 200  # 10 -> 20
    killed = time.monotonic()
    fleet.members[leader].proc.send_signal(signal.SIGKILL)
    await fleet.members[leader].proc.wait()
    alive = [i for i in range(3) if i != leader]
    new = await fleet.leader(limit=10.0, alive=alive)
    took = time.monotonic() - killed
    print(f"\nkill -9 of the leader: member {new} leads {took:.2f}s later (lease 1s)")
    assert took < 1.0 + 1 / 3 + 2.5  # the lease plus one renewal, and a busy machine's slack
    other = next(i for i in alive if i != new)
    assert (await fleet.act(other, "promote")).status == 200  # 20 -> 30, through a follower

    async def both_at_30() -> bool:
        return all([(await fleet.canary_state(i))[1] == 30 for i in alive])

    await until(both_at_30, 5.0)
    advances = [e["to_weight"] for e in stream_events(redis_server) if e["kind"] == "advance"]
    assert advances == [20, 30]  # none lost, none made twice
    for i in alive:
        assert [e["to_weight"] for e in await fleet.events(i)
                if e["kind"] == "advance"] == [20, 30]


async def test_redis_stopped_for_10s_under_load_then_back_with_its_data(
    fleet: Fleet, redis_server: RedisServer,  # noqa: F811
) -> None:
    # A healthy canary, wide tolerances: it advances about every second while Redis is up.
    await fleet.start(3, steps="[40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90]", min_step="1s",
                      increase=30, latency="{p50: 3}")
    await fleet.leader()
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(i: int) -> None:
        n = 0
        async with aiohttp.ClientSession() as client:
            while not stop.is_set() and n < 4000:
                n += 1
                async with client.get(fleet.members[i].url + "/app",
                                      headers={"X-User-Id": f"user-{n % 500}"}) as r:
                    await r.read()
                    statuses.append(r.status)
                await asyncio.sleep(0.02)

    loads = [asyncio.ensure_future(load(i)) for i in range(3)]
    try:
        async def advanced() -> bool:
            return (await fleet.canary_state(0))[1] not in (None, 40)

        await until(advanced, 30.0, step=0.2)  # the rollout moves while Redis is up
        redis_server.stop()
        await asyncio.sleep(1.5)  # every member has noticed
        frozen = [await fleet.canary_state(i) for i in range(3)]
        assert frozen[0] == frozen[1] == frozen[2], frozen
        for i in range(3):
            info = await fleet.fleet_info(i)
            assert info["up"] is False and info["leading"] is False
            async with fleet.client.get(fleet.admin[i] + "/readyz") as r:
                ready = await r.json()
                assert r.status == 200 and ready["fleet"]["up"] is False
            async with fleet.client.get(fleet.admin[i] + "/metrics") as r:
                assert "ringproxy_state_backend_up 0.0" in await r.text()
        refused = await fleet.act(1, "pause")  # more than a rollback: it must wait
        assert refused.status == 503
        for _ in range(17):  # 8.5 s more: no step advances anywhere
            await asyncio.sleep(0.5)
            assert [await fleet.canary_state(i) for i in range(3)] == frozen
        failed_while_down = [s for s in statuses if s != 200]
        assert failed_while_down == []
        redis_server.start()  # the same directory: its append-only file
        saved = redis_server.command("GET", "test:version")
        assert saved.split(b"\r\n")[1].isdigit()
        body = redis_server.command("HGET", "test:states", "api")
        agreed = json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])
        assert (agreed["canary"]["phase"], agreed["canary"]["weight"] / 100) == \
            (frozen[0][0], frozen[0][1])  # the agreed state survived the restart

        async def moving_again() -> bool:
            states = [await fleet.canary_state(i) for i in range(3)]
            return all(s[1] is not None and s[1] > frozen[0][1] for s in states)

        await until(moving_again, 30.0, step=0.2)
    finally:
        stop.set()
        await asyncio.gather(*loads)
    assert statuses and [s for s in statuses if s != 200] == []


async def test_a_member_cut_off_from_redis_takes_a_failing_ring_off_locally_and_records_it(
    fleet: Fleet, redis_server: RedisServer, canary: Upstream,  # noqa: F811
) -> None:
    await fleet.start(2, steps="[50, 100]",
                      fast="{max_error_rate: 50, min_requests: 10, window: 1s}")
    await fleet.leader()
    redis_server.stop()

    async def cut_off() -> bool:
        return not any([(await fleet.fleet_info(i))["up"] for i in range(2)])

    await until(cut_off, 5.0)
    canary.error_every = 1  # every canary answer is a 500 now

    async def taken_off(i: int) -> None:
        for n in range(200):
            await fleet.served(i, range(n * 5, n * 5 + 5))
            if (await fleet.canary_state(i))[0] == "rolled_back":
                return
        raise AssertionError(f"member {i} kept the failing canary")

    await asyncio.wait_for(asyncio.gather(taken_off(0), taken_off(1)), 60)
    for i in range(2):
        assert set((await fleet.served(i, range(100))).values()) == {"stable"}
        assert (await fleet.fleet_info(i))["local_rollbacks_pending"] == ["api/canary"]
    redis_server.start()

    async def recorded() -> bool:
        infos = [await fleet.fleet_info(i) for i in range(2)]
        return all(x["up"] and not x["local_rollbacks_pending"] for x in infos)

    await until(recorded, 10.0)
    rollbacks = [e for e in stream_events(redis_server) if e["kind"] == "rollback"]
    assert len(rollbacks) == 1, rollbacks  # one member recorded it; the other found it done
    assert "taken off locally" in rollbacks[0]["reason"]
    body = redis_server.command("HGET", "test:states", "api")
    agreed = json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])
    assert agreed["canary"]["phase"] == "rolled_back"
    for i in range(2):
        assert (await fleet.canary_state(i))[0] == "rolled_back"
