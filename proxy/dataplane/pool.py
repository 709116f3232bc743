"""Upstream pools: one pooled, keep-alive aiohttp client per pool, and server selection.

The pool is the one boundary to upstreams: ``request``, ``ws_connect``, ``body_now`` and
``body_chunks`` are the only calls into aiohttp's client, and the only place its
exceptions are translated into ringproxy's (``UPSTREAM_FAILURES`` and ``translate``).
Anything else raised on the way is a defect of the proxy and goes up as it is.  Server
URLs were parsed at config load; per request only the path and query are put together.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence

import aiohttp
from aiohttp import hdrs
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict, istr
from yarl import URL

from proxy.config import Balance, Pool
from proxy.config.values import Upstream
from proxy.errors import (
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamResetError,
    UpstreamTimeout,
)

# Send only what the client sent: no User-Agent, Accept, Accept-Encoding or Content-Type of
# aiohttp's own.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
_SKIP = frozenset(map(istr, SKIP_AUTO_HEADERS))
# aiohttp only reads the skip list (checked by a test): one instance serves every request.
_SKIPPED: CIMultiDict[None] = CIMultiDict((name, None) for name in sorted(_SKIP))
# Every header aiohttp would add on its own is skipped (checked, not assumed: a later
# aiohttp with more default headers turns the shortcut below off).
_SKIPS_ALL = {istr(h) for h in aiohttp.ClientRequest.DEFAULT_HEADERS} | {hdrs.USER_AGENT} <= _SKIP


class _UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's request, minus per-request work whose result is known in advance.

    The headers to send are taken over instead of copied one by one (``update_headers``).

    With every automatic header skipped, ``update_auto_headers`` adds nothing; all it
    leaves behind is the skip list (which a POST consults before adding a Content-Type).
    aiohttp rebuilds that list for every request (sorted, into a new multidict, plus a copy
    of the headers): a noticeable share of a small request's cost.  Here it is built once.
    """

    def update_headers(self, headers: LooseHeaders | None) -> None:
        # The headers the pool sends were made for this request alone (by the handler, or
        # by ws_connect's own copy), the client's Host or the server's among them: taken as
        # they are, where aiohttp would copy them one by one in a Python loop.  (A client
        # without Host, HTTP/1.0, gets aiohttp's Host from the URL.)
        if type(headers) is CIMultiDict and hdrs.HOST in headers:
            self.headers = headers
            return
        super().update_headers(headers)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if _SKIPS_ALL and skip_auto_headers == _SKIP:
            self._skip_auto_headers = _SKIPPED
            return
        super().update_auto_headers(skip_auto_headers)


# A relayed WebSocket waits for messages as long as they take; a close handshake does not.
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0)

# Server.url() remembers the URLs it made: paths repeat, and a URL object that aiohttp has
# seen before also has its derived parts (host:port, path and query) already computed.
# Bounded: at most _URLS_MAX per server, for targets of at most _URL_MAX_LEN characters.
_URLS_MAX = 512
_URL_MAX_LEN = 256


class Server:
    """One upstream server of a pool and its live in-flight count."""

    __slots__ = (
        "_urls", "host", "host_header", "inflight", "port", "scheme", "upstream", "ws_scheme",
    )

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.scheme = upstream.scheme
        self.ws_scheme = "wss" if upstream.scheme == "https" else "ws"
        self.host = upstream.host
        self.port = upstream.port
        self.inflight = 0
        self._urls: dict[tuple[str, str], URL] = {}
        # The Host header for this server (when the pool does not preserve the client's).
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"

    def url(self, raw_path: str, raw_query: str, websocket: bool = False) -> URL:
        if websocket:
            return self._build(raw_path, raw_query, websocket)
        key = (raw_path, raw_query)
        url = self._urls.get(key)
        if url is None:
            url = self._build(raw_path, raw_query, websocket)
            if len(raw_path) + len(raw_query) <= _URL_MAX_LEN:
                if len(self._urls) >= _URLS_MAX:
                    self._urls.clear()
                self._urls[key] = url
        return url

    def _build(self, raw_path: str, raw_query: str, websocket: bool) -> URL:
        return URL.build(
            scheme=self.ws_scheme if websocket else self.scheme,
            host=self.host,
            port=self.port,
            path=raw_path,
            query_string=raw_query,
            encoded=True,
        )

    def __repr__(self) -> str:
        return f"<Server {self.upstream.url} inflight={self.inflight}>"


