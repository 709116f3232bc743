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


# The usual Connection values, already split (what the general case below would return).
_COMMON_TOKENS = {
    v: frozenset({v.lower()}) for v in ("keep-alive", "Keep-Alive", "close", "Close")
}
_NO_TOKENS: frozenset[str] = frozenset()


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Header names listed in Connection (they are hop-by-hop for this message)."""
    values = headers.getall("Connection", ())
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        common = _COMMON_TOKENS.get(values[0])
        if common is not None:
            return common
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


# Request ids come from os.urandom in batches: one system call per _ID_BATCH ids instead
# of one per request.  Still 128 random bits from the OS generator per id; a forked child
# starts a batch of its own so two processes never hand out the same ids.
_ID_BATCH = 256
_ids: list[str] = []
if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_ids.clear)


def new_request_id() -> str:
    if not _ids:
        raw = os.urandom(16 * _ID_BATCH).hex()
        _ids.extend([raw[i : i + 32] for i in range(0, len(raw), 32)])
    return _ids.pop()


def request_id_of(headers: CIMultiDictProxy[str]) -> str:
    """Keep a client's X-Request-Id when it is sane (printable, short); else make one."""
    rid = headers.get(X_REQUEST_ID)
    if rid and len(rid) <= _MAX_REQUEST_ID and rid.isprintable():
        return rid
    return new_request_id()


# Both functions below copy the incoming headers whole (one C-level copy) and then remove
# by name only the names that need it, found with one case-insensitive set intersection:
# a per-header loop in Python costs several times more on ordinary requests.  The result
# is the same as filtering header by header: kept headers in their order and case, then
# the forwarding headers in a fixed order.
# (istr members: a multidict compares them without lower-casing them first.)
_REQUEST_SPECIAL = frozenset(map(istr, _REQUEST_DROP | _REPLACED | {"x-forwarded-for", "via"}))
_RESPONSE_SPECIAL = frozenset(map(istr, _RESPONSE_DROP | {"via"}))


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
    out = CIMultiDict(incoming)
    original_host = incoming.get(HOST, "")
    forwarded_for = client_ip
    via = VIA
    special = incoming.keys() & _REQUEST_SPECIAL  # names as sent, any letter case
    if special:
        drop = _remove(out, incoming, special)
        forwarded_for = _appended(incoming, X_FORWARDED_FOR, drop, client_ip)
        via = _appended(incoming, VIA_H, drop, VIA)
    if websocket:
        for name in [k for k in out if k.lower().startswith("sec-websocket-")]:
            out.popall(name, None)
    if host is not None:
        out[HOST] = host
    # None of these is left in ``out``: add (append) rather than set.
    out.add(X_FORWARDED_FOR, forwarded_for)
    out.add(X_FORWARDED_PROTO, proto)
    if original_host:
        out.add(X_FORWARDED_HOST, original_host)
    out.add(VIA_H, via)
    out.add(X_REQUEST_ID, request_id)
    out.add(X_RING, ring)
    for key, value in extra:
        out[key] = value
    return out


def downstream_response_headers(
    incoming: CIMultiDictProxy[str], request_id: str, out: CIMultiDict[str] | None = None
) -> CIMultiDict[str]:
    """The upstream response's headers (as aiohttp parsed them) as the client should see them.

    Written into ``out`` when given (an empty response's own headers: no copy to hand over).
    """
    if out is None:
        out = CIMultiDict(incoming)
    else:
        out.extend(incoming)
    via = VIA
    special = incoming.keys() & _RESPONSE_SPECIAL
    if special:
        via = _appended(incoming, VIA_H, _remove(out, incoming, special), VIA)
    out.add(VIA_H, via)
    out.setdefault(X_REQUEST_ID, request_id)
    return out


def _remove(
    out: CIMultiDict[str], incoming: CIMultiDictProxy[str], special: Iterable[str]
) -> frozenset[str]:
    """Remove the special names and those the Connection header lists; returns the latter."""
    drop = connection_tokens(incoming)
    for name in special:
        out.popall(name, None)
    for name in drop:
        out.popall(name, None)
    return drop


def _appended(
    incoming: CIMultiDictProxy[str], name: istr, drop: frozenset[str], own: str
) -> str:
    """``own`` after the incoming values of a list header (unless Connection dropped it)."""
    if name.lower() in drop:
        return own
    prior = incoming.getall(name, ())
    return ", ".join([*prior, own]) if prior else own


def is_websocket_upgrade(method: str, headers: CIMultiDictProxy[str]) -> bool:
    """A WebSocket handshake (RFC 6455 §4.1): GET with Upgrade: websocket and a Connection
    header that lists upgrade."""
    return (
        method == "GET"
        and headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in headers.get("Connection", "").lower()
    )
