"""The request path: decide, forward to the ring's pool, stream back.

This is the hot path.  Everything that can be computed per config already was (routing
table, ring runtimes, client timeouts, headers to add); per request ``decide`` looks up
the route, evaluates precompiled predicates and builds the upstream headers, and the
handler does the I/O: it sends through the pool and streams both bodies with
back-pressure (aiohttp's readers pause the socket when their buffer fills, so a 1 GiB
body holds constant memory).

Outcomes: an upstream failure is the ``UpstreamError`` the pool translated it into (502,
503, 504); any other exception is a defect of the proxy: a 500, logged with its
traceback, recorded as ``internal`` and never counted against the ring's version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.deadlines import IDLE, Deadlines, Waiter
from proxy.dataplane.decide import Forward, LocalAnswer, decide
from proxy.dataplane.headers import X_REQUEST_ID, downstream_response_headers, request_id_of
from proxy.dataplane.pool import body_chunks, body_now, start_idle_timeout
from proxy.dataplane.websocket import proxy_websocket
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.runtime import Runtime

log = logging.getLogger("ringproxy.dataplane")

_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
INTERNAL = "internal"  # the error of a request that failed on a defect of the proxy
BAD_REQUEST = "bad_request"  # the error of a client's request the proxy refused


class Exchange(Waiter):
    """What one request did, for the access log and the ring's metrics recorder; also its
    entry in its ring timeout's ``Deadlines``."""

    __slots__ = ("bytes_in", "bytes_out", "error", "request_id", "server", "status")

    def __init__(self, request_id: str) -> None:
        # (Waiter's fields set here too: one call less per request.)
        self.task: asyncio.Task[object] | None = None
        self.timer = IDLE
        self.expired = False
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
        ex = Exchange(request_id_of(request.headers))
        step: Forward | LocalAnswer | None = None
        try:
            step = decide(self.runtime, request, ex.request_id)
            if isinstance(step, Forward):
                return await self._forward(request, step, ex)
            ex.error = step.error
            return _local_response(step.status, step.message, ex, step.retry_after, step.extra)
        except UpstreamError as exc:
            ex.error = exc.kind
            return _local_response(exc.status, exc.reason, ex, exc.status == 503,
                                   step.extra if step is not None else ())
        except asyncio.CancelledError:  # the client went away while we waited upstream
            ex.error = ex.error or "client_closed"
            raise
        except ConnectionResetError:  # the client went away as we wrote (a 100 Continue)
            ex.error = "client_closed"
            raise
        except web.HTTPException as exc:  # aiohttp refused the client (a bad WS handshake)
            ex.status = exc.status
            ex.error = BAD_REQUEST  # the client's doing: never judged against the ring
            raise
        except Exception:
            _internal_error(request, ex)
            return _local_response(500, "internal error", ex)
        finally:
            self._finish(request, ex, started, step)

    async def _forward(
        self, request: web.BaseRequest, fwd: Forward, ex: Exchange
    ) -> web.StreamResponse:
        ring, server = fwd.ring, fwd.server
        ex.server = server.upstream.url
        ring.inflight += 1
        server.inflight += 1
        try:
            if fwd.websocket:
                ws = await proxy_websocket(request, ring.pool, fwd.url, fwd.headers, ring.timeout)
                ex.status = 101
                return ws
            # Plain HTTP, inline rather than one more coroutine per request.
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
                upstream = await ring.pool.request(request.method, fwd.url, fwd.headers, data)
            except asyncio.CancelledError:
                # The deadline fired (and nobody else cancelled the task meanwhile, such as
                # the client going away): a timeout, as ``asyncio.timeout`` would report it.
                if ex.expired and ex.task is not None and ex.task.uncancel() == 0:
                    raise UpstreamTimeout("no response within the ring timeout") from None
                raise
            finally:
                deadlines.disarm(ex)
            try:
                return await _relay(request, upstream, ex, fwd.extra, ring.idle_timeout)
            finally:
                upstream.release()
        finally:
            server.inflight -= 1
            ring.inflight -= 1

    def _finish(
        self,
        request: web.BaseRequest,
        ex: Exchange,
        started: float,
        step: Forward | LocalAnswer | None,
    ) -> None:
        now = time.monotonic()
        duration = now - started
        ring = step.ring if step is not None else None
        if ring is not None and ring.recorder is not None:
            ring.recorder.record(ex.status, ex.error, duration, ex.bytes_in, ex.bytes_out, now)
        if self.access_log is None:
            return
        decision = step.decision if step is not None else None
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


async def _relay(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    ex: Exchange,
    extra: tuple[tuple[str, str], ...],
    idle_timeout: float | None,
) -> web.StreamResponse:
    ex.status = status = upstream.status
    response = web.StreamResponse(status=status, reason=upstream.reason)
    headers = downstream_response_headers(upstream.headers, ex.request_id, response.headers)
    if extra:
        headers.extend(extra)
    # (HEAD, 204 and 304 responses have an empty body, complete at once.)
    complete = upstream.content.is_eof()
    if not complete:
        start_idle_timeout(upstream, idle_timeout)
    try:
        await response.prepare(request)
        if request.method == "HEAD" or status in _NO_BODY_STATUS:
            return response
        if complete:
            # The whole body came with the headers (most small responses): one write, no
            # async iteration over the stream.
            body = body_now(upstream)
            if body:
                ex.bytes_out += len(body)
                await response.write(body)
            return response
        async for chunk in body_chunks(upstream):
            ex.bytes_out += len(chunk)
            await response.write(chunk)
    except ConnectionResetError:  # the client went away; aiohttp releases the upstream
        ex.error = "client_closed"
    except UpstreamError as exc:
        # The status line is gone already: the only honest signal left is to cut the
        # connection, so the client sees a short body instead of a complete-looking one.
        ex.error = exc.kind
        _cut(request)
    except Exception:
        if not response.prepared:
            raise  # the handler answers 500
        _internal_error(request, ex)
        _cut(request)
    return response


def _cut(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.close()


def _internal_error(request: web.BaseRequest, ex: Exchange) -> None:
    """A defect of the proxy (call from an ``except`` block): logged with its traceback,
    recorded as ``internal``, which metrics never count against the ring's version."""
    log.exception("internal error on %s %s (request %s)", request.method, request.path,
                  ex.request_id)
    ex.error = INTERNAL


def _local_response(
    status: int,
    message: str,
    ex: Exchange,
    retry_after: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> web.Response:
    ex.status = status
    response = web.Response(status=status, text=f"ringproxy: {message}\n")
    response.headers[X_REQUEST_ID] = ex.request_id
    if retry_after:
        response.headers["Retry-After"] = "1"
    if extra:
        response.headers.extend(extra)
    return response
