"""Upstream pools: servers, pooled keep-alive connections, and the upstream side's parser.

``UpstreamPool.acquire`` hands an exchange an idle connection to the server it picked
(LIFO: the most recently used, whose keep-alive is least likely to have lapsed), or opens
one (within ``connect_timeout``, TLS with SNI for https servers), or queues the exchange
while the pool is at ``max_connections``.  A connection goes back to the pool only after a
complete, well-framed response to a completely sent request; idle ones are closed after
``keepalive_timeout``.

``UpstreamConnection`` is the Protocol of one connection: llhttp (httptools) parses the
responses; the head's lines are filtered as they come (hop-by-hop removed, framing noted)
and the exchange it serves gets ``response_head``, ``response_body``,
``response_complete``, or ``upstream_failed`` with one of ringproxy's ``UpstreamError``s.
This module is the one place foreign failures of the upstream side (OSError, ssl,
timeouts, parser errors) are translated (``translate``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxy.config import Balance, Pool
from proxy.config.credentials import client_context
from proxy.config.values import Upstream
from proxy.dataplane import headers as h
from proxy.dataplane.deadlines import Timers
from proxy.errors import (
    PoolExhausted,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamResetError,
    UpstreamTimeout,
)
from proxy.health.monitor import PoolHealth
from proxy.health.retry import RetryBudget

if TYPE_CHECKING:
    # What an upstream connection reports to: the exchange it serves (its upstream_ready,
    # upstream_failed, upstream_defect, response_head/body/pending/complete,
    # upstream_upgraded, upstream_write_paused).  The class itself, not a Protocol:
    # compiled, the calls are native calls, where a Protocol's are generic ones.
    from proxy.dataplane.exchange import Exchange as Listener
    from proxy.dataplane.tunnel import Tunnel

log = logging.getLogger("ringproxy.dataplane")

_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


class HeadLimits:
    """The upstream response head limits (the client head's, from ``limits``)."""

    __slots__ = ("max_headers", "max_size")

    def __init__(self, max_size: int = 32768, max_headers: int = 100) -> None:
        self.max_size = max_size
        self.max_headers = max_headers


class Server:
    """One upstream server of a pool: its live in-flight count and idle connections."""

    __slots__ = ("failures", "host", "host_header", "idle", "inflight", "port", "scheme", "up",
                 "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.up = True  # in rotation (PoolHealth keeps it)
        self.failures = 0  # failed attempts in a row (PoolHealth keeps it)
        self.scheme = upstream.scheme
        self.host = upstream.host
        self.port = upstream.port
        self.inflight = 0
        self.idle: list[UpstreamConnection] = []  # LIFO
        # The Host header for this server (when the pool does not preserve the client's).
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = (host if self.port == default else f"{host}:{self.port}").encode()

    def __repr__(self) -> str:
        return (f"<Server {self.upstream.url} {'up' if self.up else 'out'} "
                f"inflight={self.inflight} idle={len(self.idle)}>")


class UpstreamPool:
    """The live side of a configured pool.  ``start()`` must run inside the event loop."""

    def __init__(self, config: Pool, head_limits: HeadLimits | None = None) -> None:
        self.config = config
        self.servers = tuple(Server(u) for u in config.servers)
        self._rr = itertools.cycle(self.servers)
        self._least = config.balance is Balance.LEAST_REQUEST
        self.head_limits = head_limits or HeadLimits()
        self.open = 0  # connections open or being opened
        self._waiters: deque[tuple[Server, Listener]] = deque()
        self._connecting: set[asyncio.Task[None]] = set()
        self._conns: set[UpstreamConnection] = set()
        self._timers: Timers | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop_time: Callable[[], float] = lambda: 0.0
        self._ssl: ssl.SSLContext | None = None
        self.closed = False
        # Health: pick() skips servers out of rotation; all_up is its fast path.
        self.all_up = True
        self.health = PoolHealth(config, self.servers, self._health_changed)
        self.outlier_5xx = config.outlier is not None and config.outlier.on_5xx
        retries = config.retries
        self.budget = RetryBudget(retries.budget, retries.min_retries) if retries else None
        self.retried: dict[str, int] = {}  # retries made, by reason
        self.down_message = f"no healthy server in pool {config.name}"
        # tls.server_name: the SNI and the name verified, instead of each server's host.
        self.server_name = config.tls.server_name if config.tls is not None else None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._timers = Timers(loop)
        self._loop_time = loop.time
        if any(s.scheme == "https" for s in self.servers):
            # The pool's tls (CA, client certificate, verify), checked when the config was
            # loaded; the system's trust store without one.
            self._ssl = client_context(self.config.tls)
        self.health.start(self._ssl)

    def _health_changed(self, all_up: bool) -> None:
        self.all_up = all_up

    @property
    def started(self) -> bool:
        return self._timers is not None

    def pick(self) -> Server | None:
        """The server for a request; None when no server is in rotation."""
        if self.all_up:
            return self._pick_least() if self._least else next(self._rr)
        return self.pick_other(None)

    def _pick_least(self) -> Server:
        # Fewest in-flight wins; the round-robin cursor breaks ties so equal servers share.
        start = next(self._rr)
        best = start
        for server in self.servers:
            if server.inflight < best.inflight:
                best = server
        return best

    def pick_other(self, failed: Server | None) -> Server | None:
        """A server in rotation other than ``failed`` (a retry's), by the pool's balance;
        None if there is none."""
        best: Server | None = None
        for _ in range(len(self.servers)):
            server = next(self._rr)
            if server.up and server is not failed:
                if not self._least:
                    return server
                if best is None or server.inflight < best.inflight:
                    best = server
        return best

    # -- connections

    def acquire(self, server: Server, listener: Listener) -> UpstreamConnection | None:
        """An idle connection to ``server`` now, or None: ``listener.upstream_ready`` (or
        ``upstream_failed``) is called later."""
        if self.closed or self._timers is None:
            listener.upstream_failed(UpstreamConnectError(f"pool {self.config.name} is closed"))
            return None
        idle = server.idle
        while idle:
            conn = idle.pop()
            if not (conn.closed or conn.broken):
                return conn
            conn.close()
        if self.open < self.config.max_connections:
            self._connect(server, listener)
        else:
            # Every connection is busy: wait for one, at most connect_timeout (then 503).
            self._waiters.append((server, listener))
            self._timers(self.config.connect_timeout).arm(
                id(listener), lambda: self._wait_expired(listener))
        return None

    def _wait_expired(self, listener: Listener) -> None:
        if self._unwait(listener):
            listener.upstream_failed(PoolExhausted(
                f"pool {self.config.name}: all {self.config.max_connections} connections busy "
                f"for {self.config.connect_timeout:g}s"))

    def _unwait(self, listener: Listener) -> bool:
        for i, (_, waiting) in enumerate(self._waiters):
            if waiting is listener:
                del self._waiters[i]
                return True
        return False

    def _served(self, listener: Listener) -> None:
        """``listener`` leaves the waiters (served): its wait's deadline no longer applies."""
        if self._timers is not None:
            self._timers(self.config.connect_timeout).disarm(id(listener))

    def forget(self, listener: Listener) -> None:
        """``listener`` no longer waits for a connection (its client left)."""
        if self._unwait(listener):
            self._served(listener)

    def _connect(self, server: Server, listener: Listener) -> None:
        self.open += 1
        task = asyncio.ensure_future(self._open(server, listener))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _open(self, server: Server, listener: Listener) -> None:
        loop = asyncio.get_running_loop()
        tls = self._ssl if server.scheme == "https" else None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, server),
                    server.host, server.port, ssl=tls,
                    server_hostname=self.server_name or server.host if tls is not None
                    else None,
                )
        except TimeoutError:
            self._lost_one()
            listener.upstream_failed(UpstreamConnectTimeout(
                f"connect to {server.upstream.url} took over {self.config.connect_timeout:g}s"))
            return
        except (OSError, ssl.SSLError) as exc:
            self._lost_one()
            listener.upstream_failed(translate(exc, connecting=True))
            return
        except asyncio.CancelledError:
            self._lost_one()
            raise
        if self.closed:
            self._conns.add(conn)  # so that closing it gives its count back
            conn.close()
            listener.upstream_failed(UpstreamConnectError(f"pool {self.config.name} is closed"))
            return
        self._conns.add(conn)
        listener.upstream_ready(conn)

    def _lost_one(self) -> None:
        self.open -= 1
        self._serve_waiters()

    def release(self, conn: UpstreamConnection) -> None:
        """``conn`` finished an exchange cleanly: keep it for the next one."""
        if self.closed or self._timers is None or conn.closed or conn.broken:
            conn.close()
            return
        # Reading may have been paused for a slow client of the exchange that just ended
        # (its last read completed the response): the next exchange starts it reading.
        # (resume_reading, inline: conn is not closed, checked above.)
        if conn.transport is not None:
            conn.transport.resume_reading()
        # A waiter for this server takes it at once.
        for i, (server, listener) in enumerate(self._waiters):
            if server is conn.server:
                del self._waiters[i]
                self._served(listener)
                listener.upstream_ready(conn)
                return
        conn.idle_since = self._loop_time()
        conn.server.idle.append(conn)
        if self._sweeper is None:
            self._schedule_sweep()
        if self._waiters:
            # A waiter for another server: this idle connection makes room for it.
            conn.server.idle.remove(conn)
            conn.close()

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(min(self.config.keepalive_timeout / 2, 1.0), self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for longer than ``keepalive_timeout``.  Idle lists are
        LIFO, so the oldest sit at the bottom: a sweep looks only at those (one clock read
        per release instead of a deadline armed and disarmed per request)."""
        self._sweeper = None
        limit = self._loop_time() - self.config.keepalive_timeout
        idle = False
        for server in self.servers:
            stale = server.idle
            while stale and stale[0].idle_since <= limit:
                stale.pop(0).close()
            idle = idle or bool(stale)
        if idle and not self.closed:
            self._schedule_sweep()

    def connection_closed(self, conn: UpstreamConnection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            if conn in conn.server.idle:
                conn.server.idle.remove(conn)
            self._lost_one()

    def _serve_waiters(self) -> None:
        while self._waiters and self.open < self.config.max_connections and not self.closed:
            server, listener = self._waiters.popleft()
            self._served(listener)
            self._connect(server, listener)

    def idle_connections(self) -> int:
        return sum(len(s.idle) for s in self.servers)

    async def close(self) -> None:
        self.closed = True
        await self.health.close()
        for task in list(self._connecting):
            task.cancel()
        await asyncio.gather(*self._connecting, return_exceptions=True)
        while self._waiters:
            _, listener = self._waiters.popleft()
            self._served(listener)
            listener.upstream_failed(UpstreamConnectError(f"pool {self.config.name} is closed"))
        for conn in list(self._conns):
            conn.close()
        if self._timers is not None:
            self._timers.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def __repr__(self) -> str:
        return (f"<UpstreamPool {self.config.name} {self.config.balance.value} "
                f"servers={len(self.servers)} open={self.open}>")


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream server; serves one exchange at a time."""

    __slots__ = (
        "broken", "chunked", "closed", "connection", "content_length", "extra", "finished",
        "has_request_id", "head_done", "head_limits", "head_read",
        "idle_since", "lines", "listener", "no_body", "parser", "pool", "reason", "received",
        "request_sent", "reusable", "server", "skipping", "status", "transport", "tunnel",
        "upgrade", "upgrade_asked", "via",
    )

    def __init__(self, pool: UpstreamPool, server: Server) -> None:
        self.pool = pool
        self.server = server
        self.head_limits = pool.head_limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.listener: Listener | None = None
        self.tunnel: Tunnel | None = None
        self.closed = False
        self.broken = False  # not reusable
        self.request_sent = False
        self.no_body = False  # the request was HEAD: the response has no body
        self.idle_since = 0.0  # loop time it went back to the pool
        self.finished = False  # a response completed in the read being parsed
        self.extra = False  # ... and more bytes followed it
        self.reusable = False
        self.upgrade_asked = False
        self._reset_response()

    def _reset_response(self) -> None:
        self.status = 0
        self.reason = b""
        self.lines: list[bytes] = []
        self.content_length: int | None = None
        self.chunked = False
        self.connection = b""
        self.via: bytes | None = None
        self.has_request_id = False
        self.upgrade = b""
        self.head_read = 0  # bytes read while the head is incomplete
        self.head_done = False
        self.skipping = False  # an interim 1xx response, not passed on
        self.received = False  # any byte of a response arrived

    # -- the exchange's side

    def send(self, listener: Listener, data: bytes, *, no_body: bool, upgrade: bool,
             complete: bool) -> None:
        """Start an exchange: write its head (and what there is of the body)."""
        self.listener = listener
        self.no_body = no_body
        self.upgrade_asked = upgrade
        self.request_sent = complete
        self._reset_response()
        assert self.transport is not None
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.connection_closed(self)

    def abort(self) -> None:
        self.listener = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool.connection_closed(self)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one.)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        listener = self.listener
        if listener is None:
            self.close()  # nothing was asked: an idle connection must stay silent
            return
        self.received = True
        self.finished = False
        self.extra = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(listener, data[exc.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            if self.finished:
                self.close()  # bytes beyond the response: the connection is not reused
            else:
                self._fail(listener, exc.__context__)
        except httptools.HttpParserError as exc:
            if self.finished:
                self.close()
            else:
                self._fail(listener, UpstreamBadResponse(f"malformed response: {exc}"))
        else:
            if self.finished:
                # Reused only after a complete, well-framed response with nothing after it.
                if self.extra or not self.reusable:
                    self.close()
                else:
                    self.pool.release(self)
            elif self.listener is listener:
                if self.head_done:
                    listener.response_pending()
                else:
                    self.head_read += len(data)
                    if self.head_read > self.head_limits.max_size:
                        self._fail(listener,
                                   UpstreamBadResponse("response head over the limits"))

    def _fail(self, listener: Listener, cause: BaseException | None) -> None:
        self.listener = None
        self.abort()
        if isinstance(cause, UpstreamError):
            listener.upstream_failed(cause)
        elif cause is not None:
            listener.upstream_defect(cause)
        else:
            listener.upstream_failed(UpstreamBadResponse("malformed response"))

    def _upgraded(self, listener: Listener, rest: bytes) -> None:
        self.broken = True
        if self.status != 101 or not self.upgrade_asked:
            self._fail(listener, UpstreamBadResponse("101 to a request that did not upgrade"))
            return
        self.listener = None
        listener.upstream_upgraded(self, rest)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.upstream_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if not was_closed:
            self.pool.connection_closed(self)
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
            return
        listener = self.listener
        if listener is None:
            return
        self.listener = None
        if self.head_done and not self.skipping and self._close_delimited():
            listener.response_complete()  # a body that ends with the connection
            return
        if exc is not None:
            listener.upstream_failed(translate(exc))
        elif self.received:
            listener.upstream_failed(UpstreamBadResponse("upstream closed the connection "
                                                         "mid-response"))
        else:
            listener.upstream_failed(UpstreamResetError("upstream closed the connection "
                                                        "without a response"))

    def _close_delimited(self) -> bool:
        return self.content_length is None and not self.chunked and not self.no_body

    def pause_writing(self) -> None:
        if self.listener is not None:
            self.listener.upstream_write_paused(True)
        elif self.tunnel is not None:
            self.tunnel.pause_client()

    def resume_writing(self) -> None:
        if self.listener is not None:
            self.listener.upstream_write_paused(False)
        elif self.tunnel is not None:
            self.tunnel.resume_client()

    # -- httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # (The head's size and count are checked at its end, and per read while it is
        # incomplete, in data_received: a head held in memory is at most one read larger.)
        kind = h.response_kind(name)
        if kind == 0:
            self.lines.append(name + b": " + value + b"\r\n")
        elif kind == h.R_CONTENT_LENGTH:
            self.content_length = int(value)
            self.lines.append(name + b": " + value + b"\r\n")
        elif kind == h.R_TRANSFER_ENCODING:
            # Only chunked, as NGINX: another coding (gzip, chunked; or gzip alone, which
            # would end with the connection) cannot be relayed faithfully.
            if value.strip().lower() != b"chunked":
                raise UpstreamBadResponse("unsupported Transfer-Encoding from the upstream")
            self.chunked = True
        elif kind == h.R_CONNECTION:
            self.connection = self.connection + b"," + value if self.connection else value
        elif kind == h.R_VIA:
            self.via = h.joined(self.via, value)
        elif kind == h.R_REQUEST_ID:
            self.has_request_id = True
            self.lines.append(name + b": " + value + b"\r\n")
        elif kind == h.R_UPGRADE:
            self.upgrade = value

    def on_headers_complete(self) -> None:
        lines = self.lines
        limits = self.head_limits
        if len(lines) > limits.max_headers or sum(map(len, lines)) > limits.max_size:
            raise UpstreamBadResponse("response head over the limits")
        status = self.parser.get_status_code()
        self.status = status
        if 100 <= status < 200 and status != 101:
            self.skipping = True  # 100 Continue, 103 Early Hints: not passed on
            return
        if status == 101 and not self.upgrade_asked:
            raise UpstreamBadResponse("101 to a request that did not upgrade")
        if self.connection and self.connection not in _PLAIN_CONNECTION:
            self._drop_connection_named()
        self.head_done = True
        if status == 101:
            return  # the upgrade: the exchange hears of it from data_received
        listener = self.listener
        if listener is not None:
            listener.response_head(self)
            if self.no_body and self.listener is listener:
                # A HEAD's response: complete with its head, whatever it says of a body.
                # llhttp cannot be told, so it gets a fresh parser for the next response.
                keep = self.parser.should_keep_alive()
                self.parser = httptools.HttpResponseParser(self)
                self._complete(listener, keep)

    def _drop_connection_named(self) -> None:
        tokens = {t.strip().lower() for t in self.connection.split(b",")}
        tokens -= {b"keep-alive", b"close", b"upgrade", b""}
        if tokens:
            self.lines = [line for line in self.lines
                          if line.partition(b":")[0].lower() not in tokens]

    def on_body(self, data: bytes) -> None:
        listener = self.listener
        if listener is not None and not self.skipping:
            listener.response_body(data)
        elif self.finished:
            self.extra = True

    def on_message_begin(self) -> None:
        if self.finished:
            self.extra = True  # a second response nobody asked for

    def on_message_complete(self) -> None:
        if self.skipping:
            self._reset_response()
            self.received = True
            return
        listener = self.listener
        if listener is not None and self.status != 101:
            self._complete(listener, self.parser.should_keep_alive())

    def _complete(self, listener: Listener, keep_alive: bool) -> None:
        """The response is complete: the exchange hears of it now; the connection goes back
        to the pool once the rest of this read shows nothing follows it (data_received)."""
        self.listener = None
        self.finished = True
        self.reusable = (self.request_sent and not self.broken and not self.upgrade_asked
                         and keep_alive)
        listener.response_complete()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "busy" if self.listener else "idle"
        return f"<UpstreamConnection {self.server.upstream.url} {state}>"


def translate(exc: BaseException, connecting: bool = False) -> UpstreamError:
    """The ringproxy error for a foreign failure on the upstream side."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamConnectTimeout(str(exc)) if connecting else UpstreamTimeout(str(exc))
    if connecting and isinstance(exc, OSError | ssl.SSLError):
        return UpstreamConnectError(str(exc) or type(exc).__name__)
    if isinstance(exc, ssl.SSLError):
        return UpstreamResetError(str(exc))
    if isinstance(exc, ConnectionError):
        return UpstreamResetError(str(exc) or "connection reset")
    if isinstance(exc, OSError):
        return UpstreamResetError(str(exc) or type(exc).__name__)
    raise TypeError(f"{type(exc).__name__} is not an upstream failure") from exc
