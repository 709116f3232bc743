"""Upstream health over real sockets (#15): ejection, readmission, active checks, retries
within the pool and its budget, a streamed body never retried, the judge counting every
attempt, no healthy server (503, /readyz, on_pool_down: next_ring)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from proxy.admin.client import format_status
from proxy.server import Proxy
from tests.conftest import ProxyFactory, raw_exchange


class Backend:
    """An aiohttp upstream: answers its name; ``/health`` answers ``health_status``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = ""
        self.hits = 0
        self.checks = 0
        self.check_agents: set[str] = set()
        self.rings: list[str] = []
        self.health_status = 200
        self.answer_status = 200
        self._runner: web.AppRunner | None = None

    async def health(self, request: web.Request) -> web.Response:
        self.checks += 1
        self.check_agents.add(request.headers.get("User-Agent", ""))
        return web.Response(status=self.health_status, text="health")

    async def any(self, request: web.Request) -> web.Response:
        await request.read()
        self.hits += 1
        self.rings.append(request.headers.get("X-Ring", ""))
        return web.Response(status=self.answer_status, text=self.name,
                            headers={"X-Upstream": self.name})

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.any)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True).start()
        host, bound = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Resetter:
    """A raw TCP upstream that reads a request head and resets the connection."""

    def __init__(self) -> None:
        self.url = ""
        self.attempts = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
            self.attempts += 1
            sock = writer.get_extra_info("socket")
            if sock is not None:  # RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:  # also when the loop cancels a handler still reading at the test's end
            self._open.discard(writer)
            writer.close()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):  # connections the proxy left open: none leak
            writer.close()


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    started = [Backend(f"b{i}") for i in range(3)]
    for b in started:
        await b.start()
    yield started
    for b in started:
        await b.stop()


@pytest.fixture
async def resetter() -> AsyncIterator[Resetter]:
    r = Resetter()
    await r.start()
    yield r
    await r.stop()


def config(canary: str, stable: str, canary_pool: str = "", beta: str = "") -> str:
    pool = "".join(f"    {line}\n" for line in canary_pool.splitlines())
    return (
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "access_log: {enabled: false}\n"
        "shutdown_grace: 1s\n"
        "pools:\n"
        "  canary:\n"
        f"    servers: [{canary}]\n"
        f"{pool}"
        f"  stable: {{servers: [\"{stable}\"]}}\n"
        "routes:\n"
        "  - name: api\n"
        "    rings:\n"
        "      - {name: beta, pool: canary, rules: [{attr: \"header:X-Beta\", equals: \"1\"}]"
        f"{beta}}}\n"
        "      - {name: main, pool: stable}\n"
    )


BETA = {"X-Beta": "1"}


async def get(client: aiohttp.ClientSession, proxy: Proxy, n: int = 1,
              method: str = "GET", data: bytes | None = None) -> list[tuple[int, str]]:
    out = []
    for _ in range(n):
        async with client.request(method, proxy.url + "/app", headers=BETA, data=data) as r:
            out.append((r.status, await r.text()))
    return out


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{want}}} in the metrics")


async def scrape(client: aiohttp.ClientSession, proxy: Proxy) -> str:
    async with client.get(proxy.admin_url + "/metrics") as r:
        return await r.text()


async def server_views(client: aiohttp.ClientSession, proxy: Proxy) -> dict[str, dict[str, object]]:
    async with client.get(proxy.admin_url + "/api/routes") as r:
        body = await r.json()
    ring = body["routes"][0]["rings"][0]
    return {s["url"]: s for s in ring["health"]["servers"]}


async def until_view(client: aiohttp.ClientSession, proxy: Proxy, url: str, *, up: bool,
                     within: float = 5.0) -> None:
    """Wait until the proxy's own view of server ``url`` is up (or out)."""
    async with asyncio.timeout(within):
        while (await server_views(client, proxy))[url]["up"] is not up:  # noqa: ASYNC110 - a poll of the admin API
            await asyncio.sleep(0.02)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - a poll of counters the servers keep
            await asyncio.sleep(0.02)


