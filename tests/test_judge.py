"""The judge, table-driven: thresholds, baseline comparisons, significance.  Pure."""

from __future__ import annotations

import math

import pytest

from proxy.config.rollout import Thresholds
from proxy.rollout.judge import (
    Outcome,
    fisher_greater,
    increase_p_value,
    judge,
)
from proxy.rollout.window import LATENCY_BUCKETS, summarize


def window(requests: int, errors: int = 0, latency: float | None = 0.004):
    """A window where every request took ``latency`` seconds (a bucket's upper bound)."""
    hist = [0] * (len(LATENCY_BUCKETS) + 1)
    if latency is not None and requests:
        index = next(i for i, b in enumerate(LATENCY_BUCKETS) if latency <= b)
        hist[index] = requests
    return summarize(30.0, requests, errors, hist)


T = Thresholds(
    min_requests=50, max_error_rate=0.05, max_p95=0.5, max_p99=1.0,
    max_error_rate_increase=0.01, max_latency_ratio=1.5, latency_floor=0.020,
)


@pytest.mark.parametrize(
    ("ring", "baseline", "outcome", "broken"),
    [
        # zero traffic, and too little traffic: hold
        (window(0), window(1000), Outcome.NO_DATA, ()),
        (window(49, 49), window(1000), Outcome.NO_DATA, ()),
        # healthy, identical
        (window(1000, 5), window(1000, 5), Outcome.PASS, ()),
        # zero errors on both sides
        (window(100, 0), window(100, 0), Outcome.PASS, ()),
        # baseline with no data: absolute checks only
        (window(100, 2), window(0), Outcome.PASS, ()),
        (window(100, 20), window(0), Outcome.FAIL, ("error_rate", "")),
        (window(100, 20), None, Outcome.FAIL, ("error_rate",)),
        # absolute error rate
        (window(1000, 200), window(1000, 5), Outcome.FAIL,
         ("error_rate", "error_rate_increase")),
        # significant increase under the absolute limit: 3 % vs 0.5 % over 2000 requests
        (window(2000, 60), window(2000, 10), Outcome.FAIL, ("error_rate_increase",)),
        # the same rates on a tiny canary are noise: 2/60 vs 5/1000 is not significant
        (window(60, 2), window(1000, 5), Outcome.PASS, ()),
        # an increase below the limit, even if significant, passes
        (window(100_000, 1000), window(100_000, 600), Outcome.PASS, ()),
        # latency: absolute p95
        (window(100, 0, 0.75), window(100, 0, 0.75), Outcome.FAIL, ("p95",)),
        # latency: 300 ms slower than the baseline fails on the ratio
        (window(100, 0, 0.5), window(100, 0, 0.1), Outcome.FAIL, ("latency_ratio",)),
        # 5 ms -> 10 ms is 2x but under the 20 ms floor: pass
        (window(100, 0, 0.01), window(100, 0, 0.005), Outcome.PASS, ()),
        # p99 alone
        (window(100, 0, 2.5), window(100, 0, 2.5), Outcome.FAIL, ("p95", "p99")),
        # requests without latencies (e.g. WebSockets): latency checks skip
        (window(100, 0, None), window(100, 0, 0.1), Outcome.PASS, ()),
    ],
)
def test_verdicts(ring, baseline, outcome, broken) -> None:
    verdict = judge(ring, baseline, T)
    assert verdict.outcome is outcome, verdict
    if broken:
        assert set(verdict.broken) == {b for b in broken if b}
        assert len(verdict.reasons) == len(verdict.broken)
    else:
        assert verdict.broken == ()
    assert verdict.numbers["requests"] == ring.requests


def test_reasons_carry_the_numbers() -> None:
    verdict = judge(window(1000, 200, 0.1), window(1000, 5, 0.1), T)
    assert "error rate 20.00% (200/1000) above 5.00%" in verdict.reason
    assert "points above the baseline's 0.50%" in verdict.reason
    assert verdict.numbers["baseline_error_rate"] == 0.005
    slow = judge(window(100, 0, 0.5), window(100, 0, 0.1), T)
    assert slow.reasons == ("p95 487.5ms is 4.94x the baseline's 98.8ms "
                            "(limit 1.5x, floor 20.0ms)",)
    no_data = judge(window(3), window(100), T)
    assert no_data.reason == "3 requests in the window, fewer than 50"


def test_thresholds_left_out_are_not_checked() -> None:
    assert judge(window(1000, 900, 9.0), window(1000), Thresholds(min_requests=10)).outcome \
        is Outcome.PASS


def test_fisher_matches_a_hand_computed_tail() -> None:
    # 3 errors in 5 vs 0 in 5: P(X >= 3) with 3 errors among 10, 5 drawn = C(5,3)/C(10,3)
    assert fisher_greater(3, 5, 0, 5) == pytest.approx(math.comb(5, 3) / math.comb(10, 3))
    assert fisher_greater(0, 5, 3, 5) == pytest.approx(1.0)
    assert fisher_greater(0, 10, 0, 10) == pytest.approx(1.0)


def test_z_test_and_edges() -> None:
    assert increase_p_value(60, 2000, 10, 2000) < 1e-6
    assert increase_p_value(10, 2000, 10, 2000) == pytest.approx(0.5)
    assert increase_p_value(10, 2000, 60, 2000) > 0.999
    assert increase_p_value(0, 0, 5, 100) == 1.0
    assert increase_p_value(100, 100, 100, 100) == 1.0  # all errors on both: no evidence


def test_fast_verdict() -> None:
    from proxy.rollout.judge import judge_fast

    assert judge_fast(window(9, 9), 0.5, 10) is None  # too few requests
    assert judge_fast(window(100, 50), 0.5, 10) is None  # at the limit, not above
    verdict = judge_fast(window(100, 51), 0.5, 10)
    assert verdict is not None and verdict.broken == ("fast_error_rate",)
    assert "above the fast-rollback limit 50.00%" in verdict.reason
