"""Strict request and response framing (RFC 9112) on real sockets, byte by byte.

Every request is written with a raw socket, so the test controls each byte; the upstream is
a raw asyncio server that records the bytes it got, so "the upstream received nothing" is a
fact, not an inference.  Rejected requests get 400 and a close; a body that turns malformed
after its head was forwarded closes the upstream connection too.  From the upstream: a 101
nobody asked for, broken framing, or an oversized head is a 502 and that upstream connection
is closed, never reused.

The helpers here (``RawUpstream``, ``exchange``, ``read_response``, ``proxy_config``) are
shared with ``test_limits_sockets.py`` and ``test_tls_sockets.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest
import uvloop

from proxy.config import parse_config
from proxy.server import Proxy
from tests.conftest import ProxyFactory

# Generous: a correct proxy answers in milliseconds; these only bound a wrong one.
ANSWER_WAIT = 3.0
OK_BODY = b"upstream ok"
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\n" + OK_BODY


# --------------------------------------------------------------------------- raw upstream


@dataclass
class Received:
    """One complete request as the upstream parsed it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header_names(self) -> set[str]:
        return {name.lower() for name, _ in self.headers}

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class _RequestRecorder:
    """httptools callbacks: collects the requests of one upstream connection."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.parser: httptools.HttpRequestParser | None = None

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.conn.heads += 1
        self.conn.head_seen.set()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.parser is not None
        method = self.parser.get_method().decode()
        self.conn.requests.append(
            Received(method, self.url.decode("latin-1"), self.headers, bytes(self.body))
        )
        self.conn.complete.release()


@dataclass
class UpstreamConnection:
    """One connection the proxy opened to the raw upstream."""

    index: int
    data: bytearray = field(default_factory=bytearray)
    requests: list[Received] = field(default_factory=list)
    heads: int = 0
    head_seen: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # EOF or reset from the proxy
    complete: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    parse_error: str | None = None


# answer(connection, request, writer): write the response (or nothing, to hang).
Answer = Callable[[UpstreamConnection, Received, asyncio.StreamWriter], Awaitable[None]]


async def answer_ok(
    conn: UpstreamConnection, request: Received, writer: asyncio.StreamWriter
) -> None:
    writer.write(OK_RESPONSE)


def answer_bytes(*parts: bytes) -> Answer:
    """An answer that writes fixed bytes (each part flushed on its own)."""

    async def answer(
        conn: UpstreamConnection, request: Received, writer: asyncio.StreamWriter
    ) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()

    return answer


class RawUpstream:
    """An upstream on 127.0.0.1 that records every byte it gets, per connection.

    Requests are parsed with httptools only to know when to answer; what the proxy sent is
    in ``connections[i].data`` exactly.  ``answer`` writes each response; by default a
    200 with a Content-Length, keeping the connection open.
    """

    def __init__(self, answer: Answer = answer_ok) -> None:
        self.answer = answer
        self.url = ""
        self.connections: list[UpstreamConnection] = []
        self.connected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.data) for c in self.connections)

    @property
    def requests(self) -> list[Received]:
        return [r for c in self.connections for r in c.requests]

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        conn = UpstreamConnection(len(self.connections))
        self.connections.append(conn)
        self.connected.set()
        recorder = _RequestRecorder(conn)
        parser = httptools.HttpRequestParser(recorder)
        recorder.parser = parser
        answered = 0
        try:
            while data := await reader.read(65536):
                conn.data += data
                if conn.parse_error is None:
                    try:
                        parser.feed_data(data)
                    except httptools.HttpParserError as exc:
                        conn.parse_error = str(exc)
                while answered < len(conn.requests):
                    await self.answer(conn, conn.requests[answered], writer)
                    answered += 1
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            conn.closed.set()
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


StartUpstream = Callable[..., Awaitable[RawUpstream]]


@pytest.fixture
async def upstream() -> AsyncIterator[StartUpstream]:
    """Start raw upstreams (``await upstream(answer)``); all stopped after the test."""
    started: list[RawUpstream] = []

    async def start(answer: Answer = answer_ok) -> RawUpstream:
        up = RawUpstream(answer)
        await up.start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


# --------------------------------------------------------------------------- config


def proxy_config(
    upstream_url: str,
    limits: Mapping[str, object] | None = None,
    route: Mapping[str, object] | None = None,
    pool: Mapping[str, object] | None = None,
    top: str = "",
    access_log: str | None = None,
) -> str:
    """One route, one ring, one pool on ``upstream_url``; ``limits``, extra ``route`` and
    ``pool`` keys as mappings of YAML scalars; ``top``: more top-level YAML; the access
    log off, or to the file ``access_log``."""
    log = "{enabled: false}" if access_log is None else f'{{enabled: true, path: "{access_log}"}}'
    lines = [
        "listen: 127.0.0.1:0",
        "admin: {listen: 127.0.0.1:0}",
        f"access_log: {log}",
        "shutdown_grace: 1s",
        "pools:",
        "  app:",
        f'    servers: ["{upstream_url}"]',
        *(f"    {key}: {_yaml_scalar(value)}" for key, value in (pool or {}).items()),
        "routes:",
        "  - name: api",
        *(f"    {key}: {_yaml_scalar(value)}" for key, value in (route or {}).items()),
        "    rings:",
        "      - name: stable",
        "        pool: app",
    ]
    if limits:
        lines.append("limits:")
        lines += (f"  {key}: {_yaml_scalar(value)}" for key, value in limits.items())
    return "\n".join(lines) + "\n" + textwrap.dedent(top)


def _yaml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --------------------------------------------------------------------------- client side


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


@dataclass
class Reply:
    """What the proxy sent on one connection, and whether it closed it."""

    data: bytes
    closed: bool  # EOF (or reset) from the proxy before we stopped waiting
    seconds: float = 0.0  # from the end of our writing to the close (or to giving up)

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/1."):
            return None
        try:
            return int(self.data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None

    @property
    def head(self) -> str:
        """The response head, lower-cased (for header checks)."""
        return self.data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""


async def read_until_close(reader: asyncio.StreamReader, wait: float) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    closed = False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            try:
                while data := await reader.read(65536):
                    chunks.append(data)
            except ConnectionError:
                pass
            closed = True
    return b"".join(chunks), closed


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


async def exchange(url: str, *parts: bytes, wait: float = ANSWER_WAIT) -> Reply:
    """Write ``parts`` on a new connection, read until the proxy closes it (or ``wait``)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
        start = loop.time()
        data, closed = await read_until_close(reader, wait)
        return Reply(data, closed, loop.time() - start)
    finally:
        await close_writer(writer)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class _ResponseRecorder:
    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def read_response(reader: asyncio.StreamReader, wait: float = ANSWER_WAIT) -> Response:
    """One response to a request that was not HEAD (the connection stays usable: the tests
    never have a second request outstanding, so no bytes of a next response are read)."""
    recorder = _ResponseRecorder()
    parser = httptools.HttpResponseParser(recorder)
    async with asyncio.timeout(wait):
        while not recorder.done:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed before a complete response")
            parser.feed_data(data)
    return Response(parser.get_status_code(), recorder.headers, bytes(recorder.body))


