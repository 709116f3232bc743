"""One client request as the parser saw it: the record ``decide`` reads.

The client connection's parser fills a ``Request`` header by header (``take_header``): a
plain header becomes the line forwarded upstream as it came; a special one (hop-by-hop,
Host, framing, forwarding headers) is kept aside by kind (``headers.REQUEST_KIND``).  What
rules may look at (headers by name, cookies, query parameters) is built only when a rule
asks: most requests are decided on Host and path alone.

``parse_request`` reads a whole request from bytes, for tests and tools.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final
from urllib.parse import parse_qsl, unquote

import httptools

from proxy.dataplane import framing
from proxy.dataplane import headers as h

# What a Host value may hold (RFC 3986 reg-name, IP literals, port): anything else is a 400.
_HOST_CHARS: Final = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
               b"-._~%!$&'()*+,;=:[]")
# Host values that passed that check (a handful per site): a set lookup per request instead
# of a ``translate`` (which builds its table per call, ~1,000 instructions).  Bounded: at
# most _GOOD_HOSTS_MAX values of at most _GOOD_HOST_LEN bytes; a full set is emptied.
_GOOD_HOSTS: Final[set[bytes]] = set()
_GOOD_HOSTS_MAX: Final = 1024
_GOOD_HOST_LEN: Final = 255


class RequestError(Exception):
    """A request the proxy refuses; ``rejection`` says with what."""

    def __init__(self, rejection: framing.Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


class Headers(Mapping[str, str]):
    """The request's headers by case-insensitive name (the first value of a repeated one):
    a view of the parser's index (lower-cased bytes names), decoded only when looked up."""

    __slots__ = ("_by_name",)

    def __init__(self, by_name: dict[bytes, bytes]) -> None:
        self._by_name = by_name

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        value = self._by_name.get(name.lower().encode("latin-1"))
        return default if value is None else value.decode("latin-1")

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower().encode("latin-1")].decode("latin-1")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower().encode("latin-1") in self._by_name

    def __iter__(self) -> Iterator[str]:
        return (name.decode("latin-1") for name in self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


class Request:
    """A parsed request head, and how much of its body has arrived."""

    __slots__ = (
        "_cookies",
        "_headers",
        "_path",
        "_query",
        "body_received",
        "by_name",
        "chunked",
        "complete",
        "connection",
        "content_length",
        "cookie",
        "expect_continue",
        "fields",
        "forwarded",
        "forwarded_for",
        "forwarded_proto",
        "has_body",
        "head_size",
        "header_count",
        "host",
        "host_count",
        "host_index",
        "method",
        "peer",
        "remote",
        "request_id",
        "scheme",
        "secure",
        "target",
        "upgrade",
        "version",
        "via",
    )

    def __init__(self, remote: str, scheme: str) -> None:
        self.remote = remote  # the client: the peer, or from a trusted proxy's headers
        self.peer = remote  # the TCP peer (appended to X-Forwarded-For upstream)
        self.scheme = scheme
        self.secure = scheme == "https"
        self.method = ""
        self.version = "1.1"
        self.target = b""
        # Every header by lower-cased name, the first value of each: what rules look up.
        self.by_name: dict[bytes, bytes] = {}
        self.cookie = b""  # the Cookie headers' values, joined
        self.fields: list[bytes] = []  # the plain header lines, forwarded as they came
        self.host = b""
        self.host_count = 0
        self.host_index = -1  # where Host sits in ``fields``
        self.content_length: int | None = None
        self.chunked = False
        self.connection = b""
        self.upgrade = b""
        self.expect_continue = False
        self.forwarded_for: bytes | None = None
        self.forwarded: bytes | None = None
        self.forwarded_proto = b""
        self.via: bytes | None = None
        self.request_id = b""
        self.head_size = 0
        self.header_count = 0
        self.body_received = 0
        self.has_body = False  # chunked, or a Content-Length above 0 (set by check_head)
        self.complete = False
        self._headers: Headers | None = None
        self._cookies: dict[str, str] | None = None
        self._query: dict[str, str] | None = None
        self._path: str | None = None

    # -- what rules and decide read (RequestView)

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = Headers(self.by_name)
        return self._headers

    @property
    def path(self) -> str:
        """The decoded path (as routing matches it); the target is forwarded as it came."""
        if self._path is None:
            raw = self.target.partition(b"?")[0].decode("latin-1")
            self._path = unquote(raw) if "%" in raw else raw
        return self._path

    @property
    def query_string(self) -> bytes:
        return self.target.partition(b"?")[2]

    @property
    def query(self) -> Mapping[str, str]:
        if self._query is None:
            query: dict[str, str] = {}
            for key, value in parse_qsl(self.query_string.decode("latin-1"),
                                        keep_blank_values=True):
                query.setdefault(key, value)
            self._query = query
        return self._query

    @property
    def cookies(self) -> Mapping[str, str]:
        if self._cookies is None:
            cookies: dict[str, str] = {}
            for part in self.cookie.decode("latin-1").split(";"):
                key, sep, val = part.partition("=")
                key = key.strip()
                if sep and key:
                    cookies.setdefault(key, val.strip().strip('"'))
            self._cookies = cookies
        return self._cookies

    @property
    def host_name(self) -> str:
        return self.host.decode("latin-1")


    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target[:60]!r} HTTP/{self.version}>"


