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
from multidict import istr

from proxy.config import Route
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.headers import (
    X_REQUEST_ID,
    downstream_response_headers,
    new_request_id,
    request_id_of,
    upstream_request_headers,
)
from proxy.dataplane.pool import translate
from proxy.dataplane.websocket import is_websocket_upgrade, proxy_websocket
from proxy.errors import Overloaded, UpstreamError
from proxy.routing.assign import Decision, assign
from proxy.runtime import RingRuntime, Runtime

_NO_BODY_STATUS = frozenset({204, 304})
UPGRADE = istr("Upgrade")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange:
    """What one request did, for the access log and the ring's metrics recorder.

    It is also the request's entry in its ring timeout's ``Deadlines``: ``task`` is what
    to cancel, ``timer`` says where the deadline stands (``_IDLE``, ``_ARMED``, ``_OVER``).
    """

    __slots__ = (
        "bytes_in", "bytes_out", "error", "expired", "request_id", "server", "status", "task",
        "timer",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.server = ""
        self.error = ""
        self.task: asyncio.Task[Any] | None = None
        self.timer = _IDLE
        self.expired = False


_IDLE, _ARMED, _OVER = 0, 1, 2


class Deadlines:
    """The ring timeouts of all requests that share one timeout value, on a single timer.

    ``asyncio.timeout()`` per request costs a Timeout object, a timer handle scheduled and
    cancelled in the event loop, and its enter/exit: several microseconds, for a deadline
    that almost never fires.  Here a request's deadline is one dict insertion and one
    removal.  All entries have the same timeout, so insertion order is deadline order: the
    one timer is armed for the oldest entry; when it fires, finished requests are long gone
    from the dict, expired ones are cancelled (as ``asyncio.timeout`` does: the task is
    cancelled and the handler turns that CancelledError into a timeout), and the timer is
    re-armed for the oldest request still waiting.  With steady traffic it fires about once
    per ``timeout``.
    """

    __slots__ = ("_handle", "_loop", "_pending", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self.timeout = timeout
        self._pending: dict[Exchange, float] = {}  # insertion order is deadline order
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, ex: Exchange) -> None:
        """Start ``ex``'s deadline now (no-op once it is over: a late end of an upload)."""
        if ex.timer != _IDLE:
            return
        ex.timer = _ARMED
        when = self._loop.time() + self.timeout
        self._pending[ex] = when
        if self._handle is None:
            self._handle = self._loop.call_at(when, self._fire)

    def disarm(self, ex: Exchange) -> None:
        """The wait is over (answer, error or cancellation): the deadline no longer applies."""
        ex.timer = _OVER
        self._pending.pop(ex, None)

    def _fire(self) -> None:
        self._handle = None
        now = self._loop.time()
        pending = self._pending
        while pending:
            ex = next(iter(pending))
            when = pending[ex]
            if when > now:
                self._handle = self._loop.call_at(when, self._fire)
                return
            del pending[ex]
            ex.timer = _OVER
            ex.expired = True
            if ex.task is not None:
                ex.task.cancel()

    def __repr__(self) -> str:
        return f"<Deadlines {self.timeout:g}s pending={len(self._pending)}>"


class ProxyHandler:
    def __init__(self, runtime: Runtime, access_log: AccessLog | None = None) -> None:
        self.runtime = runtime  # swapped whole on reload; read once per request
        self.access_log = access_log
        # One Deadlines per ring timeout value in use (a handful), made on first use.
        self._deadlines: dict[float, Deadlines] = {}

    def _deadlines_for(self, timeout: float) -> Deadlines:
        deadlines = self._deadlines.get(timeout)
        if deadlines is None:
            deadlines = Deadlines(asyncio.get_running_loop(), timeout)
            self._deadlines[timeout] = deadlines
        return deadlines

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
        route = compiled.route
        extra = (
            None if decision.new_id is None and not route.decision.response
            else _response_extras(request, route, decision)
        )
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
        # (The Upgrade test first: it is one lookup, and almost no request has one.)
        websocket = UPGRADE in request.headers and is_websocket_upgrade(request)
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
            # Plain HTTP, inline rather than one more coroutine per request.
            session = pool.session
            assert session is not None, "pool not started"
            rel = request.rel_url
            url = server.url(rel.raw_path, rel.raw_query_string)
            deadlines = self._deadlines.get(ring.timeout) or self._deadlines_for(ring.timeout)
            ex.task = asyncio.current_task()
            data = None
            if request.body_exists:
                if request.headers.get("Expect", "").lower() == "100-continue":
                    await request.writer.write(_CONTINUE)
                # The ring timeout counts from the moment the body is fully sent.
                data = _upload(request, deadlines, ex)
            else:
                deadlines.arm(ex)
            try:
                # No sock_read timer while waiting for the headers (the ring timeout covers
                # that); _relay starts idle_timeout only if it has to wait for the body.
                upstream = await session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                )
            except asyncio.CancelledError:
                # The deadline fired (and nobody else cancelled the task meanwhile, such as
                # the client going away): a timeout, as ``asyncio.timeout`` would report it.
                if ex.expired and ex.task is not None and ex.task.uncancel() == 0:
                    raise translate(TimeoutError()) from None
                raise
            except Exception as exc:
                raise translate(exc) from exc
            finally:
                deadlines.disarm(ex)
            try:
                return await _relay(request, upstream, ex, extra, ring.idle_timeout)
            finally:
                upstream.release()
        finally:
            server.inflight -= 1

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
    request: web.BaseRequest, deadlines: Deadlines, ex: Exchange
) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        ex.bytes_in += len(chunk)
        yield chunk
    deadlines.arm(ex)


def _start_idle_timeout(upstream: aiohttp.ClientResponse, idle: float | None) -> None:
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


async def _relay(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    ex: Exchange,
    extra: list[tuple[str, str]] | None,
    idle_timeout: float | None,
) -> web.StreamResponse:
    ex.status = upstream.status
    headers = downstream_response_headers(upstream.headers, ex.request_id)
    if extra:
        headers.extend(extra)
    content = upstream.content
    if not content.is_eof():  # (HEAD, 204 and 304 responses have an empty one at EOF)
        _start_idle_timeout(upstream, idle_timeout)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    try:
        await response.prepare(request)
        if request.method == "HEAD" or upstream.status in _NO_BODY_STATUS:
            return response
        if content.is_eof():
            # The whole body came with the headers (most small responses): one write, no
            # async iteration over the stream.
            body = content.read_nowait()
            if body:
                ex.bytes_out += len(body)
                await response.write(body)
            return response
        async for chunk in content.iter_any():
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
) -> list[tuple[str, str]]:
    """X-Ring/X-Ring-Reason and an anonymous id's cookie (the caller checks they apply)."""
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
