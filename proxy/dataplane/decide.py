"""What to do with a request, decided before any I/O.

``decide`` matches the route, assigns the ring, checks the ring's concurrency limit and
rate limit (429 with Retry-After, taking a token of the bucket of the ring that serves
it: not of one whose pool is down under next_ring), picks the upstream
server and builds the upstream request head (bytes, ready to write) and the lines the
client's response gets; it returns a record that the exchange carries out (httpcore's
shape: decide synchronously, then do the I/O).  It reads the live runtime (in-flight
counts, the pool's balancing cursor, the rate limit's bucket) and moves only those; it
opens nothing and waits for nothing, so tests call it directly.

Per request: one record (a tuple) and the head's bytes; the plain header lines the parser
kept are joined as they came, the forwarding headers after them, prebuilt where fixed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Final

from proxy.config import Route
from proxy.config.health import PoolDown
from proxy.dataplane import framing
from proxy.dataplane.headers import VIA_VALUE, new_request_id
from proxy.dataplane.ratelimit import retry_after
from proxy.dataplane.request import Request
from proxy.dataplane.upstream import Server
from proxy.errors import Overloaded
from proxy.rollout.state import Phase
from proxy.routing.assign import Decision, assign
from proxy.runtime import RingRuntime, Runtime

NO_EXTRAS: Final = b""
_PROTO: Final = {"http": b"X-Forwarded-Proto: http\r\n", "https": b"X-Forwarded-Proto: https\r\n"}
# Connection values that name no other header (the usual ones): nothing more to drop.
_PLAIN_CONNECTION: Final = frozenset({b"", b"keep-alive", b"Keep-Alive", b"close", b"Close",
                               b"upgrade", b"Upgrade"})
_OWN_TOKENS: Final = frozenset({b"keep-alive", b"close", b"upgrade"})
_UPGRADE_LINE: Final = b"Connection: upgrade\r\nUpgrade: "


class Forward:
    """Send the request to ``server`` of the ring's pool.

    Its fields are ``Final`` (the type checker refuses an assignment; a retry makes another
    with ``to``).  A plain slotted class, not a frozen dataclass or a NamedTuple: compiled,
    its ``__init__`` is native code, where theirs run interpreted (~9k instructions each).
    """

    __slots__ = ("decision", "extra", "head", "ring", "server", "upgrade")

    def __init__(self, ring: RingRuntime, decision: Decision, server: Server, head: bytes,
                 extra: bytes, upgrade: bool) -> None:
        self.ring: Final = ring
        self.decision: Final = decision
        self.server: Final = server
        self.head: Final = head  # request line and headers, without framing and blank line
        self.extra: Final = extra  # header lines to add to the client's response
        self.upgrade: Final = upgrade  # the client asked to switch protocols (WebSocket, h2c)

    def to(self, server: Server, head: bytes) -> Forward:
        """The same step to another server of the pool (a retry), with its head."""
        return Forward(self.ring, self.decision, server, head, self.extra, self.upgrade)

    def __repr__(self) -> str:
        return f"<Forward ring {self.ring.name} server {self.server.upstream.url}>"


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """Answer the client without asking an upstream."""

    status: int
    message: str
    error: str  # the access log's ``error`` (and the metrics' kind, for a ring)
    retry_after: bool = False
    ring: RingRuntime | None = None
    decision: Decision | None = None
    extra: bytes = NO_EXTRAS


NO_ROUTE: Final = LocalAnswer(404, "no route for this host and path", "no_route")
NO_SERVER: Final = "no_server"  # the error of a request whose ring's pool had no server in rotation
# The error of a request the ring's policy.rate_limit refused (429): the proxy's own refusal.
RATE_LIMITED: Final = "rate_limited"
RATE_LIMITED_MESSAGE: Final = "ring rate limit exceeded"
_RETRY_AFTER: Final = tuple(b"Retry-After: %d\r\n" % n for n in range(61))  # prebuilt, 0..60 s


def decide(runtime: Runtime, request: Request, request_id: str) -> Forward | LocalAnswer:
    """Where ``request`` goes, and with which head (``request_id`` is forwarded)."""
    compiled = runtime.table.match(request.host.decode("latin-1"), request.path)
    if compiled is None:
        return NO_ROUTE
    decision = assign(compiled, request, new_request_id if compiled.anonymous else None)
    ring = runtime.rings[compiled.route.name][decision.index]
    route = compiled.route
    # Headers only some routes add to the client's response.
    extra = (
        NO_EXTRAS if decision.new_id is None and not route.decision.response
        else response_extras(request, route, decision)
    )
    if ring.limit is not None and ring.inflight >= ring.limit:
        return LocalAnswer(Overloaded.status, Overloaded.reason, Overloaded.kind, True,
                           ring, decision, extra)
    pool = ring.pool
    server = pool.pick()
    # The rate limit's token is taken only from the ring that serves the request: not
    # from one whose pool is down and that hands it to a later ring (next_ring).
    if server is not None and ring.bucket is not None:
        wait = ring.bucket.take(time.monotonic())
        if wait:
            return rate_limited(ring, decision, extra, wait)
    if server is None:
        # No server of the ring's pool in rotation: 503, or a later ring's pool.
        later = _later_ring(runtime, route.name, ring, decision)
        if later is None:
            return LocalAnswer(503, pool.down_message, NO_SERVER, True, ring, decision, extra)
        ring, server, decision = later
        pool = ring.pool
        if decision.new_id is not None or route.decision.response:
            extra = response_extras(request, route, decision)
        if ring.limit is not None and ring.inflight >= ring.limit:
            return LocalAnswer(Overloaded.status, Overloaded.reason, Overloaded.kind, True,
                               ring, decision, extra)
        if ring.bucket is not None:
            wait = ring.bucket.take(time.monotonic())
            if wait:
                return rate_limited(ring, decision, extra, wait)
    upgrade = bool(request.upgrade)  # (set only with Connection: upgrade: check_head)
    head = upstream_head(request, ring, server, pool.config.preserve_host, request_id,
                         decision, upgrade)
    return Forward(ring, decision, server, head, extra, upgrade)


def rate_limited(ring: RingRuntime, decision: Decision, extra: bytes,
                 wait: float) -> LocalAnswer:
    """429 for a ring over its ``policy.rate_limit``; ``Retry-After``: ``wait`` rounded up."""
    seconds = retry_after(wait)
    line = (_RETRY_AFTER[seconds] if seconds < len(_RETRY_AFTER)
            else b"Retry-After: %d\r\n" % seconds)
    return LocalAnswer(429, RATE_LIMITED_MESSAGE, RATE_LIMITED, False, ring, decision,
                       extra + line)


def _later_ring(runtime: Runtime, route: str, ring: RingRuntime,
                decision: Decision) -> tuple[RingRuntime, Server, Decision] | None:
    """``on_pool_down: next_ring``: the first later ring (never an earlier one: later is
    less exposure) that is not rolled back and whose pool has a server in rotation."""
    if ring.ring.on_pool_down is not PoolDown.NEXT_RING:
        return None
    rings = runtime.rings[route]
    for index in range(decision.index + 1, len(rings)):
        later = rings[index]
        if later.phase is Phase.ROLLED_BACK:
            continue
        server = later.pool.pick()
        if server is not None:
            detail = (f"{decision.detail}; pool {ring.pool.config.name} of ring {ring.name} "
                      f"has no healthy server (on_pool_down: next_ring)")
            return later, server, replace(decision, ring=later.name, index=index,
                                          detail=detail)
    return None


def upstream_head(
    request: Request,
    ring: RingRuntime,
    server: Server,
    preserve_host: bool,
    request_id: str,
    decision: Decision,
    upgrade: bool,
) -> bytes:
    """The request line and headers to send upstream (framing and blank line left out)."""
    fields = request.fields
    forwarded_for = request.forwarded_for
    via = request.via
    drop = ring.replaced
    if request.connection not in _PLAIN_CONNECTION:
        tokens = framing.connection_tokens(request.connection) - _OWN_TOKENS
        if tokens:
            drop = drop | tokens
            if b"x-forwarded-for" in tokens:
                forwarded_for = None
            if b"via" in tokens:
                via = None
    if not preserve_host or request.host_index < 0:
        host_line = b"Host: " + server.host_header + b"\r\n"
        if request.host_index >= 0:
            fields = fields.copy()
            fields[request.host_index] = host_line
        else:
            fields = [*fields, host_line]
    if drop:
        # Filtered only when the client sent one of them (``by_name`` holds every header
        # name it sent, lower-cased): a few dict lookups instead of a pass over the lines.
        by_name = request.by_name
        for name in drop:
            if name in by_name:
                fields = [f for f in fields if f.partition(b":")[0].lower() not in drop]
                break
    # (headers.joined, inline: a call less each.)
    peer = request.peer.encode()
    parts = [
        request.method.encode(), b" ", request.target, b" HTTP/1.1\r\n",
        *fields,
        b"X-Forwarded-For: ", forwarded_for + b", " + peer if forwarded_for else peer,
        b"\r\n", _PROTO[request.scheme],
    ]
    if request.host:
        parts += (b"X-Forwarded-Host: ", request.host, b"\r\n")
    parts += (b"Via: ", via + b", " + VIA_VALUE if via else VIA_VALUE,
              b"\r\nX-Request-Id: ", request_id.encode(), b"\r\n", ring.head_lines)
    if ring.reason_header:
        parts += (b"X-Ring-Reason: ", decision.reason._value_.encode(), b"\r\n")
    if upgrade:
        parts += (_UPGRADE_LINE, request.upgrade, b"\r\n")
    return b"".join(parts)


def response_extras(request: Request, route: Route, decision: Decision) -> bytes:
    """X-Ring/X-Ring-Reason and an anonymous id's cookie (the caller checks they apply)."""
    extra: list[bytes] = []
    if route.decision.response:
        extra += [b"X-Ring: ", decision.ring.encode(), b"\r\nX-Ring-Reason: ",
                  decision.reason._value_.encode(), b"\r\n"]
    if decision.new_id is not None and route.sticky and route.sticky.anonymous:
        cookie = route.sticky.anonymous
        value = f"{cookie.name}={decision.new_id}{cookie.attributes()}"
        if cookie.secure == "always" or (cookie.secure == "auto" and _came_over_https(request)):
            value += "; Secure"
        extra += [b"Set-Cookie: ", value.encode("latin-1"), b"\r\n"]
    return b"".join(extra)


def _came_over_https(request: Request) -> bool:
    if request.secure:
        return True
    return request.forwarded_proto.split(b",")[0].strip().lower() == b"https"
