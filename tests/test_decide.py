"""The request's decisions, without sockets: a runtime from a parsed config, requests as values.

``decide`` is synchronous and opens nothing, so every answer the handler acts on is
checked here directly; the socket tests check that the handler carries them out.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import parse_config
from proxy.dataplane.decide import NO_ROUTE, Forward, LocalAnswer, decide
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
    """A request as a value: the attributes decide reads of aiohttp's request."""

    host: str = "api.test"
    target: str = "/v1/items?id=7"
    method: str = "GET"
    header_list: tuple[tuple[str, str], ...] = ()
    remote: str | None = "192.0.2.7"
    scheme: str = "http"
    secure: bool = False
    cookies: Mapping[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict([("Host", self.host), *self.header_list]))

    @property
    def rel_url(self) -> URL:
        return URL(self.target, encoded=True)

    @property
    def path(self) -> str:
        return self.rel_url.path

    @property
    def query(self) -> Mapping[str, str]:
        return self.rel_url.query


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(parse_config(CONFIG, environ={"SECRET": SECRET}))


def forward(runtime: Runtime, req: Req, request_id: str = "rid-1") -> Forward:
    step = decide(runtime, req, request_id)
    assert isinstance(step, Forward), step
    return step


def test_no_route_is_answered_here(runtime: Runtime) -> None:
    assert decide(runtime, Req(host="other.test"), "r") is NO_ROUTE
    assert decide(runtime, Req(target="/v2/x"), "r") is NO_ROUTE
    assert (NO_ROUTE.status, NO_ROUTE.error, NO_ROUTE.ring) == (404, "no_route", None)


def test_a_rule_sends_the_request_to_its_ring_with_the_upstream_headers(
    runtime: Runtime,
) -> None:
    req = Req(header_list=(("X-Beta", "1"), ("X-User-Id", "u1"), ("Connection", "close")))
    step = forward(runtime, req, "rid-9")
    assert (step.ring.route, step.ring.name) == ("api", "beta")
    assert step.decision.reason is Reason.RULE
    assert str(step.url) == "http://10.0.1.1:9000/v1/items?id=7"
    assert step.server.host_header == "10.0.1.1:9000"
    assert not step.websocket
    h = step.headers
    assert h["Host"] == "10.0.1.1:9000"  # preserve_host: false
    assert h["X-Forwarded-Host"] == "api.test"
    assert h["X-Forwarded-For"] == "192.0.2.7"
    assert (h["X-Forwarded-Proto"], h["X-Request-Id"], h["X-Ring"]) == ("http", "rid-9", "beta")
    assert h["X-Ring-Reason"] == "rule"  # decision.reason_upstream
    assert h["X-Flag"] == "beta@api"
    assert "Connection" not in h
    assert step.extra == (("X-Ring", "beta"), ("X-Ring-Reason", "rule"))  # decision.response


def test_buckets_pick_the_ring_and_the_pool_balances_its_servers(runtime: Runtime) -> None:
    web = [forward(runtime, Req(host="web.test", target="/")) for _ in range(4)]
    assert [str(s.url) for s in web] == [
        "http://10.0.0.1:8080/", "http://10.0.0.2:8080/",
        "http://10.0.0.1:8080/", "http://10.0.0.2:8080/",
    ]
    assert all(s.headers["Host"] == "web.test" for s in web)  # preserve_host: true
    assert all(s.extra == () for s in web)  # nothing for the client's response
    step = forward(runtime, Req(header_list=(("X-User-Id", "u1"),)))
    assert (step.ring.name, step.decision.reason) == ("canary", Reason.BUCKET)


def test_the_override_secret_never_goes_upstream(runtime: Runtime) -> None:
    req = Req(header_list=(("X-Ring-Override", "main"), ("X-Override-Token", SECRET)))
    step = forward(runtime, req)
    assert (step.ring.name, step.decision.reason) == ("main", Reason.OVERRIDE)
    assert "X-Override-Token" not in step.headers
    assert step.headers["X-Ring-Override"] == "main"


@pytest.mark.parametrize(
    ("secure", "forwarded_proto", "cookie_secure"),
    [(False, None, False), (True, None, True), (False, "https, http", True),
     (False, "http", False)],
)
def test_an_anonymous_user_gets_an_id_cookie(
    runtime: Runtime, secure: bool, forwarded_proto: str | None, cookie_secure: bool
) -> None:
    headers = (("X-Forwarded-Proto", forwarded_proto),) if forwarded_proto else ()
    step = forward(runtime, Req(secure=secure, header_list=headers))
    new_id = step.decision.new_id
    assert new_id is not None and step.decision.key_source == "anonymous"
    names = [name for name, _ in step.extra]
    assert names == ["X-Ring", "X-Ring-Reason", "Set-Cookie"]
    cookie = dict(step.extra)["Set-Cookie"]
    assert cookie.startswith(f"uid={new_id}; ")
    assert cookie.endswith("; Secure") is cookie_secure


def test_a_full_ring_is_answered_here_with_its_decision(runtime: Runtime) -> None:
    beta = runtime.rings["api"][0]
    beta.inflight = 2  # max_concurrency: 2
    step = decide(runtime, Req(header_list=(("X-Beta", "1"),)), "r")
    assert isinstance(step, LocalAnswer)
    assert (step.status, step.error, step.retry_after) == (503, "overload", True)
    assert step.ring is beta and step.decision is not None
    assert step.decision.ring == "beta"
    assert step.extra == (("X-Ring", "beta"), ("X-Ring-Reason", "rule"))
    beta.inflight = 1
    assert forward(runtime, Req(header_list=(("X-Beta", "1"),))).ring is beta


def test_a_websocket_handshake_goes_to_the_ws_url(runtime: Runtime) -> None:
    req = Req(host="web.test", target="/chat?room=1", header_list=(
        ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "k"),
        ("Sec-WebSocket-Version", "13")))
    step = forward(runtime, req)
    assert step.websocket
    assert step.url.scheme == "ws" and step.url.path_qs == "/chat?room=1"
    assert not any(k.lower().startswith("sec-websocket-") for k in step.headers)
    post = dataclasses.replace(req, method="POST")
    assert not forward(runtime, post).websocket


def test_the_records_are_immutable(runtime: Runtime) -> None:
    step = forward(runtime, Req(host="web.test", target="/"))
    # (Through setattr: the type checker rightly refuses the plain statement.)
    with pytest.raises(AttributeError):
        setattr(step, "websocket", True)  # noqa: B010
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(NO_ROUTE, "status", 200)  # noqa: B010
    assert not hasattr(step, "__dict__")
