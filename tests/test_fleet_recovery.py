"""A fleet's shared state when Redis fails in the ways that lose or blur a decision, with
real ringproxy processes and a real redis-server (``tests/test_fleet_members.py``'s):

- a rollback a member took locally while Redis was out of reach survives the member's
  restart (still out of reach) and is recorded in the fleet's trail once Redis is back;
- Redis losing its last writes (restored by hand to an older version) never re-exposes a
  rolled-back ring on any member: the members write their less exposed states back;
- a write whose outcome is unknown (Redis stalled past the timeout, then ran it) answers
  an operator with "outcome unknown", and a rollback's event reaches each member's audit
  trail once (through the stream), not twice;
- a route a reload adds is seeded into the shared state by the leader at once;
- the leader judges a ring only on the traffic of the config its state holds (members on
  another config of it, as during a rolling change, publish under another fingerprint).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time

from tests.conftest import Upstream
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.test_fleet_members import (  # noqa: F401 - fleet: a fixture
    Fleet,
    fleet,
    member_config,
    stream_events,
    until,
)

# Blocks the server (one Lua script busy for ``ms``): the commands sent meanwhile wait
# and run after it, as behind a stalled Redis.
STALL = ("local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] "
         "while true do local n = redis.call('TIME') "
         "if n[1] * 1000000 + n[2] - t0 > tonumber(ARGV[1]) * 1000 then break end end "
         "return 1")


def stall(redis: RedisServer, ms: int) -> socket.socket:
    """Start a stall of ``ms`` (the socket is returned open: close it afterwards)."""
    sock = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
    args = ["EVAL", STALL, "0", str(ms)]
    sock.sendall(b"".join([f"*{len(args)}\r\n".encode()] + [
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args]))
    return sock


def shared_canary(redis: RedisServer) -> dict[str, object]:
    body = redis.command("HGET", "test:states", "api")
    states: dict[str, dict[str, object]] = json.loads(
        body[body.index(b"{"):body.rindex(b"}") + 1])
    return states["canary"]


def audit_rollbacks(members: Fleet, i: int) -> list[dict[str, object]]:
    path = members.tmp_path / f"m{i}" / "audit.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [e for e in lines if e.get("kind") == "rollback" and e.get("ring") == "canary"]


async def test_a_local_rollback_survives_a_restart_while_redis_is_out_of_reach(
    fleet: Fleet, redis_server: RedisServer, canary: Upstream,  # noqa: F811
) -> None:
    await fleet.start(1, steps="[50, 100]",
                      fast="{max_error_rate: 50, min_requests: 10, window: 1s}")
    await fleet.leader()
    redis_server.stop()

    async def cut_off() -> bool:
        return not (await fleet.fleet_info(0))["up"]

    await until(cut_off, 5.0)
    canary.error_every = 1  # every canary answer is a 500 now
    for n in range(200):
        await fleet.served(0, range(n * 5, n * 5 + 5))
        if (await fleet.canary_state(0))[0] == "rolled_back":
            break
    assert (await fleet.canary_state(0))[0] == "rolled_back"
    assert (await fleet.fleet_info(0))["local_rollbacks_pending"] == ["api/canary"]
    await fleet.restart(0)  # Redis still out of reach
    assert (await fleet.canary_state(0))[0] == "rolled_back"  # (its state file)
    info = await fleet.fleet_info(0)
    assert not info["up"] and info["local_rollbacks_pending"] == ["api/canary"]
    redis_server.start()  # still ("progressing", 50) there

    async def recorded() -> bool:
        info = await fleet.fleet_info(0)
        return bool(info["up"]) and not info["local_rollbacks_pending"]

    await until(recorded, 10.0)
    await asyncio.sleep(1.5)  # a few more rounds: nothing changes back
    assert (await fleet.canary_state(0))[0] == "rolled_back"
    assert set((await fleet.served(0, range(100))).values()) == {"stable"}
    assert shared_canary(redis_server)["phase"] == "rolled_back"
    rollbacks = [e for e in stream_events(redis_server) if e["kind"] == "rollback"]
    assert len(rollbacks) == 1, rollbacks  # recorded, once
    assert "taken off locally" in str(rollbacks[0]["reason"])
    assert not (fleet.tmp_path / "m0" / "state.json.fleet-pending").exists()


async def test_redis_losing_its_last_write_never_re_exposes_a_rolled_back_ring(
    fleet: Fleet, redis_server: RedisServer,  # noqa: F811
) -> None:
    await fleet.start(2)
    await fleet.leader()
    before_version = redis_server.command("GET", "test:version").split(b"\r\n")[1].decode()
    body = redis_server.command("HGET", "test:states", "api")
    before = body[body.index(b"{"):body.rindex(b"}") + 1].decode()
    assert json.loads(before)["canary"]["phase"] == "progressing"
    assert (await fleet.act(0, "rollback", reason="bad build")).status == 200

    async def both_rolled_back() -> bool:
        return all([(await fleet.canary_state(i))[0] == "rolled_back" for i in range(2)])

    await until(both_rolled_back, 5.0)
    # Redis loses the rollback (as after an AOF everysec crash, or a failover to a replica
    # that lagged): the older states and version, put back by hand.
    redis_server.command("HSET", "test:states", "api", before)
    redis_server.command("SET", "test:version", before_version)
    deadline = time.monotonic() + 4.0  # four version checks and more
    while time.monotonic() < deadline:
        for i in range(2):
            assert (await fleet.canary_state(i))[0] == "rolled_back", i
        await asyncio.sleep(0.1)
    for i in range(2):
        assert set((await fleet.served(i, range(100))).values()) == {"stable"}
    assert shared_canary(redis_server)["phase"] == "rolled_back"  # written back


async def test_a_write_whose_outcome_is_unknown_is_said_so_and_audited_once(
    fleet: Fleet, redis_server: RedisServer,  # noqa: F811
) -> None:
    await fleet.start(1)
    await fleet.leader()
    blocker = stall(redis_server, 3000)  # the member's write times out after 1-2 s
    try:
        await asyncio.sleep(0.1)
        refused = await fleet.act(0, "promote")
        assert refused.status == 503
        async with fleet.client.post(
                f"{fleet.admin[0]}/api/routes/api/rings/canary/promote",
                headers={"Authorization": "Bearer fleet-test-token-0123456789"}) as r:
            text = await r.text()
        assert r.status == 503 and "outcome is unknown" in text, text
        assert "nothing changed" not in text
    finally:
        blocker.close()
    # The first promote did run once Redis got to it (the second may have too).
    async def promoted() -> bool:
        return (await fleet.canary_state(0))[1] in (50, 100)

    await until(promoted, 10.0)
    blocker = stall(redis_server, 3000)
    try:
        await asyncio.sleep(0.1)
        taken_off = await fleet.act(0, "rollback", reason="bad build")
        assert taken_off.status == 200  # less exposure: applied here at once
        assert (await fleet.canary_state(0))[0] == "rolled_back"
    finally:
        blocker.close()

    async def settled() -> bool:
        info = await fleet.fleet_info(0)
        return bool(info["up"]) and not info["local_rollbacks_pending"]

    await until(settled, 10.0)
    await asyncio.sleep(1.0)  # the trail's next reads
    assert len([e for e in stream_events(redis_server) if e["kind"] == "rollback"]) == 1
    assert len(audit_rollbacks(fleet, 0)) == 1, audit_rollbacks(fleet, 0)
    assert [e["kind"] for e in await fleet.events(0)].count("rollback") == 1
    assert shared_canary(redis_server)["phase"] == "rolled_back"


async def test_a_route_added_by_a_reload_is_seeded_by_the_leader(
    fleet: Fleet, redis_server: RedisServer,  # noqa: F811
) -> None:
    await fleet.start(1)
    await fleet.leader()
    path = fleet.tmp_path / "m0" / "ringproxy.yaml"
    text = path.read_text()
    added = text + (
        "  - name: web\n"
        "    match: {path_prefix: /web}\n"
        "    sticky: {key: [\"header:X-User-Id\"]}\n"
        "    analysis: {interval: 200ms, min_requests: 20}\n"
        "    rings:\n"
        "      - name: canary\n"
        "        pool: canary\n"
        "        progression: {steps: [5, 100], min_step_duration: 1h}\n"
        "      - name: stable\n"
        "        pool: stable\n")
    path.write_text(added)
    fleet.members[0].proc.send_signal(signal.SIGHUP)

    async def seeded() -> bool:
        return b"canary" in redis_server.command("HGET", "test:states", "web")

    try:
        await until(seeded, 10.0, step=0.2)
    except AssertionError:
        _, _, err = await fleet.members[0].finish(signal.SIGTERM)
        raise AssertionError(err[-3000:]) from None


async def test_the_leader_judges_a_ring_only_on_the_traffic_of_its_own_config(
    fleet: Fleet, redis_server: RedisServer, canary: Upstream,  # noqa: F811
) -> None:
    """A rolling config change: member 1 runs another config of the canary ring (other
    steps).  Its failing canary traffic is not the leader's version's evidence; the same
    traffic through the leader is (the control: the judge does act on it)."""
    await fleet.start(1, steps="[50, 100]")
    assert await fleet.leader() == 0
    path = member_config(fleet.tmp_path / "m1", fleet.stable, fleet.canary, steps="[40, 100]")
    other = await fleet.spawn("run", "--config", str(path), "--no-watch")
    await other.wait_listening()
    admin = await other.wait_listening(re.compile(rb"admin listening on (\S+)"))
    fleet.members.append(other)
    fleet.admin.append(admin.group(1).decode())
    canary.error_every = 2  # half of the canary's answers are 500s
    for n in range(40):
        await fleet.served(1, range(n * 5, n * 5 + 5))  # through member 1 only
    await asyncio.sleep(2.0)  # ten analysis rounds of the leader's
    assert (await fleet.canary_state(0))[0] != "rolled_back"
    assert [e for e in stream_events(redis_server) if e["kind"] == "rollback"] == []
    for n in range(40):
        await fleet.served(0, range(n * 5, n * 5 + 5))  # through the leader

    async def rolled_back() -> bool:
        return (await fleet.canary_state(0))[0] == "rolled_back"

    await until(rolled_back, 15.0, step=0.2)