async def test_a_server_that_stops_answering_is_ejected_and_users_see_at_most_consecutive_failures_errors(  # noqa: E501
        make_proxy: ProxyFactory, backends: list[Backend], client: aiohttp.ClientSession) -> None:
    a, b, stable = backends
    proxy = await make_proxy(config(
        f'"{a.url}", "{b.url}"', stable.url,
        "outlier: {consecutive_failures: 3, base_ejection: 30s}"))
    assert [s for s, _ in await get(client, proxy, 4)] == [200] * 4
    await b.stop()  # b stops answering: its port refuses connections
    statuses = [s for s, _ in await get(client, proxy, 30)]
    assert statuses.count(502) <= 3 and statuses.count(502) >= 1, statuses
    assert statuses[-20:] == [200] * 20
    # Each of those errors counts against the ring's version (an ejected server's too).
    assert proxy.metrics.tally("api", "beta").errors == statuses.count(502)
    views = await server_views(client, proxy)
    assert views[b.url]["state"] == "ejected" and views[a.url]["state"] == "healthy"
    # `ringproxy status` names the server out, its ejection left, and whose fault it is.
    async with client.get(proxy.admin_url + "/api/routes") as r:
        shown = format_status(await r.json())
    row = next(line for line in shown.splitlines() if line.split()[:2] == ["api", "beta"])
    assert f" 1/2 up, out: {b.url} " in row and "s (one host)" in row, shown
    stable_row = next(line for line in shown.splitlines() if line.split()[:2] == ["api", "main"])
    assert " 1/1 up " in stable_row, shown
    text = await scrape(client, proxy)
    assert metric(text, "ringproxy_upstream_server_healthy", pool="canary", server=b.url) == 0
    assert metric(text, "ringproxy_upstream_server_healthy", pool="canary", server=a.url) == 1
    assert metric(text, "ringproxy_upstream_ejections_total", pool="canary", server=b.url) == 1
    # Visible as one host's fault in the ring's events.
    async with client.get(proxy.admin_url + "/api/events") as r:
        events = (await r.json())["events"]
    ejected = [e for e in events if e["kind"] == "server_ejected"]
    assert ejected and ejected[0]["ring"] == "beta" and "one host" in ejected[0]["reason"]


async def test_a_server_that_comes_back_is_used_again(
        make_proxy: ProxyFactory, backends: list[Backend], client: aiohttp.ClientSession) -> None:
    a, b, stable = backends
    proxy = await make_proxy(config(
        f'"{a.url}", "{b.url}"', stable.url,
        "health: {path: /health, interval: 100ms, timeout: 100ms, healthy_threshold: 2, "
        "unhealthy_threshold: 2}\noutlier: {consecutive_failures: 2, base_ejection: 500ms}"))
    # Active checks: b answers 503 to them, and is taken out.
    b.health_status = 503
    await until_view(client, proxy, b.url, up=False)
    before = b.hits
    assert [s for s, _ in await get(client, proxy, 10)] == [200] * 10
    assert b.hits == before
    # ... and back after two passed checks (not before: the one after 503s is not enough).
    b.health_status = 200
    switched = b.checks
    await until_view(client, proxy, b.url, up=True)
    assert b.checks >= switched + 2
    await get(client, proxy, 10)
    assert b.hits >= before + 4
    assert b.check_agents == {"ringproxy-health-check"}
    # Passive: b refuses, is ejected for 500ms, then comes back and is used again.
    port = int(b.url.rsplit(":", 1)[1])
    await b.stop()
    statuses = [s for s, _ in await get(client, proxy, 10)]
    assert statuses.count(502) <= 2, statuses
    assert (await server_views(client, proxy))[b.url]["up"] is False
    await b.start(port)
    hits = b.hits
    await until_view(client, proxy, b.url, up=True)  # the ejection (500ms) ends
    await get(client, proxy, 10)
    assert b.hits >= hits + 4


