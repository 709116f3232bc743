"""The framing rules llhttp leaves to us, and the client side's parse of a request head,
without sockets."""

from __future__ import annotations

import pytest

from proxy.dataplane import framing
from proxy.dataplane.request import Request, RequestError, parse_request, take_header


@pytest.mark.parametrize(("version", "ok"), [("1.1", True), ("1.0", True), ("0.9", False),
                                             ("2.0", False), ("0.0", False)])
def test_only_http_10_and_11(version: str, ok: bool) -> None:
    assert framing.version_ok(version) is ok


@pytest.mark.parametrize(("value", "ok"), [
    (b"chunked", True), (b" Chunked ", True), (b"gzip, chunked", False), (b"gzip", False),
    (b"chunked, chunked", False), (b"", False),
])
def test_transfer_encoding_is_chunked_alone(value: bytes, ok: bool) -> None:
    assert framing.transfer_encoding_ok(value) is ok


@pytest.mark.parametrize(("target", "expected"), [
    (b"/a?b=1", b"/a?b=1"),
    (b"//evil.example/x", b"//evil.example/x"),
    (b"http://evil.example/steal?x=1", b"/steal?x=1"),
    (b"HTTPS://evil.example:9999/other/path", b"/other/path"),
    (b"http://evil.example", b"/"),
    (b"http://evil.example?q=1", b"/?q=1"),
    (b"*", b"*"),
    (b"evil.example:443", None),
    (b"ftp://x/y", None),
    (b"x", None),
])
def test_origin_form(target: bytes, expected: bytes | None) -> None:
    assert framing.origin_form(target) == expected


def test_connection_tokens() -> None:
    assert framing.connection_tokens(b"keep-alive, X-Secret ,,Upgrade") == {
        b"keep-alive", b"x-secret", b"upgrade"}


def test_chunk_and_local_response() -> None:
    assert framing.chunk(b"abc") == b"3\r\nabc\r\n"
    assert framing.chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    raw = framing.local_response(503, "ring is full", b"rid-1", close=True, retry_after=True,
                                 extra=b"X-Ring: a\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 503 Service Unavailable", b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body), b"X-Request-Id: rid-1", b"Retry-After: 1",
        b"X-Ring: a", b"Connection: close"]
    assert body == b"ringproxy: ring is full\n"
    head_only = framing.local_response(404, "no route", b"r", head_only=True)
    assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: 20" in head_only


@pytest.mark.parametrize(("raw", "rejection"), [
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", framing.BAD_VERSION),
    (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", framing.BAD_VERSION),
    (b"GET / HTTP/1.1\r\n\r\n", framing.NO_HOST),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", framing.NO_HOST),
    (b"GET ftp://a.test/x HTTP/1.1\r\nHost: a\r\n\r\n", framing.BAD_TARGET),
])
def test_heads_llhttp_accepts_and_we_refuse(raw: bytes, rejection: framing.Rejection) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(raw)
    assert info.value.rejection == rejection


def test_a_request_is_parsed_into_what_decide_reads() -> None:
    req = parse_request(
        b"POST /a%20b/c?x=1&x=2&y= HTTP/1.1\r\nHost: api.test\r\nX-Forwarded-For: 1.1.1.1\r\n"
        b"Cookie: uid=u1; theme=\"dark\"\r\nX_Under: 1\r\nContent-Length: 3\r\n"
        b"Connection: keep-alive\r\nExpect: 100-continue\r\n\r\nabc",
        remote="10.0.0.1",
    )
    assert (req.method, req.path, req.query_string) == ("POST", "/a b/c", b"x=1&x=2&y=")
    assert dict(req.query) == {"x": "1", "y": ""}
    assert dict(req.cookies) == {"uid": "u1", "theme": "dark"}
    assert req.headers.get("HOST") == "api.test" and "x_under" not in req.headers
    assert (req.host_name, req.content_length, req.expect_continue) == ("api.test", 3, True)
    assert req.forwarded_for == b"1.1.1.1" and req.complete and req.has_body
    assert req.fields == [b"Host: api.test\r\n", b"Cookie: uid=u1; theme=\"dark\"\r\n"]


def test_head_limits() -> None:
    req = Request("10.0.0.1", "http")
    take_header(req, b"A", b"x" * 10, 100, 3, False)
    with pytest.raises(RequestError) as info:
        take_header(req, b"B", b"x" * 100, 100, 3, False)
    assert info.value.rejection == framing.HEAD_TOO_LARGE
    req = Request("10.0.0.1", "http")
    for _ in range(3):
        take_header(req, b"A", b"1", 100, 3, False)
    with pytest.raises(RequestError) as info:
        take_header(req, b"A", b"1", 100, 3, False)
    assert info.value.rejection == framing.TOO_MANY_HEADERS


def test_underscores_are_kept_when_allowed() -> None:
    req = Request("10.0.0.1", "http")
    take_header(req, b"X_A", b"1", 100, 10, True)
    assert req.fields == [b"X_A: 1\r\n"]


def test_transfer_encoding_other_than_chunked_is_refused() -> None:
    with pytest.raises(RequestError) as info:
        parse_request(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert info.value.rejection == framing.BAD_TRANSFER_ENCODING
