"""Header rewriting: pure functions over multidicts."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.dataplane.headers import (
    HOP_BY_HOP,
    downstream_response_headers,
    request_id_of,
    upstream_request_headers,
)


def proxy_of(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def build(*pairs: tuple[str, str], **kw: object) -> CIMultiDict[str]:
    args: dict = {"client_ip": "10.0.0.9", "proto": "http", "host": None,
                  "request_id": "rid", "ring": "beta"}
    args.update(kw)
    return upstream_request_headers(proxy_of(*pairs), **args)


def test_hop_by_hop_set_is_the_rfc_list() -> None:
    assert {h.lower() for h in HOP_BY_HOP} == {
        "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade",
    }


def test_request_drops_hop_by_hop_and_connection_named_headers() -> None:
    out = build(
        ("Host", "a.test"), ("Connection", "keep-alive, X-Drop-Me"), ("connection", "X-Also"),
        ("X-Drop-Me", "1"), ("X-Also", "2"), ("Keep-Alive", "5"), ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Trailer", "X"),
        ("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "Basic x"),
        ("Expect", "100-continue"), ("X-Keep", "yes"), ("Cookie", "a=1"), ("Cookie", "b=2"),
    )
    assert sorted(k for k, _ in out.items()) == sorted([
        "Host", "X-Keep", "Cookie", "Cookie", "X-Forwarded-For", "X-Forwarded-Proto",
        "X-Forwarded-Host", "Via", "X-Request-Id", "X-Ring",
    ])
    assert out.getall("Cookie") == ["a=1", "b=2"]  # repeated headers keep order


def test_forwarding_headers() -> None:
    out = build(("Host", "api.test:8080"), ("X-Forwarded-For", "1.1.1.1"),
                ("X-Forwarded-For", "2.2.2.2"), ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "spoofed"), ("Via", "1.0 cdn"), proto="http")
    assert out["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2, 10.0.0.9"
    assert out["X-Forwarded-Proto"] == "http"  # what this hop saw, not what the client claims
    assert out["X-Forwarded-Host"] == "api.test:8080"
    assert out["Via"] == "1.0 cdn, 1.1 ringproxy"
    assert out["Host"] == "api.test:8080"


def test_host_override_and_ring_headers_cannot_be_spoofed() -> None:
    out = build(("Host", "public.test"), ("X-Ring", "vip"), ("X-Ring-Reason", "forged"),
                host="10.0.0.5:8080", extra=(("X-Feature", "on"),))
    assert out["Host"] == "10.0.0.5:8080"
    assert out["X-Ring"] == "beta"
    assert "X-Ring-Reason" not in out
    assert out["X-Feature"] == "on"


def test_websocket_handshake_headers_are_left_to_the_client_library() -> None:
    out = build(("Host", "h"), ("Sec-WebSocket-Key", "k"), ("Sec-WebSocket-Version", "13"),
                ("Origin", "https://h"), websocket=True)
    assert "Sec-WebSocket-Key" not in out and out["Origin"] == "https://h"


def test_request_id_kept_when_sane_else_generated() -> None:
    assert request_id_of(proxy_of(("X-Request-Id", "abc"))) == "abc"
    for bad in ("", "x" * 201, "a\x01b"):
        rid = request_id_of(proxy_of(("X-Request-Id", bad)))
        assert rid != bad and len(rid) == 32
    a, b = request_id_of(proxy_of()), request_id_of(proxy_of())
    assert a != b


def test_response_headers() -> None:
    raw = proxy_of(
        ("Content-Type", "text/plain"), ("Connection", "X-Up"), ("X-Up", "1"),
        ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Via", "1.1 app"),
        ("Proxy-Authenticate", "Basic"),
    )
    out = downstream_response_headers(raw, "rid-9")
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert out["Via"] == "1.1 app, 1.1 ringproxy"
    assert out["X-Request-Id"] == "rid-9"
    for name in ("Connection", "X-Up", "Keep-Alive", "Transfer-Encoding", "Proxy-Authenticate"):
        assert name not in out
    kept = downstream_response_headers(proxy_of(("X-Request-Id", "upstream-id")), "rid-9")
    assert kept["X-Request-Id"] == "upstream-id"


def test_header_names_in_any_case_are_recognised() -> None:
    out = build(("host", "h"), ("connection", "x-secret"), ("x-secret", "1"),
                ("keep-alive", "1"), ("x-forwarded-for", "1.1.1.1"), ("x-ring", "vip"),
                ("VIA", "1.0 a"), ("x-request-id", "mine"))
    assert [k.lower() for k, _ in out.items()] == [
        "host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via",
        "x-request-id", "x-ring",
    ]
    assert out["X-Forwarded-For"] == "1.1.1.1, 10.0.0.9"
    assert out["Via"] == "1.0 a, 1.1 ringproxy"
    assert out["X-Ring"] == "beta"
    back = downstream_response_headers(proxy_of(("connection", "x-up"), ("x-up", "1"),
                                                ("KEEP-ALIVE", "5"), ("via", "1.1 app")), "r")
    assert [k.lower() for k, _ in back.items()] == ["via", "x-request-id"]


def test_response_headers_written_into_a_given_multidict_are_the_same() -> None:
    raw = proxy_of(("Content-Type", "a/b"), ("Connection", "X-Up"), ("X-Up", "1"),
                   ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Via", "1.0 up"))
    target: CIMultiDict[str] = CIMultiDict()
    out = downstream_response_headers(raw, "rid-1", target)
    assert out is target
    assert list(out.items()) == list(downstream_response_headers(raw, "rid-1").items())
    assert out.getall("Set-Cookie") == ["a=1", "b=2"] and "X-Up" not in out
