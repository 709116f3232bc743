#!/usr/bin/env python3
"""Memory per idle keep-alive connection: RSS of a ringproxy process holding N of them.

Starts ``ringproxy run --config FILE`` as a subprocess on 127.0.0.1 (limits generous
enough to keep every connection: ``max_connections`` N + 1000, head and keep-alive
timeouts of 10 minutes) in front of a small upstream served by this script, opens N
connections (default 10,000), sends one GET on each and reads its answer (so each is a
keep-alive connection that has served a request, as in production), holds them idle for
a moment, and reads the proxy's ``VmRSS`` from ``/proc/PID/status`` before and after.
Then it closes everything and reads RSS once more (what came back).  Bounded: the
whole run stops after ``--timeout`` seconds whatever happens.

    .venv/bin/python loadtests/idle_connections.py [--connections 10000] [--hold 2]
        [--no-request] [--ringproxy-cmd CMD] [--without-limits] [--json FILE]

This script raises its own soft ``RLIMIT_NOFILE`` to the hard limit (the proxy inherits
it, and raises its own too); with a hard limit below N + 200 it stops and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 15.0
SETTLE_S = 1.0  # after the last connection: let the proxy's allocator settle
BATCH = 250  # connections opened concurrently
# Requests in flight at once: few, so the proxy's upstream pool stays small and the RSS
# difference is the client connections'.
REQUESTS_IN_FLIGHT = 16
FD_RESERVE = 200  # this script's own descriptors besides the connections
BODY = b"idle-bench"
UPSTREAM_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise SystemExit(
            f"error: RLIMIT_NOFILE hard limit is {hard}, below the {needed} descriptors "
            f"needed; raise it (ulimit -Hn) or use fewer --connections"
        )
    return soft


def tail(path: Path, limit: int = 4000) -> str:
    return path.read_text(errors="replace")[-limit:]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ringproxy_argv(override: str | None) -> list[str]:
    if override:
        return shlex.split(override)
    script = Path(sys.executable).parent / "ringproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


def config_text(port: int, upstream_port: int, workdir: Path, n: int, limits: bool) -> str:
    text = f"""listen: 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:0
access_log:
  enabled: false
state:
  path: {workdir / "state.json"}
  audit: {workdir / "audit.jsonl"}
