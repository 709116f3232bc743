#!/usr/bin/env python3
"""A fleet's decision propagation and its Redis traffic (issue 14's benchmark notes).

Starts a ``redis-server`` (temporary directory, free port), an upstream (aiohttp, in this
process) and ``--members`` ringproxy processes sharing one rollout (``state.backend:
redis``), all on 127.0.0.1.  Then:

1. **Propagation**: ``--decisions`` operator actions (``set_weight``, alternating 10 % and
   20 %), each sent to a random member; every other member's ``/api/routes`` is polled
   every ``--poll`` seconds until it shows the new weight.  Reported: the time from
   sending the action to each member serving it (p50, p99, max): an upper bound, it
   includes the writer's own answer time and the poll interval.
2. **Redis commands per member**: ``INFO commandstats`` before and after ``--idle``
   seconds without traffic, then ``--load`` seconds under ``wrk`` load spread over the
   members (if ``wrk`` is on PATH): commands/s divided by the members, by command.  The
   design touches Redis on timers only, so both rates should be alike whatever the
   request rate.

    .venv/bin/python loadtests/fleet_propagation.py [--members 3] [--decisions 50]
        [--poll 0.005] [--idle 10] [--load 10] [--connections 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "fleet-bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_command(port: int, *args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    parts += [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args]
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"".join(parts))
        data = b""
        s.settimeout(0.3)
        try:
            while chunk := s.recv(1 << 16):
                data += chunk
        except TimeoutError:
            pass
        return data


def commandstats(port: int) -> dict[str, int]:
    text = redis_command(port, "INFO", "commandstats").decode()
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"cmdstat_([a-z|]+):calls=(\d+)", text)}


def config_text(directory: Path, upstream: str, redis_url_var: str) -> str:
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin:
          listen: 127.0.0.1:0
          tokens: [{{env: FLEET_BENCH_TOKEN, role: operator}}]
        access_log: {{enabled: false}}
        drain_delay: 0s
        state:
          path: "{directory / 'state.json'}"
          audit: "{directory / 'audit.jsonl'}"
          backend: redis
          url: ${{{redis_url_var}}}
          prefix: "bench:"
        pools:
          stable: {{servers: ["{upstream}"]}}
          canary: {{servers: ["{upstream}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis: {{interval: 1s, min_requests: 100000}}
            rings:
              - {{name: canary, pool: canary, weight: 10}}
              - {{name: stable, pool: stable}}
    """)


_DRAINS: set[asyncio.Task[None]] = set()


