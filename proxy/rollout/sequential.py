"""Anytime-valid confidence sequences for rates, and the comparisons the judge builds on them.

Pure: standard library only.

A ring's requests are Bernoulli trials for an event (an error; an answer slower than a
latency limit) with an unknown rate p.  After n trials with s events, Robbins' beta-binomial
mixture of likelihood ratios

    M_n(p) = [B(a + s, b + n - s) / B(a, b)] / [p^s (1 - p)^(n - s)]

is, under the true p, a nonnegative martingale with M_0 = 1.  By Ville's inequality
P(exists n: M_n(p) >= 1/alpha) <= alpha, so C_n = {p : M_n(p) < 1/alpha} is a confidence
sequence: it holds the true rate at every n at once with probability at least 1 - alpha,
however often it is looked at and whenever the looking stops (Robbins 1970; Howard, Ramdas,
McAuliffe, Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences",
Ann. Statist. 49(2), 2021).  log M_n is convex in p with its minimum at p = s/n, so C_n is an
interval, found by bisection on each side.

A ring against its baseline, H0: p_ring <= p_base + tolerance.  Each side gets a confidence
sequence at alpha/2, and H0 is rejected when the ring's lower bound exceeds the baseline's
upper bound plus the tolerance.  When both sequences hold (probability >= 1 - alpha over all
time) every null pair (p_base, p_ring) lies inside one of them, so a rejection is wrong with
probability at most alpha, at any stopping time: the false rollback probability over a
whole step, whatever the analysis interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Jeffreys' prior Beta(1/2, 1/2): no preference between low and high rates, and a mixture
# that reacts within a few trials to a rate near 1 (a ring answering only errors).
PRIOR = (0.5, 0.5)
_BISECT_STEPS = 42  # interval bisection to ~2e-13: far below any tolerance in use


@dataclass(frozen=True, slots=True)
class Counts:
    """Events among trials, e.g. errors among requests."""

    events: int
    trials: int

    def __post_init__(self) -> None:
        if not 0 <= self.events <= self.trials:
            raise ValueError(f"events {self.events} must be within 0..trials {self.trials}")

    @property
    def rate(self) -> float | None:
        return self.events / self.trials if self.trials else None


def log_mixture(c: Counts, p: float, prior: tuple[float, float] = PRIOR) -> float:
    """log M_n(p), the evidence against the rate being ``p`` (0 with no trials)."""
    return _Evidence(c, prior)(p)


class _Evidence:
    """log M_n(p) as a function of p for fixed counts (the beta term computed once)."""

    __slots__ = ("f", "log_beta_ratio", "s")

    def __init__(self, c: Counts, prior: tuple[float, float]) -> None:
        a, b = prior
        self.s, self.f = c.events, c.trials - c.events
        self.log_beta_ratio = _log_beta(a + self.s, b + self.f) - _log_beta(a, b)

    def __call__(self, p: float) -> float:
        if p <= 0.0:
            return math.inf if self.s else self.log_beta_ratio
        if p >= 1.0:
            return math.inf if self.f else self.log_beta_ratio
        return self.log_beta_ratio - self.s * math.log(p) - self.f * math.log1p(-p)


def _log_beta(x: float, y: float) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def rate_bounds(
    c: Counts, alpha: float, prior: tuple[float, float] = PRIOR
) -> tuple[float, float]:
    """The confidence sequence C_n at level ``alpha``: (lower, upper) bounds on the rate."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha {alpha!r} must be between 0 and 1")
    if c.trials == 0:
        return 0.0, 1.0
    limit = math.log(1.0 / alpha)
    centre = c.events / c.trials
    evidence = _Evidence(c, prior)
    # log M is convex with its minimum at the centre, where it is at most 0 (the mixture's
    # likelihood never beats the best single rate's), so below the limit.
    lower = 0.0 if evidence(0.0) < limit else _crossing(evidence, limit, 0.0, centre)
    upper = 1.0 if evidence(1.0) < limit else _crossing(evidence, limit, 1.0, centre)
    return lower, upper


def lower_bound(c: Counts, alpha: float, prior: tuple[float, float] = PRIOR) -> float:
    """The lower end of the sequence alone (half the work of ``rate_bounds``)."""
    if c.trials == 0:
        return 0.0
    evidence = _Evidence(c, prior)
    limit = math.log(1.0 / alpha)
    return 0.0 if evidence(0.0) < limit else _crossing(evidence, limit, 0.0,
                                                        c.events / c.trials)