def assert_rejected(reply: Reply, status: int) -> None:
    """A local answer with ``status``, ``Connection: close`` and a short ringproxy body, then
    the connection closed."""
    assert reply.status == status, reply.data[:300]
    assert reply.closed, f"connection left open after {status}: {reply.data[:300]!r}"
    assert "connection: close" in reply.head, reply.head
    assert reply.body.startswith(b"ringproxy: "), reply.body[:200]
    assert len(reply.body) < 200


# --------------------------------------------------------------------------- requests

# Each request is malformed in its head (or in a body sent with the head, below the
# request buffer): 400, the connection closed, and the upstream never contacted.
MALFORMED = {
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: b\r\n  c\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: b\r\n\tc\r\n\r\n",
    "te-and-cl": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n"
    ),
    "cl-not-a-number": b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: abc\r\n\r\n",
    "cl-negative": b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: -1\r\n\r\n",
    "cl-plus-sign": b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +3\r\n\r\nabc",
    "cl-overflow": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 184467440737095516160\r\n\r\n"
    ),
    "cl-duplicate-differing": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    ),
    "cl-list-differing": b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3, 4\r\n\r\nabcd",
    "chunk-size-not-hex": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n"
    ),
    "chunk-size-overflow": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n"
    ),
    "chunk-size-0x-prefix": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0x3\r\nabc\r\n0\r\n\r\n"
    ),
    "chunk-extension-space-in-name": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;a b\r\nabc\r\n0\r\n\r\n"
    ),
    "chunk-extension-control-char": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;\x01\r\nabc\r\n0\r\n\r\n"
    ),
    "chunk-extension-unterminated-quote": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3;a="x\r\nabc\r\n0\r\n\r\n'
    ),
    "chunk-data-overrun": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabcX\r\n0\r\n\r\n"
    ),
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: b\rc\r\n\r\n",
    "bare-cr-line-end": b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: b\r\r\n\r\n",
    "bare-cr-in-request-line": b"GET /\r HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: b\x00c\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\nHost: a.test\r\nX\x00A: b\r\n\r\n",
    "nul-in-target": b"GET /\x00 HTTP/1.1\r\nHost: a.test\r\n\r\n",
    "http-0.9": b"GET /\r\n",
    "http-2.0": b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n",
    "http-1.2": b"GET / HTTP/1.2\r\nHost: a.test\r\n\r\n",
    "http-3.0": b"GET / HTTP/3.0\r\nHost: a.test\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A : b\r\n\r\n",
    "transfer-encoding-chunked-not-last": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
        b"0\r\n\r\n"
    ),
    # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing (a classic
    # smuggling vector: a 1.0 hop ignores it); NGINX answers 400.
    "http-1.0-with-transfer-encoding": (
        b"POST / HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    ),
    # RFC 9112 3.2: an HTTP/1.1 request without Host, with two, or with an invalid value
    # MUST get a 400 (NGINX: "client sent invalid host header").
    "host-missing": b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n",
    "host-repeated": b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
    "host-with-space": b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_400_and_closed_and_never_reaches_the_upstream(
    make_proxy: ProxyFactory, upstream: StartUpstream, request_bytes: bytes
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url))
    reply = await exchange(proxy.url, request_bytes)
    assert_rejected(reply, 400)
    assert up.received == b""
    assert up.connections == []