async def start_member(directory: Path, upstream: str) -> tuple[asyncio.subprocess.Process,
                                                                str, str]:
    path = directory / "ringproxy.yaml"
    await asyncio.to_thread(_write, path, config_text(directory, upstream, "FLEET_BENCH_REDIS"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(path), "--no-watch", cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    async with asyncio.timeout(30):
        while not (m := re.search(rb"proxy listening on (\S+).*?admin listening on (\S+)",
                                  seen, re.S)):
            line = await proc.stderr.readline()
            if not line:
                raise SystemExit(f"member exited: {seen.decode()}")
            seen += line
    task = asyncio.ensure_future(_drain(proc.stderr))  # a full pipe would stall the member
    _DRAINS.add(task)
    task.add_done_callback(_DRAINS.discard)
    return proc, m.group(1).decode(), m.group(2).decode()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(text)


async def _drain(stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        if b"WARNING" in line or b"ERROR" in line:
            sys.stderr.write("member: " + line.decode())


async def weight_of(client: aiohttp.ClientSession, admin: str) -> float | None:
    async with client.get(admin + "/api/routes", headers=AUTH) as r:
        data = await r.json()
    ring = next(x for x in data["routes"][0]["rings"] if x["name"] == "canary")
    weight: float | None = ring["weight"]
    return weight


async def propagation(admins: list[str], decisions: int, poll: float) -> list[float]:
    samples: list[float] = []
    rng = random.Random(7)
    async with aiohttp.ClientSession() as client:
        for n in range(decisions):
            target = 20 if n % 2 == 0 else 10
            writer = rng.randrange(len(admins))
            sent = time.perf_counter()

            watchers = [asyncio.ensure_future(seen(client, a, target, sent, poll))
                        for i, a in enumerate(admins) if i != writer]
            url = f"{admins[writer]}/api/routes/api/rings/canary/weight"
            async with client.post(url, headers=AUTH, json={"weight": target}) as r:
                if r.status != 200:
                    raise SystemExit(f"set_weight answered {r.status}: {await r.text()}")
            samples += await asyncio.wait_for(asyncio.gather(*watchers), 10)
            await asyncio.sleep(0.1)
    return samples


async def seen(client: aiohttp.ClientSession, admin: str, target: float, sent: float,
               poll: float) -> float:
    """Seconds from ``sent`` until the member at ``admin`` serves ``target`` (polled)."""
    while await weight_of(client, admin) != target:  # noqa: ASYNC110 - polling is the method
        await asyncio.sleep(poll)
    return time.perf_counter() - sent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def rates(before: dict[str, int], after: dict[str, int], seconds: float,
          members: int) -> tuple[float, str]:
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    diff = {k: v for k, v in diff.items() if v > 0 and k not in ("info",)}
    total = sum(diff.values()) / seconds / members
    top = ", ".join(f"{k} {v / seconds / members:.1f}" for k, v in
                    sorted(diff.items(), key=lambda kv: -kv[1])[:8])
    return total, top


async def main(args: argparse.Namespace) -> None:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    port = free_port()
    redis = subprocess.Popen(  # noqa: ASYNC220 - before the loop has anything to do
        [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["FLEET_BENCH_REDIS"] = f"redis://127.0.0.1:{port}/0"
    os.environ["FLEET_BENCH_TOKEN"] = TOKEN
    app = web.Application()
    app.router.add_get("/{tail:.*}", lambda _: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    members = []
    try:
        await asyncio.sleep(0.3)
        for i in range(args.members):
            members.append(await start_member(work / f"m{i}",
                                              f"http://127.0.0.1:{upstream_port}"))
        await asyncio.sleep(2.0)  # a leader is elected
        admins = [m[2] for m in members]
        samples = await propagation(admins, args.decisions, args.poll)
        ms = [s * 1000 for s in samples]
        print(f"propagation over {args.members} members, {args.decisions} decisions, "
              f"{len(ms)} member-applies (polled every {args.poll * 1000:g} ms):")
        print(f"  p50 {statistics.median(ms):.1f} ms  p99 {percentile(ms, 0.99):.1f} ms  "
              f"max {max(ms):.1f} ms")

        before = commandstats(port)
        await asyncio.sleep(args.idle)
        total, top = rates(before, commandstats(port), args.idle, args.members)
        print(f"redis commands per member, idle {args.idle:g}s: {total:.1f}/s ({top})")

        wrk = shutil.which("wrk")
        if wrk and args.load > 0:
            before = commandstats(port)
            started = time.monotonic()
            # (asyncio: the upstream answers from this process's loop meanwhile)
            procs = [await asyncio.create_subprocess_exec(
                wrk, "-t1", f"-c{max(1, args.connections // args.members)}",
                f"-d{args.load:g}s", "-H", "X-User-Id: u1", url + "/",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                for _, url, _ in members]
            outs = [(await p.communicate())[0].decode() for p in procs]
            seconds = time.monotonic() - started
            total, top = rates(before, commandstats(port), seconds, args.members)
            served = sum(float(m.group(1)) for out in outs
                         if (m := re.search(r"Requests/sec:\s+([\d.]+)", out)))
            print(f"redis commands per member under load ({served:.0f} req/s over the "
                  f"fleet, {seconds:.1f}s): {total:.1f}/s ({top})")
    finally:
        for proc, _, _ in members:
            proc.terminate()
        for proc, _, _ in members:
            await proc.wait()
        await runner.cleanup()
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--decisions", type=int, default=50)
    parser.add_argument("--poll", type=float, default=0.005)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=30)
    asyncio.run(main(parser.parse_args()))