async def test_health_checks_go_once_per_interval_per_server_whatever_the_routes(
        make_proxy: ProxyFactory, backends: list[Backend]) -> None:
    a, b, stable = backends
    text = config(f'"{a.url}", "{b.url}"', stable.url,
                  "health: {path: /health, interval: 200ms, timeout: 100ms}")
    text += (
        "  - name: other\n"
        "    match: {path_prefix: /other}\n"
        "    rings:\n"
        "      - {name: one, pool: canary, rules: [{attr: method, equals: PUT}]}\n"
        "      - {name: two, pool: canary}\n")
    await make_proxy(text)
    await asyncio.sleep(1.3)
    for backend in (a, b):
        # The first check at a random point of the first interval, then every 200-220ms.
        assert 4 <= backend.checks <= 7, backend.checks
    assert stable.checks == 0


async def test_retries_recover_every_idempotent_request_when_one_of_two_servers_resets_and_none_crosses_pools(  # noqa: E501
        make_proxy: ProxyFactory, backends: list[Backend], resetter: Resetter,
        client: aiohttp.ClientSession) -> None:
    good, _, stable = backends
    proxy = await make_proxy(config(
        f'"{resetter.url}", "{good.url}"', stable.url,
        "outlier: off\nretries: {attempts: 1, budget: 100%}"))
    results = []
    for method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS") * 4:
        results += await get(client, proxy, 1, method, b"x" * 100 if method == "PUT" else None)
    assert [s for s, _ in results] == [200] * 20
    assert all(t in ("b0", "") for _, t in results)
    assert resetter.attempts >= 10
    assert stable.hits == 0  # never to the other ring's pool
    text = await scrape(client, proxy)
    assert metric(text, "ringproxy_upstream_retries_total", pool="canary",
                  reason="reset") == resetter.attempts


async def test_a_post_with_a_streamed_body_is_not_retried(
        make_proxy: ProxyFactory, backends: list[Backend], resetter: Resetter,
        client: aiohttp.ClientSession) -> None:
    good, _, stable = backends
    text = config(f'"{resetter.url}", "{good.url}"', stable.url,
                  "outlier: off\nretries: {methods: [POST], budget: 100%}")
    proxy = await make_proxy(text.replace("shutdown_grace", "limits: {request_buffer: 1KiB}\n"
                                                            "shutdown_grace"))
    # The first pick is the resetting server; 4 KiB stream past the 1 KiB buffer.
    head = (b"POST /app HTTP/1.1\r\nHost: x\r\nX-Beta: 1\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n1000\r\n" + b"y" * 4096 + b"\r\n")
    answer = await raw_exchange(proxy.url, head, wait=3.0)
    assert answer.startswith(b"HTTP/1.1 502"), answer[:80]
    assert resetter.attempts == 1 and good.hits == 0
    # Small bodies are read whole first: those are retried.
    statuses = [s for s, _ in await get(client, proxy, 4, "POST", b"small")]
    assert statuses == [200] * 4 and resetter.attempts >= 2
    scraped = await scrape(client, proxy)
    assert metric(scraped, "ringproxy_upstream_retries_total", pool="canary",
                  reason="reset") == resetter.attempts - 1


async def test_the_retry_budget_holds(
        make_proxy: ProxyFactory, backends: list[Backend], resetter: Resetter,
        client: aiohttp.ClientSession) -> None:
    good, _, stable = backends
    proxy = await make_proxy(config(
        f'"{resetter.url}", "{good.url}"', stable.url,
        "outlier: off\nretries: {budget: 10%, min_retries: 2}"))
    statuses = [s for s, _ in await get(client, proxy, 60)]
    text = await scrape(client, proxy)
    retried = metric(text, "ringproxy_upstream_retries_total", pool="canary", reason="reset")
    assert 2 <= retried <= 6  # 10 % of 60, at least 2
    assert statuses.count(502) == resetter.attempts - retried
    assert statuses.count(200) == 60 - statuses.count(502)


