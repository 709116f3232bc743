"""The request's decisions, without sockets: a runtime from a parsed config, requests as values.

``decide`` is synchronous and opens nothing, so every answer the handler acts on is
checked here directly; the socket tests check that the exchange carries them out.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass

import pytest
from multidict import CIMultiDict

from proxy import compiled
from proxy.config import parse_config
from proxy.dataplane.decide import NO_ROUTE, Forward, LocalAnswer, decide
from proxy.dataplane.request import Request, parse_request
from proxy.routing.assign import Reason
from proxy.runtime import Runtime

SECRET = "s3cret-override-token"

CONFIG = textwrap.dedent(
    """
    pools:
      old: {servers: ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]}
      new: {servers: ["http://10.0.1.1:9000"], preserve_host: false}
    routes:
      - name: api
        match: {host: api.test, path_prefix: /v1}
        sticky: {key: ["header:X-User-Id"], anonymous: {cookie: uid}}
        override: {header: X-Ring-Override, secret_header: X-Override-Token, secret: "${SECRET}"}
        decision: {reason_upstream: true, response: true}
        rings:
          - name: beta
            pool: new
            rules: [{attr: "header:X-Beta", equals: "1"}]
            policy: {max_concurrency: 2, add_headers: {X-Flag: "{ring}@{route}"}}
          - name: canary
            pool: new
            weight: 100
          - name: main
            pool: old
      - name: web
        match: {host: web.test}
        rings:
          - name: main
            pool: old
    """
)


@dataclass(frozen=True)
class Req:
    """A request as a value, turned into the bytes a client would send and parsed by the
    data plane's own parser (``parse_request``)."""

    host: str = "api.test"
    target: str = "/v1/items?id=7"
    method: str = "GET"
    header_list: tuple[tuple[str, str], ...] = ()
    remote: str = "192.0.2.7"
    scheme: str = "http"

    def parsed(self) -> Request:
        lines = [f"{self.method} {self.target} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{k}: {v}" for k, v in self.header_list]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return parse_request(raw, self.remote, self.scheme)


def head_of(step: Forward) -> tuple[str, CIMultiDict[str]]:
    """The upstream request line and headers of a decision."""
    line, *fields = step.head.decode().removesuffix("\r\n").split("\r\n")
    return line, CIMultiDict(tuple(f.split(": ", 1)) for f in fields)


def lines_of(extra: bytes) -> list[tuple[str, str]]:
    return [tuple(f.split(": ", 1)) for f in extra.decode().split("\r\n") if f]  # type: ignore[misc]


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(parse_config(CONFIG, environ={"SECRET": SECRET}))


def forward(runtime: Runtime, req: Req, request_id: str = "rid-1") -> Forward:
    step = decide(runtime, req.parsed(), request_id)
    assert isinstance(step, Forward), step
    return step


def test_no_route_is_answered_here(runtime: Runtime) -> None:
    assert decide(runtime, Req(host="other.test").parsed(), "r") is NO_ROUTE
    assert decide(runtime, Req(target="/v2/x").parsed(), "r") is NO_ROUTE
    assert (NO_ROUTE.status, NO_ROUTE.error, NO_ROUTE.ring) == (404, "no_route", None)


def test_a_rule_sends_the_request_to_its_ring_with_the_upstream_headers(
    runtime: Runtime,
) -> None:
    req = Req(header_list=(("X-Beta", "1"), ("X-User-Id", "u1"), ("Connection", "close")))
    step = forward(runtime, req, "rid-9")
    assert (step.ring.route, step.ring.name) == ("api", "beta")
    assert step.decision.reason is Reason.RULE
    line, h = head_of(step)
    assert line == "GET /v1/items?id=7 HTTP/1.1"
    assert step.server.upstream.url == "http://10.0.1.1:9000"
    assert step.server.host_header == b"10.0.1.1:9000"
    assert not step.upgrade
    assert h["Host"] == "10.0.1.1:9000"  # preserve_host: false
    assert h["X-Forwarded-Host"] == "api.test"
    assert h["X-Forwarded-For"] == "192.0.2.7"
    assert (h["X-Forwarded-Proto"], h["X-Request-Id"], h["X-Ring"]) == ("http", "rid-9", "beta")
    assert h["X-Ring-Reason"] == "rule"  # decision.reason_upstream
    assert h["X-Flag"] == "beta@api"
    assert "Connection" not in h
    assert lines_of(step.extra) == [("X-Ring", "beta"), ("X-Ring-Reason", "rule")]  # response


