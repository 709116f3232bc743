"""After an upstream's ``101 Switching Protocols``: a byte tunnel in both directions.

Whatever protocol the two ends switched to (WebSocket, h2c, anything else), the proxy
passes bytes: each side's data is written to the other as it arrives, with back-pressure
(a full write buffer on one side pauses reading on the other), a half-close (EOF) is passed
on as a half-close, and a closed or lost connection closes the other side once what was
written to it is flushed.  The exchange is recorded when both sides are closed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.dataplane.client import ClientConnection
    from proxy.dataplane.exchange import Exchange
    from proxy.dataplane.upstream import UpstreamConnection


class Tunnel:
    __slots__ = ("bytes_in", "bytes_out", "client", "closed", "eofs", "exchange", "upstream")

    def __init__(self, exchange: Exchange, client: ClientConnection,
                 upstream: UpstreamConnection, rest: bytes) -> None:
        self.exchange = exchange
        self.client = client
        self.upstream = upstream
        self.bytes_in = 0
        self.bytes_out = 0
        self.eofs = 0
        self.closed = False
        client.start_tunnel(self)
        upstream.tunnel = self
        if rest:
            self.from_upstream(rest)
        early = client.take_early()
        if early:
            self.from_client(early)
        if upstream.closed:
            self.upstream_lost()

    def from_client(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.client.write(data)

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
            self.exchange.tunnel_closed(self.bytes_in, self.bytes_out)

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
