"""The analysis settings: defaults, every key, and the retired keys refused with what to
write instead (pure, no sockets)."""

from __future__ import annotations

import textwrap

import pytest

from proxy.config import parse_config
from proxy.config.analysis import (
    DEFAULT_LATENCY,
    AbsoluteLatency,
    Analysis,
    Criteria,
    FastRollback,
    LatencyLimit,
    quantile_name,
)
from proxy.errors import ConfigError


def config(analysis: str) -> str:
    return textwrap.dedent(f"""
        pools:
          stable: {{servers: [http://127.0.0.1:9001]}}
          canary: {{servers: [http://127.0.0.1:9002]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis: {analysis}
            rings:
              - {{name: canary, pool: canary, weight: 10}}
              - {{name: stable, pool: stable}}
    """)


def analysis_of(text: str) -> Analysis:
    analysis = parse_config(config(text), environ={}).routes[0].analysis
    assert analysis is not None
    return analysis


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(config(text), source="c.yaml", environ={})
    return [i.format("c.yaml") for i in info.value.issues]


def test_an_empty_analysis_judges_with_the_defaults() -> None:
    got = analysis_of("{}")
    assert got == Analysis()
    assert got.interval == 1.0 and got.max_blind == 600.0
    assert got.error_statuses == frozenset(range(500, 600))
    assert got.criteria == Criteria()
    assert got.criteria.alpha == 0.01 and got.criteria.max_error_rate_increase == 0.01
    assert got.criteria.latency == DEFAULT_LATENCY
    assert [limit.name for limit in DEFAULT_LATENCY] == ["p50", "p95", "p99"]


def test_every_key() -> None:
    got = analysis_of("""
      interval: 250ms
      baseline: stable
      alpha: 0.001
      max_error_rate_increase: 0.5
      latency: {p99: 3, p90: 1.2}
      latency_floor: 50ms
      error_statuses: [5xx, 429, "404"]
      max_error_rate: 5
      max_p95: 800ms
      max_p999: 2s
      min_requests: 500
      max_blind: 15m
      fast_rollback: {max_error_rate: 60, min_requests: 8, window: 500ms}
    """.replace("\n      ", "\n              "))
    c = got.criteria
    assert got.interval == 0.25 and got.baseline == "stable" and got.max_blind == 900.0
    assert c.alpha == 0.001 and c.max_error_rate_increase == pytest.approx(0.005)
    assert c.latency == (LatencyLimit(0.9, 1.2), LatencyLimit(0.99, 3.0))
    assert c.latency_floor == 0.05 and c.max_error_rate == pytest.approx(0.05)
    assert c.max_latency == (AbsoluteLatency(0.95, 0.8), AbsoluteLatency(0.999, 2.0))
    assert c.min_requests == 500
    assert got.error_statuses == frozenset(range(500, 600)) | {429, 404}
    assert got.fast == FastRollback(0.6, 8, 0.5)


def test_checks_can_be_turned_off() -> None:
    c = analysis_of("{max_error_rate_increase: off, latency: off}").criteria
    assert c.max_error_rate_increase is None and c.latency == ()


@pytest.mark.parametrize(("key", "says"), [
    ("window: 1m", "analysis.window: no longer used: the judge reads everything since"),
    ("failure_limit: 3", "analysis.failure_limit: no longer used: one crossing"),
    ("significance: 0.05", "analysis.significance: no longer used: write alpha"),
    ("max_latency_ratio: 1.5", "analysis.max_latency_ratio: no longer used: write latency: "
                               "{p95: RATIO}"),
])
def test_retired_keys_say_what_to_write_instead(key: str, says: str) -> None:
    (error,) = errors_of("{" + key + "}")
    assert says in error and error.startswith("c.yaml:")


@pytest.mark.parametrize(("text", "says"), [
    ("{alpha: 0.7}", "analysis.alpha: expected a probability between 0 and 0.5"),
    ("{alpha: yes}", "analysis.alpha: expected a probability"),
    ("{latency: {p42: 2}}", "analysis.latency.p42: unknown quantile (known: p50, p75"),
    ("{latency: {p95: 0.5}}", "analysis.latency.p95: expected a ratio of at least 1"),
    ("{latency: 2}", "analysis.latency: expected a mapping of quantile to ratio"),
    ("{error_statuses: [5xx, 302]}", "analysis.error_statuses[1]: 302 is not an error status"),
    ("{error_statuses: teapot}", "analysis.error_statuses: 'teapot' is not an error status"),
    ("{fast_rollback: {min_requests: 3}}", "analysis.fast_rollback.max_error_rate: is required"),
    ("{fast_rollback: {max_error_rate: 50, window: 1m}}",
     "analysis.fast_rollback.window: 60s is longer than 10s"),
    ("{max_blind: 0s}", "analysis.max_blind"),
    ("{alhpa: 0.01}", "did you mean 'alpha'"),
])
def test_bad_values_name_the_place_the_value_and_what_was_expected(text: str,
                                                                  says: str) -> None:
    assert any(says in e for e in errors_of(text)), errors_of(text)


@pytest.mark.parametrize(("q", "name"), [(0.5, "p50"), (0.9, "p90"), (0.95, "p95"),
                                         (0.99, "p99"), (0.999, "p999"), (0.75, "p75")])
def test_quantile_names(q: float, name: str) -> None:
    assert quantile_name(q) == name