def take_header(request: Request, name: bytes, value: bytes, max_size: int, max_count: int,
                underscores: bool) -> None:
    """Add one header of the head being parsed (raises RequestError past the limits)."""
    request.header_count += 1
    size = request.head_size = request.head_size + len(name) + len(value) + 4
    if size > max_size:
        raise RequestError(framing.HEAD_TOO_LARGE)
    if request.header_count > max_count:
        raise RequestError(framing.TOO_MANY_HEADERS)
    if not underscores and framing.UNDERSCORE in name:
        return  # dropped, as NGINX does by default
    lname = name.lower()
    by_name = request.by_name
    if lname not in by_name:
        by_name[lname] = value
    kind = h.REQUEST_KIND.get(lname)
    if kind is None:
        request.fields.append(name + b": " + value + b"\r\n")
    else:
        special_header(request, name, value, kind)


def special_header(request: Request, name: bytes, value: bytes, kind: int) -> None:
    """A header ``headers.REQUEST_KIND`` names: kept aside by kind (the client connection's
    parser handles plain ones inline, as ``take_header`` does)."""
    if kind == h.COOKIE:
        request.cookie = request.cookie + b"; " + value if request.cookie else value
        request.fields.append(name + b": " + value + b"\r\n")
    elif kind == h.HOST:
        if value not in _GOOD_HOSTS:
            if value.translate(None, _HOST_CHARS):
                raise RequestError(framing.NO_HOST)
            if len(value) <= _GOOD_HOST_LEN:
                if len(_GOOD_HOSTS) >= _GOOD_HOSTS_MAX:
                    _GOOD_HOSTS.clear()
                _GOOD_HOSTS.add(value)
        request.host = value
        request.host_count += 1
        request.host_index = len(request.fields)
        request.fields.append(name + b": " + value + b"\r\n")
    elif kind == h.CONTENT_LENGTH:
        request.content_length = int(value)  # llhttp checked it
    elif kind == h.TRANSFER_ENCODING:
        if not framing.transfer_encoding_ok(value):
            raise RequestError(framing.BAD_TRANSFER_ENCODING)
        request.chunked = True
    elif kind == h.CONNECTION:
        request.connection = request.connection + b"," + value if request.connection else value
    elif kind == h.UPGRADE:
        request.upgrade = value
    elif kind == h.EXPECT:
        request.expect_continue = value.strip().lower() == b"100-continue"
    elif kind == h.FORWARDED_FOR:
        request.forwarded_for = h.joined(request.forwarded_for, value)
    elif kind == h.FORWARDED:
        request.forwarded = h.joined(request.forwarded, value)
        request.fields.append(name + b": " + value + b"\r\n")
    elif kind == h.VIA:
        request.via = h.joined(request.via, value)
    elif kind == h.REQUEST_ID:
        request.request_id = value
    elif kind == h.FORWARDED_PROTO:
        request.forwarded_proto = value
    # (DROP: nothing to keep.)


def check_head(request: Request, version: str) -> None:
    """The checks on a complete head that llhttp leaves to us (raises RequestError)."""
    request.version = version
    if version != "1.1" and not framing.version_ok(version):
        raise RequestError(framing.BAD_VERSION)
    if request.host_count > 1 or (request.host_count == 0 and version == "1.1"):
        raise RequestError(framing.NO_HOST)
    if request.chunked and version == "1.0":
        # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 request is faulty framing.
        raise RequestError(framing.BAD_TRANSFER_ENCODING)
    if request.target[:1] != b"/":
        target = framing.origin_form(request.target)
        if target is None:
            raise RequestError(framing.BAD_TARGET)
        request.target = target
    request.has_body = request.chunked or bool(request.content_length)
    if request.upgrade and b"upgrade" not in framing.connection_tokens(request.connection):
        request.upgrade = b""  # Upgrade without Connection: upgrade asks for nothing


class _Reader:
    """A minimal parser protocol for ``parse_request``."""

    def __init__(self, remote: str, scheme: str) -> None:
        self.request = Request(remote, scheme)
        self.body: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.request.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        take_header(self.request, name, value, 1 << 20, 1000, False)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.request.complete = True


def parse_request(raw: bytes, remote: str = "192.0.2.7", scheme: str = "http") -> Request:
    """A request from its bytes, as the client connection would see it (tests, tools)."""
    reader = _Reader(remote, scheme)
    parser = httptools.HttpRequestParser(reader)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserCallbackError as exc:
        if isinstance(exc.__context__, RequestError):
            raise exc.__context__ from None
        raise
    request = reader.request
    request.method = parser.get_method().decode()
    check_head(request, parser.get_http_version())
    return request
