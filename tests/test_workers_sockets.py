"""``workers: 2``: a real supervisor and two real worker processes (``ringproxy run``),
real upstreams, real sockets on 127.0.0.1.  Each request goes over a new connection, so
the kernel spreads them over both workers (SO_REUSEPORT); which worker served what is read
off ``ringproxy_worker_requests_total``.  Bounds are generous (a busy 2-core machine)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import LISTENING, Upstream

TOKEN = "workers-test-admin-token"
ADMIN = re.compile(rb"admin listening on (http://\S+)")
PIDS = re.compile(rb"2 workers serving \(pids (\d+), (\d+)\)")
SERVED = "ringproxy_worker_requests_total"  # per worker, over its restarts and reloads


def config_text(stable: Upstream, canary: Upstream, tmp_path: Path, *, canary_pool: str = "canary",
                stable_pool: str = "stable", extra: str = "") -> str:
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        workers: 2
        drain_delay: 0s
        shutdown_grace: 5s
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        pools:
          stable: {{servers: ["{stable.url}"]}}
          canary: {{servers: ["{canary.url}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis:
              interval: 200ms
              min_requests: 20
              max_error_rate_increase: 1
              latency: {{p99: 2}}
              latency_floor: 20ms
            rings:
              - name: canary
                pool: {canary_pool}
                weight: 50
              - name: stable
                pool: {stable_pool}
    """) + extra


class Host:
    """A ``ringproxy run`` with workers: its stderr read continuously (workers log there
    too: a full pipe would stall them), its URLs, its worker pids."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log = b""
        self.url = self.admin = ""
        self.pids: tuple[int, int] = (0, 0)
        self._pump = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log += line

    async def wait_log(self, pattern: re.Pattern[bytes], after: int = 0,
                       wait: float = 30) -> re.Match[bytes]:
        async with asyncio.timeout(wait):
            while not (m := pattern.search(self.log, after)):
                if self._pump.done():
                    raise AssertionError(f"ringproxy exited: {self.log.decode()}")
                await asyncio.sleep(0.05)
        return m

    async def started(self) -> Host:
        pids = await self.wait_log(PIDS)
        self.pids = (int(pids.group(1)), int(pids.group(2)))
        self.url = (await self.wait_log(LISTENING)).group(1).decode()
        self.admin = (await self.wait_log(ADMIN)).group(1).decode()
        return self

    async def finish(self, sig: int, wait: float = 30) -> int:
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), wait)
        await asyncio.wait_for(self._pump, 5)
        return code


@pytest.fixture
async def run_host(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[Host]]]:
    hosts: list[Host] = []

    async def start(text: str) -> Host:
        path = tmp_path / "ringproxy.yaml"
        path.write_text(text)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "RP_ADMIN_TOKEN": TOKEN})
        host = Host(proc)
        hosts.append(host)
        return await host.started()

    yield start
    for host in hosts:
        if host.proc.returncode is None:
            host.proc.kill()
            await host.proc.wait()
        for pid in host.pids:  # never leave a worker behind, whatever the test did
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def metrics(host: Host) -> dict[str, float]:
    """The supervisor's scrape: {'name{labels}': value}."""
    async with aiohttp.ClientSession() as s, s.get(host.admin + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def total(scrape: dict[str, float], name: str) -> float:
    return sum(v for k, v in scrape.items() if k == name or k.startswith(name + "{"))


async def settled(host: Host, expected: float, name: str = "ringproxy_requests_total",
                  wait: float = 10) -> dict[str, float]:
    """The supervisor's scrape once its total of ``name`` has reached ``expected``.

    A scrape waits only ``FLUSH_TIMEOUT`` (0.5 s) for the workers' reports, so on a
    starved machine one can come back short; the next reports (every 0.25 s) bring the
    rest.  This scrapes again until the total is at least ``expected`` (or ``wait``
    seconds have passed) and returns the last scrape: the caller asserts it is exactly
    ``expected``, so a count that stays short, or goes past, still fails (and shows)."""
    deadline = time.monotonic() + wait
    while True:
        scrape = await metrics(host)
        if total(scrape, name) >= expected or time.monotonic() >= deadline:
            return scrape
        await asyncio.sleep(0.1)


async def arrived(upstreams: list[Upstream], path: str, n: int, wait: float = 10) -> int:
    """Wait (up to ``wait`` seconds) until the upstreams have recorded ``n`` requests
    for ``path`` (the proxy accepted and forwarded them); how many they have."""
    deadline = time.monotonic() + wait
    while True:
        seen = sum(r["target"].startswith(path) for u in upstreams for r in u.requests)
        if seen >= n or time.monotonic() >= deadline:
            return seen
        await asyncio.sleep(0.02)


def per_worker(scrape: dict[str, float]) -> tuple[float, float]:
    return (scrape['ringproxy_worker_requests_total{worker="0"}'],
            scrape['ringproxy_worker_requests_total{worker="1"}'])


async def send(url: str, n: int, path: str = "/app", concurrency: int = 8,
               user: Callable[[int], str] = str) -> list[str]:
    """``n`` requests, each on a new connection; the X-Upstream of each answer."""
    seen: list[str] = []
    todo = iter(range(n))

    async def one(session: aiohttp.ClientSession) -> None:
        for i in todo:
            async with session.get(url + path, headers={"X-User-Id": user(i)}) as r:
                await r.read()
                assert r.status in (200, 500), r.status
                seen.append(r.headers.get("X-Upstream", "?"))

    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(concurrency)))
    return seen


