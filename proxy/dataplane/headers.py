"""Header rules for both directions of a proxied exchange, as tables over lower-cased bytes.

Hop-by-hop headers (RFC 9110 §7.6.1: Connection and every header it names, plus
Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) never cross the
proxy; the forwarding headers (X-Forwarded-For/-Proto/-Host, Via, X-Request-Id, X-Ring)
are set by it.  The parsers look each header name up once in ``REQUEST_KIND`` /
``RESPONSE_KIND`` (a dict of lower-cased bytes): a plain header is forwarded as the line it
came as, a special one is handled by its kind.  No I/O here.
"""

from __future__ import annotations

import os
import re
from typing import Final

from proxy.dataplane.framing import UNDERSCORE

# Header names arrive in whatever case the peer sent: every comparison is on .lower().
HOP_BY_HOP: Final = frozenset(
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

# What a request header is to the proxy (values of REQUEST_KIND; a plain header has none).
DROP: Final = 1  # never forwarded: hop-by-hop, this hop's credentials, headers only we may set
HOST: Final = 2
CONTENT_LENGTH: Final = 3  # forwarded as the proxy frames the body
TRANSFER_ENCODING: Final = 4
CONNECTION: Final = 5
UPGRADE: Final = 6
EXPECT: Final = 7
FORWARDED_FOR: Final = 8  # the client's values come first in ours
VIA: Final = 9
REQUEST_ID: Final = 10
FORWARDED_PROTO: Final = 11  # replaced by what this hop saw (kept for the cookie's Secure rule)
COOKIE: Final = 12  # forwarded as it came; kept for cookie rules
FORWARDED: Final = 13  # forwarded as it came; kept for trusted_proxies

REQUEST_KIND: Final[dict[bytes, int]] = {
    **{name.encode(): DROP for name in HOP_BY_HOP},
    b"proxy-authorization": DROP,
    b"x-ring": DROP,
    b"x-ring-reason": DROP,
    b"x-forwarded-host": DROP,
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"connection": CONNECTION,
    b"upgrade": UPGRADE,
    b"expect": EXPECT,
    b"x-forwarded-for": FORWARDED_FOR,
    b"via": VIA,
    b"x-request-id": REQUEST_ID,
    b"x-forwarded-proto": FORWARDED_PROTO,
    b"cookie": COOKIE,
    b"forwarded": FORWARDED,
}

# Response headers: dropped, or handled by kind.
R_DROP: Final = 1
R_CONNECTION: Final = 2
R_VIA: Final = 3
R_REQUEST_ID: Final = 4
R_CONTENT_LENGTH: Final = 5
R_TRANSFER_ENCODING: Final = 6
R_UPGRADE: Final = 7
RESPONSE_KIND: Final[dict[bytes, int]] = {
    **{name.encode(): R_DROP for name in HOP_BY_HOP},
    b"proxy-authenticate": R_DROP,
    b"connection": R_CONNECTION,
    b"via": R_VIA,
    b"x-request-id": R_REQUEST_ID,
    b"content-length": R_CONTENT_LENGTH,
    b"transfer-encoding": R_TRANSFER_ENCODING,
    b"upgrade": R_UPGRADE,
}

VIA_VALUE: Final = b"1.1 ringproxy"
# A client's X-Request-Id kept as it came: a token that is safe in any log line, header or
# URL (letters, digits, ``.``, ``_``, ``:``, ``-``: UUIDs, W3C trace ids, ULIDs, hex).
_SANE_ID: Final = re.compile(rb"[A-Za-z0-9._:-]+").fullmatch

# Request ids come from os.urandom in batches: one system call per _ID_BATCH ids instead
# of one per request.  Still 128 random bits from the OS generator per id; a forked child
# starts a batch of its own so two processes never hand out the same ids.
_ID_BATCH: Final = 256
_ids: Final[list[str]] = []
if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_ids.clear)
# The batch itself, for the request path: ``READY_IDS.pop() if READY_IDS else
# new_request_id()`` is new_request_id() without a call when the batch has ids.
READY_IDS: Final = _ids


def new_request_id() -> str:
    if not _ids:
        raw = os.urandom(16 * _ID_BATCH).hex()
        _ids.extend([raw[i : i + 32] for i in range(0, len(raw), 32)])
    return _ids.pop()


# Header names as peers spell them -> what their lower-cased form says: one lookup of the
# name as it came instead of lower() and a lookup per header (the lower-cased name, shared,
# keeps its hash).  Bounded in count and length: a peer chooses the names.  A request
# header name with "_" is never kept (the client connection checks those every time).
_NAMES_MAX: Final = 1024
_NAME_LEN: Final = 64
_REQUEST_NAMES: Final[dict[bytes, tuple[bytes, int]]] = {}
_RESPONSE_NAMES: Final[dict[bytes, int]] = {}


def request_name(name: bytes) -> tuple[bytes, int]:
    """A request header's name lower-cased, and its ``REQUEST_KIND`` (0: a plain header)."""
    known = _REQUEST_NAMES.get(name)
    if known is None:
        lname = name.lower()
        known = (lname, REQUEST_KIND.get(lname, 0))
        if len(name) <= _NAME_LEN and UNDERSCORE not in name and len(_REQUEST_NAMES) < _NAMES_MAX:
            _REQUEST_NAMES[name] = known
    return known


def response_kind(name: bytes) -> int:
    """A response header's ``RESPONSE_KIND`` (0: a plain header)."""
    kind = _RESPONSE_NAMES.get(name)
    if kind is None:
        kind = RESPONSE_KIND.get(name.lower(), 0)
        if len(name) <= _NAME_LEN and len(_RESPONSE_NAMES) < _NAMES_MAX:
            _RESPONSE_NAMES[name] = kind
    return kind


def request_id_ok(value: bytes, max_length: int = 128) -> bool:
    """A client's X-Request-Id is kept when it is sane: 1..``max_length`` characters of
    A-Z a-z 0-9 . _ : - (config ``request_id``); any other is replaced by a new one."""
    return len(value) <= max_length and _SANE_ID(value) is not None


def joined(prior: bytes | None, own: bytes) -> bytes:
    """``own`` after the incoming values of a list header."""
    return prior + b", " + own if prior else own

