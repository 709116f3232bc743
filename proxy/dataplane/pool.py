"""Upstream pools: one pooled, keep-alive aiohttp client per pool, and server selection.

This is the boundary where aiohttp's client exceptions are translated into ringproxy's
(see ``translate``).  Server URLs were parsed at config load; per request only the path
and query are put together.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

import aiohttp
from aiohttp import hdrs
from multidict import CIMultiDict, CIMultiDictProxy, istr
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
_SKIPPED = CIMultiDictProxy(CIMultiDict((name, None) for name in sorted(_SKIP)))
# Every header aiohttp would add on its own is skipped (checked, not assumed: a later
# aiohttp with more default headers turns the shortcut below off).
_SKIPS_ALL = {istr(h) for h in aiohttp.ClientRequest.DEFAULT_HEADERS} | {hdrs.USER_AGENT} <= _SKIP


class _UpstreamRequest(aiohttp.ClientRequest):
    """aiohttp's request, minus per-request work whose result is known in advance.

    With every automatic header skipped, ``update_auto_headers`` adds nothing; all it
    leaves behind is the skip list (which a POST consults before adding a Content-Type).
    aiohttp rebuilds that list for every request (sorted, into a new multidict, plus a copy
    of the headers): a noticeable share of a small request's cost.  Here it is built once.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if _SKIPS_ALL and skip_auto_headers == _SKIP:
            self._skip_auto_headers = _SKIPPED  # type: ignore[assignment]  # read-only
            return
        super().update_auto_headers(skip_auto_headers)



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


def translate(exc: BaseException) -> UpstreamError:
    """aiohttp/OS exception -> ringproxy's; callers ``raise translate(e) from e``."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamConnectTimeout(str(exc) or "connect timed out")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return UpstreamTimeout("no response within the ring timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"cannot connect to {exc.host}:{exc.port}: {exc.strerror}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamResetError("upstream closed the connection without a response")
    if isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        return UpstreamResetError(f"connection error: {exc}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamBadResponse(f"malformed response: {exc.message}")
    return UpstreamBadResponse(f"{type(exc).__name__}: {exc}")
