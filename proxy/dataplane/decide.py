"""What to do with a request, decided before any I/O.

``decide`` matches the route, assigns the ring, checks the ring's concurrency limit,
picks the upstream server and builds the headers for both directions; it returns a frozen
record that the async handler carries out (httpcore's shape: decide synchronously, then do
the I/O).  It reads the live runtime (in-flight counts, the pool's balancing cursor) and
moves only that cursor; it opens nothing and waits for nothing, so tests call it directly.

Per request: one record (a tuple), no dict copies beyond the upstream headers themselves;
the response extras are a shared empty tuple on the common path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from proxy.config import Route
from proxy.dataplane.headers import is_websocket_upgrade, new_request_id, upstream_request_headers
from proxy.dataplane.pool import Server
from proxy.errors import Overloaded
from proxy.routing.assign import Decision, assign
from proxy.routing.predicates import RequestView
from proxy.runtime import RingRuntime, Runtime

UPGRADE = istr("Upgrade")
X_FORWARDED_PROTO = istr("X-Forwarded-Proto")
X_RING_REASON = istr("X-Ring-Reason")
NO_EXTRAS: tuple[tuple[str, str], ...] = ()


class Incoming(RequestView, Protocol):
    """What deciding reads of a request.  aiohttp's request satisfies it."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def host(self) -> str: ...
    @property
    def rel_url(self) -> URL: ...
    @property
    def scheme(self) -> str: ...
    @property
    def secure(self) -> bool: ...


class Forward(NamedTuple):
    """Send the request to ``server`` of the ring's pool.

    Immutable and without a ``__dict__``, like a frozen slotted dataclass, but built for a
    fraction of the cost: a frozen dataclass sets each field through
    ``object.__setattr__``, which measured ~8k more instructions per request (~1.7 %).
    """

    ring: RingRuntime
    decision: Decision
    server: Server
    url: URL
    headers: CIMultiDict[str]  # to send upstream
    extra: tuple[tuple[str, str], ...]  # to add to the client's response
    websocket: bool


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """Answer the client without asking an upstream."""

    status: int
    message: str
    error: str  # the access log's ``error`` (and the metrics' kind, for a ring)
    retry_after: bool = False
    ring: RingRuntime | None = None
    decision: Decision | None = None
    extra: tuple[tuple[str, str], ...] = NO_EXTRAS


NO_ROUTE = LocalAnswer(404, "no route for this host and path", "no_route")


def decide(runtime: Runtime, request: Incoming, request_id: str) -> Forward | LocalAnswer:
    """Where ``request`` goes, and with which headers (``request_id`` is forwarded)."""
    compiled = runtime.table.match(request.host, request.path)
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
    # (The Upgrade test first: it is one lookup, and almost no request has one.)
    websocket = UPGRADE in request.headers and is_websocket_upgrade(request.method,
                                                                    request.headers)
    headers = upstream_request_headers(
        request.headers,
        client_ip=request.remote or "",
        proto=request.scheme,
        host=None if pool.config.preserve_host else server.host_header,
        request_id=request_id,
        ring=ring.name,
        extra=ring.extra_headers,
        websocket=websocket,
    )
    if ring.reason_header:
        headers[X_RING_REASON] = decision.reason.value
    for name in ring.strip_headers:
        headers.popall(name, None)
    rel = request.rel_url
    url = server.url(rel.raw_path, rel.raw_query_string, websocket)
    return Forward(ring, decision, server, url, headers, extra, websocket)


def response_extras(
    request: Incoming, route: Route, decision: Decision
) -> tuple[tuple[str, str], ...]:
    """X-Ring/X-Ring-Reason and an anonymous id's cookie (the caller checks they apply)."""
    extra: list[tuple[str, str]] = []
    if route.decision.response:
        extra += [("X-Ring", decision.ring), ("X-Ring-Reason", decision.reason.value)]
    if decision.new_id is not None and route.sticky and route.sticky.anonymous:
        cookie = route.sticky.anonymous
        value = f"{cookie.name}={decision.new_id}{cookie.attributes()}"
        if cookie.secure == "always" or (cookie.secure == "auto" and _came_over_https(request)):
            value += "; Secure"
        extra.append(("Set-Cookie", value))
    return tuple(extra)


def _came_over_https(request: Incoming) -> bool:
    if request.secure:
        return True
    proto = request.headers.get(X_FORWARDED_PROTO, "")
    return proto.split(",")[0].strip().lower() == "https"