async def test_malformed_request_after_a_good_one_on_the_same_connection(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Keep-alive: the first request is served, the second (malformed) is 400 and closes."""
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url))
    good = b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n"
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(good)
        first = await read_response(reader)
        assert first.status == 200 and first.body == OK_BODY
        writer.write(MALFORMED["te-and-cl"])
        data, closed = await read_until_close(reader, ANSWER_WAIT)
    finally:
        await close_writer(writer)
    assert_rejected(Reply(data, closed), 400)
    assert [r.target for r in up.requests] == ["/first"]
    assert b"Transfer-Encoding" not in up.received


async def test_pipelined_malformed_request_after_a_good_one_is_400_after_its_answer(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Both in one write: the good one is answered first, then the 400, then the close."""
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url))
    reply = await exchange(
        proxy.url, b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n" + MALFORMED["obs-fold"]
    )
    assert reply.status == 200, reply.data[:300]
    first_end = reply.data.index(OK_BODY) + len(OK_BODY)
    assert_rejected(Reply(reply.data[first_end:], reply.closed), 400)
    assert [r.target for r in up.requests] == ["/first"]


async def test_well_formed_edge_cases_are_accepted(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """What strictness must not refuse: HTTP/1.0, a valid chunk extension, same-value tokens."""
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url))
    http10 = await exchange(proxy.url, b"GET /ten HTTP/1.0\r\nHost: a.test\r\n\r\n")
    assert http10.status == 200 and http10.closed
    chunked = await exchange(
        proxy.url,
        b"POST /ext HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3;name=value\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    assert chunked.status == 200, chunked.data[:300]
    by_target = {r.target: r for r in up.requests}
    assert by_target["/ext"].body == b"abcde"
    assert "/ten" in by_target


async def test_chunked_body_with_trailers_is_served(
    make_proxy: ProxyFactory, upstream: StartUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Trailer fields after the last chunk are valid HTTP/1.1 (RFC 9112 7.1.2): the body is
    served whole (the trailers may be dropped, as NGINX does), never an internal error."""
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url))
    caplog.set_level(logging.INFO)
    caplog.clear()  # what start-up logged (an admin API without tokens warns) is not ours
    reply = await exchange(
        proxy.url,
        b"POST /trailers HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Checksum\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Checksum: 12345\r\n\r\n",
    )
    assert reply.status == 200, reply.data[:300]
    assert [r.body for r in up.requests] == [b"abcde"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_oversized_trailers_are_refused_or_dropped_never_an_internal_error(
    make_proxy: ProxyFactory, upstream: StartUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url))
    caplog.set_level(logging.INFO)
    caplog.clear()  # what start-up logged (an admin API without tokens warns) is not ours
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 1000) for i in range(200))  # ~200 KB
    reply = await exchange(
        proxy.url,
        b"POST /trailers HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n" + trailers + b"\r\n",
    )
    assert reply.status in (200, 400, 431), reply.data[:300]
    assert reply.closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_body_malformed_after_the_head_closes_client_and_upstream(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """Streaming (request_buffer 0): the head went upstream, then a bad chunk size arrives."""
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits={"request_buffer": 0}))
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(
            b"POST /stream HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        await writer.drain()
        await asyncio.wait_for(up.connected.wait(), ANSWER_WAIT)
        conn = up.connections[0]
        await asyncio.wait_for(conn.head_seen.wait(), ANSWER_WAIT)
        writer.write(b"zz\r\nmore\r\n0\r\n\r\n")
        await writer.drain()
        data, closed = await read_until_close(reader, ANSWER_WAIT)
    finally:
        await close_writer(writer)
    assert_rejected(Reply(data, closed), 400)
    await asyncio.wait_for(conn.closed.wait(), ANSWER_WAIT)
    assert conn.requests == []  # the upstream never saw a complete request
    assert b"zz" not in up.received and b"more" not in up.received


async def test_chunked_body_truncated_by_client_close_closes_the_upstream(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """The client goes away mid-body: the upstream must not wait for the rest forever."""
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits={"request_buffer": 0}))
    _, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(
            b"POST /stream HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        await writer.drain()
        await asyncio.wait_for(up.connected.wait(), ANSWER_WAIT)
        conn = up.connections[0]
        await asyncio.wait_for(conn.head_seen.wait(), ANSWER_WAIT)
    finally:
        await close_writer(writer)
    await asyncio.wait_for(conn.closed.wait(), ANSWER_WAIT)
    assert conn.requests == []


# --------------------------------------------------------------------------- underscores

UNDERSCORED = (
    b"GET /u HTTP/1.1\r\nHost: a.test\r\nX_Forwarded_For: 6.6.6.6\r\nX_Custom: one\r\n"
    b"X-Dashed: two\r\nConnection: close\r\n\r\n"
)


async def test_header_names_with_underscores_are_dropped_by_default(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url))
    reply = await exchange(proxy.url, UNDERSCORED)
    assert reply.status == 200, reply.data[:300]
    (seen,) = up.requests
    assert "x_forwarded_for" not in seen.header_names()
    assert "x_custom" not in seen.header_names()
    assert b"6.6.6.6" not in up.received and b"X_Custom" not in up.received
    assert seen.header("X-Dashed") == "two"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"


async def test_header_names_with_underscores_are_forwarded_when_allowed(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    up = await upstream()
    proxy = await make_proxy(proxy_config(up.url, limits={"underscores_in_headers": True}))
    reply = await exchange(proxy.url, UNDERSCORED)
    assert reply.status == 200, reply.data[:300]
    (seen,) = up.requests
    assert seen.header("X_Forwarded_For") == "6.6.6.6"
    assert seen.header("X_Custom") == "one"
    assert seen.header("X-Dashed") == "two"
    # The real X-Forwarded-For is still the proxy's own, never the underscored one.
    assert seen.header("X-Forwarded-For") == "127.0.0.1"


# --------------------------------------------------------------------------- from the upstream

PLAIN_GET = b"GET /plain HTTP/1.1\r\nHost: a.test\r\n\r\n"
PLAIN_GET_CLOSE = b"GET /plain HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"


async def test_upstream_101_to_a_plain_get_is_502_and_the_connection_is_not_reused(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    async def answer(
        conn: UpstreamConnection, request: Received, writer: asyncio.StreamWriter
    ) -> None:
        if conn.index == 0:
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\nraw bytes after the switch"
            )
        else:
            writer.write(OK_RESPONSE)

    up = await upstream(answer)
    proxy = await make_proxy(proxy_config(up.url))
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(PLAIN_GET)
        first = await read_response(reader)
        assert first.status == 502
        assert b"raw bytes after the switch" not in first.body
    finally:
        await close_writer(writer)
    await asyncio.wait_for(up.connections[0].closed.wait(), ANSWER_WAIT)
    # The next request gets a fresh upstream connection and a normal answer.
    second = await exchange(
        proxy.url, b"GET /next HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    assert second.status == 200, second.data[:300]
    assert len(up.connections) == 2
    assert [r.target for r in up.connections[1].requests] == ["/next"]


BAD_RESPONSES = {
    "cl-duplicate-differing": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
    ),
    "cl-not-a-number": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
    "te-and-cl": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "status-four-digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "status-not-a-number": b"HTTP/1.1 abc\r\nContent-Length: 0\r\n\r\n",
    "not-http": b"hello, this is not HTTP\r\n\r\n",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    # Transfer codings other than chunked (NGINX: "upstream sent unknown Transfer-Encoding").
    "te-gzip-chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "te-gzip-close-delimited": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
}


@pytest.mark.parametrize("response", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
async def test_upstream_response_with_invalid_framing_is_502_and_not_reused(
    make_proxy: ProxyFactory, upstream: StartUpstream, response: bytes
) -> None:
    async def answer(
        conn: UpstreamConnection, request: Received, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(response if conn.index == 0 else OK_RESPONSE)

    up = await upstream(answer)
    proxy = await make_proxy(proxy_config(up.url))
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(PLAIN_GET)
        first = await read_response(reader)
        assert first.status == 502
        assert first.body.startswith(b"ringproxy: ")
        await asyncio.wait_for(up.connections[0].closed.wait(), ANSWER_WAIT)
        # Same client connection (a 502 of ours need not close it), new upstream connection.
        writer.write(b"GET /next HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        data, _ = await read_until_close(reader, ANSWER_WAIT)
    finally:
        await close_writer(writer)
    # The client connection may have been closed after the 502 (then the second request
    # went nowhere); if it was kept, the answer came from a new upstream connection.
    if data:
        assert Reply(data, True).status == 200, data[:300]
        assert [r.target for r in up.connections[1].requests] == ["/next"]
    assert [r.target for r in up.connections[0].requests] == ["/plain"]


async def test_upstream_body_with_a_bad_chunk_closes_both_connections(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    """The head was good, so it may already be on its way: the client gets either a 502 or
    a response cut short (no final chunk) and a close; never a complete-looking one."""
    release = asyncio.Event()

    async def answer(
        conn: UpstreamConnection, request: Received, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.wait_for(release.wait(), ANSWER_WAIT)
        writer.write(b"zz\r\nbroken\r\n0\r\n\r\n")

    up = await upstream(answer)
    proxy = await make_proxy(proxy_config(up.url))
    reader, writer = await asyncio.open_connection(*host_port(proxy.url))
    try:
        writer.write(PLAIN_GET)
        await writer.drain()
        await asyncio.wait_for(up.connected.wait(), ANSWER_WAIT)
        await asyncio.wait_for(up.connections[0].head_seen.wait(), ANSWER_WAIT)
        release.set()
        data, closed = await read_until_close(reader, ANSWER_WAIT)
    finally:
        await close_writer(writer)
    assert closed
    reply = Reply(data, closed)
    assert reply.status in (200, 502), data[:300]
    if reply.status == 200:
        assert not data.endswith(b"0\r\n\r\n")
        assert b"broken" not in data
    await asyncio.wait_for(up.connections[0].closed.wait(), ANSWER_WAIT)


FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
# (request, what the upstream answers it with: a complete response and then more bytes)
BEYOND = {
    "content-length-same-write": (b"GET", OK_RESPONSE + FORGED),
    "content-length-while-idle": (b"GET", OK_RESPONSE),  # FORGED follows 200 ms later
    "204-with-a-body": (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n" + FORGED),
    "head-answered-with-a-body": (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"),
}


@pytest.mark.parametrize("case", BEYOND.keys())
async def test_upstream_bytes_beyond_its_response_close_that_connection(
    make_proxy: ProxyFactory, upstream: StartUpstream, case: str
) -> None:
    """More bytes than the response's framing says (NGINX: "upstream sent more data than
    specified"): that connection must never carry another request, or its extra bytes
    would be taken for the next request's response (response queue poisoning)."""
    method, response = BEYOND[case]
    extra_sent = asyncio.Event()

    async def answer(
        conn: UpstreamConnection, request: Received, writer: asyncio.StreamWriter
    ) -> None:
        if conn.index == 0 and request.target == "/first":
            writer.write(response)
            if case == "content-length-while-idle":  # once it idles in the pool
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(FORGED)
            await writer.drain()
            extra_sent.set()
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood")

    up = await upstream(answer)
    proxy = await make_proxy(proxy_config(up.url))
    first = await exchange(
        proxy.url, method + b" /first HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    assert first.status in (200, 204), first.data[:300]
    assert b"forged" not in first.data
    await asyncio.wait_for(extra_sent.wait(), ANSWER_WAIT)
    await asyncio.wait_for(up.connections[0].closed.wait(), ANSWER_WAIT)
    second = await exchange(
        proxy.url, b"GET /second HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
    )
    assert second.status == 200 and second.body == b"good", second.data[:300]
    assert [r.target for r in up.connections[0].requests] == ["/first"]


async def test_oversized_upstream_response_head_is_502(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    big = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 8000 + b"\r\nContent-Length: 2\r\n\r\nok"
    up = await upstream(answer_bytes(big))
    limits = {"max_head_size": "4KiB", "max_request_line": "1KiB"}
    proxy = await make_proxy(proxy_config(up.url, limits=limits))
    reply = await exchange(proxy.url, PLAIN_GET_CLOSE)
    assert reply.status == 502, reply.data[:300]
    assert b"aaaa" not in reply.data
    await asyncio.wait_for(up.connections[0].closed.wait(), ANSWER_WAIT)


async def test_upstream_response_with_too_many_headers_is_502(
    make_proxy: ProxyFactory, upstream: StartUpstream
) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    head = b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 2\r\n\r\nok"
    up = await upstream(answer_bytes(head))
    proxy = await make_proxy(proxy_config(up.url, limits={"max_headers": 10}))
    reply = await exchange(proxy.url, PLAIN_GET_CLOSE)
    assert reply.status == 502, reply.data[:300]
    assert "x-h20" not in reply.head
    await asyncio.wait_for(up.connections[0].closed.wait(), ANSWER_WAIT)


# --------------------------------------------------------------------------- logs

SECRET = b"Bearer s3cr3t-t0ken-never-logged"

LOGGED_REJECTIONS = {
    "obs-fold": (
        b"GET / HTTP/1.1\r\nHost: a.test\r\nAuthorization: " + SECRET + b"\r\n  folded\r\n\r\n"
    ),
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a.test\r\nAuthorization: " + SECRET + b"\x00\r\n\r\n",
    "te-and-cl": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nAuthorization: " + SECRET + b"\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    ),
    "bad-chunk": (
        b"POST / HTTP/1.1\r\nHost: a.test\r\nAuthorization: " + SECRET + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + SECRET + b"\r\n"
    ),
}


@pytest.mark.parametrize("request_bytes", LOGGED_REJECTIONS.values(), ids=LOGGED_REJECTIONS.keys())
async def test_rejected_request_logs_one_quiet_line_without_header_values(
    make_proxy: ProxyFactory,
    upstream: StartUpstream,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
) -> None:
    up = await upstream()
    proxy: Proxy = await make_proxy(proxy_config(up.url))
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    reply = await exchange(proxy.url, request_bytes)
    assert_rejected(reply, 400)
    assert b"s3cr3t" not in reply.data  # nor echoed back
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "127.0.0.1" in message
    assert len(message) > len("127.0.0.1") + 5  # a reason, not just an address
    assert record.exc_info is None and record.exc_text is None and record.stack_info is None
    for r in caplog.records:  # debug included: a secret is never logged at any level
        text = r.getMessage() + repr(r.args)
        assert "s3cr3t" not in text
        assert "Bearer" not in text
        assert "folded" not in text
        assert r.exc_info is None
    assert "s3cr3t" not in caplog.text


async def test_rejected_request_is_in_the_access_log_as_bad_request_of_no_ring(
    make_proxy: ProxyFactory, upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await upstream()
    path = tmp_path / "access.log"
    proxy = await make_proxy(proxy_config(up.url, access_log=str(path)))
    reply = await exchange(proxy.url, LOGGED_REJECTIONS["te-and-cl"])
    assert_rejected(reply, 400)
    # The log is written in batches (every 200 ms): wait for the line, boundedly.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ANSWER_WAIT
    while not (path.exists() and path.read_text().strip()) and loop.time() < deadline:  # noqa: ASYNC110 - written by a timer
        await asyncio.sleep(0.05)
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    (entry,) = lines
    assert entry["status"] == 400
    assert entry["error"] == "bad_request"
    assert entry.get("ring") is None  # never judged against a ring
    assert entry["client"] == "127.0.0.1"
    assert "s3cr3t" not in path.read_text()


# --------------------------------------------------------------------------- on uvloop


async def _uvloop_scenario() -> None:
    async def answer(
        conn: UpstreamConnection, request: Received, writer: asyncio.StreamWriter
    ) -> None:
        if request.target == "/switch":
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\n")
        else:
            writer.write(OK_RESPONSE)

    up = RawUpstream(answer)
    await up.start()
    proxy = Proxy(parse_config(proxy_config(up.url, limits={"head_timeout": "1s"})))
    await proxy.start()
    try:
        ok = await exchange(proxy.url, UNDERSCORED)
        assert ok.status == 200 and ok.body == OK_BODY, ok.data[:300]
        assert "x_custom" not in up.requests[-1].header_names()
        assert_rejected(await exchange(proxy.url, MALFORMED["obs-fold"]), 400)
        assert_rejected(await exchange(proxy.url, MALFORMED["chunk-size-not-hex"]), 400)
        switched = await exchange(
            proxy.url, b"GET /switch HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        )
        assert switched.status == 502, switched.data[:300]
        slow = await exchange(proxy.url, b"GET / HTTP/1.1\r\nHost: a", wait=4.0)
        assert_rejected(slow, 408)
    finally:
        await proxy.stop()
        await up.stop()


def test_the_same_on_uvloop_the_loop_the_proxy_runs_on() -> None:
    """The CLI runs the proxy on uvloop, whose transports are not asyncio's classes: a
    normal request, two rejections, a 502 and a head timeout there too."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_uvloop_scenario())
