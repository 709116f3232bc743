"""Anytime-valid confidence sequences: checked against independent computations and by
simulation over many runs (pure, no sockets)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from fractions import Fraction

import pytest

from proxy.rollout.sequential import (
    BASELINE,
    JEFFREYS,
    PRIOR,
    RING_WORSE,
    Counts,
    Prior,
    binomial_tail,
    check_prior,
    compare,
    log_mixture,
    lower_bound,
    p_above,
    rate_bounds,
)


@pytest.mark.parametrize(("s", "n", "p"), [
    (0, 0, 0.3), (0, 10, 0.01), (3, 10, 0.2), (10, 10, 0.9), (7, 200, 0.05), (50, 60, 0.5),
])
def test_uniform_prior_mixture_is_the_closed_form(s: int, n: int, p: float) -> None:
    # With a Beta(1, 1) prior, integral of x^s (1-x)^(n-s) dx = 1 / ((n + 1) C(n, s)),
    # computed here in exact integers, independently of the lgamma form.
    exact = -math.log((n + 1) * math.comb(n, s)) - s * math.log(p) - (n - s) * math.log1p(-p)
    assert log_mixture(Counts(s, n), p, prior=((1.0, 1.0, 1.0),)) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize(("s", "n", "p"), [(0, 5, 0.1), (2, 9, 0.3), (12, 40, 0.25)])
def test_jeffreys_mixture_matches_numeric_integration(s: int, n: int, p: float) -> None:
    # x = sin^2(t) turns the Beta(1/2, 1/2) density into the constant 2/pi on [0, pi/2]:
    # a midpoint rule then integrates without the endpoint singularities.
    steps = 20_000
    h = (math.pi / 2) / steps
    total = sum(
        math.sin(t) ** (2 * s) * math.cos(t) ** (2 * (n - s))
        for t in ((i + 0.5) * h for i in range(steps))
    ) * h * 2 / math.pi
    numeric = math.log(total) - s * math.log(p) - (n - s) * math.log1p(-p)
    assert log_mixture(Counts(s, n), p, JEFFREYS) == pytest.approx(numeric, rel=1e-6)


def _integral(density: Callable[[float], float], s: int, f: int, steps: int = 200_000) -> float:
    """The integral of x^s (1-x)^f density(x) over [0, 1] by the midpoint rule."""
    h = 1.0 / steps
    return sum(x ** s * (1 - x) ** f * density(x)
               for x in ((i + 0.5) * h for i in range(steps))) * h


@pytest.mark.parametrize(("s", "n", "p"), [(0, 5, 0.1), (2, 9, 0.3), (12, 40, 0.25),
                                           (3, 300, 0.004), (30, 30, 0.5)])
def test_the_default_mixture_over_scales_matches_numeric_integration(
        s: int, n: int, p: float) -> None:
    # Each component integrated on its own: Jeffreys through x = sin^2(t) as above, the
    # Beta(1, b) ones against their density b (1 - x)^(b - 1) by the midpoint rule.
    f = n - s
    steps = 20_000
    h = (math.pi / 2) / steps
    jeffreys = sum(math.sin(t) ** (2 * s) * math.cos(t) ** (2 * f)
                   for t in ((i + 0.5) * h for i in range(steps))) * h * 2 / math.pi
    parts = {(0.5, 0.5): jeffreys}
    for b in (4.0, 16.0, 64.0):
        parts[(1.0, b)] = _integral(lambda x, b=b: b * (1 - x) ** (b - 1), s, f)
    total = sum(w * parts[(a, b)] for w, a, b in PRIOR)
    numeric = math.log(total) - s * math.log(p) - f * math.log1p(-p)
    assert log_mixture(Counts(s, n), p) == pytest.approx(numeric, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("s", "n", "p"), [(2, 2, 0.03), (0, 40, 0.05), (12, 40, 0.25),
                                           (1, 100, 0.02), (9, 10, 0.5)])
def test_the_rollback_priors_match_numeric_integration(s: int, n: int, p: float) -> None:
    # RING_WORSE and BASELINE, every component integrated on its own against its density:
    # Beta(8, 1) is 8 x^7, Beta(1, b) is b (1 - x)^(b - 1), Jeffreys through x = sin^2(t).
    f = n - s
    steps = 20_000
    h = (math.pi / 2) / steps
    jeffreys = sum(math.sin(t) ** (2 * s) * math.cos(t) ** (2 * f)
                   for t in ((i + 0.5) * h for i in range(steps))) * h * 2 / math.pi

    def part(a: float, b: float) -> float:
        if (a, b) == (0.5, 0.5):
            return jeffreys
        if b == 1.0:
            return _integral(lambda x: a * x ** (a - 1), s, f, 50_000)
        assert a == 1.0
        return _integral(lambda x: b * (1 - x) ** (b - 1), s, f, 50_000)

    for prior in (RING_WORSE, BASELINE):
        check_prior(prior)
        total = sum(w * part(a, b) for w, a, b in prior)
        numeric = math.log(total) - s * math.log(p) - f * math.log1p(-p)
        assert log_mixture(Counts(s, n), p, prior) == pytest.approx(numeric, rel=1e-4,
                                                                    abs=1e-5)


def test_priors_are_checked() -> None:
    check_prior(PRIOR)
    check_prior(JEFFREYS)
    for bad in [(), ((0.5, 0.5, 0.5),), ((1.0, 0.0, 1.0),), ((0.5, 1, 1), (0.6, 1, 2))]:
        with pytest.raises(ValueError, match="weights adding up to 1"):
            check_prior(bad)


def test_bounds_hold_the_estimate_and_sit_where_the_evidence_crosses() -> None:
    for s, n in [(0, 1), (0, 50), (5, 50), (50, 50), (13, 1000)]:
        c = Counts(s, n)
        lo, hi = rate_bounds(c, 0.01)
        assert 0.0 <= lo <= s / n <= hi <= 1.0
        limit = math.log(100)
        if lo > 0:
            assert log_mixture(c, lo) < limit <= log_mixture(c, lo * 0.999)
        if hi < 1:
            assert log_mixture(c, hi) < limit <= log_mixture(c, min(1.0, hi * 1.001))
    assert rate_bounds(Counts(0, 0), 0.05) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"events 3 must be within 0\.\.trials 2"):
        Counts(3, 2)
    with pytest.raises(ValueError, match=r"alpha 1\.5 must be between 0 and 1"):
        rate_bounds(Counts(1, 2), 1.5)


def _ever_excluded(rng: random.Random, p: float, steps: int, alpha: float) -> tuple[bool, bool]:
    """One run of ``steps`` Bernoulli(p) trials, looked at after every trial: did the
    sequence ever exclude the true p, and did a naive fixed-horizon 95 % Wald interval?"""
    limit = math.log(1 / alpha)
    s = 0
    ours = naive = False
    for n in range(1, steps + 1):
        s += rng.random() < p
        c = Counts(s, n)
        ours = ours or log_mixture(c, p) >= limit
        if n >= 30:
            hat = s / n
            half = 1.96 * math.sqrt(max(hat * (1 - hat), 1e-12) / n)
            naive = naive or abs(hat - p) > half
        if ours and naive:
            break
    return ours, naive


@pytest.mark.parametrize("p", [0.01, 0.2])
def test_coverage_holds_however_often_one_looks(p: float) -> None:
    # 400 runs of 1,500 trials, looked at after every single one.  The guarantee is
    # P(ever excluded) <= alpha; the naive interval, looked at as often, fails far more
    # often (which shows this harness can see a violation).
    rng = random.Random(20261129 + int(p * 100))
    alpha, runs = 0.1, 400
    results = [_ever_excluded(rng, p, 1500, alpha) for _ in range(runs)]
    ours = sum(o for o, _ in results) / runs
    naive = sum(n for _, n in results) / runs
    sigma = math.sqrt(alpha * (1 - alpha) / runs)
    assert ours <= alpha + 3 * sigma, f"excluded the true rate in {ours:.1%} of runs"
    assert naive > alpha + 3 * sigma, f"the naive interval failed only {naive:.1%}"


def test_a_a_comparison_rarely_rejects_when_looked_at_often() -> None:
    # Two rings with the same 2 % error rate, the ring at 10 % of the traffic, looked at
    # every 20 of its requests up to 1,000: false rejections stay below alpha.
    rng = random.Random(7)
    alpha, runs, rejected = 0.1, 150, 0
    for _ in range(runs):
        ring = base = 0
        for n in range(1, 1001):
            ring += rng.random() < 0.02
            base += sum(rng.random() < 0.02 for _ in range(9))
            if n % 20 == 0 and compare(Counts(ring, n), Counts(base, 9 * n), 0.0, alpha,
                                       shown=False).worse:
                rejected += 1
                break
    sigma = math.sqrt(alpha * (1 - alpha) / runs)
    assert rejected / runs <= alpha + 3 * sigma


def test_a_broken_ring_is_rejected_within_a_handful_of_requests() -> None:
    # Every request an error, baseline at 1 %: with the rollback priors, rejected on the
    # 2nd request at alpha 0.01, on the 3rd at 0.001.  At the error check's default share
    # of mark 1 (0.01 x 0.9 x 0.458, log-evidence 5.49 needed) on the 2nd while the
    # baseline has about 40-200 requests (2 of 2 carry 5.58-5.89), as at 0.1 req/s, and on
    # the 3rd against 10 of 1,000 (5.10: the baseline's mixture pays ~ln(n)/2 at its own
    # rate).  With PRIOR on both sides (the earlier test), one request more.
    def first(base: Counts, a: float, priors: tuple[Prior, Prior] | None) -> int:
        return next(n for n in range(1, 50)
                    if compare(Counts(n, n), base, 0.01, a, worse_priors=priors).worse)

    default = 0.01 * 0.9 * 0.458
    for base in (Counts(10, 1000), Counts(2, 200), Counts(1, 100), Counts(0, 40)):
        got = {a: first(base, a, (RING_WORSE, BASELINE)) for a in (0.01, default, 0.001)}
        assert got == {0.01: 2, default: 3 if base.trials == 1000 else 2, 0.001: 3}, base
        assert first(base, 0.01, None) == 3


def _brute_joint(ring: Counts, base: Counts, tolerance: float, grid: int = 4000,
                 ring_prior: Prior = PRIOR, base_prior: Prior = PRIOR) -> float:
    """min over the edge p_r = p_b + tol of log M_ring(p_r) + log M_base(p_b), on a grid
    of p_b (no convexity used), refined once around the best point."""
    top = 1.0 - tolerance
    def at(x: float) -> float:
        return log_mixture(base, x, base_prior) + log_mixture(ring, x + tolerance, ring_prior)
    xs = [top * (i + 0.5) / grid for i in range(grid)]
    best = min(xs, key=at)
    fine = [min(top, max(0.0, best + top * (j - 500) / (grid * 500))) for j in range(1001)]
    return min(at(x) for x in fine if 0.0 < x < top)


@pytest.mark.parametrize(("ring", "base", "tol"), [
    (Counts(8, 40), Counts(4, 360), 0.01), (Counts(20, 100), Counts(10, 1000), 0.01),
    (Counts(3, 3), Counts(1, 100), 0.01), (Counts(30, 1000), Counts(100, 10_000), 0.0),
    (Counts(5, 2000), Counts(180, 18_000), 0.01), (Counts(0, 500), Counts(30, 3000), 0.01),
])
def test_joint_evidence_is_the_minimum_over_the_null_edge(ring: Counts, base: Counts,
                                                          tol: float) -> None:
    # compare's p-value is exp(-V) when the estimates are worse than the tolerance (V
    # with the rollback priors: RING_WORSE for the ring, BASELINE for the baseline, or
    # PRIOR on both when asked); when they are better, "within" flips at V with PRIOR on
    # both sides (the mirror null).
    v = _brute_joint(ring, base, tol)
    assert ring.rate is not None and base.rate is not None
    if ring.rate - base.rate > tol:
        against = _brute_joint(ring, base, tol, ring_prior=RING_WORSE, base_prior=BASELINE)
        assert compare(ring, base, tol, 0.01).p_value == pytest.approx(math.exp(-against),
                                                                       rel=1e-4)
        assert compare(ring, base, tol, 0.01, worse_priors=None).p_value == \
            pytest.approx(math.exp(-v), rel=1e-4)
    else:
        assert compare(ring, base, tol, math.exp(-v) * 1.001).within
        assert not compare(ring, base, tol, math.exp(-v) / 1.001).within


def test_the_joint_test_beats_two_sequences_at_half_alpha_each() -> None:
    # The earlier test: the ring's lower bound (alpha/2) above the baseline's upper bound
    # (alpha/2) plus the tolerance.  A ring at 20 % errors and 10 % of the traffic, its
    # baseline at 1 %: the joint test rejects at 35 requests, the earlier one at 50.
    def base(n: int) -> Counts:
        return Counts(round(9 * n * 0.01), 9 * n)

    def two_sequences(n: int) -> bool:
        return lower_bound(Counts(n // 5, n), 0.005) > rate_bounds(base(n), 0.005)[1] + 0.01

    joint = next(n for n in range(1, 400) if compare(Counts(n // 5, n), base(n), 0.01,
                                                     0.01).worse)
    earlier = next(n for n in range(1, 400) if two_sequences(n))
    assert (joint, earlier) == (35, 50)


def test_p_value_is_the_level_where_the_decision_flips() -> None:
    cases = [(Counts(20, 100), Counts(10, 1000)), (Counts(9, 60), Counts(30, 3000)),
             (Counts(200, 1000), Counts(100, 10_000)), (Counts(4, 4), Counts(2, 500))]
    for ring, base in cases:
        p = compare(ring, base, 0.01, 0.01).p_value
        assert 0.0 < p < 1.0
        assert compare(ring, base, 0.01, min(0.999, p * 1.02)).worse
        assert not compare(ring, base, 0.01, p * 0.98).worse
        quick = compare(ring, base, 0.01, p * 1.02, shown=False)
        assert quick.worse and quick.p_value == p and (quick.lower, quick.upper) == (-1, 1)
    # The estimates themselves within the tolerance: no evidence at all.
    assert compare(Counts(2, 100), Counts(10, 1000), 0.02, 0.01).p_value == 1.0


def test_no_baseline_trials_can_show_health_but_never_a_rollback() -> None:
    empty = Counts(0, 0)
    assert not compare(Counts(500, 500), empty, 0.01, 0.01).worse
    clean = compare(Counts(0, 5000), empty, 0.01, 0.01)  # surely under 1 %: within
    assert clean.within and clean.estimate is None and clean.upper <= 0.01
    assert clean.within == (upper_bound_of(Counts(0, 5000), 0.01) <= 0.01)
    nothing = compare(empty, Counts(10, 1000), 0.01, 0.01)
    assert (nothing.worse, nothing.within, nothing.p_value) == (False, False, 1.0)


def upper_bound_of(c: Counts, alpha: float) -> float:
    return rate_bounds(c, alpha)[1]


def test_health_needs_enough_traffic_to_bound_the_difference() -> None:
    # The same 1 % on both sides: "within" 1 point only once the interval is that narrow.
    few = compare(Counts(1, 100), Counts(10, 1000), 0.01, 0.01)
    many = compare(Counts(100, 10_000), Counts(1000, 100_000), 0.01, 0.01)
    assert not few.within and not few.worse
    assert many.within and not many.worse
    assert many.lower < 0 < many.upper <= 0.01


def test_exceeds_a_fixed_limit() -> None:
    # 40 slow answers of 200 against "at most 1 % slower" (a p99 limit): rejected.
    assert lower_bound(Counts(40, 200), 0.01) > 0.01
    assert not lower_bound(Counts(3, 200), 0.01) > 0.01
    # and p_above is the level where that flips
    p = p_above(Counts(40, 200), 0.01)
    assert lower_bound(Counts(40, 200), p * 1.02) > 0.01 >= lower_bound(Counts(40, 200), p * 0.98)


@pytest.mark.parametrize(("k", "n", "p"), [(0, 5, 0.3), (6, 10, 0.01), (6, 10, 0.05),
                                           (3, 3, 0.5), (11, 10, 0.2), (12, 40, 0.25)])
def test_binomial_tail_is_the_exact_sum(k: int, n: int, p: float) -> None:
    q = Fraction(p).limit_denominator(10_000)
    exact = sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(k, n + 1))
    assert binomial_tail(k, n, float(q)) == pytest.approx(float(exact), rel=1e-9, abs=1e-300)
