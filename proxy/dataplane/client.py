"""The client side: one ``ClientConnection`` Protocol per accepted connection.

llhttp (httptools) parses the requests; each complete head becomes an ``Exchange``.
Requests are answered in order: a pipelined request waits, parsed, while the one before
it is answered, and reading pauses until it is its turn.  Reading also pauses while the
upstream's write buffer is full (back-pressure on uploads) and while an exchange waits for
an upstream connection with body bytes in hand; writing back-pressure (the client reads
slowly) pauses the upstream connection's reading.

Timeouts (``limits``): the head (from the connection's open, or the first byte after an
idle keep-alive wait, to the complete head: 408 if any of it came, else a silent close),
the body (longest silence between reads: 408), the keep-alive wait (a silent close).
Limits on the request line (414), the head's size and header count (431); everything a
client can get wrong is one log line at info with the reason and its address, an answer
with ``Connection: close``, and the access log's ``bad_request``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Final, cast

import httptools

from proxy.config.proxies import TrustedProxies
from proxy.dataplane import framing
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.deadlines import Timers
from proxy.dataplane.exchange import BAD_REQUEST, Exchange, unsent
from proxy.dataplane.headers import request_name
from proxy.dataplane.ratelimit import LogBudget
from proxy.dataplane.request import Request, RequestError, check_head, special_header

if TYPE_CHECKING:
    from proxy.dataplane.listener import ConnectionGate
    from proxy.dataplane.tunnel import Tunnel
    from proxy.runtime import Runtime

log = logging.getLogger("ringproxy.dataplane")

_METHODS: Final[dict[bytes, str]] = {}

# b"_" as a byte value: ``int in bytes`` is a plain scan, where ``b"_" in bytes`` first tries
# the operand as an integer and raises (and clears) a TypeError, about 8x the cost.
_UNDERSCORE: Final = framing.UNDERSCORE
# Requests a connection may have parsed and queued behind the one being answered; the next
# is answered 429 in its turn and the connection closes (memory per connection stays small).
MAX_PIPELINED: Final = 32
# Rejected requests are logged at info, at most 20 at once and 2 a second after that, per
# process (a scanner or a broken client must not flood the log); the access log and
# ringproxy_requests_total still have every one, and a line says how many went unlogged.
REJECTIONS_LOGGED: Final = LogBudget(2.0, 20)

# Timers a connection can have armed (one at a time, besides the body's).
_NONE: Final = 0
_HEAD: Final = 1
_KEEPALIVE: Final = 2


def _version_11(chunk: bytes, method: bytes, target: bytes) -> bool:
    """The read ``chunk`` begins with ``METHOD SP target SP HTTP/1.1``: the request llhttp
    just parsed from its start is HTTP/1.1.  (httptools' get_http_version
    formats a string each call, ~2k instructions; this is the common case's answer without
    it, and anything else asks the parser.)"""
    m = len(method)
    end = m + 1 + len(target)  # where the space before the version is
    # (llhttp parsed this line: a method at the start, one space each side of the target
    # and HTTP/1.1 there are the line ``METHOD SP target SP HTTP/1.1``.  Indexing and one
    # slice: bytes methods with offsets are generic calls, costlier than the parser's.)
    return (len(chunk) > end + 8 and chunk[m] == 32 and chunk[end] == 32
            and chunk.startswith(method) and chunk[end + 1:end + 9] == b"HTTP/1.1")


class DataPlane:
    """What every client connection shares: the live runtime (swapped whole on reload,
    read once per request), the access log, the limits, the timers, the connection gate."""

    def __init__(self, runtime: Runtime, access_log: AccessLog | None,
                 gate: ConnectionGate | None = None) -> None:
        # A plain attribute (read once per request; a property would be a call): the swap
        # on reload is an assignment, and the credential header names follow it lazily.
        self.runtime = runtime
        self._names_of = runtime
        self._credential_names = credential_names(runtime)
        self.access_log = access_log
        self.gate = gate
        self.timers = Timers(asyncio.get_running_loop())
        self.connections: set[ClientConnection] = set()
        self.closing = False

    @property
    def credential_names(self) -> frozenset[bytes]:
        """The live runtime's credential header names (worked out once a config, when first
        asked after a swap: only a header name with ``_`` asks)."""
        runtime = self.runtime
        if self._names_of is not runtime:
            self._credential_names = credential_names(runtime)
            self._names_of = runtime
        return self._credential_names

    def protocol(self, scheme: str = "http") -> ClientConnection:
        return ClientConnection(self, scheme)

    def close_idle(self) -> None:
        """Shutdown: no new requests; idle connections close now, busy ones after their
        exchange."""
        self.closing = True
        for conn in list(self.connections):
            conn.shutdown()

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()

    def busy(self) -> int:
        return sum(1 for conn in self.connections if conn.current is not None)

    def __repr__(self) -> str:
        return f"<DataPlane connections={len(self.connections)} closing={self.closing}>"


def credential_names(runtime: Runtime) -> frozenset[bytes]:
    """Every pool's credential header names, lower-cased, ``_`` written as ``-``: a client
    header named so once its ``_`` are ``-`` (``X_Api_Key`` for ``X-Api-Key``) is dropped
    when ``limits.underscores_in_headers`` lets underscores in, since a CGI-style backend
    reads both as one (``HTTP_X_API_KEY``).  Dropped for every route (the ring is not
    known yet when the header is parsed)."""
    return frozenset(c.header.lower().replace("_", "-").encode("latin-1")
                     for pool in runtime.config.pools for c in pool.auth)


class ClientConnection(asyncio.Protocol):
    # Why reading is paused (bits; reading resumes when none is left).
    PIPELINE: Final = 1
    UPSTREAM: Final = 2
    WAIT: Final = 4
    TUNNEL: Final = 8
    DONE: Final = 16

    # (Slots: an idle keep-alive connection is this object, its parser and its transport.)
    __slots__ = (
        "_advancing", "_body_deadlines", "_head_deadlines", "_keepalive_deadlines",
        "admitted", "chunk", "closed", "closing", "current", "early", "head_bytes", "limits",
        "parser", "parsing", "paused_writing", "pausing", "plane", "proxies", "queue", "remote",
        "req", "scheme", "timer", "transport", "tunnel", "upgrading", "url_bytes",
    )

    def __init__(self, plane: DataPlane, scheme: str) -> None:
        self.plane = plane
        # The limits at accept time: a reload applies to connections accepted after it.
        self.limits = plane.runtime.config.limits
        self.scheme = scheme
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        # The trusted proxies when the peer is one of them (checked once, at accept time,
        # under the config of that time, as limits are); None: the peer is the client.
        self.proxies: TrustedProxies | None = None
        self.req: Request | None = None  # the head being parsed
        self.parsing: Exchange | None = None  # the exchange whose body is being parsed
        self.current: Exchange | None = None  # the exchange answering now
        self.queue: deque[Exchange] = deque()  # pipelined, waiting for their turn
        self.tunnel: Tunnel | None = None
        self.early: list[bytes] = []  # bytes after an upgrade request, before the tunnel
        self.upgrading = False
        self.pausing = 0
        self.paused_writing = False
        self.closing = False
        self.closed = False
        self.admitted = False
        self.timer = _NONE
        self.head_bytes = 0
        self.url_bytes = 0
        # The read being parsed, while it began with no request in progress (its first
        # request line is at its start): see _version.
        self.chunk: bytes | None = None
        self._advancing = False
        timers = plane.timers
        limits = self.limits
        self._head_deadlines = timers(limits.head_timeout)
        self._body_deadlines = timers(limits.body_timeout)
        self._keepalive_deadlines = timers(limits.keepalive_timeout)

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one.)
        self.transport = cast(asyncio.Transport, transport)
        gate = self.plane.gate
        if self.plane.closing or (gate is not None and not gate.admit()):
            self.closed = True
            self.transport.abort()  # over the connection cap: closed at once
            return
        self.admitted = True
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if peer else ""
        trusted = self.plane.runtime.config.trusted_proxies
        if trusted.networks and trusted.trusts(self.remote):
            self.proxies = trusted
        self.plane.connections.add(self)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.upgrading:
            self.early.append(data)
            self.pause(self.TUNNEL)
            return
        if self.closing and self.current is None:
            return
        # (The keep-alive deadline is left armed: its callback sees the connection busy.
        # A head that does not come whole in this read gets the head deadline below.)
        self.chunk = data if self.req is None and self.parsing is None else None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrading = True
            rest = data[exc.args[0]:]
            if rest:
                self.early.append(rest)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, RequestError):
                self.reject(cause.rejection)
            else:
                self._defect(cause)
        except httptools.HttpParserError:
            self.reject(framing.BAD_BODY if self.parsing is not None else framing.MALFORMED)
        else:
            req = self.req
            if req is not None:
                if self.timer != _HEAD:
                    self._arm_head()
                self.head_bytes += len(data)
                if self.head_bytes > self.limits.max_head_size + self.limits.max_request_line:
                    self.reject(framing.HEAD_TOO_LARGE)
                elif not req.header_count and self._http09(req, data):
                    self.reject(framing.BAD_VERSION)
        self.chunk = None  # (never kept past its read)

    def _http09(self, req: Request, data: bytes) -> bool:
        """A request line without a version (HTTP/0.9), which llhttp would wait on."""
        return self.parser.get_http_version() in ("0.0", "0.9") and bool(req.target) \
            and req.target + b"\r\n" in data

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.client_eof()
        return None  # the client is gone: its exchanges end (as NGINX's, by default)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.closed = True
        plane = self.plane
        if plane.gate is not None:
            plane.gate.release()
        plane.connections.discard(self)
        self._disarm()
        self._disarm_body()
        if self.tunnel is not None:
            self.tunnel.client_lost()
            return
        current = self.current
        if current is not None:
            current.client_lost()
        while self.queue:
            self.queue.popleft().client_lost()

    def pause_writing(self) -> None:
        self.paused_writing = True
        if self.tunnel is not None:
            self.tunnel.pause_upstream()
        elif self.current is not None:
            self.current.client_write_paused(True)

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.tunnel is not None:
            self.tunnel.resume_upstream()
        elif self.current is not None:
            self.current.client_write_paused(False)

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self.req = Request(self.remote, self.scheme)
        self.head_bytes = 0
        self.url_bytes = 0

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        self.url_bytes += len(url)
        if self.url_bytes > self.limits.max_request_line:
            raise RequestError(framing.URI_TOO_LONG)
        req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        limits = self.limits
        if req is None:
            # A trailer field after a chunked body: dropped (as NGINX does), within the
            # head's limits.
            self.head_bytes += len(name) + len(value) + 4
            if self.head_bytes > limits.max_head_size:
                raise RequestError(framing.HEAD_TOO_LARGE)
            return
        # take_header, inline for the plain headers (most of them): one call less each.
        req.header_count += 1
        req.head_size += len(name) + len(value) + 4
        if req.head_size > limits.max_head_size:
            raise RequestError(framing.HEAD_TOO_LARGE)
        if req.header_count > limits.max_headers:
            raise RequestError(framing.TOO_MANY_HEADERS)
        if _UNDERSCORE in name:
            if not limits.underscores_in_headers:
                return  # dropped, as NGINX does by default
            if name.lower().replace(b"_", b"-") in self.plane.credential_names:
                return  # a credential header's CGI twin (X_Api_Key): never from a client
        lname, kind = request_name(name)
        by_name = req.by_name
        if lname not in by_name:
            by_name[lname] = value
        if kind == 0:
            req.fields.append(name + b": " + value + b"\r\n")
        else:
            special_header(req, name, value, kind)

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        parser = self.parser
        method = parser.get_method()
        name = _METHODS.get(method)
        if name is None:
            name = _METHODS[method] = method.decode("latin-1")
        req.method = name
        chunk = self.chunk
        self.chunk = None  # the read's first request only
        check_head(req, "1.1" if chunk is not None and _version_11(chunk, method, req.target)
                   else parser.get_http_version())
        if self.proxies is not None:
            req.remote = self.proxies.client(req.peer, req.forwarded_for, req.forwarded)
        if name == "CONNECT":
            raise RequestError(framing.METHOD_NOT_ALLOWED)
        if len(self.queue) >= MAX_PIPELINED:
            raise RequestError(framing.TOO_MANY_PIPELINED)
        ex = Exchange(self, req, parser.should_keep_alive())
        self.parsing = ex
        self.head_bytes = 0  # from here on: the trailers' size, if any
        if self.timer == _HEAD:
            self._disarm()
        if req.has_body:
            self._arm_body()
        if self.current is None and not self._advancing:
            self.current = ex
            ex.begin()
        else:
            self.queue.append(ex)
            self.pause(self.PIPELINE)

    def on_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            if self.pausing == 0:
                self._arm_body()
            ex.request_body(data)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is not None:
            self.parsing = None
            self._body_deadlines.disarm(self.parser)  # (_disarm_body, inline)
            ex.request_complete()

    # ------------------------------------------------------------------ the exchanges' side

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def unread(self) -> int:
        """Bytes written to the client it has not read yet: the transport's buffer and
        the socket's kernel send queue (where the kernel tells)."""
        transport = self.transport
        if transport is None or self.closed:
            return 0
        return transport.get_write_buffer_size() + unsent(transport)

    def cut(self) -> None:
        """End the connection after what was written (a response cut short)."""
        self.closing = True
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def shutdown(self) -> None:
        self.closing = True
        if self.current is None and self.tunnel is None:
            self.close()

    def pause(self, reason: int) -> None:
        if not self.pausing and self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self._disarm_body()
        self.pausing |= reason

    def resume(self, reason: int) -> None:
        if self.pausing & reason:
            self.pausing &= ~reason
            if not self.pausing and self.transport is not None and not self.closed:
                self.transport.resume_reading()
                if self.parsing is not None:
                    self._arm_body()

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` answered: the next pipelined request's turn, or the keep-alive wait."""
        if ex is not self.current:
            if ex in self.queue:
                self.queue.remove(ex)
            return
        self.current = None
        if self.parsing is ex and not ex.request.complete:
            self.parsing = None
        if self.closed:
            return
        if not ex.keep_alive or (self.closing and not self.queue):
            self.close()
            return
        if self._advancing:
            return  # the loop below takes the next one
        if self.queue:
            self._advance()
        elif not self.pausing:
            # The common case: nothing waits; the keep-alive wait (or a head that came
            # in part) starts.
            if self.req is not None:
                self._arm_head()
            elif self.parsing is None:
                # _arm_keepalive, inline (the request path's common end).
                if self.timer == _HEAD:
                    self._head_deadlines.disarm(self)
                self.timer = _KEEPALIVE
                self._keepalive_deadlines.arm(self, self._keepalive_timeout)
        else:
            self._advance()

    def _advance(self) -> None:
        self._advancing = True
        try:
            while self.current is None and self.queue and not self.closed:
                ex = self.current = self.queue.popleft()
                if not self.queue and self.pausing & self.PIPELINE:
                    self.resume(self.PIPELINE)
                ex.begin()
        finally:
            self._advancing = False
        if self.current is None and self.closing:
            self.close()
        elif self.current is None and not self.closed:
            if self.pausing & self.PIPELINE:
                self.resume(self.PIPELINE)
            if self.req is not None or self.parsing is not None:
                if self.req is not None:
                    self._arm_head()
            else:
                self._arm_keepalive()

    def start_tunnel(self, tunnel: Tunnel, upstream_full: bool = False) -> None:
        """From now on a byte tunnel: reading pauses only for the tunnel's back-pressure
        (``TUNNEL``: the upstream's write buffer is full), never for a reason of the
        exchange that asked for it (``UPSTREAM``, ``WAIT``, ``PIPELINE``)."""
        self.tunnel = tunnel
        self.upgrading = False
        self._disarm()
        self._disarm_body()
        if upstream_full:
            self.pause(self.TUNNEL)
            self.resume(self.UPSTREAM | self.WAIT | self.PIPELINE)
        else:
            self.resume(self.TUNNEL | self.UPSTREAM | self.WAIT | self.PIPELINE)

    def take_early(self) -> bytes:
        early, self.early = b"".join(self.early), []
        return early

    # ------------------------------------------------------------------ refusals, defects

    def reject(self, rejection: framing.Rejection) -> None:
        """The client's request is refused: one line at info (within the log's budget),
        an answer, then a close."""
        dropped = REJECTIONS_LOGGED.allow(time.monotonic())
        if dropped is not None:
            log.info("rejected a request from %s: %s%s", self.remote, rejection.reason,
                     f" ({dropped} more rejected before this one, not logged)" if dropped
                     else "", extra={"client": self.remote, "status": rejection.status})
        self.closing = True
        self.pause(self.DONE)
        ex = self.parsing
        if ex is not None:
            self.parsing = None
            if ex.state != 0:  # begun: it has an upstream side to close as well
                ex.request_broken(rejection)
                return
            ex.error = BAD_REQUEST
            ex.keep_alive = False
            if ex is self.current:
                ex.answer(*rejection)
            else:
                ex.pending_answer_rejection(rejection)
            return
        req = self.req or Request(self.remote, self.scheme)
        self.req = None
        ex = Exchange(self, req, False)
        ex.error = BAD_REQUEST
        if self.current is None and not self._advancing:
            self.current = ex
            ex.answer(*rejection)
        else:
            ex.pending_answer_rejection(rejection)
            self.queue.append(ex)

    def _defect(self, exc: BaseException | None) -> None:
        ex = self.parsing or self.current
        if ex is not None and exc is not None:
            ex.defect(exc)
        else:
            log.error("internal error on a connection from %s", self.remote, exc_info=exc)
            self.close()

    # ------------------------------------------------------------------ timers

    def _arm_head(self) -> None:
        if self.timer == _KEEPALIVE:
            self._keepalive_deadlines.disarm(self)
        self.timer = _HEAD
        self._head_deadlines.arm(self, self._head_timeout)

    def _arm_keepalive(self) -> None:
        if self.timer == _HEAD:
            self._head_deadlines.disarm(self)
        self.timer = _KEEPALIVE
        self._keepalive_deadlines.arm(self, self._keepalive_timeout)

    def _disarm(self) -> None:
        if self.timer == _HEAD:
            self._head_deadlines.disarm(self)
        elif self.timer == _KEEPALIVE:
            self._keepalive_deadlines.disarm(self)
        self.timer = _NONE

    def _keepalive_timeout(self) -> None:
        self.timer = _NONE
        if self.current is None and self.req is None and not self.closed:
            self.close()

    def _head_timeout(self) -> None:
        self.timer = _NONE
        if self.current is not None or self.closed:
            return
        if self.req is not None:
            self.reject(framing.HEAD_TIMEOUT)
        else:
            self.close()  # nothing of a request came: closed without a word

    def _arm_body(self) -> None:
        self._body_deadlines.arm(self.parser, self._body_timeout)

    def _disarm_body(self) -> None:
        self._body_deadlines.disarm(self.parser)

    def _body_timeout(self) -> None:
        if self.parsing is not None and not self.closed:
            self.reject(framing.BODY_TIMEOUT)

    def __repr__(self) -> str:
        return (f"<ClientConnection {self.remote} queued={len(self.queue)} "
                f"busy={self.current is not None}>")