def upper_bound(c: Counts, alpha: float, prior: tuple[float, float] = PRIOR) -> float:
    """The upper end of the sequence alone."""
    if c.trials == 0:
        return 1.0
    evidence = _Evidence(c, prior)
    limit = math.log(1.0 / alpha)
    return 1.0 if evidence(1.0) < limit else _crossing(evidence, limit, 1.0,
                                                        c.events / c.trials)


def _crossing(evidence: _Evidence, limit: float, outside: float, inside: float) -> float:
    """The p between ``outside`` (log M >= limit) and ``inside`` (below) where M crosses."""
    for _ in range(_BISECT_STEPS):
        mid = (outside + inside) / 2
        if evidence(mid) >= limit:
            outside = mid
        else:
            inside = mid
    return inside  # the bound itself stays inside the sequence (conservative side)


@dataclass(frozen=True, slots=True)
class Comparison:
    """A ring's rate against its baseline's, with anytime-valid bounds and p-value.

    ``lower``/``upper`` bound ``ring rate - baseline rate`` (each side at alpha/2);
    ``p_value`` is the anytime-valid p-value of H0 "the ring is at most ``tolerance``
    worse"; ``worse`` is the rejection of H0 at ``alpha``; ``within`` says the whole
    interval is inside the tolerance (evidence of health).
    """

    estimate: float | None
    lower: float
    upper: float
    p_value: float
    worse: bool
    within: bool


def compare(
    ring: Counts, baseline: Counts, tolerance: float, alpha: float,
    prior: tuple[float, float] = PRIOR,
) -> Comparison:
    """H0: p_ring <= p_baseline + tolerance, tested with two sequences at alpha/2 each."""
    ring_lo, ring_hi = rate_bounds(ring, alpha / 2, prior)
    base_lo, base_hi = rate_bounds(baseline, alpha / 2, prior)
    lower, upper = ring_lo - base_hi, ring_hi - base_lo
    estimate = None
    if ring.rate is not None and baseline.rate is not None:
        estimate = ring.rate - baseline.rate
    return Comparison(
        estimate, lower, upper,
        _p_value(ring, baseline, tolerance, prior),
        lower > tolerance, upper <= tolerance,
    )


def _p_value(
    ring: Counts, baseline: Counts, tolerance: float, prior: tuple[float, float]
) -> float:
    """The smallest alpha at which ``compare`` rejects: 2 exp(-V), capped at 1.

    ``compare`` rejects at alpha exactly when every null pair (p_b, p_r <= p_b + tol) has
    max(log M_ring(p_r), log M_base(p_b)) >= log(2 / alpha), that is when V, the minimum of
    that maximum over the null, is at least log(2 / alpha).  For a given p_b the best p_r
    is min(p_b + tol, the ring's estimate) (log M is convex), which makes the ring's term
    non-increasing in p_b while the baseline's grows beyond its estimate: V is where the
    two cross, found by bisection on p_b.
    """
    if ring.trials == 0 or baseline.trials == 0:
        return 1.0
    ring_hat, base_hat = ring.events / ring.trials, baseline.events / baseline.trials
    ring_ev, base_ev = _Evidence(ring, prior), _Evidence(baseline, prior)

    def ring_term(p_b: float) -> float:
        return ring_ev(min(p_b + tolerance, ring_hat))

    lo, hi = base_hat, ring_hat - tolerance  # the baseline term is 0-ish at lo, grows to hi
    if hi <= lo:
        return 1.0  # the estimates themselves are a null pair: no evidence at all
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if base_ev(mid) < ring_term(mid):
            lo = mid
        else:
            hi = mid
    evidence = max(ring_term(hi), base_ev(hi))
    return min(1.0, 2.0 * math.exp(-evidence))


def p_above(c: Counts, limit: float, prior: tuple[float, float] = PRIOR) -> float:
    """The anytime-valid p-value of H0: rate <= ``limit``: exp(-min over the null of log M).

    log M is convex with its minimum at the estimate: over p <= limit it is smallest at
    min(limit, estimate), so the lower bound is above ``limit`` at level alpha exactly
    when this is <= alpha.
    """
    if c.trials == 0 or c.events / c.trials <= limit:
        return 1.0
    return min(1.0, math.exp(-_Evidence(c, prior)(limit)))
