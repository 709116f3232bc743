"""Header rewriting for both directions of a proxied exchange.

Pure functions over multidicts: no I/O.  Hop-by-hop headers (RFC 9110 §7.6.1: Connection
and every header it names, plus Keep-Alive, Proxy-Connection, TE, Trailer,
Transfer-Encoding, Upgrade) never cross the proxy; the forwarding headers are set here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy, istr

# Header names arrive in whatever case the peer sent: every comparison is on .lower().
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Also never forwarded upstream: this hop's own credentials, an Expect we already answered,
# and the assignment headers only the proxy may set.
_REQUEST_DROP = HOP_BY_HOP | {"proxy-authorization", "expect", "x-ring", "x-ring-reason"}
_RESPONSE_DROP = HOP_BY_HOP | {"proxy-authenticate"}
_REPLACED = frozenset({"x-forwarded-proto", "x-forwarded-host", "x-request-id"})

VIA = "1.1 ringproxy"
X_FORWARDED_FOR = istr("X-Forwarded-For")
X_FORWARDED_PROTO = istr("X-Forwarded-Proto")
X_FORWARDED_HOST = istr("X-Forwarded-Host")
X_REQUEST_ID = istr("X-Request-Id")
X_RING = istr("X-Ring")
HOST = istr("Host")
VIA_H = istr("Via")
_MAX_REQUEST_ID = 200


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Header names listed in Connection (they are hop-by-hop for this message)."""
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def new_request_id() -> str:
    return os.urandom(16).hex()


def request_id_of(headers: CIMultiDictProxy[str]) -> str:
    """Keep a client's X-Request-Id when it is sane (printable, short); else make one."""
    rid = headers.get(X_REQUEST_ID)
    if rid and len(rid) <= _MAX_REQUEST_ID and rid.isprintable():
        return rid
    return new_request_id()


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    client_ip: str,
    proto: str,
    host: str | None,
    request_id: str,
    ring: str,
    extra: Iterable[tuple[str, str]] = (),
    websocket: bool = False,
) -> CIMultiDict[str]:
    """The headers to send upstream.

    ``host`` is the Host to send (None keeps the client's).  For a WebSocket handshake
    ``websocket`` keeps Sec-WebSocket-* for the client library to set anew.
    """
    drop = connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    forwarded_for: list[str] = []
    via: list[str] = []
    original_host = incoming.get(HOST, "")
    for key, value in incoming.items():
        lower = key.lower()
        if lower in _REQUEST_DROP or lower in drop or lower in _REPLACED:
            continue
        if lower == "x-forwarded-for":
            forwarded_for.append(value)
        elif lower == "via":
            via.append(value)
        elif not (websocket and lower.startswith("sec-websocket-")):
            out.add(key, value)
    if host is not None:
        out[HOST] = host
    forwarded_for.append(client_ip)
    out[X_FORWARDED_FOR] = ", ".join(forwarded_for)
    out[X_FORWARDED_PROTO] = proto
    if original_host:
        out[X_FORWARDED_HOST] = original_host
    via.append(VIA)
    out[VIA_H] = ", ".join(via)
    out[X_REQUEST_ID] = request_id
    out[X_RING] = ring
    for key, value in extra:
        out[key] = value
    return out


def downstream_response_headers(
    incoming: CIMultiDictProxy[str], request_id: str
) -> CIMultiDict[str]:
    """The upstream response's headers (as aiohttp parsed them) as the client should see them."""
    drop = connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    via: list[str] = []
    for key, value in incoming.items():
        lower = key.lower()
        if lower in _RESPONSE_DROP or lower in drop:
            continue
        if lower == "via":
            via.append(value)
        else:
            out.add(key, value)
    via.append(VIA)
    out[VIA_H] = ", ".join(via)
    out.setdefault(X_REQUEST_ID, request_id)
    return out
