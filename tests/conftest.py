"""Shared fixtures: real upstream servers and a real proxy, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import compiled
from proxy.config import parse_config
from proxy.dataplane.client import REJECTIONS_LOGGED
from proxy.server import Proxy


def pytest_sessionstart(session: pytest.Session) -> None:
    """Never test old code: a data plane module edited after its compiled extension was
    built (an editable install) is not what would run."""
    old = compiled.stale()
    if old:
        pytest.exit("edited after their compiled extensions were built (the old code would be "
                    f"tested): {', '.join(old)}; run `pip install -e .` again", returncode=4)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "interpreted: the test replaces a data plane method to inject a fault, "
        "which a compiled class does not allow: where the data plane runs compiled, the test "
        "runs in a pytest subprocess with RINGPROXY_PURE_PYTHON=1 (the same source, "
        "interpreted) and passes or fails with it")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if pyfuncitem.get_closest_marker("interpreted") is None or not compiled.compiled():
        return None
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "120",
         pyfuncitem.nodeid],
        cwd=pyfuncitem.config.rootpath, env={**os.environ, compiled.PURE_ENV: "1"},
        capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0 or " passed" not in done.stdout:
        pytest.fail(f"the interpreted run (RINGPROXY_PURE_PYTHON=1) did not pass "
                    f"(exit {done.returncode}):\n{done.stdout[-8000:]}\n{done.stderr[-2000:]}")
    return True


GZIP_BODY = gzip.compress(b'{"hello": "compressed world"}' * 50, mtime=0)


async def serve_app(app: web.Application, **runner: Any) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free port of 127.0.0.1: its runner (``cleanup()`` stops it) and
    its ``http://host:port``."""
    served = web.AppRunner(app, access_log=None, **runner)
    await served.setup()
    await web.TCPSite(served, "127.0.0.1", 0).start()
    host, port = served.addresses[0][:2]
    return served, f"http://{host}:{port}"


class Upstream:
    """A real aiohttp server with endpoints tests use, and a record of what it saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = ""
        self.requests: list[dict[str, Any]] = []
        self.sse_release = asyncio.Event()
        self.hang_started = asyncio.Event()
        self.hang_cancelled = asyncio.Event()
        self.ws_closed_with: int | None = None
        self.ws_closed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        # /app behaves as the test says: every ``error_every``-th answer is a 500 (0: none),
        # each after ``delay`` seconds.  ``app_hits`` counts what reached this server.
        self.error_every = 0
        self.delay = 0.0
        self.app_hits = 0
        self.first_error_at: float | None = None

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_route("*", "/bytes/{n}", self.bytes)
        r.add_post("/sink", self.sink)
        r.add_put("/sink", self.sink)
        r.add_get("/gzip", self.gzip)
        r.add_get("/sse", self.sse)
        r.add_get("/slow", self.slow)
        r.add_get("/hang", self.hang)
        r.add_route("*", "/status/{code}", self.status)
        r.add_get("/ws", self.ws)
        r.add_route("*", "/sized", self.sized)
        r.add_get("/broken", self.broken)
        r.add_get("/hop", self.hop)
        r.add_route("*", "/app", self.app_endpoint)
        r.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def start(self) -> str:
        self._runner, self.url = await serve_app(self.app(), handler_cancellation=True)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.BaseRequest, **extra: Any) -> dict[str, Any]:
        seen = {
            "upstream": self.name,
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            **extra,
        }
        self.requests.append(seen)
        return seen

    async def app_endpoint(self, request: web.Request) -> web.Response:
        self.app_hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error_every and self.app_hits % self.error_every == 0:
            if self.first_error_at is None:
                self.first_error_at = time.time()
            return web.Response(status=500, text="boom", headers={"X-Upstream": self.name})
        return web.Response(text=self.name, headers={"X-Upstream": self.name})

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = self._record(request, body_len=len(body), body_sha=hashlib.sha256(body).hexdigest())
        return web.json_response(seen, headers={"X-Upstream": self.name})

    async def bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        self._record(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        chunk = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < n:
            part = chunk[: min(len(chunk), n - sent)]
            await resp.write(part)
            sent += len(part)
        await resp.write_eof()
        return resp

    async def sink(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            total += len(chunk)
        self._record(request, body_len=total)
        return web.json_response({"received": total, "sha256": digest.hexdigest()})

    async def gzip(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(
            body=GZIP_BODY,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    async def sse(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        # The second event only comes after the test has seen the first one, so a test
        # that passes proves the proxy flushed before the upstream finished.
        await asyncio.wait_for(self.sse_release.wait(), 10)
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        self._record(request)
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text="slow done")

    async def hang(self, request: web.Request) -> web.Response:
        self._record(request)
        self.hang_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise
        return web.Response(text="never")

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        self._record(request)
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}")

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self._record(request)
        ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data[6:]), message=b"upstream says bye")
                    break
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        self.ws_closed_with = ws.close_code
        self.ws_closed.set()
        return ws

    async def sized(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(body=b"x" * 100, headers={"Content-Type": "text/plain"})

    async def broken(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        resp = web.StreamResponse(headers={"Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"y" * 1000)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def hop(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(
            text="hop",
            headers={
                "Connection": "X-Up-Secret",
                "X-Up-Secret": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-Up-Public": "yes",
            },
        )


@pytest.fixture
async def stable() -> AsyncIterator[Upstream]:
    up = Upstream("stable")
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def canary() -> AsyncIterator[Upstream]:
    up = Upstream("canary")
    await up.start()
    yield up
    await up.stop()


def two_ring_config(stable: str, canary: str) -> str:
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        shutdown_grace: 2s
        pools:
          stable: {{servers: [{stable}]}}
          canary: {{servers: [{canary}]}}
        routes:
          - name: api
            rings:
              - name: beta
                pool: canary
                rules:
                  - {{attr: "header:X-Beta", equals: "1"}}
                policy:
                  add_headers: {{X-Flag: "{{ring}}@{{route}}"}}
              - name: main
                pool: stable
                policy:
                  timeout: 1s
        """
    )


