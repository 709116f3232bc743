"""The data plane's exchanges over real sockets: pipelining, re-framing, the pool's limit,
graceful shutdown."""

from __future__ import annotations

import asyncio
import socket
import textwrap

import aiohttp

from proxy.dataplane.client import MAX_PIPELINED
from proxy.server import Proxy
from tests.conftest import ProxyFactory, Upstream, raw_exchange, raw_upstream
from tests.test_rollback_sockets import wait_for


def _config(upstream: str, pool: str = "", grace: str = "2s") -> str:
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        shutdown_grace: {grace}
        pools:
          p: {{servers: ["{upstream}"]{pool}}}
        routes:
          - name: r
            rings:
              - name: only
                pool: p
        """
    )


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def test_pipelined_requests_are_answered_in_order(
    make_proxy: ProxyFactory, stable: Upstream
) -> None:
    proxy = await make_proxy(_config(stable.url))
    raw = await raw_exchange(
        proxy.url,
        b"GET /slow?s=0.2 HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /first-fast HTTP/1.1\r\nHost: h\r\n\r\n"
        b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 200") == 3
    slow, fast, last = (raw.index(x) for x in (b"slow done", b"/first-fast", b"/last"))
    assert slow < fast < last


async def test_a_flood_of_pipelined_requests_is_bounded_per_connection(
    make_proxy: ProxyFactory, stable: Upstream
) -> None:
    """One write of 200 pipelined requests: the one being answered and MAX_PIPELINED
    queued behind it are served in order, the next is answered 429 and the connection
    closes (llhttp parses a whole read: without the bound all 200 would be queued)."""
    proxy = await make_proxy(_config(stable.url))
    raw = await raw_exchange(
        proxy.url,
        b"GET /slow?s=0.3 HTTP/1.1\r\nHost: h\r\n\r\n"
        + b"".join(b"GET /n%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(199)),
        wait=5,
    )
    assert raw.count(b"HTTP/1.1 200") == 1 + MAX_PIPELINED
    assert raw.count(b"HTTP/1.1 429") == 1 and raw.count(b"HTTP/1.1 ") == 2 + MAX_PIPELINED
    assert raw.index(b"/n%d" % (MAX_PIPELINED - 1)) < raw.index(b"HTTP/1.1 429")
    assert b"/n%d" % MAX_PIPELINED not in raw


def _ring_config(upstream: str, policy: str, pool: str = "") -> str:
    return _config(upstream, pool).replace(
        "pool: p\n", f"pool: p\n        policy: {{{policy}}}\n")


async def test_a_client_that_stops_reading_is_cut_at_the_ring_idle_timeout_and_not_judged(
    make_proxy: ProxyFactory, stable: Upstream
) -> None:
    """Three clients ask for 64 MB and read nothing: each is cut after the ring's idle
    timeout of silence (as NGINX's send_timeout), freeing its upstream connection and the
    ring's in-flight count; the client's doing is never judged against the version."""
    proxy = await make_proxy(_ring_config(stable.url, "idle_timeout: 500ms"))
    pool = proxy.runtime.pools["p"]
    ring = proxy.runtime.rings["r"][0]
    loop = asyncio.get_running_loop()
    host, port = _host_port(proxy.url)
    socks = []
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        await loop.sock_connect(s, (host, port))
        await loop.sock_sendall(s, b"GET /bytes/64000000 HTTP/1.1\r\nHost: h\r\n\r\n")
        socks.append(s)
    try:
        async with asyncio.timeout(10):
            while ring.inflight < 3:  # noqa: ASYNC110 - a poll of the proxy's counters
                await asyncio.sleep(0.02)
            while ring.inflight or pool.open:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        for s in socks:
            s.close()
    tally = proxy.metrics.tally("r", "only")
    assert (tally.requests, tally.errors) == (0, 0)  # not judged
    assert all(server.failures == 0 for server in pool.servers)


async def test_a_client_reading_slowly_but_steadily_is_not_cut(
    make_proxy: ProxyFactory, stable: Upstream
) -> None:
    """A client reads a 4 MB download at about 20 KiB/s for 3 s, then at full speed: the
    proxy's write buffer takes longer than the idle timeout (1s) to drain from its high
    to its low water mark, but the client never stops reading, so it is not cut (the wait
    restarts on progress: NGINX's send_timeout is per write, not per response)."""
    proxy = await make_proxy(_ring_config(stable.url, "idle_timeout: 1s"))
    loop = asyncio.get_running_loop()
    host, port = _host_port(proxy.url)
    size = 4_000_000
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, (host, port))
        await loop.sock_sendall(s, b"GET /bytes/%d HTTP/1.1\r\nHost: h\r\n\r\n" % size)
        got = bytearray()
        started = loop.time()
        async with asyncio.timeout(30):
            while b"\r\n\r\n" not in got or len(got) - got.index(b"\r\n\r\n") - 4 < size:
                slow = loop.time() - started < 3.0
                chunk = await loop.sock_recv(s, 1024 if slow else 1 << 16)
                assert chunk, f"cut after {len(got)} bytes, {loop.time() - started:.1f}s"
                got += chunk
                if slow:
                    await asyncio.sleep(0.05)
    finally:
        s.close()
    assert got.startswith(b"HTTP/1.1 200 "), bytes(got[:200])
    tally = proxy.metrics.tally("r", "only")
    assert (tally.requests, tally.errors) == (1, 0)


async def test_a_request_waiting_for_a_full_pool_gets_503_after_the_connect_timeout(
    make_proxy: ProxyFactory, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    """Every connection of the pool is busy (two requests that hang): a third waits at
    most the pool's connect_timeout, then 503 with Retry-After, blaming no server."""
    proxy = await make_proxy(_ring_config(
        stable.url, "timeout: 30s", ", max_connections: 2, connect_timeout: 300ms"))
    hanging = [asyncio.ensure_future(client.get(proxy.url + "/hang")) for _ in range(2)]
    pool = proxy.runtime.pools["p"]
    try:
        async with asyncio.timeout(5):
            while pool.open < 2:  # noqa: ASYNC110 - a poll of the pool's count
                await asyncio.sleep(0.02)
        started = asyncio.get_running_loop().time()
        async with client.get(proxy.url + "/fast") as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert "no free upstream connection" in await r.text()
        assert asyncio.get_running_loop().time() - started < 3
        assert all(server.failures == 0 for server in pool.servers)
        assert proxy.metrics.tally("r", "only").errors == 0  # the proxy's refusal
    finally:
        for task in hanging:
            task.cancel()
        await asyncio.gather(*hanging, return_exceptions=True)


async def test_a_close_delimited_upstream_body_is_chunked_for_http_11_and_not_for_10(
    make_proxy: ProxyFactory,
) -> None:
    server, url = await raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                                      b"no length, the close ends it")
    async with server:
        proxy = await make_proxy(_config(url))
        raw = await raw_exchange(proxy.url, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", wait=2)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        assert body == b"1c\r\nno length, the close ends it\r\n0\r\n\r\n"
        raw = await raw_exchange(proxy.url, b"GET / HTTP/1.0\r\nHost: h\r\n\r\n", wait=2)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower() and b"Connection: close" in head
        assert body == b"no length, the close ends it"


async def test_a_full_pool_queues_requests_until_a_connection_is_free(
    make_proxy: ProxyFactory, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(_config(stable.url, ", max_connections: 1"))

    async def get(path: str) -> int:
        async with client.get(proxy.url + path) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(get(f"/slow?s=0.1&i={i}") for i in range(4)))
    assert statuses == [200] * 4
    pool = proxy.runtime.pools["p"]
    assert pool.open == 1


async def test_shutdown_closes_idle_connections_and_lets_requests_in_flight_finish(
    make_proxy: ProxyFactory, stable: Upstream
) -> None:
    # The grace outlasts the request in flight (3 s): it finishes, it is not cut.
    proxy: Proxy = await make_proxy(_config(stable.url, grace="8s"))
    ring = proxy.runtime.rings["r"][0]
    idle_reader, idle_writer = await asyncio.open_connection(*_host_port(proxy.url))
    idle_writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    await asyncio.wait_for(idle_reader.readuntil(b"\r\n\r\n"), 5)  # served: now idle
    busy_reader, busy_writer = await asyncio.open_connection(*_host_port(proxy.url))
    busy_writer.write(b"GET /slow?s=3 HTTP/1.1\r\nHost: h\r\n\r\n")
    await wait_for(lambda: any(r["target"] == "/slow?s=3" for r in stable.requests), 5)
    stopping = asyncio.ensure_future(proxy.stop())
    rest = await asyncio.wait_for(idle_reader.read(), 5)
    assert b"HTTP/1.1" not in rest
    assert ring.inflight == 1  # closed at once: not after the request in flight
    answer = await asyncio.wait_for(busy_reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"slow done")
    assert b"Connection: close" in answer
    await asyncio.wait_for(stopping, 5)
    for writer in (idle_writer, busy_writer):
        writer.close()


async def test_idle_pooled_connections_close_after_keepalive_timeout(
    make_proxy: ProxyFactory, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    # 1s: a stall of this process between the answer and the first look must not outlast it.
    proxy = await make_proxy(_config(stable.url, ", keepalive_timeout: 1s"))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200
    pool = proxy.runtime.pools["p"]
    assert (pool.open, pool.idle_connections()) == (1, 1)
    await wait_for(lambda: pool.open == 0, 5)
    assert (pool.open, pool.idle_connections()) == (0, 0)
    async with client.get(proxy.url + "/y") as r:  # a new one is opened
        assert r.status == 200


def _responses(raw: bytes) -> list[bytes]:
    """The response heads in ``raw`` (each up to its blank line), in order."""
    heads = []
    at = raw.find(b"HTTP/1.1 ")
    while at >= 0:
        end = raw.index(b"\r\n\r\n", at)
        heads.append(raw[at:end])
        at = raw.find(b"HTTP/1.1 ", end)
    return heads


async def test_each_pipelined_request_keeps_its_own_http_version(
    make_proxy: ProxyFactory, stable: Upstream
) -> None:
    """The proxy reads a request's version from its request line when the read begins with
    it (data plane: _version_11), else from the parser: whichever way, an HTTP/1.0
    request keeps HTTP/1.0's answer (``Connection: keep-alive`` when it asked to be kept)
    and an HTTP/1.1 one does not, in any order in one write, and in a head split between
    reads."""
    proxy = await make_proxy(_config(stable.url))
    one_zero = b"GET /ten HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
    one_one = b"GET /eleven HTTP/1.1\r\nHost: h\r\n\r\n"
    last = b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    for order in ([one_zero, one_one], [one_one, one_zero], [one_zero, one_zero]):
        heads = _responses(await raw_exchange(proxy.url, b"".join([*order, last])))
        assert len(heads) == 3, heads
        for sent, head in zip(order, heads, strict=False):
            assert head.startswith(b"HTTP/1.1 200"), head
            assert (b"\r\nConnection: keep-alive" in head) == (b"HTTP/1.0" in sent), (sent, head)
    # A target that is a prefix of the version's look-alike, and a head split mid-version.
    host, port = _host_port(proxy.url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /a HTTP/1.")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n" + last)
        data = b""
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                data += chunk
    finally:
        writer.close()
    first, second = _responses(data)
    assert b"\r\nConnection: keep-alive" in first and b"keep-alive" not in second
    seen = [r["target"] for r in stable.requests]
    assert seen.count("/ten") == 4 and seen.count("/eleven") == 2 and "/a" in seen
