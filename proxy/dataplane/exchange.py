"""One request's life: decide, buffer or stream the body, send, relay the answer, record.

An ``Exchange`` is driven by callbacks, not a task: the client connection gives it the
request's head (``begin``), body pieces and end; the pool gives it an upstream connection;
the upstream connection gives it the response's head, body pieces and end.  Each step
does its I/O at once (a write to a transport) and returns.

- A body up to ``limits.request_buffer`` bytes is read whole before an upstream
  connection is taken (slow uploads never hold the pool); a larger one streams.
- The ring timeout runs from the request fully sent to the response head; the ring's
  idle timeout bounds silences in the response body.
- The client's framing is the proxy's: Content-Length passes through, anything else is
  re-framed chunked for HTTP/1.1 clients and close-delimited for HTTP/1.0 ones.
- An upstream failure before the response head is the proxy's own 502/503/504 with a short
  body; after it, the client connection is cut (a short body, never a complete-looking one).
- Anything else raised is a defect of the proxy: a 500 (or a cut), logged once with its
  traceback, recorded as ``internal`` and never judged against the ring's version.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Final

try:  # the kernel's send queue of a socket (Linux): an upload's progress (``unsent``)
    import fcntl
    import termios
    _OUTQ: int | None = termios.TIOCOUTQ if sys.platform == "linux" else None
except ImportError:  # pragma: no cover - not a POSIX system
    _OUTQ = None

from proxy.dataplane import framing
from proxy.dataplane.deadlines import Deadlines
from proxy.dataplane.decide import NO_ROUTE, Forward, LocalAnswer, decide, upstream_head
from proxy.dataplane.headers import READY_IDS, VIA_VALUE, joined, new_request_id, request_id_ok
from proxy.dataplane.request import Request
from proxy.dataplane.tunnel import TUNNEL_IDLE, Tunnel
from proxy.dataplane.upstream import UpstreamConnection
from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.health.retry import failure_reason, retryable

if TYPE_CHECKING:
    from proxy.dataplane.client import ClientConnection

log = logging.getLogger("ringproxy.dataplane")

INTERNAL: Final = "internal"  # the error of a request that failed on a defect of the proxy
BAD_REQUEST: Final = "bad_request"  # the error of a client's request the proxy refused
CLIENT_CLOSED: Final = "client_closed"
CLIENT_TIMEOUT: Final = "client_timeout"  # the client stopped reading the response

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
_CLOSE: Final = b"Connection: close\r\n"
_KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"
_VIA_LINE: Final = b"Via: " + VIA_VALUE + b"\r\n"
_NO_BODY_STATUS: Final = frozenset({204, 304})
_ZERO_LENGTH: Final = b"Content-Length: 0\r\n\r\n"

# States of an exchange.
NEW: Final = 0
BUFFERING: Final = 1
CONNECTING: Final = 2
SENDING: Final = 3
RESPONDING: Final = 4
TUNNEL: Final = 5
DONE: Final = 6
# How the response body is framed for the client.
F_NONE: Final = 0
F_LENGTH: Final = 1
F_CHUNKED: Final = 2
F_CLOSE: Final = 3

_STATUS_LINES: Final[dict[tuple[int, bytes], bytes]] = {}
_PROTOCOLS: Final = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}  # the access log's protocol field
_UPGRADED: Final[dict[bytes, str]] = {}


def _upgraded_protocol(upgrade: bytes) -> str:
    """The access log's protocol after a 101: ``upgrade/`` and the first protocol the
    Upgrade header names, lower-cased, in safe characters, at most 32 (``upgrade/websocket``)."""
    name = _UPGRADED.get(upgrade)
    if name is None:
        token = upgrade.split(b",")[0].strip().lower()[:32].decode("latin-1")
        token = "".join(c if c.isascii() and (c.isalnum() or c in "./_-") else "_"
                        for c in token)
        name = "upgrade/" + (token or "unknown")
        if len(_UPGRADED) < 64:
            _UPGRADED[upgrade] = name
    return name


def _status_line(status: int, reason: bytes) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %b\r\n" % (status, reason)
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[key] = line
    return line


def unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's kernel send queue (``TIOCOUTQ``); 0 where unknown."""
    if _OUTQ is None:
        return 0
    sock = transport.get_extra_info("socket")
    try:
        got = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except (OSError, AttributeError, ValueError):
        return 0
    return int.from_bytes(got, sys.byteorder, signed=True)