ProxyFactory = Callable[[str], Awaitable[Proxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    started: list[Proxy] = []

    async def factory(text: str) -> Proxy:
        proxy = Proxy(parse_config(text))
        await proxy.start()
        started.append(proxy)
        return proxy

    yield factory
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, stable: Upstream, canary: Upstream) -> Proxy:
    return await make_proxy(two_ring_config(stable.url, canary.url))


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept")
    ) as session:
        yield session


@pytest.fixture(autouse=True)
def _full_rejection_log_budget() -> None:
    """Each test starts with the rejection log's whole budget: earlier tests' rejections in
    this process must not leave this one's lines unlogged."""
    REJECTIONS_LOGGED.refill()


async def until_refused(url: str, within: float) -> None:
    """Connect to ``url``'s listener again and again until it refuses (it has closed); a
    connect that still gets in sends nothing.  TimeoutError after ``within`` seconds."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with asyncio.timeout(within):
        while True:
            try:
                _, writer = await asyncio.open_connection(host, int(port))
            except ConnectionRefusedError:
                return
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            await asyncio.sleep(0.02)


async def raw_exchange(url: str, request: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes to the proxy, read until it closes the connection (or timeout)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(wait):
                while data := await reader.read(65536):
                    chunks.append(data)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def raw_upstream(reply: bytes | None) -> tuple[asyncio.Server, str]:
    """A TCP upstream that reads a request head, then sends ``reply`` (``None``: resets)
    and closes; a connection the proxy drops, or one still open when the loop cancels the
    handler, is closed too (no transport outlives the test)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
                if reply is None:  # RST, not FIN
                    writer.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    writer.write(reply)
                    await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def headers_of(seen: dict[str, Any]) -> dict[str, str]:
    """An upstream record's headers, lower-cased names (repeated ones joined)."""
    out: dict[str, str] = {}
    for k, v in seen["headers"]:
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def parse_json(body: bytes) -> Any:
    return json.loads(body)


# --------------------------------------------------------------------------- subprocesses

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("ringproxy")
RINGPROXY = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "proxy"]
LISTENING = re.compile(rb"proxy listening on (http://\S+)")


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RINGPROXY, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


class Running:
    """A ringproxy process started by a test; its stderr is read until it says where it is."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stderr = b""
        self.url = ""

    async def wait_listening(self, pattern: re.Pattern[bytes] = LISTENING) -> re.Match[bytes]:
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = await self.proc.stderr.readline()
                if not line:
                    raise AssertionError(f"ringproxy exited early: {self.stderr.decode()}")
                self.stderr += line
                if m := pattern.search(self.stderr):
                    if pattern is LISTENING:
                        self.url = m.group(1).decode()
                    return m

    async def finish(self, sig: int | None, wait: float = 15) -> tuple[int, str, str]:
        if sig is not None:
            self.proc.send_signal(sig)
        out, err = await asyncio.wait_for(self.proc.communicate(), wait)
        return self.proc.returncode or 0, out.decode(), (self.stderr + err).decode()


@pytest.fixture
async def spawn() -> AsyncIterator:
    procs: list[Running] = []

    async def start(*args: str) -> Running:
        proc = await asyncio.create_subprocess_exec(
            *RINGPROXY, *args, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        running = Running(proc)
        procs.append(running)
        return running

    yield start
    for running in procs:
        if running.proc.returncode is None:
            running.proc.kill()
            await running.proc.wait()


def write_config(
    tmp_path: Path, upstream: str, extra: str = "", listen: str = "127.0.0.1:0"
) -> Path:
    path = tmp_path / "ringproxy.yaml"
    path.write_text(textwrap.dedent(f"""
        listen: {listen}
        admin: {{listen: 127.0.0.1:0}}
        shutdown_grace: 5s
        drain_delay: 0s
        pools:
          app: {{servers: ["{upstream}"]}}
        routes:
          - name: api
            rings:
              - name: stable
                pool: app
    """) + extra)
    return path


