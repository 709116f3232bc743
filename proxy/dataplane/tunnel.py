"""After an upstream's ``101 Switching Protocols``: a byte tunnel in both directions.

Whatever protocol the two ends switched to (WebSocket, h2c, anything else), the proxy
passes bytes: each side's data is written to the other as it arrives, with back-pressure
(a full write buffer on one side pauses reading on the other), a half-close (EOF) is passed
on as a half-close, and a closed or lost connection closes the other side once what was
written to it is flushed.  The exchange is recorded when both sides are closed.

A tunnel silent both ways for ``limits.tunnel_idle_timeout`` (default 1 h) is closed, both
sides (aborted where bytes wait unwritten: a peer that reads nothing would hold a close
forever); the access log says ``tunnel_idle``.  The timer is one ``call_at`` per tunnel,
re-armed from the time of the last byte when it fires (a byte costs a clock read).

Flow control starts from the transports' state, not from the exchange's: the exchange's
reasons to pause the client (an upstream write buffer that was full, a wait for a
connection) end with it, and each direction reads unless the side it writes to is full.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.dataplane.client import ClientConnection
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.upstream import UpstreamConnection


TUNNEL_IDLE = "tunnel_idle"  # the access log's error of a tunnel closed for silence


class Tunnel:
    __slots__ = ("_clock", "bytes_in", "bytes_out", "client", "closed", "eofs", "exchange",
                 "idle", "idle_timeout", "last", "timer", "upstream")

    def __init__(self, exchange: Exchange, client: ClientConnection,
                 upstream: UpstreamConnection, rest: bytes, upstream_full: bool = False) -> None:
        """``upstream_full``: the upstream's write buffer is above its high-water mark now
        (its transport said pause_writing and not yet resume_writing)."""
        self.exchange = exchange
        self.client = client
        self.upstream = upstream
        self.bytes_in = 0
        self.bytes_out = 0
        self.eofs = 0
        self.closed = False
        self.idle = False
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self.last = loop.time()
        self.idle_timeout = client.limits.tunnel_idle_timeout
        self.timer: asyncio.TimerHandle | None = loop.call_at(
            self.last + self.idle_timeout, self._idle_check)
        client.start_tunnel(self, upstream_full)
        upstream.tunnel = self
        # The upstream reads unless the client's write buffer is full.
        if client.paused_writing:
            upstream.pause_reading()
        else:
            upstream.resume_reading()
        if rest:
            self.from_upstream(rest)
        early = client.take_early()
        if early:
            self.from_client(early)
        if upstream.closed:
            self.upstream_lost()

    def from_client(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last = self._clock()
        self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.last = self._clock()
        self.client.write(data)

    def _idle_check(self) -> None:
        self.timer = None
        if self.closed:
            return
        due = self.last + self.idle_timeout
        loop_now = self._clock()
        if loop_now < due:
            self.timer = asyncio.get_running_loop().call_at(due, self._idle_check)
            return
        self.idle = True
        for side in (self.client, self.upstream):
            transport = side.transport
            if transport is not None and transport.get_write_buffer_size():
                side.abort()
            else:
                side.close()

    def client_eof(self) -> bool:
        """The client half-closed: so does the tunnel towards the upstream."""
        transport = self.upstream.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        return self._eof()

    def upstream_eof(self) -> bool:
        transport = self.client.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        return self._eof()

    def _eof(self) -> bool:
        self.eofs += 1
        return self.eofs < 2  # both sides done: let the transports close

    def client_lost(self) -> None:
        self.upstream.close()
        self._closed()

    def upstream_lost(self) -> None:
        self.client.close()
        self._closed()

    def _closed(self) -> None:
        if not self.closed:
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.exchange.tunnel_closed(self.bytes_in, self.bytes_out, self.idle)

    # Back-pressure: a side whose write buffer is full pauses reading on the other.
    def pause_client(self) -> None:
        self.client.pause(self.client.TUNNEL)

    def resume_client(self) -> None:
        self.client.resume(self.client.TUNNEL)

    def pause_upstream(self) -> None:
        self.upstream.pause_reading()

    def resume_upstream(self) -> None:
        self.upstream.resume_reading()

    def __repr__(self) -> str:
        return f"<Tunnel in={self.bytes_in} out={self.bytes_out} closed={self.closed}>"
