"""Header rewriting both ways, without sockets: requests through the client side's parser and
``decide``, responses through the upstream connection's parser."""

from __future__ import annotations

import textwrap

import pytest
from multidict import CIMultiDict

from proxy.config import parse_config
from proxy.dataplane.decide import Forward, decide
from proxy.dataplane.headers import HOP_BY_HOP, new_request_id, request_id_ok
from proxy.dataplane.request import parse_request
from proxy.dataplane.upstream import UpstreamConnection, UpstreamPool
from proxy.errors import UpstreamError
from proxy.runtime import Runtime

CONFIG = textwrap.dedent(
    """
    pools:
      keep: {servers: ["http://10.0.0.5:8080"]}
      own: {servers: ["http://10.0.0.5:8080"], preserve_host: false}
    routes:
      - name: own
        match: {host: own.test}
        rings: [{name: beta, pool: own, policy: {add_headers: {X-Feature: "on"}}}]
      - name: r
        rings: [{name: beta, pool: keep}]
    """
)


def build(*pairs: tuple[str, str], remote: str = "10.0.0.9",
          version: str = "1.1") -> tuple[str, list[tuple[str, str]]]:
    """The upstream request line and headers (in order) for a request with ``pairs``."""
    raw = f"GET /p HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs) + "\r\n"
    runtime = Runtime(parse_config(CONFIG))
    step = decide(runtime, parse_request(raw.encode(), remote), "rid")
    assert isinstance(step, Forward)
    line, *fields = step.head.decode().removesuffix("\r\n").split("\r\n")
    return line, [(k, v) for k, v in (f.split(": ", 1) for f in fields)]


def as_dict(fields: list[tuple[str, str]]) -> CIMultiDict[str]:
    return CIMultiDict(fields)


def test_hop_by_hop_set_is_the_rfc_list() -> None:
    assert {h.lower() for h in HOP_BY_HOP} == {
        "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade",
    }


def test_request_drops_hop_by_hop_and_connection_named_headers() -> None:
    _, fields = build(
        ("Host", "a.test"), ("Connection", "keep-alive, X-Drop-Me"), ("connection", "X-Also"),
        ("X-Drop-Me", "1"), ("X-Also", "2"), ("Keep-Alive", "5"), ("TE", "trailers"),
        ("Upgrade", "h2c"), ("Trailer", "X"),
        ("Proxy-Connection", "keep-alive"), ("Proxy-Authorization", "Basic x"),
        ("Expect", "100-continue"), ("X-Keep", "yes"), ("Cookie", "a=1"), ("Cookie", "b=2"),
    )
    assert sorted(k for k, _ in fields) == sorted([
        "Host", "X-Keep", "Cookie", "Cookie", "X-Forwarded-For", "X-Forwarded-Proto",
        "X-Forwarded-Host", "Via", "X-Request-Id", "X-Ring",
    ])
    assert as_dict(fields).getall("Cookie") == ["a=1", "b=2"]  # repeated headers keep order


def test_forwarding_headers() -> None:
    _, fields = build(("Host", "api.test:8080"), ("X-Forwarded-For", "1.1.1.1"),
                      ("X-Forwarded-For", "2.2.2.2"), ("X-Forwarded-Proto", "https"),
                      ("X-Forwarded-Host", "spoofed"), ("Via", "1.0 cdn"))
    out = as_dict(fields)
    assert out["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2, 10.0.0.9"
    assert out["X-Forwarded-Proto"] == "http"  # what this hop saw, not what the client claims
    assert out.getall("X-Forwarded-Host") == ["api.test:8080"]
    assert out["Via"] == "1.0 cdn, 1.1 ringproxy"
    assert out["Host"] == "api.test:8080"


def test_host_override_and_ring_headers_cannot_be_spoofed() -> None:
    _, fields = build(("Host", "own.test"), ("X-Ring", "vip"), ("X-Ring-Reason", "forged"),
                      ("X-Feature", "off"))
    out = as_dict(fields)
    assert out["Host"] == "10.0.0.5:8080"  # preserve_host: false
    assert out.getall("X-Ring") == ["beta"]
    assert "X-Ring-Reason" not in out
    assert out.getall("X-Feature") == ["on"]  # the ring's header replaces the client's


def test_header_names_with_underscores_are_dropped_by_default() -> None:
    _, fields = build(("Host", "h"), ("X_Forwarded_For", "6.6.6.6"), ("X-Ok", "1"))
    assert [k for k, _ in fields if "_" in k] == []
    assert as_dict(fields)["X-Forwarded-For"] == "10.0.0.9"


def test_an_http_10_request_without_host_gets_the_servers() -> None:
    line, fields = build(version="1.0")
    assert line == "GET /p HTTP/1.1"
    assert as_dict(fields)["Host"] == "10.0.0.5:8080"
    assert "X-Forwarded-Host" not in as_dict(fields)


def test_request_id_kept_when_sane_else_generated() -> None:
    assert request_id_ok(b"abc")
    for bad in (b"", b"x" * 201, b"a\x01b", "é".encode()):
        assert not request_id_ok(bad)
    a, b = new_request_id(), new_request_id()
    assert a != b and len(a) == 32


class _Listener:
    """Records what an upstream connection reports (in place of the exchange, whose
    type the compiled connection's attribute is: these tests run interpreted)."""

    def __init__(self) -> None:
        self.conn: UpstreamConnection | None = None
        self.body = b""
        self.complete = False
        self.failed: UpstreamError | None = None

    def response_head(self, conn: UpstreamConnection) -> None:
        self.conn = conn

    def response_body(self, data: bytes) -> None:
        self.body += data

    def response_complete(self) -> None:
        self.complete = True

    def upstream_failed(self, exc: UpstreamError) -> None:
        self.failed = exc


def respond(raw: bytes) -> tuple[UpstreamConnection, _Listener]:
    config = parse_config(CONFIG)
    pool = UpstreamPool(config.pools[0])
    conn = UpstreamConnection(pool, pool.servers[0])
    listener = _Listener()
    conn.listener = listener  # type: ignore[assignment]
    conn.request_sent = True
    conn.data_received(raw)
    return conn, listener


@pytest.mark.interpreted  # a recording exchange: see _Listener
def test_response_headers() -> None:
    conn, listener = respond(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: X-Up\r\nX-Up: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nSet-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\nVia: 1.1 app\r\nProxy-Authenticate: Basic\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    assert listener.conn is conn and listener.complete and listener.body == b"abc"
    assert conn.lines == [b"Content-Type: text/plain\r\n", b"Set-Cookie: a=1\r\n",
                          b"Set-Cookie: b=2\r\n"]
    assert conn.via == b"1.1 app" and conn.chunked and conn.content_length is None
    assert not conn.has_request_id


@pytest.mark.interpreted  # a recording exchange: see _Listener
def test_response_header_names_in_any_case_are_recognised() -> None:
    conn, _ = respond(b"HTTP/1.1 204 No Content\r\nconnection: x-up\r\nx-up: 1\r\n"
                      b"KEEP-ALIVE: 5\r\nvia: 1.1 app\r\nx-request-id: up-1\r\n\r\n")
    assert conn.lines == [b"x-request-id: up-1\r\n"]
    assert conn.has_request_id and conn.via == b"1.1 app"


@pytest.mark.interpreted  # a recording exchange: see _Listener
def test_a_response_head_over_the_limits_is_a_bad_response() -> None:
    _, listener = respond(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\n")
    assert listener.failed is not None and listener.failed.kind == "bad_response"