pools:
  app:
    servers: [http://127.0.0.1:{upstream_port}]
routes:
  - name: idle
    rings:
      - name: stable
        pool: app
"""
    if limits:
        text += f"""limits:
  max_connections: {n + 1000}
  head_timeout: 10m
  keepalive_timeout: 10m
"""
    return text


# --------------------------------------------------------------------------- upstream


class Upstream:
    """Answers every request head with a small 200 (GETs without bodies only)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        buffer = b""
        try:
            while data := await reader.read(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    writer.write(UPSTREAM_ANSWER)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the proxy went away, or we are shutting down: nothing to report
        finally:
            writer.close()
            self.tasks.discard(task)

    async def stop(self) -> None:
        """After the proxy stopped (its connections are closed, so the handlers end)."""
        if self.server is not None:
            self.server.close()
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


# --------------------------------------------------------------------------- client


async def read_answer(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {head[:100]!r}")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)


async def open_one(
    port: int, request: bool, in_flight: asyncio.Semaphore | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if request:
        async with in_flight or asyncio.Semaphore():
            writer.write(b"GET /idle HTTP/1.1\r\nHost: idle.test\r\n\r\n")
            await read_answer(reader)
    return reader, writer


async def close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()
    for _, writer in conns:
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


# --------------------------------------------------------------------------- run


@dataclass
class Result:
    connections: int
    requested: bool
    rss_before: int
    rss_with: int
    rss_after_close: int
    fds_before: int
    fds_with: int
    closed_by_proxy: int
    open_seconds: float

    @property
    def per_connection(self) -> float:
        return (self.rss_with - self.rss_before) / self.connections


async def run(args: argparse.Namespace, workdir: Path) -> Result:
    upstream = Upstream()
    await upstream.start()
    port = free_port()
    config = workdir / "ringproxy.yaml"
    limits = not args.without_limits
    config.write_text(config_text(port, upstream.port, workdir, args.connections, limits))
    log_path = workdir / "ringproxy.stderr"
    argv = [*ringproxy_argv(args.ringproxy_cmd), "run", "--config", str(config), "--no-watch"]
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await wait_ready(proc, port, log_path)
        # One request first: the first request's one-time allocations are not the
        # connections' cost.
        reader, writer = await open_one(port, True)
        await close_all([(reader, writer)])
        await asyncio.sleep(SETTLE_S)
        rss_before, fds_before = rss_bytes(proc.pid), open_fds(proc.pid)
        started = time.monotonic()
        in_flight = asyncio.Semaphore(REQUESTS_IN_FLIGHT)
        while len(conns) < args.connections:
            batch = min(BATCH, args.connections - len(conns))
            opened = await asyncio.gather(
                *(open_one(port, not args.no_request, in_flight) for _ in range(batch)),
                return_exceptions=True,
            )
            failed = [item for item in opened if isinstance(item, BaseException)]
            conns += [item for item in opened if not isinstance(item, BaseException)]
            if failed:
                raise RuntimeError(f"{len(failed)} of a batch of {batch} connections failed "
                                   f"with {len(conns)} open: {failed[0]!r}")
        open_seconds = time.monotonic() - started
        await asyncio.sleep(args.hold)
        rss_with, fds_with = rss_bytes(proc.pid), open_fds(proc.pid)
        closed_by_proxy = sum(1 for reader, _ in conns if reader.at_eof())
        await close_all(conns)
        conns.clear()
        await asyncio.sleep(SETTLE_S)
        rss_after = rss_bytes(proc.pid)
        if proc.returncode is not None:
            raise RuntimeError(f"ringproxy exited with {proc.returncode}")
        return Result(
            connections=args.connections,
            requested=not args.no_request,
            rss_before=rss_before,
            rss_with=rss_with,
            rss_after_close=rss_after,
            fds_before=fds_before,
            fds_with=fds_with,
            closed_by_proxy=closed_by_proxy,
            open_seconds=open_seconds,
        )
    finally:
        await close_all(conns)
        await stop(proc)
        await upstream.stop()


async def wait_ready(proc: asyncio.subprocess.Process, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"ringproxy exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
        return
    raise RuntimeError(f"ringproxy did not listen on 127.0.0.1:{port} in {READY_TIMEOUT_S}s")


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render(r: Result, hold: float) -> str:
    what = "one GET answered on each, then idle" if r.requested else "no request, silent"
    return "\n".join(
        [
            f"idle keep-alive connections: {r.connections:,} ({what}; held {hold:g} s; "
            f"opened in {r.open_seconds:.1f} s)",
            f"proxy RSS before:          {mib(r.rss_before)}",
            f"proxy RSS with them open:  {mib(r.rss_with)}",
            f"proxy RSS after closing:   {mib(r.rss_after_close)}",
            f"per idle connection:       {r.per_connection:,.0f} bytes "
            f"({r.per_connection / 1024:.1f} KiB)",
            f"proxy open descriptors:    {r.fds_before:,} -> {r.fds_with:,}",
            f"closed by the proxy while held: {r.closed_by_proxy:,}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--connections", type=int, default=10_000, help="default 10,000")
    p.add_argument(
        "--hold", type=float, default=2.0, help="seconds to hold them idle before measuring"
    )
    p.add_argument(
        "--no-request", action="store_true",
        help="open the connections without sending anything (silent, not keep-alive)",
    )
    p.add_argument(
        "--ringproxy-cmd",
        help="command that starts ringproxy (default: the venv's 'ringproxy' script); "
        "'run --config FILE --no-watch' is appended",
    )
    p.add_argument(
        "--without-limits", action="store_true",
        help="leave the limits: section out of the config (builds from before it existed)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="stop after this (default 300)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.connections < 1 or args.hold < 0 or args.timeout <= 0:
        p.error("--connections must be >= 1, --hold >= 0, --timeout > 0")
    return args


async def amain(args: argparse.Namespace) -> Result:
    with tempfile.TemporaryDirectory(prefix="ringproxy-idle-") as tmp:
        async with asyncio.timeout(args.timeout):
            return await run(args, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile(args.connections + FD_RESERVE)
    try:
        result = asyncio.run(amain(args))
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"error: {exc!r}", file=sys.stderr)
        return 1
    print(render(result, args.hold))
    if args.json is not None:
        payload = {**asdict(result), "per_connection": result.per_connection}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if result.closed_by_proxy:
        print("WARNING: the proxy closed some connections while they were held: the figure "
              "is per connection still open at the end only approximately", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
