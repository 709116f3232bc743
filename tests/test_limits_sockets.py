"""Limits and timeouts of client connections (``limits:``, route ``max_body``) on real sockets.

Small configured limits keep these fast: a 1 s head timeout, half-second idle timeouts,
a 1 KiB request line, a 4 KiB head, 10 header fields, 20 connections.  Timings are checked
with wide margins (a close is "at the timeout" anywhere from 60 % of it to 3 s after it);
they only tell a timer that fires from one that never does, or fires at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

import pytest

from proxy.server import Proxy
from tests.conftest import ProxyFactory
from tests.test_framing_sockets import (
    ANSWER_WAIT,
    OK_BODY,
    RawUpstream,
    Reply,
    StartUpstream,
    assert_rejected,
    close_writer,
    exchange,
    host_port,
    proxy_config,
    read_response,
    read_until_close,
    upstream,
)

__all__ = ["upstream"]  # the fixture, imported to be used here

GET = b"GET /normal HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
SMALL = {"max_request_line": "1KiB", "max_head_size": "4KiB", "max_headers": 10}
SLACK = 3.0  # how late after its timeout a close may come


def assert_timed(seconds: float, timeout: float) -> None:
    assert 0.6 * timeout <= seconds <= timeout + SLACK, f"closed after {seconds:.2f}s"


async def served(url: str, request: bytes = GET, within: float = 2.0) -> Reply:
    """A normal request, answered within ``within`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reply = await exchange(url, request, wait=within)
    assert reply.status == 200, reply.data[:300]
    assert reply.body == OK_BODY
    assert loop.time() - start < within
    return reply


# --------------------------------------------------------------------------- sizes


async def test_long_request_line_is_414(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits=SMALL))
    reply = await exchange(proxy.url, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert_rejected(reply, 414)
    assert up.connections == []


async def test_long_request_line_is_414_before_the_line_ends(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """A request line that never ends is cut once it passes the limit, not at the timeout."""
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits={**SMALL, "head_timeout": "30s"}))
    reply = await exchange(proxy.url, b"GET /" + b"a" * 3000)
    assert_rejected(reply, 414)
    assert reply.seconds < 2.0


async def test_big_request_head_is_431(make_proxy: ProxyFactory, upstream: StartUpstream) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits=SMALL))
    headers = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 900) for i in range(6))  # ~5.5 KiB
    reply = await exchange(proxy.url, b"GET / HTTP/1.1\r\nHost: a.test\r\n" + headers + b"\r\n")
    assert_rejected(reply, 431)
    assert up.connections == []


async def test_big_request_head_is_431_before_the_head_ends(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Headers that keep coming are cut once the head passes the limit (memory stays bounded)."""
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits={**SMALL, "head_timeout": "30s"}))
    reply = await exchange(proxy.url, b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"v" * 8000)
    assert_rejected(reply, 431)
    assert reply.seconds < 2.0


async def test_too_many_header_fields_is_431(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits=SMALL))
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(10))  # with Host: 11 fields
    reply = await exchange(proxy.url, b"GET / HTTP/1.1\r\nHost: a.test\r\n" + headers + b"\r\n")
    assert_rejected(reply, 431)
    assert up.connections == []


async def test_heads_within_the_limits_are_served(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits=SMALL))
    long_line = b"GET /" + b"a" * 700 + b" HTTP/1.1\r\n"
    await served(proxy.url, long_line + b"Host: a.test\r\nConnection: close\r\n\r\n")
    # Exactly max_headers fields: Host, Connection and 8 more.
    eight = b"".join(b"X-H%d: v\r\n" % i for i in range(8))
    await served(proxy.url, b"GET /ten HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n"
                 + eight + b"\r\n")
    # A head of about 3 KiB (under 4 KiB).
    big = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 900) for i in range(3))
    await served(proxy.url, b"GET /big HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n"
                 + big + b"\r\n")
    targets = [r.target for r in up.requests]
    assert targets[1:] == ["/ten", "/big"]
    assert up.requests[2].header("X-Big-2") == "v" * 900


async def test_oversized_head_logs_one_quiet_line(
    make_proxy: ProxyFactory, upstream: StartUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    up = await upstream()
    proxy: Proxy = await make_proxy(proxy_config(up.url, limits=SMALL))
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    secret = b"s3cr3t-" + b"k" * 5000
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\nAuthorization: Bearer " + secret + b"\r\n\r\n"
    reply = await exchange(proxy.url, head)
    assert_rejected(reply, 431)
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO
    assert "127.0.0.1" in records[0].getMessage()
    assert records[0].exc_info is None
    assert "s3cr3t" not in caplog.text and "Bearer" not in caplog.text


async def test_a_flood_of_bad_requests_logs_a_budget_of_lines_and_says_how_many_it_left_out(
    make_proxy: ProxyFactory, upstream: StartUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """60 rejected requests at once: at most the log budget's burst (20, then 2 a second)
    at info; the next line written says how many were not; every one is still answered."""
    up = await upstream()
    proxy: Proxy = await make_proxy(proxy_config(up.url, limits=SMALL))
    caplog.set_level(logging.INFO)
    caplog.clear()
    bad = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + b"k" * 5000 + b"\r\n\r\n"
    replies = await asyncio.gather(*(exchange(proxy.url, bad) for _ in range(60)))
    for reply in replies:
        assert_rejected(reply, 431)
    lines = [r.getMessage() for r in caplog.records if "rejected a request" in r.getMessage()]
    assert 20 <= len(lines) < 30, len(lines)  # the burst, and at most a few seconds' 2/s
    assert all("not logged" not in line for line in lines[:20])
    await asyncio.sleep(0.6)  # a token again
    assert_rejected(await exchange(proxy.url, bad), 431)
    last = [r.getMessage() for r in caplog.records if "rejected a request" in r.getMessage()][-1]
    assert re.search(r"\((\d+) more rejected before this one, not logged\)$", last), last
    dropped = int(re.search(r"\((\d+) more", last).group(1))  # type: ignore[union-attr]
    logged = len(lines) + 1
    assert logged + dropped == 61, (logged, dropped)


# --------------------------------------------------------------------------- max_body


async def test_content_length_over_max_body_is_413_before_the_body_is_sent(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, route={"max_body": 100}))
    # Only the head: the answer must not wait for a body it will refuse.
    reply = await exchange(
        proxy.url, b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 101\r\n\r\n"
    )
    assert_rejected(reply, 413)
    assert up.connections == []


async def test_expect_100_continue_over_max_body_gets_413_and_no_100(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, route={"max_body": "1KiB"}))
    reply = await exchange(
        proxy.url,
        b"PUT /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1048576\r\n"
        b"Expect: 100-continue\r\n\r\n",
    )
    assert not reply.data.startswith(b"HTTP/1.1 100")
    assert_rejected(reply, 413)
    assert up.connections == []


async def test_chunked_body_over_max_body_is_413_and_closed(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, route={"max_body": 100}))
    reply = await exchange(
        proxy.url,
        b"POST /up HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3c\r\n" + b"x" * 60 + b"\r\n" + b"3c\r\n" + b"y" * 60 + b"\r\n",
        # no final chunk: the proxy must answer as soon as the body goes over
    )
    assert_rejected(reply, 413)
    assert up.connections == []


async def stream_past_max_body(url: str, up: RawUpstream, head: bytes = b"") -> None:
    """Stream a chunked body (head lines ``head`` added) whose first 60 bytes are within a
    max_body of 100 and whose next 60 are not: a 413 and a close, the upstream connection
    closed too, and the bytes past the limit never forwarded."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        writer.write(b"POST /up HTTP/1.1\r\nHost: a.test\r\n" + head
                     + b"Transfer-Encoding: chunked\r\n\r\n" + b"3c\r\n" + b"x" * 60 + b"\r\n")
        await writer.drain()
        await asyncio.wait_for(up.connected.wait(), ANSWER_WAIT)
        conn = up.connections[0]
        await asyncio.wait_for(conn.head_seen.wait(), ANSWER_WAIT)
        writer.write(b"3c\r\n" + b"y" * 60 + b"\r\n")
        await writer.drain()
        data, closed = await read_until_close(reader, ANSWER_WAIT)
    finally:
        await close_writer(writer)
    assert_rejected(Reply(data, closed), 413)
    await asyncio.wait_for(conn.closed.wait(), ANSWER_WAIT)
    assert conn.requests == []
    assert b"y" * 60 not in up.received


async def test_streamed_chunked_body_over_max_body_closes_the_upstream_too(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(
        proxy_config(up.url, route={"max_body": 100}, limits={"request_buffer": 0})
    )
    await stream_past_max_body(proxy.url, up)


async def test_bodies_of_exactly_max_body_are_served(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, route={"max_body": 100}))
    await served(proxy.url, b"POST /cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n"
                 b"Connection: close\r\n\r\n" + b"a" * 100)
    await served(proxy.url, b"POST /chunked HTTP/1.1\r\nHost: a.test\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                 + b"32\r\n" + b"b" * 50 + b"\r\n32\r\n" + b"c" * 50 + b"\r\n0\r\n\r\n")
    by_target = {r.target: r.body for r in up.requests}
    assert by_target == {"/cl": b"a" * 100, "/chunked": b"b" * 50 + b"c" * 50}


# --------------------------------------------------------------------------- timeouts


async def test_slow_head_is_cut_at_the_head_timeout_while_others_are_served(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits={"head_timeout": "2s"}))
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    opened = loop.time()
    done = asyncio.Event()

    async def drip() -> None:
        # A header line every 200 ms: each byte is "progress", the head never completes.
        writer.write(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n")
        for i in range(100):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.2)
            if done.is_set() or writer.is_closing():
                return
            writer.write(b"X-Drip-%d: 1\r\n" % i)

    dripping = asyncio.ensure_future(drip())
    try:
        # Meanwhile a normal client is served at once (well before the slow head's cut).
        await served(proxy.url, within=1.5)
        data, closed = await read_until_close(reader, 2.0 + SLACK)
        elapsed = loop.time() - opened
    finally:
        done.set()
        with contextlib.suppress(ConnectionError):
            await dripping
        await close_writer(writer)
    assert_rejected(Reply(data, closed), 408)
    assert_timed(elapsed, 2.0)
    assert [r.target for r in up.requests] == ["/normal"]


async def test_silent_connection_is_closed_at_the_head_timeout_without_an_answer(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits={"head_timeout": "1s"}))
    reply = await exchange(proxy.url, wait=1.0 + SLACK)
    assert reply.closed
    assert reply.data == b""
    assert_timed(reply.seconds, 1.0)


async def test_idle_keepalive_connection_is_closed_at_the_keepalive_timeout(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    limits = {"head_timeout": "10s", "keepalive_timeout": "500ms"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n")
        first = await read_response(reader)
        assert first.status == 200
        answered = loop.time()
        data, closed = await read_until_close(reader, 0.5 + SLACK)
        elapsed = loop.time() - answered
    finally:
        await close_writer(writer)
    assert closed and data == b""
    assert_timed(elapsed, 0.5)  # well before the 10 s head timeout


async def test_partial_head_after_a_keepalive_answer_is_408_at_the_head_timeout(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Once a byte of the next head came, the head timeout runs, not the keep-alive one."""
    up = await upstream()
    limits = {"head_timeout": "1s", "keepalive_timeout": "30s"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n")
        first = await read_response(reader)
        assert first.status == 200
        writer.write(b"GET /second HTTP/1.1\r\nHost: a.te")
        await writer.drain()
        sent = loop.time()
        data, closed = await read_until_close(reader, 1.0 + SLACK)
        elapsed = loop.time() - sent
    finally:
        await close_writer(writer)
    assert_rejected(Reply(data, closed), 408)
    assert elapsed <= 1.0 + SLACK
    assert [r.target for r in up.requests] == ["/first"]


async def test_keepalive_connection_in_use_is_not_closed_early(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Requests every 200 ms for over 2 s on one connection: the 2 s idle timer restarts.
    (Each gap is a tenth of the timeout: a stall of a second or more still keeps it open.)"""
    up = await upstream()
    limits = {"head_timeout": "10s", "keepalive_timeout": "2s"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        for i in range(12):
            writer.write(b"GET /k%d HTTP/1.1\r\nHost: a.test\r\n\r\n" % i)
            response = await read_response(reader)
            assert response.status == 200
            await asyncio.sleep(0.2)
    finally:
        await close_writer(writer)
    assert len(up.requests) == 12


async def test_stalled_body_is_408_at_the_body_timeout(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    limits = {"head_timeout": "10s", "body_timeout": "500ms"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    reply = await exchange(
        proxy.url,
        b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
        wait=0.5 + SLACK,
    )
    assert_rejected(reply, 408)
    assert_timed(reply.seconds, 0.5)
    assert up.connections == []  # a body under request_buffer never took an upstream


async def test_stalled_streamed_body_is_408_and_closes_the_upstream(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    limits = {"head_timeout": "10s", "body_timeout": "500ms", "request_buffer": "1KiB"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        # A body over request_buffer streams: the upstream gets the head at once.
        writer.write(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 8192\r\n\r\n"
                     + b"x" * 2048)
        await writer.drain()
        sent = loop.time()
        await asyncio.wait_for(up.connected.wait(), ANSWER_WAIT)
        conn = up.connections[0]
        await asyncio.wait_for(conn.head_seen.wait(), ANSWER_WAIT)
        data, closed = await read_until_close(reader, 0.5 + SLACK)
        elapsed = loop.time() - sent
    finally:
        await close_writer(writer)
    assert_rejected(Reply(data, closed), 408)
    assert_timed(elapsed, 0.5)
    await asyncio.wait_for(conn.closed.wait(), ANSWER_WAIT)
    assert conn.requests == []


async def test_trickling_body_is_served_while_each_read_comes_in_time(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """body_timeout is the silence between reads, not the body's whole duration.
    (Each gap is a tenth of the timeout: a stall of a second or more still keeps it going.)"""
    up = await upstream()
    limits = {"head_timeout": "10s", "body_timeout": "2s"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(b"POST /trickle HTTP/1.1\r\nHost: a.test\r\nContent-Length: 12\r\n\r\n")
        for _ in range(12):  # 12 bytes over ~2.4 s, 200 ms apart
            await asyncio.sleep(0.2)
            writer.write(b"t")
        response = await read_response(reader)
    finally:
        await close_writer(writer)
    assert response.status == 200
    assert [r.body for r in up.requests] == [b"t" * 12]


# --------------------------------------------------------------------------- connections


async def test_connection_flood_does_not_stop_healthz_nor_later_requests(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    limits = {"max_connections": 20, "head_timeout": "10s"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(40):
            flood.append(await asyncio.open_connection(*host_port(proxy.url)))
        # Those over the cap are closed at once, without an answer.
        results = await asyncio.gather(*(read_until_close(r, 1.0) for r, _ in flood))
        refused = [data for data, closed in results if closed]
        assert len(refused) >= 20, f"only {len(refused)} of 40 closed at the cap of 20"
        assert all(data == b"" for data in refused)
        # The admin listener is not the proxy port's: /healthz answers during the flood.
        health = await exchange(
            proxy.admin_url, b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )
        assert health.status == 200, health.data[:300]
        # The proxy port itself is full: a new client is closed at once.
        full = await exchange(proxy.url, GET, wait=3.0)
        assert full.closed and full.status is None
    finally:
        for _, writer in flood:
            await close_writer(writer)
    # The flood is gone: the cap is free again (its closes are seen within moments).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    while True:
        reply = await exchange(proxy.url, GET, wait=2.0)
        if reply.status == 200 or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert reply.status == 200, reply.data[:300]
    assert reply.body == OK_BODY


async def test_flood_of_silent_connections_times_out_and_frees_the_cap(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    limits = {"max_connections": 20, "head_timeout": "1s"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(20):
            flood.append(await asyncio.open_connection(*host_port(proxy.url)))
        # Held open by us, closed by the proxy at its head timeout.
        results = await asyncio.gather(*(read_until_close(r, 1.0 + SLACK) for r, _ in flood))
        assert all(closed for _, closed in results)
        await served(proxy.url)
    finally:
        for _, writer in flood:
            await close_writer(writer)


async def test_slow_uploads_do_not_take_upstream_connections(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Bodies below request_buffer are read whole first: five slow uploads, a pool of two
    connections, and a normal request is still served at once."""
    up = await upstream()
    limits = {"head_timeout": "10s", "body_timeout": "10s"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits, pool={"max_connections": 2}))
    uploads: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for i in range(5):
            reader, writer = await asyncio.open_connection(*host_port(proxy.url))
            uploads.append((reader, writer))
            writer.write(b"POST /up%d HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000\r\n\r\n" % i
                         + b"u" * 100)
            await writer.drain()
        # Nothing observable is meant to happen now (no upstream connection may open), so
        # there is no event to wait for: give the proxy a moment to read the heads.
        await asyncio.sleep(0.3)
        assert b"/up" not in up.received
        await served(proxy.url, within=1.0)
        # One upload finishes: the whole body goes upstream, and it is answered.
        reader, writer = uploads[0]
        writer.write(b"u" * 900)
        response = await read_response(reader)
        assert response.status == 200
    finally:
        for _, writer in uploads:
            await close_writer(writer)
    bodies = {r.target: r.body for r in up.requests}
    assert bodies == {"/normal": b"", "/up0": b"u" * 1000}
    assert len(up.connections) <= 2
