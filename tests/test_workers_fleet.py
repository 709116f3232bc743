"""``workers: 2`` with ``state.backend: redis``: the supervisor is the fleet's member (the
workers only serve), and the ``ringproxy status`` CLI shows the fleet.  A real
redis-server (``tests/redis_fixture.py``), a real ``ringproxy run`` and its workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.admin.client import format_status
from tests.conftest import Upstream, cli
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.test_workers_sockets import TOKEN, Host, metrics, per_worker

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fleet_config(folder: Path, stable: Upstream, canary: Upstream) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ringproxy.yaml"
    path.write_text(textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin:
          listen: 127.0.0.1:0
          tokens: [{{env: RP_ADMIN_TOKEN, role: operator}}]
        access_log: {{enabled: false}}
        workers: 2
        shutdown_grace: 2s
        drain_delay: 0s
        state:
          path: "{folder / 'state.json'}"
          audit: "{folder / 'audit.jsonl'}"
          backend: redis
          url: ${{WFIX_TEST_REDIS}}
          prefix: "wtest:"
          lease: 1s
        pools:
          stable: {{servers: ["{stable.url}"]}}
          canary: {{servers: ["{canary.url}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis: {{interval: 200ms, min_requests: 1000, max_error_rate_increase: 1}}
            rings:
              - name: canary
                pool: canary
                progression: {{steps: [10, 50, 100], min_step_duration: 1h}}
              - name: stable
                pool: stable
    """))
    return path


@pytest.fixture
async def host(tmp_path: Path, stable: Upstream, canary: Upstream,
               redis_server: RedisServer,  # noqa: F811
               ) -> AsyncIterator[Host]:
    path = fleet_config(tmp_path / "a", stable, canary)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RP_ADMIN_TOKEN": TOKEN, "WFIX_TEST_REDIS": redis_server.url})
    running = Host(proc)
    try:
        yield await running.started()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in running.pids:
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def served(host: Host, users: list[str]) -> dict[str, str]:
    """Each user's request on a new connection (either worker): the upstream that answered."""
    seen: dict[str, str] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for user in users:
            async with s.get(host.url + "/app", headers={"X-User-Id": user}) as r:
                await r.read()
                seen[user] = r.headers.get("X-Upstream", "?")
    return seen


async def expected(host: Host, users: list[str]) -> dict[str, str]:
    """Each user's ring as the supervisor decides at its live weights (``/api/explain``)."""
    out: dict[str, str] = {}
    async with aiohttp.ClientSession(headers=AUTH) as s:
        for user in users:
            async with s.get(host.admin + "/api/explain", params=[
                    ("route", "api"), ("path", "/app"), ("header", f"X-User-Id:{user}")]) as r:
                assert r.status == 200, await r.text()
                out[user] = (await r.json())["ring"]
    return out


async def test_a_promote_through_the_admin_api_is_applied_by_both_workers(
    host: Host, stable: Upstream, canary: Upstream,
) -> None:
    users = [f"user-{i}" for i in range(80)]
    before = await expected(host, users)
    assert await served(host, users) == before
    async with aiohttp.ClientSession(headers=AUTH) as s, s.post(
        host.admin + "/api/routes/api/rings/canary/promote", json={"reason": "looks good"},
    ) as r:
        assert r.status == 200, await r.text()
    after = await expected(host, users)
    moved = [u for u in users if before[u] != after[u]]
    assert moved and all(after[u] == "canary" for u in moved)  # 10% -> 50%
    first = per_worker(await metrics(host))
    assert await served(host, users) == after  # whichever worker served each one
    second = per_worker(await metrics(host))
    assert second[0] > first[0] and second[1] > first[1]  # both workers served
    scrape = await metrics(host)
    assert scrape['ringproxy_ring_weight_percent{ring="canary",route="api"}'] == 50
    assert scrape["ringproxy_state_backend_up"] == 1  # the supervisor is the member


async def test_the_status_cli_shows_the_fleet(host: Host, redis_server: RedisServer,  # noqa: F811
                                              ) -> None:
    result = await asyncio.to_thread(cli, "status", "--admin", host.admin, "--token", TOKEN)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("fleet:"))
    assert f"redis redis://127.0.0.1:{redis_server.port}/0 prefix 'wtest:'" in line
    assert ", member " in line and "backend up" in line, line


def test_the_fleet_line_of_a_follower_whose_backend_is_down() -> None:
    text = format_status({"revision": "abc", "routes": [], "fleet": {
        "backend": "redis", "url": "redis://cache:6379/0", "prefix": "rp:", "member": "h2",
        "up": False, "leader": "h1", "leading": False, "version": 7,
        "local_rollbacks_pending": ["api/canary"]}})
    assert text.splitlines()[1] == (
        "fleet: redis redis://cache:6379/0 prefix 'rp:', member h2, follower of h1, state "
        "version 7, backend DOWN: serving the last agreed states, nothing advances; local "
        "rollbacks not yet shared: api/canary")
    assert "fleet" not in format_status({"revision": "abc", "routes": []})
