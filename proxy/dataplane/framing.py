"""Strict HTTP/1.1 framing (RFC 9112): the checks llhttp does not already make, and bytes.

llhttp (through httptools, in its strict default mode) already refuses obs-fold, both
Transfer-Encoding and Content-Length, invalid, overflowing or repeated Content-Length,
invalid chunk sizes and extensions, bare CR, NUL and other control characters in the head,
and malformed header names.  What it lets through and this module refuses: HTTP/0.9 and
versions other than 1.0 and 1.1, a Transfer-Encoding other than exactly ``chunked`` (a
proxy that re-frames the body cannot pass other codings on), an HTTP/1.1 request without
exactly one Host, a request target that is not origin-, absolute- or asterisk-form.

Pure functions over bytes: no I/O, no clock; tests call them directly.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final, NamedTuple


class Rejection(NamedTuple):
    """Why a client's request is refused: the status to answer and a short reason (logged
    and sent as the body; never a header value or the raw head)."""

    status: int
    reason: str


# ``_`` as a byte value, for ``UNDERSCORE in name`` (a bytes operand of ``in`` is first
# tried as an integer, a TypeError raised and cleared each time: about 8x the cost).
UNDERSCORE: Final = 0x5F

MALFORMED: Final = Rejection(400, "malformed request")
BAD_VERSION: Final = Rejection(400, "unsupported HTTP version")
BAD_TRANSFER_ENCODING: Final = Rejection(400, "unsupported transfer-encoding")
NO_HOST: Final = Rejection(400, "missing, repeated or invalid Host header")
BAD_TARGET: Final = Rejection(400, "invalid request target")
BAD_BODY: Final = Rejection(400, "malformed request body")
URI_TOO_LONG: Final = Rejection(414, "request line too long")
HEAD_TOO_LARGE: Final = Rejection(431, "request header fields too large")
TOO_MANY_HEADERS: Final = Rejection(431, "too many request header fields")
# More requests pipelined ahead of their answers than a connection may queue (llhttp parses
# a whole read, so without a bound one read of tiny requests would queue thousands).
TOO_MANY_PIPELINED: Final = Rejection(429, "too many pipelined requests")
BODY_TOO_LARGE: Final = Rejection(413, "request body too large")
HEAD_TIMEOUT: Final = Rejection(408, "request head timed out")
BODY_TIMEOUT: Final = Rejection(408, "request body timed out")
METHOD_NOT_ALLOWED: Final = Rejection(405, "method not allowed")


def version_ok(version: str) -> bool:
    """HTTP/1.0 and HTTP/1.1 only (llhttp also takes 0.9 and 2.0 here)."""
    return version == "1.1" or version == "1.0"


def transfer_encoding_ok(value: bytes) -> bool:
    """Only ``chunked`` alone: llhttp accepts codings before it, which a proxy that
    re-frames the body would silently drop."""
    return value.strip().lower() == b"chunked"


def name_has_underscore(name: bytes) -> bool:
    """Header names with ``_`` are dropped by default: CGI-style upstreams read
    ``X_Forwarded_For`` as ``X-Forwarded-For``."""
    return UNDERSCORE in name


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lower-cased tokens of a Connection header value."""
    return frozenset(t for t in (p.strip().lower() for p in value.split(b",")) if t)


def origin_form(target: bytes) -> bytes | None:
    """The request target to send upstream: origin-form as it came, absolute-form reduced
    to its path and query (the authority never chooses the upstream), ``*`` kept; None for
    anything else (authority-form outside CONNECT, garbage)."""
    if target[:1] == b"/":
        return target
    if target == b"*":
        return target
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https") and rest:
        slash = rest.find(b"/")
        query = rest.find(b"?")
        if slash < 0 or (0 <= query < slash):
            return b"/" + rest[query:] if query >= 0 else b"/"
        return rest[slash:]
    return None


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (``data`` must not be empty)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"

_STATUS_LINES: Final[dict[int, bytes]] = {}


def status_line(status: int, reason: bytes | None = None) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``; the standard reason when none is given
    (cached: a handful of statuses repeat)."""
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is None:
            try:
                phrase = HTTPStatus(status).phrase.encode()
            except ValueError:
                phrase = b""
            line = _STATUS_LINES[status] = b"HTTP/1.1 %d %b\r\n" % (status, phrase)
        return line
    return b"HTTP/1.1 %d %b\r\n" % (status, reason)


def local_response(
    status: int,
    message: str,
    request_id: bytes,
    *,
    close: bool = False,
    retry_after: bool = False,
    extra: bytes = b"",
    head_only: bool = False,
) -> bytes:
    """A complete answer of the proxy's own: a short ``ringproxy: ...`` text body."""
    body = b"ringproxy: " + message.encode() + b"\n"
    parts = [
        status_line(status),
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
    ]
    if request_id:
        parts.append(b"X-Request-Id: " + request_id + b"\r\n")
    if retry_after:
        parts.append(b"Retry-After: 1\r\n")
    if extra:
        parts.append(extra)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)
