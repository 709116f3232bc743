"""The judge: one ring's window of metrics against thresholds and a baseline -> a verdict.

Pure: no asyncio, no clock, no I/O.  Incidents can be replayed through it.

* **no data** when the ring has fewer than ``min_requests`` in the window: never a reason
  to advance or to roll back.
* **fail** when any threshold breaks; the verdict names each one with its numbers.
* **pass** otherwise.

Absolute thresholds: ``max_error_rate``, ``max_p95``, ``max_p99``.  Relative to the
baseline ring (only when the baseline itself has ``min_requests``):
``max_error_rate_increase`` (percentage points, and the increase must be statistically
significant: a one-sided two-proportion z-test, or Fisher's exact test when the counts are
small, at ``significance``), and ``max_latency_ratio`` on p95, ignored while the absolute
increase stays under ``latency_floor`` (5 ms -> 10 ms is not a failure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from proxy.config.rollout import Thresholds
from proxy.rollout.window import Summary


class Outcome(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no_data"


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    reasons: tuple[str, ...] = ()  # human text, one per broken threshold (or why no data)
    # machine names: error_rate, p95, p99, error_rate_increase, latency_ratio
    broken: tuple[str, ...] = ()
    numbers: dict[str, float | int | None] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _ms(x: float) -> str:
    return f"{x * 1000:.1f}ms"


def judge(ring: Summary, baseline: Summary | None, t: Thresholds) -> Verdict:
    numbers: dict[str, float | int | None] = {
        "requests": ring.requests,
        "errors": ring.errors,
        "error_rate": ring.error_rate,
        "p95": ring.p95,
        "p99": ring.p99,
        "baseline_requests": baseline.requests if baseline else None,
        "baseline_errors": baseline.errors if baseline else None,
        "baseline_error_rate": baseline.error_rate if baseline else None,
        "baseline_p95": baseline.p95 if baseline else None,
    }
    if ring.requests < t.min_requests:
        return Verdict(Outcome.NO_DATA,
                       (f"{ring.requests} requests in the window, fewer than {t.min_requests}",),
                       (), numbers)
    reasons: list[str] = []
    broken: list[str] = []
    if t.max_error_rate is not None and ring.error_rate > t.max_error_rate:
        broken.append("error_rate")
        reasons.append(f"error rate {_pct(ring.error_rate)} ({ring.errors}/{ring.requests}) "
                       f"above {_pct(t.max_error_rate)}")
    for name, value, limit in (("p95", ring.p95, t.max_p95), ("p99", ring.p99, t.max_p99)):
        if limit is not None and value is not None and value > limit:
            broken.append(name)
            reasons.append(f"{name} {_ms(value)} above {_ms(limit)}")
    if baseline is not None and baseline.requests >= t.min_requests:
        if t.max_error_rate_increase is not None:
            increase = ring.error_rate - baseline.error_rate
            p_value = increase_p_value(ring.errors, ring.requests,
                                       baseline.errors, baseline.requests)
            numbers["error_rate_increase"] = increase
            numbers["p_value"] = p_value
            if increase > t.max_error_rate_increase and p_value < t.significance:
                broken.append("error_rate_increase")
                reasons.append(
                    f"error rate {_pct(ring.error_rate)} is {increase * 100:.2f} points above "
                    f"the baseline's {_pct(baseline.error_rate)} (limit "
                    f"{t.max_error_rate_increase * 100:.2f}, p={p_value:.3g})"
                )
        if t.max_latency_ratio is not None and ring.p95 is not None and baseline.p95:
            ratio = ring.p95 / baseline.p95
            numbers["latency_ratio"] = ratio
            if ratio > t.max_latency_ratio and ring.p95 - baseline.p95 > t.latency_floor:
                broken.append("latency_ratio")
                reasons.append(
                    f"p95 {_ms(ring.p95)} is {ratio:.2f}x the baseline's {_ms(baseline.p95)} "
                    f"(limit {t.max_latency_ratio:g}x, floor {_ms(t.latency_floor)})"
                )
    if broken:
        return Verdict(Outcome.FAIL, tuple(reasons), tuple(broken), numbers)
    return Verdict(Outcome.PASS, (), (), numbers)


def judge_fast(ring: Summary, max_error_rate: float, min_requests: int) -> Verdict | None:
    """The fast path: a FAIL when the error rate is above a hard limit, else None."""
    if ring.requests < min_requests or ring.error_rate <= max_error_rate:
        return None
    return Verdict(
        Outcome.FAIL,
        (f"error rate {_pct(ring.error_rate)} ({ring.errors}/{ring.requests}) above the "
         f"fast-rollback limit {_pct(max_error_rate)}",),
        ("fast_error_rate",),
        {"requests": ring.requests, "errors": ring.errors, "error_rate": ring.error_rate,
         "p95": ring.p95},
    )


# --------------------------------------------------------------------------- statistics


def increase_p_value(e1: int, n1: int, e2: int, n2: int) -> float:
    """One-sided p-value that ring 1's error rate is above ring 2's only by chance.

    Fisher's exact test when any expected cell count is below 5, the two-proportion z-test
    (pooled) otherwise.  1.0 when either side has no requests.
    """
    if n1 <= 0 or n2 <= 0:
        return 1.0
    total_errors = e1 + e2
    n = n1 + n2
    expected = min(n1 * total_errors / n, n2 * total_errors / n,
                   n1 * (n - total_errors) / n, n2 * (n - total_errors) / n)
    if expected < 5:
        return fisher_greater(e1, n1, e2, n2)
    p1, p2 = e1 / n1, e2 / n2
    pooled = total_errors / n
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (p1 - p2) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


def fisher_greater(e1: int, n1: int, e2: int, n2: int) -> float:
    """P(X >= e1) for X hypergeometric: errors among n1 draws from n1+n2 with e1+e2 errors."""
    k = e1 + e2
    n = n1 + n2
    lo, hi = max(0, k - n2), min(k, n1)
    denominator = _log_comb(n, k)
    tail = 0.0
    for x in range(max(e1, lo), hi + 1):
        tail += math.exp(_log_comb(n1, x) + _log_comb(n2, k - x) - denominator)
    return min(1.0, tail)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
