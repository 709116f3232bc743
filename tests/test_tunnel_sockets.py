"""Waits of the data plane that a misbehaving peer could make endless, on real sockets.

- A WebSocket (upgraded) tunnel silent both ways for ``limits.tunnel_idle_timeout`` is
  closed, both sides; traffic either way keeps it open.
- A tunnel starts with both directions reading, whatever the exchange had paused: an
  upstream whose write buffer was full when it answered 101 (a large request head it had
  not read) still gets the client's bytes once it reads, and a tunnel that starts with
  megabytes waiting in both directions delivers them all.
- An upstream that stops reading a streamed request body fails as a timeout after the
  ring's idle timeout: 504 to the client, both connections closed, counted as the
  upstream's failure (its 504 is the ring's error); one that reads it slowly but steadily
  (slower than the buffer's high-to-low water per idle timeout) is not cut; and the
  body's stall timer ends at a switch to a tunnel.

The upstreams here are raw asyncio servers that misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.upstream import UpstreamConnection
from proxy.metrics import CODE_CLASSES, ERROR_KINDS
from proxy.server import Proxy
from tests.conftest import ProxyFactory

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"User-Agent: tunnel-test/1\r\n")


async def raw_upstream(handle: Handler, rcvbuf: int | None = None) -> asyncio.Server:
    """A raw upstream; ``rcvbuf`` shrinks its receive buffer (set before listen, so each
    accepted socket has it: the proxy's writes back up sooner)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    return await asyncio.start_server(handle, sock=sock, limit=1 << 22)


def config(upstream: asyncio.Server | socket.socket, tmp_path: Path, limits: str = "",
           policy: str = "") -> str:
    sock = upstream if isinstance(upstream, socket.socket) else upstream.sockets[0]
    port = sock.getsockname()[1]
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: true, path: "{tmp_path / 'access.log'}"}}
        shutdown_grace: 1s
        pools:
          app: {{servers: ["http://127.0.0.1:{port}"], connect_timeout: 2s}}
        routes:
          - name: api
            rings:
              - name: main
                pool: app
                policy: {{{policy}}}
        limits: {{{limits}}}
    """)


async def connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.open_connection(host, int(port), limit=1 << 22)


async def access_lines(tmp_path: Path) -> list[dict[str, object]]:
    await asyncio.sleep(0.4)  # the access log writes every 200 ms
    text = (tmp_path / "access.log").read_text()
    return [json.loads(line) for line in text.splitlines()]


def pattern(n: int, seed: int) -> bytes:
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (n // 251 + 1))[:n]


def start_upload(writer: asyncio.StreamWriter, total: int) -> asyncio.Future[None]:
    """Send ``total`` bytes of request body, 1 MiB at a time, in the background (it stops
    quietly when the proxy cuts the connection)."""

    async def upload() -> None:
        chunk = b"u" * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(total >> 20):
                writer.write(chunk)
                await writer.drain()

    return asyncio.ensure_future(upload())


async def test_a_silent_tunnel_is_closed_both_sides_and_traffic_keeps_it_open(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    upstream_eof = asyncio.Event()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCH)
        while data := await reader.read(65536):
            writer.write(data)
        upstream_eof.set()
        writer.close()

    upstream = await raw_upstream(echo)
    try:
        proxy = await make_proxy(config(upstream, tmp_path, "tunnel_idle_timeout: 1s"))
        reader, writer = await connect(proxy)
        writer.write(UPGRADE + b"\r\n")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            # Traffic every 0.4 s for 2.4 s: longer than the idle timeout, never idle.
            for i in range(6):
                await asyncio.sleep(0.4)
                writer.write(b"ping%d" % i)
                assert await reader.readexactly(5) == b"ping%d" % i
            silent = time.monotonic()
            assert await reader.read(100) == b""  # then silence: the proxy closes it
            waited = time.monotonic() - silent
            await upstream_eof.wait()  # ... and the upstream side too
        assert waited >= 0.9, waited  # not before the idle timeout
        writer.close()
        (line,) = await access_lines(tmp_path)
        assert line["status"] == 101 and line["error"] == "tunnel_idle"
        assert line["protocol"] == "upgrade/websocket"
        assert line["user_agent"] == "tunnel-test/1"
        assert isinstance(line["upstream_ms"], float)
        assert line["bytes_in"] == line["bytes_out"] == 30
        # The metrics see a 101 (a tunnel's silence is nobody's failure).
        recorder = proxy.runtime.rings["api"][0].recorder
        assert recorder is not None
        assert recorder.requests[CODE_CLASSES.index("1xx")] == 1
        assert sum(recorder.requests) == 1 and recorder.buckets[-1] == 0
    finally:
        upstream.close()


@pytest.mark.interpreted
async def test_a_tunnel_starts_reading_though_the_upstream_had_not_read_the_head(
    make_proxy: ProxyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upgrade request's head (900 KB of headers, allowed by the limits) fills the
    upstream connection's write buffer: the exchange pauses the client (back-pressure on
    uploads).  The upstream answers 101 before reading it; once it reads, the client's
    tunnel bytes must flow (the exchange's pause must not outlive it).

    Linux lets a loopback socket buffer up to 4 MiB in the kernel, more than any head: the
    proxy's upstream sockets get a small send buffer here, so that the head waits in the
    transport's buffer and the real pause_writing path runs, as it would on a slow link."""
    made = UpstreamConnection.connection_made

    def small_buffers(self: UpstreamConnection, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        made(self, transport)

    monkeypatch.setattr(UpstreamConnection, "connection_made", small_buffers)
    paused: list[bool] = []
    exchanges: list[Exchange] = []
    noted = Exchange.upstream_write_paused

    def note(self: Exchange, pause: bool) -> None:
        paused.append(pause)
        exchanges.append(self)
        noted(self, pause)

    monkeypatch.setattr(Exchange, "upstream_write_paused", note)
    got = asyncio.Event()
    received: list[bytes] = []

    async def early_switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n")  # the request line only
        writer.write(SWITCH + b"hello")
        await writer.drain()
        await asyncio.sleep(0.5)  # the proxy's write buffer stays full meanwhile
        await reader.readuntil(b"\r\n\r\n")  # the rest of the head
        data = b""
        while not data.endswith(b"END"):
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
        received.append(data)
        got.set()
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    upstream = await raw_upstream(early_switch, rcvbuf=4096)
    try:
        proxy = await make_proxy(config(upstream, tmp_path,
                                        "max_head_size: 1MiB, max_headers: 10000"))
        filler = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"f" * 90) for i in range(9000))
        reader, writer = await connect(proxy)
        writer.write(UPGRADE + filler + b"\r\n")
        async with asyncio.timeout(15):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await reader.readexactly(5) == b"hello"
            # The request body's stall timer (the ring's idle timeout, 60 s) ended with
            # the exchange's flow control at the switch: the tunnel has its own.
            assert proxy.plane is not None
            assert exchanges[0].request not in proxy.plane.timers(60.0)
            writer.write(b"tunnel bytes END")
            await got.wait()
            assert await reader.read(100) == b"bye"
        assert received == [b"tunnel bytes END"]
        assert paused == [True]  # the head did fill the buffer: the case this test is for
        writer.close()
    finally:
        upstream.close()


