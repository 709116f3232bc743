"""Route matching and (data-plane) ring assignment: pure, no sockets."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import pytest

from proxy.config import parse_config
from proxy.routing.assign import Reason, assign
from proxy.routing.table import RoutingTable, normalize_host

CONFIG = textwrap.dedent("""
    pools: {p: {servers: [http://h]}}
    routes:
      - name: exact-v1
        match: {host: api.example.com, path_prefix: /v1}
        rings: [{name: r, pool: p}]
      - name: wild
        match: {host: "*.example.com"}
        rings: [{name: r, pool: p}]
      - name: exact-root
        match: {host: [api.example.com, "[::1]"]}
        rings: [{name: r, pool: p}]
      - name: docs
        match: {path_prefix: /docs/}
        rings: [{name: r, pool: p}]
      - name: rules
        match: {host: rules.test}
        rings:
          - name: a
            pool: p
            rules:
              - all:
                  - {attr: "header:X-A", equals: "1"}
                  - {attr: method, equals: POST}
              - {attr: "cookie:a", exists: true}
          - name: b
            pool: p
            rules:
              - {attr: "query:b", equals: "Yes", ignore_case: true}
              - {attr: path, equals: /b}
              - {attr: ip, equals: "::1"}
          - name: default
            pool: p
""")


@pytest.fixture(scope="module")
def table() -> RoutingTable:
    return RoutingTable(parse_config(CONFIG, environ={}))


@pytest.mark.parametrize(
    ("host", "path", "route"),
    [
        ("api.example.com", "/v1", "exact-v1"),
        ("API.Example.com:8443", "/v1/items", "exact-v1"),
        ("api.example.com", "/v1x", "wild"),  # a prefix ends at a segment boundary
        ("api.example.com", "/", "wild"),  # the wildcard route comes before exact-root
        ("x.example.com", "/anything", "wild"),
        ("example.com", "/docs/a", "docs"),  # "*.example.com" needs a subdomain
        ("[::1]:8080", "/", "exact-root"),
        ("other.test", "/docs/", "docs"),
        ("other.test", "/docs", None),  # "/docs/" as written needs the slash
        ("other.test", "/", None),
        ("", "/docs/x", "docs"),
    ],
)
def test_first_matching_route_in_file_order(
    table: RoutingTable, host: str, path: str, route: str | None
) -> None:
    got = table.match(host, path)
    assert (got.route.name if got else None) == route


def test_normalize_host() -> None:
    assert normalize_host("API.example.COM.:80") == "api.example.com"
    assert normalize_host("[::1]:80") == "[::1]"
    assert normalize_host("[::1") == "[::1"


@dataclass
class Req:
    method: str = "GET"
    path: str = "/"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    remote: str | None = "127.0.0.1"


@pytest.mark.parametrize(
    ("req", "ring", "reason", "detail"),
    [
        (Req(), "default", Reason.DEFAULT, ""),
        (Req(method="POST", headers={"x-a": "1"}), "a", Reason.RULE,
         "header:x-a equals '1' and method equals 'POST'"),
        (Req(headers={"x-a": "1"}), "default", Reason.DEFAULT, ""),  # all rules of a group
        (Req(cookies={"a": ""}), "a", Reason.RULE, "cookie:a exists true"),  # empty exists
        (Req(query={"b": "yES"}), "b", Reason.RULE, "query:b equals 'Yes' (any case)"),
        (Req(query={"b": "no"}), "default", Reason.DEFAULT, ""),
        (Req(path="/b"), "b", Reason.RULE, "path equals '/b'"),
        (Req(path="/B"), "default", Reason.DEFAULT, ""),  # case-sensitive unless asked
        (Req(remote="::1"), "b", Reason.RULE, "ip equals '::1'"),
        (Req(remote=None), "default", Reason.DEFAULT, ""),
        (Req(cookies={"a": "1"}, path="/b"), "a", Reason.RULE, "cookie:a exists true"),
    ],
)
def test_assignment(table: RoutingTable, req: Req, ring: str, reason: Reason, detail: str) -> None:
    compiled = table.routes["rules"]
    decision = assign(compiled, req)
    assert (decision.ring, decision.reason, decision.detail) == (ring, reason, detail)
    assert decision.revision == table.config.revision
    assert compiled.route.rings[decision.index].name == ring
    assert decision.as_dict()["reason"] == reason.value