async def test_two_workers_share_the_traffic_and_the_merged_metrics_are_exact(
    run_host: Callable[[str], Awaitable[Host]], stable: Upstream, canary: Upstream,
    tmp_path: Path,
) -> None:
    host = await run_host(config_text(stable, canary, tmp_path))
    seen = await send(host.url, 300)
    assert len(seen) == 300 and {"stable", "canary"} <= set(seen)
    # Every finished request, counted once, whichever worker served it: exactly.
    scrape = await settled(host, 300)
    assert total(scrape, "ringproxy_requests_total") == 300
    assert total(scrape, "ringproxy_request_duration_seconds_count") == 300
    first, second = per_worker(scrape)
    assert first + second == 300 and first > 0 and second > 0
    assert scrape['ringproxy_workers{state="ready"}'] == 2
    assert canary.app_hits + stable.app_hits == 300
    # The admin views read the merged windows.
    async with aiohttp.ClientSession() as s, s.get(host.admin + "/api/routes/api") as r:
        assert r.status == 200
        body = await r.json()
    assert "canary" in str(body) and "stable" in str(body)
    async with aiohttp.ClientSession() as s, s.get(host.admin + "/readyz") as r:
        ready = await r.json()
    assert r.status == 200 and ready["workers"] == {"ready": 2, "wanted": 2}
    assert await host.finish(signal.SIGTERM) == 0


