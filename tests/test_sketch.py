"""The log-linear latency sketch (kept in a ring's Tally) against exact quantiles of the
same data (pure)."""

from __future__ import annotations

import math
import random

import pytest

from proxy.rollout.evidence import Evidence, Tally
from proxy.rollout.sketch import (
    HIGH,
    LOW,
    RELATIVE_ERROR,
    SIZE,
    index_of,
    representative,
    upper_edge,
)


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_every_value_is_within_the_relative_error_of_its_bucket() -> None:
    rng = random.Random(3)
    for _ in range(20_000):
        v = math.exp(rng.uniform(math.log(LOW * 1.0001), math.log(HIGH)))
        i = index_of(v)
        assert upper_edge(i - 1) < v <= upper_edge(i) * (1 + 1e-12)
        assert abs(representative(i) - v) <= RELATIVE_ERROR * v * (1 + 1e-9)
    assert RELATIVE_ERROR < 0.02
    assert index_of(0.0) == 0 and index_of(LOW) == 0
    assert index_of(HIGH * 10) == SIZE - 1


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99, 0.999])
def test_quantiles_match_exact_ones_within_two_percent(q: float) -> None:
    rng = random.Random(int(q * 1000))
    values = [rng.lognormvariate(math.log(0.02), 0.8) for _ in range(50_000)]
    values += [0.3 + rng.random() * 0.01 for _ in range(1500)]  # a 3 % slow tail
    sketch = timed(values)
    exact = exact_quantile(values, q)
    got = sketch.quantile(q)
    assert got is not None and abs(got - exact) <= 0.02 * exact


def test_a_two_fold_shift_inside_one_prometheus_bucket_is_visible() -> None:
    # 100-105 ms against 200-245 ms: one Prometheus bucket (0.1-0.25 s), far apart here.
    rng = random.Random(5)
    stable = timed([0.100 + rng.random() * 0.005 for _ in range(2000)])
    canary = timed([0.200 + rng.random() * 0.045 for _ in range(2000)])
    s95, c95 = stable.quantile(0.95), canary.quantile(0.95)
    assert s95 is not None and c95 is not None and c95 / s95 > 1.9
    # "How many canary answers were slower than 1.5x the stable p95": nearly all.
    limit = index_of(1.5 * s95)
    assert canary.slower_than(limit) > 1990 and stable.slower_than(limit) == 0


def test_later_evidence_less_earlier_and_empty_has_no_quantile() -> None:
    tally = Tally()
    for v in (0.001, 0.002):
        tally.record(False, v)
    before = tally.evidence()
    tally.record(True, 0.5)
    tally.record(False, None)  # counted, not timed (an upgraded WebSocket)
    after = tally.evidence()
    assert (after.requests, after.errors, after.timed) == (4, 1, 3)
    assert after.slower_than(index_of(0.002)) == 1
    since = after.since(before)
    assert (since.requests, since.errors, since.timed) == (2, 1, 1)
    assert Evidence().quantile(0.5) is None
    assert repr(Evidence()) == "<Evidence requests=0 errors=0 p95=->"
    with pytest.raises(ValueError, match=r"quantile 1\.5 must be between 0 and 1"):
        after.quantile(1.5)


def timed(values: list[float]) -> Evidence:
    tally = Tally()
    for v in values:
        tally.record(False, v)
    return tally.evidence()