def _stall_timeout(step: Forward) -> float:
    """How long an upstream may leave the request body unread (its write buffer full)."""
    return step.ring.idle_timeout or step.ring.timeout


class Exchange:
    """What one request did, for the access log and the ring's metrics recorder."""

    __slots__ = (
        "attempt",
        "attempt_started",
        "buffer",
        "buffered",
        "bytes_in",
        "bytes_out",
        "client",
        "client_mark",
        "conn",
        "deadlines",
        "error",
        "framing",
        "idle_armed",
        "keep_alive",
        "max_body",
        "pending_answer",
        "pending_head",
        "request",
        "request_id",
        "resend",
        "sent_at",
        "server_url",
        "stall_mark",
        "started",
        "state",
        "status",
        "step",
        "stream_chunked",
        "upgraded",
        "upstream_ms",
        "upstream_paused",
    )

    def __init__(self, client: ClientConnection, request: Request, keep_alive: bool) -> None:
        self.client = client
        self.request = request
        self.keep_alive = keep_alive
        rid = request.request_id
        if rid:
            ids = client.plane.runtime.config.request_id
            self.request_id = (rid.decode() if ids.trust_incoming
                               and request_id_ok(rid, ids.max_length) else new_request_id())
        else:
            self.request_id = READY_IDS.pop() if READY_IDS else new_request_id()
        self.started = time.monotonic()
        self.state = NEW
        self.step: Forward | LocalAnswer | None = None
        self.conn: UpstreamConnection | None = None
        self.deadlines: Deadlines | None = None  # the ring timeout's, while it runs
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.status = 0
        self.error = ""
        self.server_url = ""
        self.framing = F_NONE
        self.pending_head = b""
        self.pending_answer: LocalAnswer | None = None
        self.max_body: int | None = None
        self.stream_chunked = False
        self.upstream_paused = False
        self.idle_armed = False
        self.client_mark = 0  # while the client is not reading: _delivered() then
        self.attempt = 1  # the upstream attempt (2: the first retry)
        self.attempt_started = self.started
        self.resend: bytes | None = None  # the whole body sent (a retry sends it again)
        self.sent_at = 0.0  # when the (last) attempt's head went to the upstream
        self.upstream_ms: float | None = None  # from then to the response head
        self.upgraded = ""  # after a 101: the access log's protocol ("upgrade/websocket")

    # ------------------------------------------------------------------ the client's side

    def begin(self) -> None:
        """The request's turn: decide, then answer, buffer or connect."""
        try:
            self._begin()
        except Exception as exc:
            self.defect(exc)

    def pending_answer_rejection(self, rejection: framing.Rejection) -> None:
        """Refuse this request when its turn comes (a pipelined one)."""
        self.error = BAD_REQUEST
        self.keep_alive = False
        self.pending_answer = LocalAnswer(rejection.status, rejection.reason, BAD_REQUEST)

    def _begin(self) -> None:
        request = self.request
        refused = self.pending_answer
        if refused is not None:
            self.pending_answer = None
            self.answer(refused.status, refused.message)
            return
        runtime = self.client.plane.runtime
        step = self.step = decide(runtime, request, self.request_id)
        if isinstance(step, LocalAnswer):
            if step is NO_ROUTE:
                runtime.unrouted.value += 1
            self.error = step.error
            if request.complete or not request.has_body:
                self.answer(step.status, step.message, step.retry_after, step.extra)
            elif request.expect_continue or not self._small_body():
                # The body is not wanted: answer now and close rather than read it.
                self.keep_alive = False
                self.answer(step.status, step.message, step.retry_after, step.extra)
            else:
                self.pending_answer = step  # answered once the (small) body is in
            return
        ring = step.ring
        max_body = ring.max_body
        if max_body is not None:
            self.max_body = max_body
            length = request.content_length
            if (length is not None and length > max_body) or self.bytes_in > max_body:
                self.error = BAD_REQUEST
                self.keep_alive = False
                self.answer(*framing.BODY_TOO_LARGE, extra=step.extra)
                return
        self.server_url = step.server.upstream.url
        ring.inflight += 1
        step.server.inflight += 1
        budget = ring.pool.budget
        if budget is not None:
            budget.request(self.started)
        if request.complete or not request.has_body or request.upgrade:
            self._acquire()
            return
        if request.expect_continue and request.version == "1.1" and not self.bytes_in:
            self.client.write(_CONTINUE)
        if self._small_body():
            self.state = BUFFERING  # taken whole before an upstream connection
            if self.buffered > self.client.limits.request_buffer:
                self._acquire()
        else:
            self._acquire()

    def _small_body(self) -> bool:
        limit = self.client.limits.request_buffer
        length = self.request.content_length
        return limit > 0 and (length is None or length <= limit)

    def request_body(self, data: bytes) -> None:
        """A piece of the request body arrived."""
        self.bytes_in += len(data)
        if self.max_body is not None and self.bytes_in > self.max_body:
            self.error = BAD_REQUEST
            self.keep_alive = False
            self._close_upstream()
            self.answer_or_cut(*framing.BODY_TOO_LARGE)
            return
        state = self.state
        conn = self.conn
        if state >= SENDING and conn is not None:
            if not self.request.complete:
                conn.write(framing.chunk(data) if self.stream_chunked else data)
            return
        if state == DONE or self.pending_answer is not None:
            return  # a body nobody reads (an answer already given, or about to be)
        self.buffer.append(data)
        self.buffered += len(data)
        if state == BUFFERING and self.buffered > self.client.limits.request_buffer:
            self._acquire()
        if state == CONNECTING or self.state == CONNECTING:
            self.client.pause(self.client.WAIT)

    def request_complete(self) -> None:
        """The request body is complete (called after its last ``request_body``)."""
        request = self.request
        request.complete = True
        if self.pending_answer is not None:
            answer, self.pending_answer = self.pending_answer, None
            self.answer(answer.status, answer.message, answer.retry_after, answer.extra)
            return
        state = self.state
        if state == BUFFERING:
            self._acquire()
        elif state >= SENDING and self.conn is not None and state != DONE:
            if self.stream_chunked:
                self.conn.write(framing.LAST_CHUNK)
            self._request_sent()

    def request_broken(self, rejection: framing.Rejection) -> None:
        """The request body turned malformed: both connections are closed."""
        self.error = BAD_REQUEST
        self.keep_alive = False
        self._close_upstream()
        self.answer_or_cut(*rejection)

    def client_lost(self) -> None:
        """The client went away before the exchange was done."""
        if self.state == DONE:
            return
        if self.state == TUNNEL:
            return  # the tunnel finishes it
        self.error = self.error or CLIENT_CLOSED
        self._close_upstream()
        self.finish()

    def client_write_paused(self, paused: bool) -> None:
        conn = self.conn
        if conn is None:
            return
        if paused:
            conn.pause_reading()
            # The ring's idle timeout now bounds the client's silence: a client that stops
            # reading cannot hold the upstream connection, its pool slot and the ring's
            # in-flight count forever (NGINX's send_timeout).
            step = self.step
            if isinstance(step, Forward) and step.ring.idle_timeout:
                self.idle_armed = True
                self.client_mark = self._delivered()
                self.client.plane.timers(step.ring.idle_timeout).arm(self, self._client_stalled)
        else:
            conn.resume_reading()
            if self.state == RESPONDING:
                self._arm_idle()

    def _client_stalled(self) -> None:
        """The client read nothing for the ring's idle timeout: the client's doing, never
        the server's nor the version's (recorded as ``client_timeout``).  A client that
        read some of it meanwhile is slow, not gone: the wait starts again (NGINX's
        send_timeout is between two writes, not for the whole response)."""
        if self.state == DONE:
            return
        step = self.step
        if self.client.paused_writing and isinstance(step, Forward):
            delivered = self._delivered()
            if delivered > self.client_mark:
                self.client_mark = delivered
                self.client.plane.timers(step.ring.idle_timeout).arm(self, self._client_stalled)
                return
        self.error = CLIENT_TIMEOUT
        self.keep_alive = False
        self._close_upstream()
        self.answer_or_cut(408, "client stopped reading")

    def _delivered(self) -> int:
        """A count that grows only as the client reads this response: the body bytes
        written less those it has not read yet (the transport's buffer and the kernel's
        send queue; a write adds as much to both)."""
        return self.bytes_out - self.client.unread()

    # ------------------------------------------------------------------ the pool's side

    def _acquire(self) -> None:
        step = self.step
        assert isinstance(step, Forward)
        self.state = CONNECTING
        conn = step.ring.pool.acquire(step.server, self)
        if conn is not None:
            self._send(conn)  # (a defect here is begin's or request_body's to catch)
        elif self.state == CONNECTING and not self.request.complete:
            self.client.pause(self.client.WAIT)

    def upstream_ready(self, conn: UpstreamConnection) -> None:
        if self.state != CONNECTING:
            conn.pool.release(conn)  # the client left meanwhile: a fresh, unused connection
            return
        try:
            self._send(conn)
        except Exception as exc:
            self.defect(exc)

    def _send(self, conn: UpstreamConnection) -> None:
        step = self.step
        assert isinstance(step, Forward)
        request = self.request
        self.conn = conn
        self.state = SENDING
        body = b"".join(self.buffer) if self.buffer else b""
        self.buffer = []
        complete = request.complete
        if request.upgrade and step.upgrade:
            framing_line = b"\r\n"
            body = b""
        elif not request.has_body:
            framing_line = b"\r\n" if request.content_length is None else _ZERO_LENGTH
        elif complete:
            framing_line = b"Content-Length: %d\r\n\r\n" % len(body)
        elif request.content_length is not None:
            framing_line = b"Content-Length: %d\r\n\r\n" % request.content_length
        else:
            framing_line = b"Transfer-Encoding: chunked\r\n\r\n"
            self.stream_chunked = True
            if body:
                body = framing.chunk(body)
        if complete or not request.has_body:
            self.resend = body  # sent whole (a reference): a retry may send it again
        self.sent_at = time.monotonic()
        conn.send(self, step.head + framing_line + body, no_body=request.method == "HEAD",
                  upgrade=step.upgrade, complete=complete)
        client = self.client
        if client.paused_writing:
            conn.pause_reading()  # (a pipelined request behind a slow reader's response)
        if client.pausing & client.WAIT:
            client.resume(client.WAIT)
        if complete and self.state == SENDING:
            # _request_sent, inline (conn.send marked the request sent): the ring timeout.
            deadlines = self.deadlines = client.plane.timers(step.ring.timeout)
            deadlines.arm(self, self._timed_out)

    def _request_sent(self) -> None:
        if self.conn is not None:
            self.conn.request_sent = True
        if self.state == SENDING:
            step = self.step
            assert isinstance(step, Forward)
            deadlines = self.deadlines = self.client.plane.timers(step.ring.timeout)
            deadlines.arm(self, self._timed_out)

    def _timed_out(self) -> None:
        if self.state == SENDING:
            self._close_upstream()
            self.upstream_failed(UpstreamTimeout("no response within the ring timeout"))

    def upstream_failed(self, exc: UpstreamError) -> None:
        if self.state == DONE:
            return
        step = self.step
        if isinstance(step, Forward) and self.state != TUNNEL and exc.server_fault:
            # The server's record (outlier ejection), then perhaps another server.
            step.ring.pool.health.failure(step.server, exc.kind)
            if self.state < RESPONDING and self._retry(step, failure_reason(exc.kind),
                                                      exc.kind, exc.status):
                return
        self.error = exc.kind
        self._close_upstream()
        if self.state == TUNNEL:
            return
        self.keep_alive = self.keep_alive and self.request.complete
        step = self.step
        extra = step.extra if step is not None else b""
        self.answer_or_cut(exc.status, exc.reason, exc.status == 503, extra)

    def upstream_defect(self, exc: BaseException) -> None:
        self._close_upstream()
        self.defect(exc)

    def upstream_write_paused(self, paused: bool) -> None:
        """The upstream's write buffer filled up (or drained): the client's reading follows.
        An upstream that reads none of the request body for the ring's idle timeout (its
        timeout if idle_timeout is 0) fails as a timeout (504, its fault), so it cannot hold
        the client, the connection and the ring's in-flight count forever.  The wait starts
        again whenever the buffer shrank (a slow reader is not a stalled one: NGINX's
        proxy_send_timeout restarts on every write), and never blames the upstream while
        the client is not reading the response (a full-duplex upstream blocked writing it
        stops reading too: the client is the slow one)."""
        self.upstream_paused = paused
        client = self.client
        step = self.step
        if paused:
            client.pause(client.UPSTREAM)
            if isinstance(step, Forward):
                self.stall_mark = self._upstream_buffered()  # (read only once armed)
                client.plane.timers(_stall_timeout(step)).arm(self.request, self._upload_stalled)
        else:
            client.resume(client.UPSTREAM)
            if isinstance(step, Forward):
                client.plane.timers(_stall_timeout(step)).disarm(self.request)

    def _upstream_buffered(self) -> int:
        """The request bytes not yet read by the upstream: the transport's buffer and,
        where the kernel tells (Linux), its socket's send queue (a slow reader frees that
        first; the transport's buffer moves only when the kernel wakes it)."""
        conn = self.conn
        transport = conn.transport if conn is not None else None
        if transport is None:
            return 0
        return transport.get_write_buffer_size() + unsent(transport)

    def _upload_stalled(self) -> None:
        if not (self.upstream_paused and self.conn is not None
                and SENDING <= self.state <= RESPONDING):
            return
        left = self._upstream_buffered()
        step = self.step
        if (left < self.stall_mark or self.client.paused_writing) and isinstance(step, Forward):
            # Progress, or the client's doing: wait again.
            self.stall_mark = left
            self.client.plane.timers(_stall_timeout(step)).arm(self.request, self._upload_stalled)
            return
        self.upstream_failed(UpstreamTimeout("the upstream stopped reading the request body"))

    # ------------------------------------------------------------------ the upstream's side

    def response_head(self, conn: UpstreamConnection) -> None:
        step = self.step
        assert isinstance(step, Forward)
        status = conn.status
        if status >= 500:
            if self._server_error(step, status):
                return  # retried on another server
        elif step.server.failures:
            step.ring.pool.health.success(step.server)
        if self.deadlines is not None:
            self.deadlines.disarm(self)
            self.deadlines = None
        self.upstream_ms = (time.monotonic() - self.sent_at) * 1000.0
        self.state = RESPONDING
        self.status = status
        request = self.request
        client = self.client
        line = _STATUS_LINES.get((status, conn.reason))  # (_status_line's hit, inline)
        parts = [line or _status_line(status, conn.reason), *conn.lines]
        parts.append(b"Via: " + joined(conn.via, VIA_VALUE) + b"\r\n" if conn.via else _VIA_LINE)
        if not conn.has_request_id:
            parts.append(b"X-Request-Id: " + self.request_id.encode() + b"\r\n")
        if step.extra:
            parts.append(step.extra)
        if request.method == "HEAD" or status in _NO_BODY_STATUS:
            self.framing = F_NONE
        elif conn.content_length is not None:
            self.framing = F_LENGTH
        elif request.version == "1.1":
            self.framing = F_CHUNKED
            parts.append(_CHUNKED)
        else:
            self.framing = F_CLOSE
            self.keep_alive = False
        if request.upgrade:
            self.keep_alive = False  # the client's parser stopped at the upgrade
        if not request.complete:
            self.keep_alive = False  # answered before the body was read: no reuse
        if client.closing and not client.queue:
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(_CLOSE)
        elif request.version == "1.0":
            parts.append(_KEEP_ALIVE)
        parts.append(b"\r\n")
        self.pending_head = b"".join(parts)

    def _server_error(self, step: Forward, status: int) -> bool:
        """A 5xx answer: a failure for outlier detection if the pool says so; retried (the
        response dropped with its connection) if the pool's retries name the status."""
        pool = step.ring.pool
        if pool.outlier_5xx:
            pool.health.failure(step.server, "5xx")
        elif step.server.failures:
            pool.health.success(step.server)
        return pool.budget is not None and self._retry(step, str(status), "", status)

    def _retry(self, step: Forward, reason: str | None, error: str, status: int) -> bool:
        """Send the request again to another server of the same pool, if allowed: a
        retryable failure and method, a body sent whole, attempts and budget left.  The
        failed attempt counts for the ring's version first (retries never hide errors)."""
        pool = step.ring.pool
        retries = pool.config.retries
        budget = pool.budget
        request = self.request
        # Whole: still all in the buffer (no connection yet), or sent whole.
        whole = ((request.complete or not request.has_body) if self.state == CONNECTING
                 else self.resend is not None)
        if (retries is None or budget is None or reason is None or reason not in retries.on
                or step.upgrade or not retryable(retries, request.method, whole, self.attempt)):
            return False
        server = pool.pick_other(step.server)
        if server is None:
            return False
        now = time.monotonic()
        if not budget.allow(now):
            return False
        recorder = step.ring.recorder
        if recorder is not None:
            recorder.attempt(status if not error else 0, error, now - self.attempt_started, now)
        pool.retried[reason] = pool.retried.get(reason, 0) + 1
        self._close_upstream()
        head = step.head
        if not pool.config.preserve_host or request.host_index < 0:
            head = upstream_head(request, step.ring, server, pool.config.preserve_host,
                                 self.request_id, step.decision, step.upgrade)
        step.server.inflight -= 1
        server.inflight += 1
        self.step = step.to(server, head)
        self.server_url = server.upstream.url
        self.attempt += 1
        self.attempt_started = now
        if self.resend is not None:
            self.buffer = [self.resend] if self.resend else []
            self.resend = None
        self.status = 0
        self._acquire()
        return True

    def _arm_idle(self) -> None:
        step = self.step
        assert isinstance(step, Forward)
        idle = step.ring.idle_timeout
        if idle:
            self.idle_armed = True
            self.client.plane.timers(idle).arm(self, self._idle_expired)

    def _idle_expired(self) -> None:
        if self.state == RESPONDING:
            step = self.step
            if isinstance(step, Forward):
                step.ring.pool.health.failure(step.server, "timeout")
            self.error = "timeout"
            self._close_upstream()
            self.answer_or_cut(504, "upstream timed out")

    def response_body(self, data: bytes) -> None:
        if self.state != RESPONDING:
            return
        self.bytes_out += len(data)
        fr = self.framing
        if fr == F_NONE:
            return
        if fr == F_CHUNKED:
            data = framing.chunk(data)
        head = self.pending_head
        if head:
            self.pending_head = b""
            data = head + data
        client = self.client  # (client.write, inline)
        if not client.closed and client.transport is not None:
            client.transport.write(data)

    def response_pending(self) -> None:
        """The upstream's data so far is relayed and the response is not complete: its
        idle timeout (re)starts (once per read, not per piece; never for a response that
        came whole)."""
        if self.state == RESPONDING and not self.client.paused_writing:
            self._arm_idle()

    def response_complete(self) -> None:
        if self.state != RESPONDING:
            return
        self.conn = None
        tail = framing.LAST_CHUNK if self.framing == F_CHUNKED else b""
        head = self.pending_head
        if head or tail:
            self.pending_head = b""
            self.client.write(head + tail)
        if self.framing == F_CLOSE:
            self.keep_alive = False
        self.finish()

    def upstream_upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream switched protocols: a byte tunnel from now on."""
        if self.deadlines is not None:
            self.deadlines.disarm(self)
            self.deadlines = None
        self.upstream_ms = (time.monotonic() - self.sent_at) * 1000.0
        self.status = 101
        self.state = TUNNEL
        self.conn = None
        self.upgraded = _upgraded_protocol(conn.upgrade or self.request.upgrade)
        parts = [_status_line(101, conn.reason), *conn.lines]
        if conn.upgrade:
            parts += (b"Connection: upgrade\r\nUpgrade: ", conn.upgrade, b"\r\n")
        parts += (b"Via: " + joined(conn.via, VIA_VALUE) + b"\r\n" if conn.via else _VIA_LINE,
                  b"\r\n")
        self.client.write(b"".join(parts))
        # The exchange's flow control ends here: the tunnel's starts from the transports
        # (and so does its idle timeout: the request body's stall timer is over).
        full, self.upstream_paused = self.upstream_paused, False
        step = self.step
        if full and isinstance(step, Forward):
            self.client.plane.timers(_stall_timeout(step)).disarm(self.request)
        Tunnel(self, self.client, conn, rest, full)

    def tunnel_closed(self, bytes_in: int, bytes_out: int, idle: bool = False) -> None:
        # (A tunnel's bytes are another protocol's, not a body's: the access log shows
        # them, the ring's body byte counters do not, as before.)
        self.keep_alive = False
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        if idle and not self.error:
            self.error = TUNNEL_IDLE  # for the access log; the metrics see a plain 101
        self.finish()

    # ------------------------------------------------------------------ answers, the end

    def answer(self, status: int, message: str, retry_after: bool = False,
               extra: bytes = b"") -> None:
        """The proxy's own answer (nothing of a response was sent yet)."""
        self.status = status
        if not self.request.complete:
            self.keep_alive = False
        client = self.client
        if client.closing and not client.queue:
            self.keep_alive = False
        client.write(framing.local_response(
            status, message, self.request_id.encode(), close=not self.keep_alive,
            retry_after=retry_after, extra=extra, head_only=self.request.method == "HEAD"))
        self.finish()

    def answer_or_cut(self, status: int, message: str, retry_after: bool = False,
                      extra: bytes = b"") -> None:
        """The proxy's answer if no response head went out yet, else a cut connection."""
        if self.state == DONE:
            return
        if self.state == RESPONDING and not self.pending_head:
            self.keep_alive = False
            self.client.cut()
            self.finish()
            return
        self.pending_head = b""
        self.answer(status, message, retry_after, extra)

    def defect(self, exc: BaseException) -> None:
        """A defect of the proxy: logged once with its traceback, recorded as ``internal``."""
        log.error("internal error on %s %s (request %s)", self.request.method,
                  self.request.path, self.request_id, exc_info=exc)
        self.error = INTERNAL
        self._close_upstream()
        if self.state == DONE:
            return
        self.keep_alive = False
        if self.state == TUNNEL:
            self.client.cut()
            return
        self.answer_or_cut(500, "internal error")

    def _close_upstream(self) -> None:
        conn = self.conn
        step = self.step
        if isinstance(step, Forward):
            if self.state == CONNECTING:
                step.ring.pool.forget(self)
            if self.deadlines is not None:
                self.deadlines.disarm(self)
                self.deadlines = None
            if self.idle_armed:
                self.client.plane.timers(step.ring.idle_timeout).disarm(self)
            if self.upstream_paused:
                self.client.plane.timers(_stall_timeout(step)).disarm(self.request)
        if conn is not None:
            self.conn = None
            conn.abort()

    def finish(self) -> None:
        """Record the exchange (metrics, access log) and hand the connection on."""
        if self.state == DONE:
            return
        state = self.state
        self.state = DONE
        step = self.step
        client = self.client
        plane = client.plane
        ring = step.ring if step is not None else None
        if isinstance(step, Forward):
            if self.idle_armed:
                plane.timers(step.ring.idle_timeout).disarm(self)
            if state != NEW:
                step.ring.inflight -= 1
                step.server.inflight -= 1
        if self.upstream_paused:
            self.upstream_paused = False
            client.resume(client.UPSTREAM)
            if isinstance(step, Forward):
                plane.timers(_stall_timeout(step)).disarm(self.request)
        if client.pausing & client.WAIT:
            client.resume(client.WAIT)
        now = time.monotonic()
        duration = now - self.started
        if ring is not None and ring.recorder is not None:
            if state != TUNNEL:
                ring.recorder.record(self.status, self.error, duration, self.bytes_in,
                                     self.bytes_out, now)
            else:  # (a tunnel's bytes and its silence are no body's and no failure)
                error = self.error
                ring.recorder.record(self.status, "" if error is TUNNEL_IDLE else error,
                                     duration, 0, 0, now)
        access_log = plane.access_log
        if access_log is not None:
            request = self.request
            decision = step.decision if step is not None else None
            access_log.log_request(
                self.request_id, request.remote, request.method,
                request.host,  # (bytes: decoded by the log when not cached)
                self.upgraded or _PROTOCOLS.get(request.version) or "HTTP/" + request.version,
                request.by_name.get(b"user-agent"), request.path, self.status,
                duration * 1000.0, self.upstream_ms,
                ring.route if ring else None, ring.name if ring else None,
                decision.reason._value_ if decision else None,  # (.value: a call)
                decision.bucket if decision else None,
                ring.pool.config.name if ring else None, self.server_url or None,
                self.bytes_in, self.bytes_out, self.error or None,
                decision.revision if decision else plane.runtime.config.revision,
                plain_id=True,  # (generated, or a client's that request_id_ok accepted)
            )
        client.exchange_done(self)

    def __repr__(self) -> str:
        return (f"<Exchange {self.request.method} {self.request.target[:40]!r} "
                f"state={self.state} status={self.status}>")
