"""``workers: 2`` when things go wrong: a second instance on the port, a hung worker, a
signal to the whole process group, a worker that cannot apply a reload, a rollback during
a reload.  Real ``ringproxy run`` processes, real upstreams, real sockets on 127.0.0.1;
bounds are generous (a busy 2-core machine)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import resource
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Upstream
from tests.test_workers_sockets import (
    SERVED,
    TOKEN,
    Host,
    arrived,
    config_text,
    metrics,
    per_worker,
    send,
    settled,
    total,
)

Start = Callable[..., Awaitable[Host]]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WITH_TOKEN = ("admin: {listen: 127.0.0.1:0, tokens: [{env: RP_ADMIN_TOKEN, role: admin}]}")


@pytest.fixture
async def start_host(tmp_path: Path) -> AsyncIterator[Start]:
    """Start ``ringproxy run`` on a config text (in its own folder ``name``); ``session``:
    in a process group of its own (to signal the group)."""
    hosts: list[Host] = []

    async def start(text: str, name: str = "a", session: bool = False,
                    wait: bool = True) -> Host:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        path = folder / "ringproxy.yaml"
        path.write_text(text)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "RP_ADMIN_TOKEN": TOKEN}, start_new_session=session)
        host = Host(proc)
        hosts.append(host)
        return await host.started() if wait else host

    yield start
    for host in hosts:
        if host.proc.returncode is None:
            host.proc.kill()
            await host.proc.wait()
        for pid in host.pids:
            if pid <= 0:  # never started (0 would be this process group)
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def text_for(stable: Upstream, canary: Upstream, folder: Path, extra: str = "",
             **options: str) -> str:
    folder.mkdir(exist_ok=True)
    text = config_text(stable, canary, folder, extra=extra).replace(
        "admin: {listen: 127.0.0.1:0}", WITH_TOKEN)
    for key, value in options.items():
        text = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.M)
    return text


async def readyz(host: Host) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as s, s.get(host.admin + "/readyz") as r:
        return r.status, await r.json()


async def test_a_second_instance_on_the_same_port_fails_at_start_and_the_first_serves_on(
    start_host: Start, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    first = await start_host(text_for(stable, canary, tmp_path / "a"))
    port = first.url.rsplit(":", 1)[1]
    second = await start_host(
        text_for(stable, canary, tmp_path / "b", listen=f"127.0.0.1:{port}"),
        name="b", wait=False)
    code = await asyncio.wait_for(second.proc.wait(), 60)
    await asyncio.wait_for(second._pump, 5)
    assert code != 0
    assert f"cannot listen for clients on 127.0.0.1:{port}: Address already in use" in \
        second.log.decode(), second.log.decode()
    assert b"workers serving" not in second.log
    # The first one keeps every connection: all its workers, none elsewhere.
    assert len(await send(first.url, 60)) == 60
    assert total(await settled(first, 60), "ringproxy_requests_total") == 60
    assert await first.finish(signal.SIGTERM) == 0


async def test_a_hung_worker_is_killed_and_restarted_and_reads_do_not_pile_up_for_it(
    start_host: Start, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    host = await start_host(text_for(stable, canary, tmp_path / "a"))
    hung = host.pids[0]
    mark = len(host.log)
    os.kill(hung, signal.SIGSTOP)
    try:
        # Admin reads while it hangs: each asks the workers for a report; none waits
        # for the hung one past FLUSH_TIMEOUT.
        for _ in range(5):
            async with aiohttp.ClientSession() as s, s.get(host.admin + "/api/routes",
                                                         headers=AUTH) as r:
                assert r.status == 200
        await host.wait_log(re.compile(
            rb"worker 0 \(pid %d\) sent nothing for [\d.]+s \(hung\?\): killing" % hung),
            mark, wait=60)
        await host.wait_log(re.compile(rb"worker 0 restarted \(pid \d+\)"), mark, wait=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
    status, body = await readyz(host)
    assert status == 200 and body["workers"] == {"ready": 2, "wanted": 2}
    assert len(await send(host.url, 60)) == 60
    scrape = await metrics(host)
    assert scrape['ringproxy_worker_restarts_total{worker="0"}'] == 1
    assert scrape['ringproxy_worker_reports_missed_total'] >= 1
    assert await host.finish(signal.SIGTERM) == 0


async def test_sigterm_to_the_process_group_drains_with_every_worker_serving(
    start_host: Start, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    host = await start_host(text_for(stable, canary, tmp_path / "a", drain_delay="5s"),
                            session=True)
    assert len(await send(host.url, 20)) == 20
    signalled = time.monotonic()
    os.killpg(host.proc.pid, signal.SIGTERM)  # dumb-init, KillMode=control-group
    await host.wait_log(re.compile(rb"draining: /readyz answers 503"))
    status, body = await readyz(host)
    assert status == 503 and body["workers"] == {"ready": 2, "wanted": 2}
    # Requests until 1.5 s after the signal (at least one round), then the scrape: well
    # inside drain_delay (timed from the signal), every worker serves and reports.
    served = 0
    while True:
        served += len(await send(host.url, 10))
        if time.monotonic() >= signalled + 1.5:
            break
    scrape = await settled(host, served + 20, SERVED)
    assert total(scrape, "ringproxy_worker_restarts_total") == 0
    first, second = per_worker(scrape)
    assert first + second == served + 20 and first > 0 and second > 0
    assert await asyncio.wait_for(host.proc.wait(), 30) == 0
    await asyncio.wait_for(host._pump, 5)
    assert b"exited with code" not in host.log and b"restart" not in host.log


async def test_a_worker_that_cannot_apply_a_reload_finishes_its_requests_then_restarts(
    start_host: Start, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    folder = tmp_path / "a"
    host = await start_host(text_for(stable, canary, folder))
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def slow(i: int) -> tuple[int, str]:
            async with session.get(host.url + "/slow?s=3",
                                   headers={"X-User-Id": str(i)}) as r:
                return r.status, await r.text()

        in_flight = [asyncio.ensure_future(slow(i)) for i in range(8)]
        # Once the upstreams have all eight (accepted and forwarded: their descriptors
        # are open), no file descriptor left to either worker: the reload's new access
        # log cannot be opened there (it can in the supervisor, which applies it).
        assert await arrived([stable, canary], "/slow", 8) == 8
        for pid in host.pids:
            _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))
        (folder / "ringproxy.yaml").write_text(
            text_for(stable, canary, folder).replace(
                "access_log: {enabled: false}",
                f"access_log: {{enabled: true, path: \"{folder / 'access.log'}\"}}"))
        mark = len(host.log)
        host.proc.send_signal(signal.SIGHUP)
        await host.wait_log(re.compile(rb"worker 0 could not apply revision \w+"), mark)
        results = await asyncio.gather(*in_flight)
    assert results == [(200, "slow done")] * 8  # nothing in flight was lost
    await host.wait_log(re.compile(rb"worker 0 restarted"), mark, wait=60)
    await host.wait_log(re.compile(rb"worker 1 restarted"), mark, wait=60)
    assert b"stopping it gracefully" in host.log[mark:] and b"killed" not in host.log[mark:]
    assert len(await send(host.url, 20)) == 20
    scrape = await settled(host, 28)
    assert total(scrape, "ringproxy_requests_total") == 28  # their last reports counted
    assert scrape['ringproxy_workers{state="ready"}'] == 2
    log = folder / "access.log"  # the new config serves (lines flushed every 200 ms)
    deadline = time.monotonic() + 10
    while log.read_text().count("\n") < 20 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    assert log.read_text().count("\n") == 20
    assert await host.finish(signal.SIGTERM) == 0


FILLER = 2000  # routes that make a worker's build take seconds


def _slow_build(text: str) -> str:
    """``text`` with FILLER more routes after its own (matching nothing the test sends)."""
    routes = "".join(
        f"  - name: r{i}\n    match: {{path_prefix: /r{i}/}}\n"
        f"    rings: [{{name: stable, pool: stable}}]\n" for i in range(FILLER))
    return text.rstrip("\n") + "\n" + routes


async def test_a_rollback_during_a_reload_is_served_at_once_by_every_worker(
    start_host: Start, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    folder = tmp_path / "a"
    text = _slow_build(text_for(stable, canary, folder))
    host = await start_host(text)
    assert "canary" in set(await send(host.url, 40))
    changed = text.replace("pool: stable\n", "pool: stable\n        policy: {timeout: 20s}\n",
                           1)
    assert changed != text
    (folder / "ringproxy.yaml").write_text(changed)
    mark = len(host.log)
    host.proc.send_signal(signal.SIGHUP)
    # The workers are building the new config (seconds, for FILLER routes).
    await host.wait_log(re.compile(rb"revision \w+ sent to 2 worker"), mark, wait=60)
    async with aiohttp.ClientSession() as s, s.post(
        host.admin + "/api/routes/api/rings/canary/rollback", headers=AUTH,
        json={"reason": "bad build"},
    ) as r:
        assert r.status == 200, await r.text()
    hits = canary.app_hits
    # 20 users (about half of them the canary's at weight 50): few enough to be served
    # well within the build, so the test holds on a loaded machine too.
    seen = await send(host.url, 20)
    assert b"config reloaded" not in host.log[mark:]  # still building: the test holds
    assert set(seen) == {"stable"} and canary.app_hits == hits
    await host.wait_log(re.compile(rb"config reloaded \(signal\)"), mark, wait=60)
    # The new tables got the rollback too.
    assert set(await send(host.url, 60)) == {"stable"} and canary.app_hits == hits
    assert await host.finish(signal.SIGTERM) == 0


async def test_ring_limits_are_the_hosts_shared_by_the_workers(
    start_host: Start, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    # Every user on the canary ring: at most 2 in flight on the host, a burst of 40
    # requests (and 0.2/s after); each of the 2 workers enforces half of each.
    text = text_for(stable, canary, tmp_path / "a").replace(
        "weight: 50\n", "weight: 100\n        policy: {max_concurrency: 2, rate_limit: "
        "{requests_per_second: 0.2, burst: 40}}\n")
    host = await start_host(text)
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get(path: str, user: str) -> int:
            async with session.get(host.url + path, headers={"X-User-Id": user}) as r:
                await r.read()
                return r.status

        # Ten slow requests at once over ten connections (the kernel spreads them).
        slow = await asyncio.gather(*(get("/slow?s=2", str(i)) for i in range(10)))
        assert 1 <= slow.count(200) <= 2 and slow.count(503) == 10 - slow.count(200), slow
        fast = [await get("/app", str(i)) for i in range(60)]
    # At most the host's burst (less what the slow ones took, plus a token or two).
    assert 20 <= fast.count(200) <= 42 and fast.count(429) == 60 - fast.count(200), fast
    scrape = await settled(host, 70)
    assert total(scrape, "ringproxy_requests_total") == 70
    assert await host.finish(signal.SIGTERM) == 0


async def test_workers_log_in_the_configs_log_format_and_follow_a_reload(
    start_host: Start, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    folder = tmp_path / "a"
    text = text_for(stable, canary, folder) + "log_format: json\n"
    host = await start_host(text)
    path = folder / "ringproxy.yaml"
    path.write_text(text.replace("shutdown_grace: 5s", "shutdown_grace: 6s"))
    mark = len(host.log)
    host.proc.send_signal(signal.SIGHUP)
    await host.wait_log(re.compile(rb'"message":"config reloaded \(signal\)'), mark)
    lines = [json.loads(line) for line in host.log[mark:].splitlines()]  # all JSON
    by_worker = {e["worker"] for e in lines if "worker" in e}
    assert by_worker == {0, 1}, lines  # each worker logged the change, as JSON
    # Back to text lines: the workers switch with the supervisor.
    path.write_text(text.replace("log_format: json", "log_format: text"))
    mark = len(host.log)
    host.proc.send_signal(signal.SIGHUP)
    await host.wait_log(re.compile(rb" INFO ringproxy\S* ?: config reloaded \(signal\)"), mark)
    tail = host.log[mark:].decode()
    for index in (0, 1):
        assert re.search(rf"^\S+ \S+ INFO ringproxy \[worker {index}\]: ", tail, re.M), tail
    assert await host.finish(signal.SIGTERM) == 0


def _steal_fd(pid: int, fd: int) -> int:
    """A copy of process ``pid``'s descriptor ``fd`` (pidfd_getfd, Linux 5.6+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    if pidfd < 0:
        pytest.skip(f"pidfd_open: {os.strerror(ctypes.get_errno())}")
    try:
        stolen = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if stolen < 0:
            pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
        return int(stolen)
    finally:
        os.close(pidfd)


