"""What the request path's shortcuts must keep: shared deadline timers, an idle timer only
when the body is still coming, a bounded Host cache, batched request ids, pooled upstream
connections."""

from __future__ import annotations

import asyncio
import re
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

import aiohttp
import pytest
from aiohttp import web

from proxy.config import parse_config
from proxy.config.values import parse_upstream
from proxy.dataplane.deadlines import Deadlines
from proxy.dataplane.headers import new_request_id
from proxy.dataplane.upstream import Server
from proxy.routing.table import _HOSTS_MAX, RoutingTable, normalize_host
from proxy.server import Proxy
from tests.conftest import ProxyFactory, Upstream, headers_of, raw_exchange, serve_app


def _config(upstream: str, policy: str) -> str:
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        shutdown_grace: 1s
        pools:
          p: {{servers: [{upstream}]}}
        routes:
          - name: r
            rings:
              - name: only
                pool: p
                policy: {policy}
        """
    )


async def test_one_timer_serves_many_deadlines_and_is_rearmed(
    make_proxy: ProxyFactory, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(_config(stable.url, "{timeout: 1s}"))

    async def get(seconds: float) -> tuple[int, float]:
        started = time.monotonic()
        async with client.get(proxy.url + f"/slow?s={seconds}") as r:
            await r.read()
            return r.status, time.monotonic() - started

    # Fast and slow requests interleaved, in two waves: the second wave's deadlines are
    # served by a timer re-armed after the first wave's fired.
    for _ in range(2):
        results = await asyncio.gather(*(get(0.02 if i % 3 else 3.0) for i in range(12)))
        for i, (status, took) in enumerate(results):
            if i % 3:
                assert status == 200
            else:
                assert status == 504
                assert 0.9 < took < 2.5
    # Nothing is left waiting on a ring deadline.
    assert proxy.plane is not None
    assert len(proxy.plane.timers(1.0)) == 0


class _ManualClock:
    """Stands in for the event loop in ``Deadlines``, which uses only ``time()`` and
    ``call_at()``: time moves only when the test says, so no stall can reorder deadlines.
    ``advance`` runs the due timers in order of their time, as the loop would."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[_ManualTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _ManualTimer:
        timer = _ManualTimer(when, callback)
        self.timers.append(timer)
        return timer

    def armed(self) -> list[float]:
        return sorted(t.when for t in self.timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := [t for t in self.timers if not t.cancelled and t.when <= self.now]:
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            timer.callback()


class _ManualTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_deadlines_fire_only_expired_entries_and_restart_moves_one_back() -> None:
    clock = _ManualClock()
    deadlines = Deadlines(cast(asyncio.AbstractEventLoop, clock), 10.0)
    fired: list[str] = []
    deadlines.arm("slow", lambda: fired.append("slow"))
    deadlines.arm("done", lambda: fired.append("done"))
    deadlines.arm("moved", lambda: fired.append("moved"))
    deadlines.disarm("done")
    assert clock.armed() == [1010.0]  # one timer for all three, at the oldest deadline
    clock.advance(6)
    deadlines.arm("moved", lambda: fired.append("moved"))  # restarted: due at 1016
    clock.advance(3)  # 1009
    assert fired == []
    clock.advance(2)  # 1011: "slow" is due, "moved" (restarted) is not
    assert fired == ["slow"]
    assert clock.armed() == [1016.0]  # re-armed for the oldest entry still waiting
    clock.advance(4)  # 1015
    assert fired == ["slow"]
    clock.advance(1)  # 1016
    assert fired == ["slow", "moved"]
    assert len(deadlines) == 0
    assert clock.armed() == []


def test_a_callback_may_arm_its_own_key_again_and_waits_one_timeout_more() -> None:
    """A wait that starts over (a slow reader read something): the callback re-arms its
    key; it is due one timeout later, on the one timer, and fires again then."""
    clock = _ManualClock()
    deadlines = Deadlines(cast(asyncio.AbstractEventLoop, clock), 10.0)
    fired: list[float] = []

    def again() -> None:
        fired.append(clock.now)
        if clock.now < 1030.0:
            deadlines.arm("slow", again)

    deadlines.arm("slow", again)
    deadlines.arm("other", lambda: fired.append(-clock.now))
    clock.advance(10)  # 1010: both due; "slow" is armed again for 1020
    assert fired == [1010.0, -1010.0]
    assert clock.armed() == [1020.0]  # one timer, not one per arm
    clock.advance(9)
    assert len(fired) == 2
    clock.advance(1)  # 1020
    clock.advance(10)  # 1030: the third time, not armed again
    assert fired == [1010.0, -1010.0, 1020.0, 1030.0]
    assert len(deadlines) == 0 and clock.armed() == []


class _Trickle:
    """An upstream that sends its headers, then body pieces with pauses it is told."""

    def __init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/trickle", self.trickle)
        app.router.add_get("/late", self.late)
        # A handler whose client went away stops (no teardown waiting out its pauses).
        self._runner, self.url = await serve_app(app, handler_cancellation=True)

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        pauses = [float(p) for p in request.query["pauses"].split(",")]
        resp = web.StreamResponse(headers={"Content-Length": str(len(pauses) + 1)})
        await resp.prepare(request)
        await resp.write(b"a")
        for pause in pauses:
            await asyncio.sleep(pause)
            await resp.write(b"b")
        return resp

    async def late(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query["s"]))
        return web.Response(text="late")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def trickle() -> AsyncIterator[_Trickle]:
    up = _Trickle()
    await up.start()
    yield up
    await up.stop()


