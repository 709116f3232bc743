"""The request path: route, assign a ring, forward to the ring's pool, stream back.

This is the hot path.  Everything that can be computed per config already was (routing
table, ring runtimes, client timeouts, headers to add); per request we look up the route,
evaluate precompiled predicates, build the upstream headers and stream both bodies with
back-pressure (aiohttp's readers pause the socket when their buffer fills, so a 1 GiB
body holds constant memory).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.assign import Decision, assign
from proxy.config import Route
from proxy.errors import Overloaded, UpstreamError
from proxy.headers import (
    X_REQUEST_ID,
    downstream_response_headers,
    new_request_id,
    request_id_of,
    upstream_request_headers,
)
from proxy.pool import translate
from proxy.runtime import RingRuntime, Runtime
from proxy.wsproxy import is_websocket_upgrade, proxy_websocket

_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange:
    """What one request did, for the access log (and, later, metrics)."""

    __slots__ = ("bytes_in", "bytes_out", "error", "request_id", "server", "status")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.server = ""
        self.error = ""


class ProxyHandler:
    def __init__(self, runtime: Runtime, access_log: AccessLog | None = None) -> None:
        self.runtime = runtime  # swapped whole on reload; read once per request
        self.access_log = access_log

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        runtime = self.runtime
        ex = Exchange(request_id_of(request.headers))
        compiled = runtime.table.match(request.host, request.path)
        if compiled is None:
            ex.error = "no_route"
            response = _local_response(404, "no route for this host and path", ex)
            self._finish(request, ex, started, None, None)
            return response
        decision = assign(compiled, request, new_request_id if compiled.anonymous else None)
        ring = runtime.rings[compiled.route.name][decision.index]
        # Headers only some routes add to the client's response (None on the common path).
        extra = _response_extras(request, compiled.route, decision)
        try:
            if ring.limit is not None and ring.inflight >= ring.limit:
                raise Overloaded(f"ring {ring.name!r} has {ring.limit} requests in flight")
            ring.inflight += 1
            try:
                return await self._forward(request, ring, decision, ex, extra)
            finally:
                ring.inflight -= 1
        except UpstreamError as exc:
            ex.error = exc.kind
            response = _local_response(exc.status, exc.reason, ex, retry_after=exc.status == 503)
            if extra:
                response.headers.extend(extra)
            return response
        except asyncio.CancelledError:  # the client went away while we waited upstream
            ex.error = ex.error or "client_closed"
            raise
        finally:
            self._finish(request, ex, started, ring, decision)

    async def _forward(
        self,
        request: web.BaseRequest,
        ring: RingRuntime,
        decision: Decision,
        ex: Exchange,
        extra: list[tuple[str, str]] | None,
    ) -> web.StreamResponse:
        pool = ring.pool
        server = pool.pick()
        ex.server = server.upstream.url
        websocket = is_websocket_upgrade(request)
        headers = upstream_request_headers(
            request.headers,
            client_ip=request.remote or "",
            proto=request.scheme,
            host=None if pool.config.preserve_host else server.host_header,
            request_id=ex.request_id,
            ring=ring.name,
            extra=ring.extra_headers,
            websocket=websocket,
        )
        if ring.reason_header:
            headers["X-Ring-Reason"] = decision.reason.value
        for name in ring.strip_headers:
            headers.popall(name, None)
        server.inflight += 1
        try:
            if websocket:
                ws = await proxy_websocket(request, ring, server, headers)
                ex.status = 101
                return ws
            return await self._http(request, ring, server.url, headers, ex, extra)
        finally:
            server.inflight -= 1

    async def _http(
        self,
        request: web.BaseRequest,
        ring: RingRuntime,
        make_url: Any,
        headers: Any,
        ex: Exchange,
        extra: list[tuple[str, str]] | None,
    ) -> web.StreamResponse:
        session = ring.pool.session
        assert session is not None, "pool not started"
        rel = request.rel_url
        url = make_url(rel.raw_path, rel.raw_query_string)
        data = None
        if request.body_exists:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(_CONTINUE)
            # The ring timeout counts from the moment the body is fully sent.
            timer = asyncio.timeout(None)
            data = _upload(request, timer, ring.timeout, ex)
        else:
            timer = asyncio.timeout(ring.timeout)
        try:
            async with timer:
                upstream = await session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    timeout=ring.client_timeout,
                )
        except Exception as exc:
            raise translate(exc) from exc
        try:
            return await _relay(request, upstream, ex, extra)
        finally:
            upstream.release()

    def _finish(
        self,
        request: web.BaseRequest,
        ex: Exchange,
        started: float,
        ring: RingRuntime | None,
        decision: Decision | None,
    ) -> None:
        now = time.monotonic()
        duration = now - started
        if ring is not None and ring.recorder is not None:
            ring.recorder.record(ex.status, ex.error, duration, ex.bytes_in, ex.bytes_out, now)
        if self.access_log is None:
            return
        self.access_log.log(
            {
                "time": "",  # filled in by the access log, kept first for readability
                "request_id": ex.request_id,
                "client": request.remote,
                "method": request.method,
                "host": request.host,
                "path": request.path,
                "status": ex.status,
                "duration_ms": round(duration * 1000, 3),
                "route": ring.route if ring else None,
                "ring": ring.name if ring else None,
                "reason": decision.reason.value if decision else None,
                "bucket": decision.bucket if decision else None,
                "pool": ring.pool.config.name if ring else None,
                "upstream": ex.server or None,
                "bytes_in": ex.bytes_in,
                "bytes_out": ex.bytes_out,
                "error": ex.error or None,
                "revision": decision.revision if decision else self.runtime.config.revision,
            }
        )


async def _upload(
    request: web.BaseRequest, timer: asyncio.Timeout, ring_timeout: float, ex: Exchange
) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        ex.bytes_in += len(chunk)
        yield chunk
    timer.reschedule(asyncio.get_running_loop().time() + ring_timeout)


async def _relay(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    ex: Exchange,
    extra: list[tuple[str, str]] | None,
) -> web.StreamResponse:
    ex.status = upstream.status
    headers = downstream_response_headers(upstream.headers, ex.request_id)
    if extra:
        headers.extend(extra)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    try:
        await response.prepare(request)
        if request.method == "HEAD" or upstream.status in _NO_BODY_STATUS:
            return response
        async for chunk in upstream.content.iter_any():
            ex.bytes_out += len(chunk)
            await response.write(chunk)
    except ConnectionResetError:  # the client went away; aiohttp releases the upstream
        ex.error = "client_closed"
        return response
    except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, TimeoutError) as exc:
        # The status line is gone already: the only honest signal left is to cut the
        # connection, so the client sees a short body instead of a complete-looking one.
        ex.error = translate(exc).kind
        if request.transport is not None:
            request.transport.close()
        return response
    return response


def _response_extras(
    request: web.BaseRequest, route: Route, decision: Decision
) -> list[tuple[str, str]] | None:
    if decision.new_id is None and not route.decision.response:
        return None
    extra = []
    if route.decision.response:
        extra += [("X-Ring", decision.ring), ("X-Ring-Reason", decision.reason.value)]
    if decision.new_id is not None and route.sticky and route.sticky.anonymous:
        cookie = route.sticky.anonymous
        value = f"{cookie.name}={decision.new_id}{cookie.attributes()}"
        if cookie.secure == "always" or (cookie.secure == "auto" and _came_over_https(request)):
            value += "; Secure"
        extra.append(("Set-Cookie", value))
    return extra


def _came_over_https(request: web.BaseRequest) -> bool:
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "")
    return proto.split(",")[0].strip().lower() == "https"


def _local_response(
    status: int, message: str, ex: Exchange, retry_after: bool = False
) -> web.Response:
    ex.status = status
    response = web.Response(status=status, text=f"ringproxy: {message}\n")
    response.headers[X_REQUEST_ID] = ex.request_id
    if retry_after:
        response.headers["Retry-After"] = "1"
    return response