def test_buckets_pick_the_ring_and_the_pool_balances_its_servers(runtime: Runtime) -> None:
    web = [forward(runtime, Req(host="web.test", target="/")) for _ in range(4)]
    assert [s.server.upstream.url for s in web] == [
        "http://10.0.0.1:8080", "http://10.0.0.2:8080",
        "http://10.0.0.1:8080", "http://10.0.0.2:8080",
    ]
    assert all(head_of(s)[1]["Host"] == "web.test" for s in web)  # preserve_host: true
    assert all(s.extra == b"" for s in web)  # nothing for the client's response
    step = forward(runtime, Req(header_list=(("X-User-Id", "u1"),)))
    assert (step.ring.name, step.decision.reason) == ("canary", Reason.BUCKET)


def test_the_override_secret_never_goes_upstream(runtime: Runtime) -> None:
    req = Req(header_list=(("X-Ring-Override", "main"), ("X-Override-Token", SECRET)))
    step = forward(runtime, req)
    assert (step.ring.name, step.decision.reason) == ("main", Reason.OVERRIDE)
    headers = head_of(step)[1]
    assert "X-Override-Token" not in headers
    assert headers["X-Ring-Override"] == "main"


@pytest.mark.parametrize(
    ("scheme", "forwarded_proto", "cookie_secure"),
    [("http", None, False), ("https", None, True), ("http", "https, http", True),
     ("http", "http", False)],
)
def test_an_anonymous_user_gets_an_id_cookie(
    runtime: Runtime, scheme: str, forwarded_proto: str | None, cookie_secure: bool
) -> None:
    headers = (("X-Forwarded-Proto", forwarded_proto),) if forwarded_proto else ()
    step = forward(runtime, Req(scheme=scheme, header_list=headers))
    new_id = step.decision.new_id
    assert new_id is not None and step.decision.key_source == "anonymous"
    extra = lines_of(step.extra)
    assert [name for name, _ in extra] == ["X-Ring", "X-Ring-Reason", "Set-Cookie"]
    cookie = dict(extra)["Set-Cookie"]
    assert cookie.startswith(f"uid={new_id}; ")
    assert cookie.endswith("; Secure") is cookie_secure


def test_a_full_ring_is_answered_here_with_its_decision(runtime: Runtime) -> None:
    beta = runtime.rings["api"][0]
    beta.inflight = 2  # max_concurrency: 2
    step = decide(runtime, Req(header_list=(("X-Beta", "1"),)).parsed(), "r")
    assert isinstance(step, LocalAnswer)
    assert (step.status, step.error, step.retry_after) == (503, "overload", True)
    assert step.ring is beta and step.decision is not None
    assert step.decision.ring == "beta"
    assert lines_of(step.extra) == [("X-Ring", "beta"), ("X-Ring-Reason", "rule")]
    beta.inflight = 1
    assert forward(runtime, Req(header_list=(("X-Beta", "1"),))).ring is beta


def test_an_upgrade_is_forwarded_with_its_handshake_headers(runtime: Runtime) -> None:
    req = Req(host="web.test", target="/chat?room=1", header_list=(
        ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "k"),
        ("Sec-WebSocket-Version", "13")))
    step = forward(runtime, req)
    assert step.upgrade
    line, headers = head_of(step)
    assert line == "GET /chat?room=1 HTTP/1.1"
    # After the 101 the tunnel carries bytes: the handshake goes through as the client sent it.
    assert (headers["Sec-WebSocket-Key"], headers["Sec-WebSocket-Version"]) == ("k", "13")
    assert (headers["Connection"], headers["Upgrade"]) == ("upgrade", "websocket")
    # Upgrade without Connection: upgrade asks for nothing: both are dropped.
    plain = dataclasses.replace(req, header_list=(("Upgrade", "h2c"),))
    step = forward(runtime, plain)
    assert not step.upgrade
    assert "Upgrade" not in head_of(step)[1] and "Connection" not in head_of(step)[1]


def test_the_records_are_immutable(runtime: Runtime) -> None:
    step = forward(runtime, Req(host="web.test", target="/"))
    # (Through setattr: the type checker rightly refuses the plain statement.)
    if "proxy.dataplane.decide" in compiled.compiled():
        # Forward's fields are Final: compiled, read-only at run time as well.
        with pytest.raises(AttributeError):
            setattr(step, "upgrade", True)  # noqa: B010
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(NO_ROUTE, "status", 200)  # noqa: B010
    assert not hasattr(step, "__dict__")