@pytest.mark.parametrize(("payload", "said"), [
    (b"not json at all", rb"worker 0 sent something that is not a message \(not a JSON"),
    (b'{"type": "report", "rings": 5}', rb"worker 0 sent a report that cannot be read"),
])
async def test_a_worker_that_sends_garbage_is_killed_and_restarted(
    start_host: Start, stable: Upstream, canary: Upstream, tmp_path: Path,
    payload: bytes, said: bytes,
) -> None:
    host = await start_host(text_for(stable, canary, tmp_path / "a"))
    worker = host.pids[0]
    stolen = _steal_fd(worker, _channel_fd(worker))  # the worker's end of its channel
    mark = len(host.log)
    try:
        os.write(stolen, struct.pack(">I", len(payload)) + payload)
    finally:
        os.close(stolen)
    await host.wait_log(re.compile(said + rb".*killing and restarting it"), mark)
    await host.wait_log(re.compile(rb"worker 0 restarted \(pid \d+\)"), mark, wait=60)
    assert not _running(worker)
    status, body = await readyz(host)
    assert status == 200 and body["workers"] == {"ready": 2, "wanted": 2}
    assert len(await send(host.url, 20)) == 20
    assert await host.finish(signal.SIGTERM) == 0


def _channel_fd(pid: int) -> int:
    """The channel's descriptor in worker ``pid``: its first argument."""
    return int(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3])


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