class UpstreamPool:
    """The live side of a configured pool.  ``start()`` must run inside the event loop."""

    def __init__(self, config: Pool) -> None:
        self.config = config
        self.servers = tuple(Server(u) for u in config.servers)
        self._rr = itertools.cycle(self.servers)
        self.session: aiohttp.ClientSession | None = None
        # (Not a bound method stored on self: that would be a reference cycle, which a
        # reload would leave to the cyclic garbage collector.)
        self._least = config.balance is Balance.LEAST_REQUEST

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            limit_per_host=0,
            keepalive_timeout=self.config.keepalive_timeout,
            ttl_dns_cache=30,
            enable_cleanup_closed=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            request_class=_UpstreamRequest,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
            read_bufsize=2**16,
        )

    @property
    def started(self) -> bool:
        return self.session is not None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        data: AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """Send one request; returns once the response headers are in (release it after).

        No sock_read timer runs while the headers are awaited (the caller's ring timeout
        covers that); ``start_idle_timeout`` starts one if the body has to be waited for.
        """
        session = self.session
        if session is None:
            raise RuntimeError(f"pool {self.config.name!r} is not started")
        try:
            return await session.request(
                method, url, headers=headers, data=data, allow_redirects=False
            )
        except UPSTREAM_FAILURES as exc:
            raise translate(exc) from exc

    async def ws_connect(
        self,
        url: URL,
        headers: CIMultiDict[str],
        protocols: Sequence[str],
        handshake_timeout: float,
        max_msg_size: int,
    ) -> aiohttp.ClientWebSocketResponse:
        """A WebSocket handshake within ``handshake_timeout`` seconds, for a relay: closes are not
        answered on their own (the relay passes them on), pings are."""
        session = self.session
        if session is None:
            raise RuntimeError(f"pool {self.config.name!r} is not started")
        try:
            async with asyncio.timeout(handshake_timeout):
                return await session.ws_connect(
                    url,
                    headers=headers,
                    protocols=protocols,
                    autoclose=False,
                    autoping=True,
                    max_msg_size=max_msg_size,
                    timeout=_WS_TIMEOUT,
                )
        except UPSTREAM_FAILURES as exc:  # a refused upgrade is a ClientResponseError
            raise translate(exc) from exc

    def pick(self) -> Server:
        return self._pick_least() if self._least else next(self._rr)

    def _pick_least(self) -> Server:
        # Fewest in-flight wins; the round-robin cursor breaks ties so equal servers share.
        start = next(self._rr)
        best = start
        for server in self.servers:
            if server.inflight < best.inflight:
                best = server
        return best

    def __repr__(self) -> str:
        return (f"<UpstreamPool {self.config.name} {self.config.balance.value} "
                f"servers={len(self.servers)}>")


def body_now(upstream: aiohttp.ClientResponse) -> bytes:
    """What arrived of the body so far: all of it once ``upstream.content.is_eof()``."""
    try:
        return upstream.content.read_nowait()
    except UPSTREAM_FAILURES as exc:
        raise translate(exc) from exc


async def body_chunks(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response body as it arrives, with back-pressure (aiohttp pauses reading from
    the socket while its buffer is full)."""
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except UPSTREAM_FAILURES as exc:
        raise translate(exc) from exc


def start_idle_timeout(upstream: aiohttp.ClientResponse, idle: float | None) -> None:
    """Time out silences of more than ``idle`` seconds in the rest of the response body.

    This is aiohttp's own sock_read timer (restarted by every read, stopped at the end of
    the body and while reading is paused for back-pressure), switched on only now: most
    responses are complete when their headers arrive and never need the timer.
    """
    conn = upstream.connection
    if not idle or conn is None or conn.protocol is None:
        return  # no limit, or the body is complete and the connection released
    protocol = conn.protocol
    protocol.read_timeout = idle
    transport = conn.transport
    if transport is not None and transport.is_reading():
        protocol.start_timeout()
    # While paused (back-pressure) aiohttp starts the timer itself on resuming.


# Foreign exception -> ringproxy's, first match wins (a subclass before its base).  This is
# every failure an upstream can cause on the way: what is not listed is not the upstream's
# doing and must not be judged as such (httpx's transport mapping is the model).
_TRANSLATIONS: tuple[tuple[type[Exception], type[UpstreamError]], ...] = (
    (aiohttp.ConnectionTimeoutError, UpstreamConnectTimeout),  # a TimeoutError too
    (TimeoutError, UpstreamTimeout),  # asyncio's, and aiohttp's sock_read timeout
    (aiohttp.ClientConnectorError, UpstreamConnectError),  # refused, unreachable, DNS, TLS
    (aiohttp.ServerDisconnectedError, UpstreamResetError),
    (aiohttp.ClientOSError, UpstreamResetError),
    (ConnectionError, UpstreamResetError),
    (aiohttp.ClientResponseError, UpstreamBadResponse),  # a malformed status line or headers
    (aiohttp.ClientError, UpstreamBadResponse),  # a broken body, a connection closed mid-way
)
UPSTREAM_FAILURES: tuple[type[Exception], ...] = tuple(foreign for foreign, _ in _TRANSLATIONS)


def translate(exc: Exception) -> UpstreamError:
    """The ringproxy error for one of ``UPSTREAM_FAILURES``; used as
    ``except UPSTREAM_FAILURES as exc: raise translate(exc) from exc``."""
    if isinstance(exc, UpstreamError):
        return exc  # already ours (UpstreamTimeout is a TimeoutError too)
    for foreign, ours in _TRANSLATIONS:
        if isinstance(exc, foreign):
            return ours(str(exc))
    raise TypeError(f"{type(exc).__name__} is not an upstream failure") from exc
