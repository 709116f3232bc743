"""Assignment properties over many keys: sticky, exact, monotonic, independent.  Pure."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.routing.assign import (
    BUCKETS,
    CompiledRoute,
    Reason,
    StaticRequest,
    assign,
    bucket_of,
    compile_route,
)

ROUTE = textwrap.dedent("""
    pools: {{p: {{servers: [http://h]}}}}
    routes:
      - name: api
        sticky: {{key: ["header:X-User-Id", "cookie:uid", "query:u"]{salt}}}
        rings:
          - {{name: canary, pool: p, weight: {w0}}}
          - {{name: early, pool: p, weight: {w1}}}
          - {{name: beta, pool: p, weight: {w2}, rules: [{{attr: "header:X-Beta", exists: true}}]}}
          - {{name: stable, pool: p}}
""")


def compiled(w0: float = 5, w1: float = 20, w2: float = 10.25, salt: str = "") -> CompiledRoute:
    text = ROUTE.format(w0=w0, w1=w1, w2=w2, salt=f", salt: {salt}" if salt else "")
    config = parse_config(text, environ={})
    return compile_route(config.routes[0], config.revision)


def keys(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"user-{rng.getrandbits(64):016x}" for _ in range(n)]


def ring_of(route: CompiledRoute, key: str) -> int:
    return assign(route, StaticRequest.build([("X-User-Id", key)])).index


def test_bucket_is_the_documented_hash() -> None:
    import mmh3

    assert bucket_of("api", "alice") == mmh3.hash("api:alice", signed=False) % 10000
    assert 0 <= bucket_of("api", "") < BUCKETS


def test_decision_explains_the_bucket() -> None:
    route = compiled()
    key = next(k for k in keys(1000) if 500 <= bucket_of("api", k) < 2500)
    decision = assign(route, StaticRequest.build([("X-User-Id", key)]))
    assert decision.ring == "early"
    assert decision.reason is Reason.BUCKET
    assert decision.bucket == bucket_of("api", key)
    assert decision.detail == f"bucket {decision.bucket} in [500, 2500)"
    assert decision.key_source == "header:x-user-id"
    assert decision.revision == route.revision


def test_key_sources_in_order_and_empty_values_skipped() -> None:
    route = compiled()
    for request, source in [
        (StaticRequest.build([("X-User-Id", "a")], cookies={"uid": "b"}), "header:x-user-id"),
        (StaticRequest.build([("X-User-Id", "")], cookies={"uid": "b"}), "cookie:uid"),
        (StaticRequest.build(query={"u": "c"}), "query:u"),
    ]:
        assert assign(route, request).key_source == source
    no_key = assign(route, StaticRequest.build())
    assert (no_key.ring, no_key.reason, no_key.bucket) == ("stable", Reason.DEFAULT, None)


def test_rules_come_before_buckets_and_a_ring_may_have_both() -> None:
    route = compiled()
    key = next(k for k in keys(1000) if bucket_of("api", k) < 500)  # a canary user
    with_rule = assign(route, StaticRequest.build([("X-User-Id", key), ("X-Beta", "1")]))
    assert (with_rule.ring, with_rule.reason) == ("beta", Reason.RULE)
    beta_bucket = next(k for k in keys(5000) if 2500 <= bucket_of("api", k) < 3525)
    assert ring_of(route, beta_bucket) == 2  # beta also owns 10.25 % of buckets


def test_sticky_within_and_across_processes() -> None:
    route = compiled()
    sample = keys(2000)
    here = [ring_of(route, k) for k in sample]
    assert here == [ring_of(compiled(), k) for k in sample]  # rebuilt from the config
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent.parent)!r})
        from tests.test_assign import compiled, ring_of
        keys = json.load(sys.stdin)
        route = compiled()
        print(json.dumps([ring_of(route, k) for k in keys]))
    """)
    other = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(sample), capture_output=True,
        text=True, check=True, timeout=60, env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(other.stdout) == here


def test_exact_shares_over_100000_keys() -> None:
    route = compiled(w0=5, w1=20, w2=10.25)
    counts = [0, 0, 0, 0]
    for key in keys(100_000, seed=11):
        counts[ring_of(route, key)] += 1
    shares = [c / 1000 for c in counts]  # percent
    for share, weight in zip(shares, [5, 20, 10.25, 64.75], strict=True):
        assert abs(share - weight) <= 0.3, shares


def test_weights_with_hundredths_of_a_percent() -> None:
    route = compiled(w0=0.01, w1=99.98, w2=0.01)
    assert [(r.lo, r.hi) for r in route.ranges] == [(0, 1), (1, 9999), (9999, 10000)]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_raising_a_weight_only_moves_users_toward_earlier_rings(k: int) -> None:
    sample = keys(20_000, seed=3)
    base = [5.0, 20.0, 10.0]
    for step in (0.01, 1, 15):
        raised = list(base)
        raised[k] += step
        before = compiled(*base)
        after = compiled(*raised)
        moved = 0
        for key in sample:
            old, new = ring_of(before, key), ring_of(after, key)
            assert new <= old, f"{key} moved from ring {old} to later ring {new}"
            moved += old != new
        assert moved > 0 or step == 0.01


@pytest.mark.parametrize("k", [0, 1, 2])
def test_lowering_a_weight_releases_that_rings_most_recently_added_users(k: int) -> None:
    sample = keys(20_000, seed=5)
    base = [5.0, 20.0, 10.0]
    lowered = list(base)
    lowered[k] -= 4
    before, after = compiled(*base), compiled(*lowered)
    lo, hi = before.ranges[k].lo, before.ranges[k].hi
    for key in sample:
        old, new = ring_of(before, key), ring_of(after, key)
        bucket = bucket_of("api", key)
        if old == k:
            # the users who leave ring k are exactly its top 4 % (the last ones raised in)
            assert (new != k) == (bucket >= hi - 400), key
            assert lo <= bucket < hi
        if old != k and new != old:
            # only later percentage rings shift (documented); nobody moves to an earlier ring
            assert old > k and new > old, key
    # lowering back restores every user: the layout is a pure function of the weights
    restored = compiled(*base)
    assert [ring_of(restored, key) for key in sample] == [ring_of(before, key) for key in sample]


def test_lowering_the_last_percentage_ring_moves_only_its_own_users() -> None:
    sample = keys(20_000, seed=9)
    before, after = compiled(5, 20, 10), compiled(5, 20, 3)
    for key in sample:
        old, new = ring_of(before, key), ring_of(after, key)
        if old != new:
            assert (old, new) == (2, 3)


def test_rollback_to_zero_with_live_weights() -> None:
    route = compiled(5, 20, 10)
    rolled = route.with_weights([0, 2000, 1000, None], blocked=["canary"])
    sample = keys(5000)
    for key in sample:
        assert ring_of(rolled, key) != 0
    assert rolled.range_of("canary") is None
    assert rolled.range_of("early") == (0, 2000)
    with pytest.raises(ValueError, match="3 weights for 4 rings"):
        route.with_weights([0, 1, 2])


def test_shares_are_read_off_the_layout_and_the_default_ring_takes_the_rest() -> None:
    route = compiled(5, 20, 10.25)
    assert [route.share_of(r) for r in ("canary", "early", "beta", "stable")] == [
        500, 2000, 1025, 6475]
    rolled = route.with_weights([0, 2000, None, 123], blocked=["canary"])  # 123: not read
    assert [rolled.share_of(r) for r in ("canary", "early", "beta", "stable")] == [
        0, 2000, None, 8000]
    assert rolled.range_of("stable") is None  # the rest is no range of its own


def test_two_salts_pick_independent_user_sets() -> None:
    a, b = compiled(w0=10, w1=0, w2=0, salt="checkout"), compiled(w0=10, w1=0, w2=0, salt="search")
    sample = keys(100_000, seed=13)
    in_a = {k for k in sample if ring_of(a, k) == 0}
    in_b = {k for k in sample if ring_of(b, k) == 0}
    both = len(in_a & in_b) / len(sample) * 100
    assert abs(len(in_a) / 1000 - 10) < 0.5
    assert 0.7 <= both <= 1.3, both  # independent: 10 % of 10 %, not 10 %
    same = compiled(w0=10, w1=0, w2=0, salt="checkout")
    assert {k for k in sample if ring_of(same, k) == 0} == in_a


def test_salt_defaults_to_the_route_name() -> None:
    assert compiled().salt == "api"
    assert compiled(salt="x").salt == "x"


def test_anonymous_requests_get_an_id_and_keep_their_ring() -> None:
    text = ROUTE.format(w0=50, w1=0, w2=0, salt="").replace(
        '"query:u"]', '"query:u"], anonymous: {cookie: rp_uid}'
    )
    config = parse_config(text, environ={})
    route = compile_route(config.routes[0], config.revision)
    ids = iter(keys(200, seed=17))
    rings = set()
    for _ in range(200):
        first = assign(route, StaticRequest.build(), make_id=lambda: next(ids))
        assert first.new_id is not None and first.key_source == "anonymous"
        again = assign(route, StaticRequest.build(cookies={"rp_uid": first.new_id}))
        assert (again.ring, again.bucket, again.new_id) == (first.ring, first.bucket, None)
        assert again.key_source == "cookie:rp_uid"
        rings.add(first.ring)
    assert rings == {"canary", "stable"}
    # without a make_id (e.g. explain), no id is invented
    assert assign(route, StaticRequest.build()).new_id is None


OVERRIDE = textwrap.dedent("""
    pools: {p: {servers: [http://h]}}
    routes:
      - name: api
        override:
          header: X-Ring-Override
          cookie: ring
          secret_header: X-Override-Token
          secret: ${TOKEN}
          cidrs: [10.0.0.0/8, "fd00::/8"]
        rings:
          - {name: canary, pool: p, rules: [{attr: "header:X-Never", exists: true}]}
          - {name: stable, pool: p}
""")
SECRET = "s3cret-s3cret-s3cret"


@pytest.fixture(scope="module")
def guarded() -> CompiledRoute:
    config = parse_config(OVERRIDE, environ={"TOKEN": SECRET})
    return compile_route(config.routes[0], config.revision)


@pytest.mark.parametrize(
    ("headers", "cookies", "remote", "ring", "reason"),
    [
        ([("X-Ring-Override", "canary"), ("X-Override-Token", SECRET)], {}, "1.2.3.4",
         "canary", Reason.OVERRIDE),
        ([("X-Ring-Override", "canary")], {}, "10.1.1.1", "canary", Reason.OVERRIDE),
        ([("X-Ring-Override", "canary")], {}, "fd00::5", "canary", Reason.OVERRIDE),
        ([], {"ring": "canary"}, "10.1.1.1", "canary", Reason.OVERRIDE),
        ([("X-Ring-Override", "canary")], {}, "1.2.3.4", "stable", Reason.DEFAULT),  # no proof
        ([("X-Ring-Override", "canary"), ("X-Override-Token", "wrong")], {}, "1.2.3.4",
         "stable", Reason.DEFAULT),
        ([("X-Ring-Override", "nope")], {}, "10.1.1.1", "stable", Reason.DEFAULT),  # unknown
        ([("X-Ring-Override", "canary")], {}, None, "stable", Reason.DEFAULT),
    ],
)
def test_override_needs_proof(
    guarded: CompiledRoute, headers, cookies, remote, ring, reason
) -> None:
    decision = assign(guarded, StaticRequest.build(headers, cookies=cookies, remote=remote))
    assert (decision.ring, decision.reason) == (ring, reason)


def test_override_never_reaches_a_rolled_back_ring_unless_allowed(guarded: CompiledRoute) -> None:
    request = StaticRequest.build([("X-Ring-Override", "canary")], remote="10.0.0.1")
    blocked = guarded.with_weights([None, None], blocked=["canary"])
    assert assign(blocked, request).ring == "stable"
    text = OVERRIDE.replace('fd00::/8"]', 'fd00::/8"]\n      allow_rolled_back: true')
    config = parse_config(text, environ={"TOKEN": SECRET})
    allowed = compile_route(config.routes[0], "r").with_weights([None, None], blocked=["canary"])
    assert assign(allowed, request).ring == "canary"


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (OVERRIDE.replace("${TOKEN}", "literal-secret-in-file"), {},
         "a secret must come from the environment"),
        (OVERRIDE, {"TOKEN": "short"}, "shorter than 16 characters"),
        (OVERRIDE.replace("      secret_header: X-Override-Token\n      secret: ${TOKEN}\n", "")
         .replace('cidrs: [10.0.0.0/8, "fd00::/8"]', "cidrs: []"), {}, "must be guarded"),
        (OVERRIDE.replace("      header: X-Ring-Override\n      cookie: ring\n", ""),
         {"TOKEN": SECRET}, "needs a header and/or a cookie"),
        (ROUTE.format(w0=50, w1=40, w2=10.01, salt=""), {}, "add up to 100.01 %, above 100 %"),
        (ROUTE.format(w0=5.001, w1=0, w2=0, salt=""), {}, "more than two decimals"),
        (ROUTE.format(w0=-1, w1=0, w2=0, salt=""), {}, "outside 0..100"),
        (ROUTE.format(w0=5, w1=0, w2=0, salt="").replace(
            '    sticky: {key: ["header:X-User-Id", "cookie:uid", "query:u"]}\n', ""), {},
         "a weight needs the route's sticky.key"),
        (ROUTE.format(w0=5, w1=0, w2=0, salt="").replace('"query:u"]', '"ip"]'), {},
         "a stickiness key comes from a header, cookie or query"),
        (ROUTE.format(w0=5, w1=0, w2=0, salt="").replace(
            "{name: stable, pool: p}", "{name: stable, pool: p, weight: 1}"), {},
         "cannot have rules or a weight"),
        (ROUTE.format(w0=5, w1=0, w2=0, salt="").replace(
            '"query:u"]', '"query:u"], anonymous: {same_site: None}'), {},
         "SameSite=None needs secure: always"),
    ],
)
def test_assignment_config_errors(text: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, environ=environ)