async def test_a_bad_canary_is_rolled_back_once_and_no_worker_sends_to_it_after(
    run_host: Callable[[str], Awaitable[Host]], stable: Upstream, canary: Upstream,
    tmp_path: Path,
) -> None:
    canary.error_every = 1  # every answer a 500
    host = await run_host(config_text(stable, canary, tmp_path))
    sent = 0
    deadline = time.monotonic() + 60
    while b"rollback" not in host.log and time.monotonic() < deadline:
        await send(host.url, 40, user=lambda i: f"u{random.random()}")
        sent += 40
    assert b"rollback" in host.log, host.log.decode()
    scrape = await settled(host, sent)
    assert total(scrape, "ringproxy_requests_total") == sent
    hits, before = canary.app_hits, per_worker(scrape)
    sent += len(await send(host.url, 200, user=lambda i: f"v{i}"))
    assert canary.app_hits == hits  # neither worker sent one more request to the canary
    scrape = await settled(host, sent)
    assert total(scrape, "ringproxy_requests_total") == sent
    after = per_worker(scrape)
    assert after[0] > before[0] and after[1] > before[1]  # both workers served
    assert scrape['ringproxy_ring_weight_percent{ring="canary",route="api"}'] == 0
    async with aiohttp.ClientSession() as s, s.get(host.admin + "/api/events") as r:
        events = await r.json()
    rollbacks = [e for e in events["events"] if e["kind"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["ring"] == "canary"
    assert await host.finish(signal.SIGTERM) == 0


async def test_sighup_reload_is_served_by_every_worker(
    run_host: Callable[[str], Awaitable[Host]], stable: Upstream, canary: Upstream,
    tmp_path: Path,
) -> None:
    host = await run_host(config_text(stable, canary, tmp_path))
    assert set(await send(host.url, 40)) == {"stable", "canary"}
    # (Counted before the reload: exact per-worker numbers below.)
    assert total(await settled(host, 40, SERVED), SERVED) == 40
    # Both rings now send to the stable pool: every worker must serve it.
    (tmp_path / "ringproxy.yaml").write_text(
        config_text(stable, canary, tmp_path, canary_pool="stable"))
    mark = len(host.log)
    host.proc.send_signal(signal.SIGHUP)
    await host.wait_log(re.compile(rb"config reloaded \(signal\)"), mark)
    scrape = await settled(host, 40, SERVED)
    assert total(scrape, SERVED) == 40
    before = per_worker(scrape)
    assert set(await send(host.url, 100)) == {"stable"}
    scrape = await settled(host, 140, SERVED)
    assert total(scrape, SERVED) == 140
    after = per_worker(scrape)
    assert after[0] > before[0] and after[1] > before[1]
    assert await host.finish(signal.SIGTERM) == 0


async def test_a_killed_worker_is_restarted_and_traffic_keeps_being_served(
    run_host: Callable[[str], Awaitable[Host]], stable: Upstream, canary: Upstream,
    tmp_path: Path,
) -> None:
    host = await run_host(config_text(stable, canary, tmp_path))
    await send(host.url, 20)
    # A scrape first: a worker killed with SIGKILL loses what it recorded since its last
    # report (at most REPORT_EVERY); after a flush that is nothing.
    assert total(await settled(host, 20), "ringproxy_requests_total") == 20
    mark = len(host.log)
    os.kill(host.pids[0], signal.SIGKILL)
    await host.wait_log(re.compile(rb"worker 0 \(pid \d+\) exited with code -9"), mark)
    assert len(await send(host.url, 40)) == 40  # the other worker serves meanwhile
    await host.wait_log(re.compile(rb"worker 0 restarted \(pid (\d+)\)"), mark)
    scrape = await settled(host, 60)
    assert total(scrape, "ringproxy_requests_total") == 60
    before = per_worker(scrape)
    seen = await send(host.url, 100)
    assert len(seen) == 100
    scrape = await settled(host, 160)
    assert scrape['ringproxy_worker_restarts_total{worker="0"}'] == 1
    assert scrape['ringproxy_workers{state="ready"}'] == 2
    assert per_worker(scrape)[0] > before[0]  # the new worker 0 serves
    assert total(scrape, "ringproxy_requests_total") == 160
    assert await host.finish(signal.SIGTERM) == 0


async def test_sigterm_lets_in_flight_requests_finish_in_every_worker_then_exits(
    run_host: Callable[[str], Awaitable[Host]], stable: Upstream, canary: Upstream,
    tmp_path: Path,
) -> None:
    host = await run_host(config_text(stable, canary, tmp_path))
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def slow(i: int) -> tuple[int, str]:
            async with session.get(host.url + "/slow?s=2",
                                   headers={"X-User-Id": str(i)}) as r:
                return r.status, await r.text()

        # Enough requests that both workers hold some when the signal comes; it comes
        # once the upstreams have all of them (accepted, forwarded, still in flight).
        in_flight = [asyncio.ensure_future(slow(i)) for i in range(12)]
        assert await arrived([stable, canary], "/slow", 12) == 12
        host.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*in_flight)
    assert results == [(200, "slow done")] * 12
    assert await asyncio.wait_for(host.proc.wait(), 30) == 0
    for pid in host.pids:  # the workers exited with it
        assert not _alive(pid)


async def test_workers_exit_when_the_supervisor_is_killed(
    run_host: Callable[[str], Awaitable[Host]], stable: Upstream, canary: Upstream,
    tmp_path: Path,
) -> None:
    host = await run_host(config_text(stable, canary, tmp_path))
    host.proc.kill()
    await host.proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in host.pids) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    assert not any(_alive(pid) for pid in host.pids)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def test_an_operator_rollback_holds_in_every_worker_across_a_reload(
    run_host: Callable[[str], Awaitable[Host]], stable: Upstream, canary: Upstream,
    tmp_path: Path,
) -> None:
    text = config_text(stable, canary, tmp_path).replace(
        "admin: {listen: 127.0.0.1:0}", "admin: {listen: 127.0.0.1:0, tokens: [{env: "
        "RP_ADMIN_TOKEN, role: admin}]}")
    assert text != config_text(stable, canary, tmp_path)
    host = await run_host(text)
    assert "canary" in set(await send(host.url, 40))
    async with aiohttp.ClientSession() as s, s.post(
        host.admin + "/api/routes/api/rings/canary/rollback",
        headers={"Authorization": f"Bearer {TOKEN}"}, json={"reason": "bad build"},
    ) as r:
        assert r.status == 200, await r.text()
    hits = canary.app_hits
    assert set(await send(host.url, 100)) == {"stable"}
    # (Counted before the reload: exact per-worker numbers below.)
    assert total(await settled(host, 140, SERVED), SERVED) == 140
    # A reload that changes the ring's neighbour, not the ring: it stays rolled back in
    # every worker (the states go with the config).
    changed = text.replace("pool: stable\n", "pool: stable\n        policy: {timeout: 20s}\n")
    assert changed != text
    (tmp_path / "ringproxy.yaml").write_text(changed)
    mark = len(host.log)
    host.proc.send_signal(signal.SIGHUP)
    await host.wait_log(re.compile(rb"config reloaded \(signal\)"), mark)
    scrape = await settled(host, 140, SERVED)
    assert total(scrape, SERVED) == 140
    before = per_worker(scrape)
    assert set(await send(host.url, 100)) == {"stable"}
    scrape = await settled(host, 240, SERVED)
    assert total(scrape, SERVED) == 240
    after = per_worker(scrape)
    assert after[0] > before[0] and after[1] > before[1]
    assert canary.app_hits == hits
    assert await host.finish(signal.SIGTERM) == 0