async def test_the_judge_counts_every_attempt(
        make_proxy: ProxyFactory, backends: list[Backend], resetter: Resetter,
        client: aiohttp.ClientSession) -> None:
    good, _, stable = backends
    proxy = await make_proxy(config(
        f'"{resetter.url}", "{good.url}"', stable.url,
        "outlier: off\nretries: {budget: 100%}"))
    statuses = [s for s, _ in await get(client, proxy, 20)]
    assert statuses == [200] * 20  # the users saw no error ...
    tally = proxy.metrics.tally("api", "beta")
    # ... the judge saw every failed attempt: retries never hide a bad canary.
    assert tally.errors == resetter.attempts >= 10
    assert tally.requests == 20 + resetter.attempts
    text = await scrape(client, proxy)
    assert metric(text, "ringproxy_requests_total", route="api", ring="beta",
                  code_class="2xx") == 20
    assert metric(text, "ringproxy_upstream_errors_total", route="api", ring="beta",
                  kind="reset") == resetter.attempts


async def test_no_healthy_server_is_a_503_with_retry_after_and_readyz_names_the_pool(
        make_proxy: ProxyFactory, backends: list[Backend], client: aiohttp.ClientSession) -> None:
    a, b, stable = backends
    a.health_status = b.health_status = 500
    proxy = await make_proxy(config(
        f'"{a.url}", "{b.url}"', stable.url,
        "health: {path: /health, interval: 100ms, timeout: 100ms, unhealthy_threshold: 1}"))
    await until(lambda: a.checks >= 2 and b.checks >= 2)
    async with client.get(proxy.url + "/app", headers=BETA) as r:
        assert r.status == 503 and r.headers["Retry-After"]
        assert "no healthy server" in await r.text()
    async with client.get(proxy.url + "/app") as r:
        assert r.status == 200  # the other ring's pool is not touched
    assert a.hits == b.hits == 0
    async with client.get(proxy.admin_url + "/readyz") as r:
        body = await r.json()
        assert r.status == 503 and body["pools_down"] == ["canary"]
    views = await server_views(client, proxy)
    assert {v["state"] for v in views.values()} == {"unhealthy"}
    a.health_status = b.health_status = 200
    await until_view(client, proxy, a.url, up=True)  # two passed checks (the default)
    async with client.get(proxy.admin_url + "/readyz") as r:
        assert r.status == 200


async def test_on_pool_down_next_ring_sends_users_to_a_later_ring(
        make_proxy: ProxyFactory, backends: list[Backend], client: aiohttp.ClientSession) -> None:
    a, b, stable = backends
    a.health_status = b.health_status = 500
    proxy = await make_proxy(config(
        f'"{a.url}", "{b.url}"', stable.url,
        "health: {path: /health, interval: 100ms, timeout: 100ms, unhealthy_threshold: 1}",
        ", on_pool_down: next_ring"))
    await until(lambda: a.checks >= 2 and b.checks >= 2)
    statuses = [s for s, _ in await get(client, proxy, 5)]
    assert statuses == [200] * 5 and stable.hits == 5 and stable.rings == ["main"] * 5


async def test_a_503_is_retried_on_the_other_server_and_judged(
        make_proxy: ProxyFactory, backends: list[Backend], client: aiohttp.ClientSession) -> None:
    a, b, stable = backends
    a.answer_status = 503  # a answers every request with a 503 (its checks pass)
    proxy = await make_proxy(config(f'"{a.url}", "{b.url}"', stable.url,
                                    "outlier: off\nretries: {budget: 100%}"))
    results = await get(client, proxy, 10)
    assert results == [(200, "b1")] * 10
    assert a.hits >= 5 and stable.hits == 0
    tally = proxy.metrics.tally("api", "beta")
    assert (tally.requests, tally.errors) == (10 + a.hits, a.hits)
    text = await scrape(client, proxy)
    assert metric(text, "ringproxy_upstream_retries_total", pool="canary",
                  reason="503") == a.hits