async def test_idle_timeout_cuts_a_stalled_body_but_not_a_slow_steady_one(
    make_proxy: ProxyFactory, trickle: _Trickle, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(_config(trickle.url, "{timeout: 5s, idle_timeout: 1s}"))
    # Ten pauses of 150 ms: 1.5 s in all, longer than the idle timeout, never silent for
    # long (a stall of most of a second still leaves the body in time).
    async with client.get(proxy.url + "/trickle?pauses=" + ",".join(["0.15"] * 10)) as r:
        assert r.status == 200
        assert await r.read() == b"a" + b"b" * 10
    # A silence of 3 s: the body is cut off after about 1 s.
    started = time.monotonic()
    async with client.get(proxy.url + "/trickle?pauses=0.05,3") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert 0.9 < time.monotonic() - started < 2.5


async def test_the_wait_for_headers_is_bounded_by_timeout_not_idle_timeout(
    make_proxy: ProxyFactory, trickle: _Trickle, client: aiohttp.ClientSession
) -> None:
    # README: ``timeout`` runs until the response headers; ``idle_timeout`` is the longest
    # silence while streaming the response body.
    proxy = await make_proxy(_config(trickle.url, "{timeout: 3s, idle_timeout: 200ms}"))
    async with client.get(proxy.url + "/late?s=0.5") as r:
        assert r.status == 200
        assert await r.text() == "late"
    proxy = await make_proxy(_config(trickle.url, "{timeout: 200ms, idle_timeout: 3s}"))
    async with client.get(proxy.url + "/late?s=1") as r:
        assert r.status == 504


def test_host_cache_is_bounded_and_changes_no_answer() -> None:
    table = RoutingTable(parse_config(textwrap.dedent(
        """
        pools:
          p: {servers: ["http://127.0.0.1:9"]}
        routes:
          - name: exact
            match: {host: api.example.com}
            rings: [{name: a, pool: p}]
          - name: wild
            match: {host: "*.example.org"}
            rings: [{name: a, pool: p}]
        """
    )))
    for i in range(3 * _HOSTS_MAX):
        table.match(f"h{i}.example.org:80", "/")
        assert len(table._hosts) <= _HOSTS_MAX
    for host in ("API.example.com:8080", "api.example.com.", "x.EXAMPLE.org", "nope.test"):
        for _ in range(2):  # the second lookup comes from the cache
            route = table.match(host, "/")
            name = normalize_host(host)
            expected = ("exact" if name == "api.example.com"
                        else "wild" if name.endswith(".example.org") else None)
            assert (route.route.name if route else None) == expected
    long_host = "a" * 300 + ".example.org"
    assert table.match(long_host, "/") is not None
    assert long_host not in table._hosts


def test_request_ids_are_unique_random_hex() -> None:
    ids = [new_request_id() for _ in range(3000)]  # several batches
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_upstream_sees_only_what_the_client_sent(
    proxy: Proxy, stable: Upstream, method: str
) -> None:
    body = b"x=1" if method == "POST" else b""
    raw = await raw_exchange(
        proxy.url,
        f"{method} /seen HTTP/1.1\r\nHost: h.test\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode() + body,
    )
    assert raw.startswith(b"HTTP/1.1 200")
    seen = headers_of(stable.requests[-1])
    for name in ("user-agent", "accept", "accept-encoding", "content-type"):
        assert name not in seen
    raw = await raw_exchange(
        proxy.url,
        f"{method} /seen HTTP/1.1\r\nHost: h.test\r\nUser-Agent: ua/1\r\nAccept: a/b\r\n"
        f"Accept-Encoding: br\r\nContent-Type: c/d\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode() + body,
    )
    assert raw.startswith(b"HTTP/1.1 200")
    seen = headers_of(stable.requests[-1])
    assert (seen["user-agent"], seen["accept"], seen["accept-encoding"], seen["content-type"]) \
        == ("ua/1", "a/b", "br", "c/d")


def test_server_host_headers() -> None:
    assert Server(parse_upstream("http://127.0.0.1:9")).host_header == b"127.0.0.1:9"
    assert Server(parse_upstream("http://[::1]:80")).host_header == b"[::1]"
    assert Server(parse_upstream("https://h.test:443")).host_header == b"h.test"


async def test_upstream_connections_are_kept_and_reused(
    proxy: Proxy, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    for _ in range(5):
        async with client.get(proxy.url + "/x") as r:
            assert r.status == 200
    pool = proxy.runtime.pools["stable"]
    assert pool.open == 1 and pool.idle_connections() == 1


async def test_the_upstream_headers_are_taken_over_and_a_missing_host_still_gets_one(
    proxy: Proxy, stable: Upstream
) -> None:
    raw = await raw_exchange(
        proxy.url,
        b"POST /seen HTTP/1.1\r\nX-First: 1\r\nhost: h.test\r\nX-Dup: a\r\nX-Dup: b\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nx=1",
    )
    assert raw.startswith(b"HTTP/1.1 200")
    sent = stable.requests[-1]["headers"]
    # The client's headers in their order and spelling, then the proxy's own.
    assert sent[:4] == [["X-First", "1"], ["host", "h.test"], ["X-Dup", "a"], ["X-Dup", "b"]]
    assert [k.lower() for k, _ in sent].count("host") == 1
    assert headers_of(stable.requests[-1])["x-dup"] == "a, b"
    # An HTTP/1.0 client without Host: the server's is sent.
    raw = await raw_exchange(proxy.url, b"GET /seen HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") or raw.startswith(b"HTTP/1.0 200")
    assert headers_of(stable.requests[-1])["host"] == stable.url.removeprefix("http://")


def test_good_host_cache_is_bounded_and_changes_no_answer() -> None:
    from proxy.dataplane import request as request_module
    from proxy.dataplane.request import RequestError, parse_request

    for i in range(3 * request_module._GOOD_HOSTS_MAX):
        parse_request(f"GET / HTTP/1.1\r\nHost: h{i}.example.org\r\n\r\n".encode())
        assert len(request_module._GOOD_HOSTS) <= request_module._GOOD_HOSTS_MAX
    for host in (b"api.example.com", b"[::1]:8080"):
        for _ in range(2):  # the second one comes from the cache
            req = parse_request(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert req.host == host
    for bad in (b"a b", b"a/b", b"a\"b", b"a@b"):
        for _ in range(2):
            with pytest.raises(RequestError):
                parse_request(b"GET / HTTP/1.1\r\nHost: " + bad + b"\r\n\r\n")
        assert bad not in request_module._GOOD_HOSTS
    long_host = b"a" * 300 + b".example.org"
    assert parse_request(b"GET / HTTP/1.1\r\nHost: " + long_host + b"\r\n\r\n").host == long_host
    assert long_host not in request_module._GOOD_HOSTS


def test_header_getter_reads_the_parsed_request_as_its_headers_view_does() -> None:
    from proxy.config.rules import Attr
    from proxy.dataplane.request import parse_request
    from proxy.routing.assign import StaticRequest
    from proxy.routing.predicates import getter

    req = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\nx-user-id: u1\r\nX-USER-ID: u2\r\n"
                        b"X-Cafe: cr\xe8me\r\n\r\n")
    for name in ("X-User-Id", "x-user-id", "X-USER-ID", "x-CAFE", "Missing", "Host"):
        assert getter(Attr.HEADER, name)(req) == req.headers.get(name)
    assert getter(Attr.HEADER, "X-User-Id")(req) == "u1"  # the first value
    assert getter(Attr.HEADER, "X-Cafe")(req) == "cr\xe8me"
    assert getter(Attr.HEADER, "Missing")(req) is None
    # Any other view goes through its headers mapping.
    static = StaticRequest.build([("X-User-Id", "s1")])
    assert getter(Attr.HEADER, "x-user-id")(static) == static.headers.get("x-user-id") == "s1"


async def test_credential_names_follow_the_runtime_swap() -> None:
    from proxy.dataplane.client import DataPlane
    from proxy.runtime import Runtime

    def runtime(header: str) -> Runtime:
        return Runtime(parse_config(textwrap.dedent(
            f"""
            pools:
              p:
                servers: ["http://127.0.0.1:9"]
                auth: [{{header: {header}, value: "${{TOKEN}}"}}]
            routes:
              - name: r
                rings: [{{name: a, pool: p}}]
            """
        ), environ={"TOKEN": "secret"}))

    first, second = runtime("X_Api_Key"), runtime("Authorization")
    plane = DataPlane(first, None)
    assert plane.credential_names == frozenset({b"x-api-key"})
    plane.runtime = second  # the reload's swap
    assert plane.runtime is second
    assert plane.credential_names == frozenset({b"authorization"})
    plane.timers.close()
