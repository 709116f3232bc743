"""proxy.routing.explain: the one answer to "which ring, and why" for the CLI and the API.

Pure.  Buckets are worked out here from mmh3 directly, not through the code under test.
"""

from __future__ import annotations

import textwrap

import mmh3

from proxy.config import parse_config
from proxy.routing.assign import CompiledRoute, StaticRequest, compile_route
from proxy.routing.explain import explain

CONFIG = textwrap.dedent("""
    pools: {p: {servers: ["http://127.0.0.1:9"]}}
    routes:
      - name: api
        match: {path_prefix: /api}
        sticky: {key: ["header:X-User-Id", "cookie:uid"], salt: s1}
        rings:
          - {name: beta, pool: p, rules: [{attr: "header:X-Beta", exists: true}]}
          - {name: canary, pool: p, weight: 25}
          - {name: stable, pool: p}
      - name: anon
        match: {path_prefix: /anon}
        sticky: {key: ["header:X-User-Id"], anonymous: true}
        rings:
          - {name: canary, pool: p, weight: 10}
          - {name: stable, pool: p}
      - name: rules
        match: {path_prefix: /rules}
        rings:
          - {name: beta, pool: p, rules: [{attr: "header:X-Beta", exists: true}]}
          - {name: stable, pool: p}
""")


def route(name: str) -> CompiledRoute:
    config = parse_config(CONFIG, environ={})
    (found,) = (r for r in config.routes if r.name == name)
    return compile_route(found, config.revision)


def bucket(salt: str, key: str) -> int:
    return mmh3.hash(f"{salt}:{key}", signed=False) % 10_000


def user_in(salt: str, lo: int, hi: int) -> str:
    return next(f"u{i}" for i in range(10_000) if lo <= bucket(salt, f"u{i}") < hi)


def test_a_bucket_decision_shows_the_ranges() -> None:
    compiled = route("api")
    user = user_in("s1", 0, 2500)
    out = explain(compiled, StaticRequest(headers={"x-user-id": user}))
    b = bucket("s1", user)
    assert out == {
        "route": "api", "ring": "canary", "reason": "bucket",
        "detail": f"bucket {b} in [0, 2500)", "bucket": b, "key_source": "header:x-user-id",
        "revision": compiled.revision, "ranges": {"canary": [0, 2500]},
    }
    # The CLI prints the keys in this order (README shows it).
    assert list(out) == ["route", "ring", "reason", "detail", "bucket", "key_source",
                         "revision", "ranges"]


def test_the_ranges_are_the_live_ones() -> None:
    # The API explains against the live table: weights the controller set, not the file's.
    live = route("api").with_weights([None, 4000, None])
    user = user_in("s1", 2500, 4000)
    out = explain(live, StaticRequest(headers={"x-user-id": user}))
    assert (out["ring"], out["ranges"]) == ("canary", {"canary": [0, 4000]})


def test_a_rule_decision_has_no_ranges_and_no_note() -> None:
    out = explain(route("api"), StaticRequest(headers={"x-beta": "1", "x-user-id": "u1"}))
    assert (out["ring"], out["reason"], out["detail"]) == (
        "beta", "rule", "header:x-beta exists true")
    assert "ranges" not in out and "note" not in out


def test_no_key_without_anonymous_ids_is_the_default_ring() -> None:
    out = explain(route("api"), StaticRequest())
    assert (out["ring"], out["reason"], out["bucket"], out["key_source"]) == (
        "stable", "default", None, None)
    assert out["note"] == "no stickiness key (header:x-user-id, cookie:uid): the default ring"
    assert "ranges" not in out


def test_no_key_with_anonymous_ids_says_what_the_proxy_would_do() -> None:
    out = explain(route("anon"), StaticRequest())
    # No id is made up: the answer stays deterministic and says so.
    assert out["ring"] == "stable" and "new_id" not in out
    assert out["note"] == (
        "no stickiness key (header:x-user-id, cookie:ringproxy_uid); the proxy would set "
        "cookie 'ringproxy_uid' to a new random id and assign by its bucket")


def test_a_key_outside_every_range_shows_the_ranges_without_a_note() -> None:
    user = user_in("s1", 2500, 10_000)
    out = explain(route("api"), StaticRequest(cookies={"uid": user}))
    assert (out["ring"], out["reason"], out["key_source"]) == ("stable", "default", "cookie:uid")
    assert out["ranges"] == {"canary": [0, 2500]} and "note" not in out


def test_a_route_without_percentage_rings_needs_no_note() -> None:
    out = explain(route("rules"), StaticRequest())
    assert (out["ring"], out["reason"]) == ("stable", "default")
    assert "note" not in out and "ranges" not in out
