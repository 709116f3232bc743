"""pools' health:, outlier:, retries: and rings' on_pool_down, read and refused with lines."""

from __future__ import annotations

import textwrap

import pytest

from proxy.config import parse_config
from proxy.config.health import HealthCheck, Outlier, PoolDown, Retries
from proxy.errors import ConfigError


def config(pool: str, ring: str = "") -> str:
    return textwrap.dedent("""
        pools:
          a:
            servers: [http://h:1, http://h:2]
        {pool}
          b: {{servers: [http://h:3]}}
        routes:
          - name: r
            rings:
              - {{name: x, pool: a, rules: [{{attr: method, equals: GET}}] {ring}}}
              - {{name: y, pool: b}}
        """).format(pool=textwrap.indent(pool, "    "), ring=ring)


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [i.format() for i in info.value.issues]


def test_defaults_outlier_on_checks_and_retries_off() -> None:
    c = parse_config(config(""))
    a = c.pool("a")
    assert a.health is None and a.retries is None and a.outlier == Outlier()
    assert Outlier() == Outlier(5, 30.0, 300.0, 50, False)
    assert c.routes[0].rings[0].on_pool_down is PoolDown.REFUSE


def test_every_key_read() -> None:
    c = parse_config(config(textwrap.dedent("""
        health: {path: /hz, interval: 2s, timeout: 500ms, healthy_threshold: 1,
                 unhealthy_threshold: 4, expect_status: 2xx, headers: {X-Check: "1"}}
        outlier: {consecutive_failures: 2, base_ejection: 1s, max_ejection: 5s,
                  max_ejection_percent: 100, on_5xx: true}
        retries: {attempts: 2, on: [reset, 503, timeout], methods: [get, POST],
                  budget: 50%, min_retries: 0}
        """), ", on_pool_down: next_ring"))
    a = c.pool("a")
    assert a.health == HealthCheck("/hz", 2.0, 0.5, 1, 4, (200, 299), (("X-Check", "1"),))
    assert a.outlier == Outlier(2, 1.0, 5.0, 100, True)
    assert a.retries == Retries(2, frozenset({"reset", "503", "timeout"}),
                                frozenset({"GET", "POST"}), 0.5, 0)
    assert c.routes[0].rings[0].on_pool_down is PoolDown.NEXT_RING
    off = parse_config(config("outlier: off\nhealth: off\nretries: off"))
    assert off.pool("a").outlier is None and off.pool("a").health is None


@pytest.mark.parametrize(("pool", "ring", "complaint"), [
    ("health: {interval: 1s}", "", "line 5: pools.a.health.path: is required"),
    ("health: {path: hz}", "", "pools.a.health.path: 'hz' must start with '/'"),
    ("health: {path: /, interval: 1s, timeout: 2s}", "",
     "pools.a.health.timeout: 2s is above the interval (1s)"),
    ("health: {path: /, expect_status: 99}", "", "expect_status: 99 is not a status range"),
    ("health: {path: /, headers: {Host: x}}", "", "pools.a.health.headers.Host: Host is set"),
    ("outlier: {max_ejection_percent: 120}", "", "max_ejection_percent: 120 is outside 0..100"),
    ("outlier: {base_ejection: 10s, max_ejection: 5s}", "",
     "max_ejection: 5s is below base_ejection (10s)"),
    ("retries: {on: [reset, 404]}", "", "line 5: pools.a.retries.on[1]: 404 is not one of"),
    ("retries: {methods: [FETCH]}", "", "pools.a.retries.methods[0]: 'FETCH' is not one of"),
    ("retries: {budget: 120%}", "", "pools.a.retries.budget: '120%' is not a share"),
    ("retries: {attempts: 0}", "", "attempts: 0 is outside 1..10"),
    ("retries: {attmepts: 2}", "", "did you mean 'attempts'?"),
    ("", ", on_pool_down: elsewhere", "on_pool_down: 'elsewhere' is not one of: refuse, "
     "next_ring"),
])
def test_mistakes_are_named_with_their_place(pool: str, ring: str, complaint: str) -> None:
    found = issues(config(pool, ring))
    assert any(complaint in i for i in found), found


def test_next_ring_only_toward_a_later_ring() -> None:
    text = config("").replace("{name: y, pool: b}", "{name: y, pool: b, on_pool_down: next_ring}")
    found = issues(text)
    assert any("rings[1].on_pool_down: next_ring on the last ring ('y')" in i for i in found)
