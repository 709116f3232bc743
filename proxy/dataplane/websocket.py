"""WebSocket pass-through: handshake upstream first, then accept the client and relay.

The upstream handshake happens first so that the subprotocol the upstream chose is the
one the client is told, and so that an upstream refusal becomes an HTTP error response
rather than an accepted-then-closed socket.  Messages are relayed as they arrive; a close
from either side (with its code and reason) is passed to the other.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from proxy.dataplane.pool import UpstreamPool

MAX_MESSAGE = 16 * 1024 * 1024  # bytes; a larger message closes the socket with 1009
_CLOSE_TYPES = (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)


async def proxy_websocket(
    request: web.BaseRequest,
    pool: UpstreamPool,
    url: URL,
    headers: CIMultiDict[str],
    handshake_timeout: float,
) -> web.WebSocketResponse:
    """Relay one WebSocket session; a failed upstream handshake raises UpstreamError."""
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    upstream = await pool.ws_connect(url, headers, protocols, handshake_timeout, MAX_MESSAGE)
    downstream = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        autoping=True,
        max_msg_size=MAX_MESSAGE,
    )
    try:
        await downstream.prepare(request)
        to_upstream = asyncio.ensure_future(_pump(downstream, upstream))
        to_client = asyncio.ensure_future(_pump(upstream, downstream))
        try:
            await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, return_exceptions=True)
    finally:
        with contextlib.suppress(Exception):
            await upstream.close()
        with contextlib.suppress(Exception):
            await downstream.close()
    return downstream


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    while True:
        msg = await src.receive()
        if msg.type is WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSING:
            # The other direction is closing this socket and passes the code on itself.
            return
        elif msg.type in _CLOSE_TYPES:
            if msg.type is WSMsgType.CLOSE and isinstance(msg.data, int):
                code = msg.data
            else:  # the peer vanished without a close frame
                code = src.close_code if src.close_code is not None else 1006
            reason = msg.extra.encode() if isinstance(msg.extra, str) else b""
            if code in (1005, 1006, 1015):  # reserved codes that may not be sent on the wire
                code = 1000 if code == 1005 else 1011
            with contextlib.suppress(Exception):
                await dst.close(code=code, message=reason)
            with contextlib.suppress(Exception):
                await src.close(code=code)
            return