async def test_megabytes_waiting_both_ways_at_the_switch_all_arrive(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """The client sends 4 MiB right behind its upgrade request, the upstream sends 4 MiB
    right behind its 101, and neither reads for a while: every byte arrives, in order,
    both ways, and a close then ends both sides."""
    size = 4 << 20
    to_upstream, to_client = pattern(size, 1), pattern(size, 7)
    upstream_got: list[bytes] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(SWITCH + to_client)
        await asyncio.sleep(0.5)
        upstream_got.append(await reader.readexactly(size))
        writer.write(b"pong")
        assert await reader.read(10) == b""  # the client's half-close came through
        writer.close()

    upstream = await raw_upstream(flood)
    try:
        proxy = await make_proxy(config(upstream, tmp_path))
        reader, writer = await connect(proxy)
        writer.write(UPGRADE + b"\r\n" + to_upstream)
        await asyncio.sleep(0.5)
        async with asyncio.timeout(20):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await reader.readexactly(size) == to_client
            assert await reader.readexactly(4) == b"pong"
            writer.write_eof()
            assert await reader.read(10) == b""
        assert upstream_got == [to_upstream]
        writer.close()
        (line,) = await access_lines(tmp_path)
        assert line["bytes_in"] == size and line["bytes_out"] == size + 4
        assert line["error"] is None and line["status"] == 101
    finally:
        upstream.close()


async def test_an_upstream_that_stops_reading_the_body_is_a_504_after_the_idle_timeout(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    head_read = asyncio.Event()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)

    async def deaf() -> None:
        """Reads the request head, then never another byte (a plain socket: no reader
        task drains it) until the test ends."""
        conn, _ = await loop.sock_accept(listener)
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await loop.sock_recv(conn, 1)
            head_read.set()
            await asyncio.Event().wait()

    serving = asyncio.ensure_future(deaf())
    try:
        proxy = await make_proxy(config(listener, tmp_path, policy="idle_timeout: 1s"))
        reader, writer = await connect(proxy)
        total = 256 << 20
        writer.write(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % total)
        started = time.monotonic()

        sending = start_upload(writer, total)
        try:
            async with asyncio.timeout(15):
                answer = await reader.read(1 << 16)
                # ... and the client's connection is closed (reset: its upload was unread)
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read(1 << 16) == b""
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        assert head_read.is_set()
        assert answer.startswith(b"HTTP/1.1 504 "), answer[:200]
        assert b"Connection: close" in answer
        assert time.monotonic() - started >= 0.9  # the idle timeout, not at once
        writer.close()
        (line,) = await access_lines(tmp_path)
        assert line["status"] == 504 and line["error"] == "timeout"
        assert line["upstream_ms"] is None  # no response head came
        assert 0 < int(str(line["bytes_in"])) < total
        recorder = proxy.runtime.rings["api"][0].recorder
        assert recorder is not None
        assert recorder.upstream_errors[ERROR_KINDS.index("timeout")] == 1  # the upstream's
        assert recorder.tally.errors == 1  # judged against the ring's version
        # The upstream connection is closed on the proxy's side (its pool slot given back;
        # the kernel still owes the unread bytes, so the deaf peer hears of it later).
        assert proxy.runtime.rings["api"][0].pool.open == 0
    finally:
        serving.cancel()
        listener.close()


def small_listener() -> socket.socket:
    """A listening plain socket whose accepted sockets have a small receive buffer (the
    proxy's writes back up soon)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    return listener


async def read_head(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[int, bytes]:
    """The request head read byte by byte: (its Content-Length, the body bytes after it)."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(conn, 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return length, b""


async def test_an_upstream_reading_the_body_slowly_but_steadily_is_not_cut(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """It reads about 20 KiB/s: the write buffer's 48 KiB from high to low water take
    longer than the idle timeout, but it never stops: no 504 (the wait restarts on
    progress, as NGINX's proxy_send_timeout restarts on every write)."""
    loop = asyncio.get_running_loop()
    listener = small_listener()
    slow_for = 4.0

    async def slow() -> None:
        conn, _ = await loop.sock_accept(listener)
        with conn:
            length, _ = await read_head(loop, conn)
            got, started = 0, time.monotonic()
            while got < length:
                fast = time.monotonic() - started > slow_for
                chunk = await loop.sock_recv(conn, 1 << 16 if fast else 2048)
                if not chunk:
                    return
                got += len(chunk)
                if not fast:
                    await asyncio.sleep(0.1)
            body = str(got).encode()
            await loop.sock_sendall(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b"
                                    % (len(body), body))

    serving = asyncio.ensure_future(slow())
    try:
        proxy = await make_proxy(config(listener, tmp_path, policy="idle_timeout: 1s"))
        reader, writer = await connect(proxy)
        total = 16 << 20
        writer.write(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % total)

        sending = start_upload(writer, total)
        try:
            async with asyncio.timeout(60):
                answer = await reader.readuntil(b"\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
                length = int(answer.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                assert int(await reader.readexactly(length)) == total  # every byte arrived
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        writer.close()
        recorder = proxy.runtime.rings["api"][0].recorder
        assert recorder is not None
        assert recorder.upstream_errors[ERROR_KINDS.index("timeout")] == 0
    finally:
        serving.cancel()
        listener.close()


async def test_a_full_duplex_upstream_held_up_by_a_client_not_reading_is_not_blamed(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """An echo upstream answers as it reads; the client uploads but never reads the
    answer, so the upstream's writes back up and it stops reading the body too.  The
    client is the one at fault: cut as ``client_timeout`` after the idle timeout, never a
    504 nor an upstream timeout (outlier ejection, the version's error)."""
    loop = asyncio.get_running_loop()
    listener = small_listener()

    async def echo() -> None:
        conn, _ = await loop.sock_accept(listener)
        with conn:
            length, _ = await read_head(loop, conn)
            await loop.sock_sendall(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                    % length)
            got = 0
            with contextlib.suppress(ConnectionError):
                while got < length:
                    chunk = await loop.sock_recv(conn, 1 << 16)
                    if not chunk:
                        return
                    got += len(chunk)
                    await loop.sock_sendall(conn, chunk)
            await asyncio.Event().wait()

    serving = asyncio.ensure_future(echo())
    try:
        proxy = await make_proxy(config(listener, tmp_path, policy="idle_timeout: 1s"))
        sock = socket.create_connection(
            (proxy.url.removeprefix("http://").rsplit(":", 1)[0],
             int(proxy.url.rsplit(":", 1)[1])))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        total = 64 << 20
        await loop.sock_sendall(
            sock, b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % total)

        async def upload() -> None:
            chunk = b"e" * (1 << 16)
            with contextlib.suppress(ConnectionError):
                for _ in range(total >> 16):
                    await loop.sock_sendall(sock, chunk)

        sending = asyncio.ensure_future(upload())
        try:
            await asyncio.sleep(3.0)  # three idle timeouts
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
            sock.close()
        lines = await access_lines(tmp_path)
        assert len(lines) == 1, lines
        line = lines[0]
        assert line["error"] == "client_timeout", line
        recorder = proxy.runtime.rings["api"][0].recorder
        assert recorder is not None
        assert recorder.upstream_errors[ERROR_KINDS.index("timeout")] == 0
        assert recorder.tally.errors == 0
    finally:
        serving.cancel()
        listener.close()
