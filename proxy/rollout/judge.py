"""The judge: a ring's evidence since its step began, against its baseline's -> a verdict.

Pure: no asyncio, no clock, no I/O.  Incidents can be replayed through it.

Every check is a sequential test with an anytime-valid guarantee (``proxy.rollout.sequential``):
the evidence accumulates over the step, the judge may look as often as it likes, and the
probability that a ring within its tolerances is ever rolled back during the step is at
most ``alpha``.  The route's ``alpha`` is split over its checks by weights fixed by the
config (a union bound; ``alpha_shares``): an error check weighs 3, a latency check at
quantile q weighs sqrt(0.05 / (1 - q)), so by default the error increase gets 46 %, p99
34 %, p95 15 % and p50 5 %.

* **Error rate increase.** H0: p_ring <= p_baseline + tolerance (errors among judged
  requests on each side; ``sequential.compare``: one joint e-process over both rings, so
  the baseline's plentiful traffic spends almost none of the check's alpha).
* **Latency against the baseline**, per quantile q with its ``ratio``.  The limit is
  t = max(ratio x Q_base(q), Q_base(q) + latency_floor) and H0 is "Q_ring(q) <= t", that is
  "at most a share 1 - q of the ring's requests are slower than t": a rate, tested like the
  errors.  Q_base is unknown, so it is bounded first: U, the smallest sketch edge where the
  baseline's share of slower requests is surely (upper bound) at most 1 - q, has
  Q_base <= U; the ring is then tested against the sketch edge at or above
  max(ratio x U, U + floor), which is at least t.  Health is the mirror image: L, a sure
  lower bound of Q_base, gives a limit below t, and the ring's share slower than it must be
  surely under 1 - q.

  The edges are picked by the data, yet no union over them is needed: the baseline's
  bound runs at a quarter of the check's alpha (``BASELINE_SHARE``: the baseline has
  most of the traffic) and the ring's test at the other three quarters.  The bounds grow
  with the count, and the count of requests slower than an edge shrinks as the edge
  rises, so a wrong conclusion at a picked edge implies the sequence failed at one *fixed*
  edge: for "Q_base <= U", the last edge below the true Q_base; for a false rejection of
  the ring, the first edge at or above its true quantile (H0 puts t, hence the picked
  edge, at or above it); and likewise for health.  Each of those is one confidence
  sequence, failing with probability at most its level over all time.
* **Absolute limits**: ``max_error_rate`` (H0: p_ring <= limit) and ``max_pXX`` (H0: at
  most a share 1 - q slower than the limit), one-sample tests with fixed limits.

A check is *worse* (H0 rejected: roll back), *within* (its confidence bound is inside the
tolerance) or *undecided*.  The verdict rolls back when any check is worse, and is healthy
when every check is within and the ring has at least ``min_requests`` judged requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from proxy.config.analysis import AbsoluteLatency, Criteria, FastRollback, LatencyLimit
from proxy.rollout.evidence import Evidence
from proxy.rollout.sequential import (
    Counts,
    binomial_tail,
    compare,
    lower_bound,
    p_above,
    rate_bounds,
    upper_bound,
)
from proxy.rollout.sketch import SIZE, index_of, upper_edge

Numbers = Mapping[str, float | int | str | None]
# The share of a relative latency check's alpha spent on bounding the baseline's quantile;
# the ring's test gets the rest.  The baseline usually has most of the traffic, so a
# quarter bounds it about as tightly as a half would, and the ring gains ln(1.5) of evidence.
BASELINE_SHARE = 0.25


class Outcome(StrEnum):
    ROLLBACK = "rollback"
    HEALTHY = "healthy"
    UNDECIDED = "undecided"


class Finding(StrEnum):
    WORSE = "worse"
    WITHIN = "within"
    UNDECIDED = "undecided"


@dataclass(frozen=True, slots=True)
class Check:
    """One test of a verdict, with its evidence.

    ``estimate``, ``lower`` and ``upper`` are on the tested quantity (a rate difference for
    ``error_rate_increase``, a rate for ``error_rate``, the share of requests slower than
    the limit for latency checks) and ``limit`` is its tolerance.  ``p_value`` is the
    anytime-valid p-value of "within tolerance"; the check rolls back at ``alpha``.
    """

    name: str
    finding: Finding
    estimate: float | None
    lower: float
    upper: float
    limit: float
    p_value: float
    alpha: float
    detail: str
    numbers: Numbers = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """How far the evidence is toward a rollback: 0 none, 1 there (log scale)."""
        if self.p_value >= 1.0:
            return 0.0
        if self.p_value <= 0.0:
            return 1.0
        return min(1.0, math.log(1 / self.p_value) / math.log(1 / self.alpha))

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "finding": self.finding.value, "estimate": self.estimate,
            "lower": self.lower, "upper": self.upper, "limit": self.limit,
            "p_value": self.p_value, "alpha": self.alpha, "progress": round(self.progress, 4),
            "detail": self.detail, "numbers": dict(self.numbers),
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    checks: tuple[Check, ...] = ()
    requests: int = 0
    baseline_requests: int = 0
    note: str = ""  # why undecided, when no check says

    @property
    def broken(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.checks if c.finding is Finding.WORSE)

    @property
    def reason(self) -> str:
        worse = [c.detail for c in self.checks if c.finding is Finding.WORSE]
        if worse:
            return "; ".join(worse)
        if self.outcome is Outcome.HEALTHY:
            return f"within every tolerance over {self.requests} requests"
        waiting = [c.name for c in self.checks if c.finding is Finding.UNDECIDED]
        why = [self.note] if self.note else []
        if waiting:
            why.append("not yet sure of " + ", ".join(waiting))
        return "; ".join(why) or "undecided"

    @property
    def numbers(self) -> dict[str, object]:
        """The evidence, flat enough for an event or a log line."""
        out: dict[str, object] = {"requests": self.requests,
                                  "baseline_requests": self.baseline_requests}
        for c in self.checks:
            out[c.name] = {"finding": c.finding.value, "estimate": c.estimate,
                           "lower": c.lower, "upper": c.upper, "limit": c.limit,
                           "p_value": c.p_value, **c.numbers}
        return out


def check_count(c: Criteria) -> int:
    """How many checks share the route's alpha (fixed by the config, never by the data)."""
    return ((c.max_error_rate_increase is not None) + (c.max_error_rate is not None)
            + len(c.latency) + len(c.max_latency))


# An error check's weight in the split of alpha (a p95 check weighs 1).  3 rather than 2
# (46 % of alpha rather than 36 %): a ring failing everything at 0.1 req/s is then rolled
# back at its 2nd request in most runs (p95 of the low-traffic case 58 -> 54 s, 1,500
# simulated runs of the error check alone), for about 1 s more on the p99 tail's median.
ERROR_WEIGHT = 3.0


def latency_weight(q: float) -> float:
    """A latency check's weight: sqrt(0.05 / (1 - q)), 1 for p95, 2.2 for p99, 0.32 for p50.

    The rarer the requests a check counts (a share 1 - q of them), the less evidence each
    request brings, and the more a share of alpha is worth to it: p50 sees evidence in
    every other request and needs little, p99 in one of a hundred."""
    return math.sqrt(0.05 / (1.0 - q))


def alpha_shares(c: Criteria) -> dict[str, float]:
    """Each check's share of the route's alpha, by name: weights fixed by the config,
    never by the data, that add up to 1 (a union bound over the checks)."""
    weights: dict[str, float] = {}
    if c.max_error_rate_increase is not None:
        weights["error_rate_increase"] = ERROR_WEIGHT
    if c.max_error_rate is not None:
        weights["error_rate"] = ERROR_WEIGHT
    for limit in c.latency:
        weights[limit.name] = latency_weight(limit.quantile)
    for absolute in c.max_latency:
        weights[absolute.name] = latency_weight(absolute.quantile)
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def judge(ring: Evidence, baseline: Evidence, c: Criteria) -> Verdict:
    """The verdict on ``ring``'s evidence against ``baseline``'s over the same time."""
    shares = alpha_shares(c)
    if not shares:
        return Verdict(Outcome.UNDECIDED, (), ring.requests, baseline.requests,
                       "no checks configured")
    a = {name: c.alpha * share for name, share in shares.items()}
    checks: list[Check] = []
    if c.max_error_rate_increase is not None:
        checks.append(_error_increase(ring, baseline, c.max_error_rate_increase,
                                      a["error_rate_increase"]))
    if c.max_error_rate is not None:
        checks.append(_error_rate(ring, c.max_error_rate, a["error_rate"]))
    if c.latency or c.max_latency:
        tails = (_Tail(ring), _Tail(baseline))
        checks += [_relative_latency(ring, baseline, limit, c.latency_floor, a[limit.name],
                                     tails)
                   for limit in c.latency]
        checks += [_absolute_latency(ring, limit, a[limit.name], tails[0])
                   for limit in c.max_latency]
    done = tuple(checks)
    if any(ch.finding is Finding.WORSE for ch in done):
        return Verdict(Outcome.ROLLBACK, done, ring.requests, baseline.requests)
    if ring.requests < c.min_requests:
        return Verdict(Outcome.UNDECIDED, done, ring.requests, baseline.requests,
                       f"{ring.requests} of the {c.min_requests} requests a step needs")
    if all(ch.finding is Finding.WITHIN for ch in done):
        return Verdict(Outcome.HEALTHY, done, ring.requests, baseline.requests)
    return Verdict(Outcome.UNDECIDED, done, ring.requests, baseline.requests)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}ms"


def _finding(worse: bool, within: bool) -> Finding:
    return Finding.WORSE if worse else Finding.WITHIN if within else Finding.UNDECIDED


# --------------------------------------------------------------------------- errors


def _error_increase(ring: Evidence, base: Evidence, tolerance: float, a: float,
                    shown: bool = True) -> Check:
    r, b = Counts(ring.errors, ring.requests), Counts(base.errors, base.requests)
    cmp = compare(r, b, tolerance, a, shown=shown)
    detail = (f"error rate {_pct(r.rate)} ({r.events}/{r.trials}) against the baseline's "
              f"{_pct(b.rate)} ({b.events}/{b.trials}): {_points(cmp.lower)} to "
              f"{_points(cmp.upper)} points, {tolerance * 100:g} allowed (p={cmp.p_value:.3g})")
    return Check("error_rate_increase", _finding(cmp.worse, cmp.within), cmp.estimate,
                 cmp.lower, cmp.upper, tolerance, cmp.p_value, a, detail,
                 {"errors": r.events, "requests": r.trials, "baseline_errors": b.events,
                  "baseline_requests": b.trials})


def _points(x: float) -> str:
    return f"{x * 100:+.2f}"


def _error_rate(ring: Evidence, limit: float, a: float) -> Check:
    r = Counts(ring.errors, ring.requests)
    lo, hi = rate_bounds(r, a)
    p = p_above(r, limit)
    detail = (f"error rate {_pct(r.rate)} ({r.events}/{r.trials}), surely "
              f"{_pct(lo)} to {_pct(hi)}, limit {_pct(limit)} (p={p:.3g})")
    return Check("error_rate", _finding(lo > limit, r.trials > 0 and hi <= limit), r.rate,
                 lo, hi, limit, p, a, detail, {"errors": r.events, "requests": r.trials})


# --------------------------------------------------------------------------- latency


def _first_index(ok: Callable[[int], bool]) -> int | None:
    """The smallest index in [0, SIZE) where the monotone ``ok`` holds (None: nowhere)."""
    if not ok(SIZE - 1):
        return None
    lo, hi = 0, SIZE - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class _Tail:
    """How many of a side's timed requests were slower than each sketch edge."""

    __slots__ = ("above", "timed")

    def __init__(self, ev: Evidence) -> None:
        above = [0] * SIZE
        running = 0
        for i in range(SIZE - 1, -1, -1):
            above[i] = running  # slower than edge i: the buckets after it
            running += ev.latency[i]
        self.above, self.timed = above, running

    def share(self, index: int) -> Counts:
        """Requests slower than bucket ``index``'s upper edge (index -1: all of them)."""
        return Counts(self.above[index] if index >= 0 else self.timed, self.timed)


def _limit(value: float, ratio: float, floor: float) -> float:
    return max(ratio * value, value + floor)


def _rollback_edge(base: _Tail, q: float, ratio: float, floor: float,
                   edge_a: float) -> int | None:
    """The edge the ring is tested against for a rollback: at or above the limit built
    from U, the first edge the baseline's share of slower requests is surely <= 1 - q at
    (so its quantile is at most U); None while no edge is sure yet."""
    upper = _first_index(lambda j: upper_bound(base.share(j), edge_a) <= 1 - q)
    if upper is None:
        return None
    return index_of(_limit(upper_edge(upper), ratio, floor))


def _health_edge(base: _Tail, q: float, ratio: float, floor: float, edge_a: float) -> int:
    """The edge the ring is tested against for health: at or below the limit built from L,
    the last edge the baseline's share of slower requests is surely > 1 - q at (its
    quantile is above it; 0 when there is none).  -1: no edge is low enough."""
    first_unsure = _first_index(lambda j: lower_bound(base.share(j), edge_a) <= 1 - q)
    if first_unsure is None:
        below = upper_edge(SIZE - 1)
    else:
        below = upper_edge(first_unsure - 1) if first_unsure > 0 else 0.0
    limit = _limit(below, ratio, floor)
    index = index_of(limit)
    return index - 1 if upper_edge(index) > limit else index


def _rejects(ring: _Tail, base: _Tail, q: float, ratio: float, floor: float,
             a: float) -> bool:
    """Whether the relative latency test rejects "Q_ring(q) <= t" at level ``a``."""
    edge = _rollback_edge(base, q, ratio, floor, a * BASELINE_SHARE)
    ring_a = a * (1 - BASELINE_SHARE)
    return edge is not None and lower_bound(ring.share(edge), ring_a) > 1 - q


def _latency_p_value(ring: _Tail, base: _Tail, q: float, ratio: float, floor: float) -> float:
    """The smallest level at which ``_rejects`` holds (rejection grows with the level)."""
    top = 1.0 - 1e-9
    if not _rejects(ring, base, q, ratio, floor, top):
        return 1.0
    lo, hi = math.log(1e-300), math.log(top)
    if _rejects(ring, base, q, ratio, floor, math.exp(lo)):
        return 0.0
    for _ in range(24):  # to ~0.004 % of the p-value
        mid = (lo + hi) / 2
        if _rejects(ring, base, q, ratio, floor, math.exp(mid)):
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def _relative_latency(ring: Evidence, base: Evidence, limit: LatencyLimit, floor: float,
                      a: float, tails: tuple[_Tail, _Tail]) -> Check:
    """``lower`` is a sure share of the ring's requests slower than the rollback edge (at
    or above the true limit), ``upper`` a sure most of them slower than the health edge
    (at or below it): worse when lower > 1 - q, within when upper <= 1 - q."""
    q, ratio = limit.quantile, limit.ratio
    ring_q, base_q = ring.quantile(q), base.quantile(q)
    ring_tail, base_tail = tails
    base_a, ring_a = a * BASELINE_SHARE, a * (1 - BASELINE_SHARE)
    rollback_edge = _rollback_edge(base_tail, q, ratio, floor, base_a)
    health_edge = _health_edge(base_tail, q, ratio, floor, base_a)
    lo = 0.0
    if rollback_edge is not None and ring.timed:
        lo = lower_bound(ring_tail.share(rollback_edge), ring_a)
    hi = upper_bound(ring_tail.share(health_edge), ring_a) if ring.timed else 1.0
    worse = lo > 1 - q
    within = not worse and ring.timed > 0 and hi <= 1 - q
    p = _latency_p_value(ring_tail, base_tail, q, ratio, floor)
    estimate = None
    if base_q is not None and ring.timed:
        shares = ring_tail.share(index_of(_limit(base_q, ratio, floor)))
        estimate = shares.events / shares.trials
    t = None if base_q is None else _limit(base_q, ratio, floor)
    detail = (f"{limit.name} {_ms(ring_q)} against the baseline's {_ms(base_q)}: "
              f"{_pct(estimate)} of requests slower than {_ms(t)} "
              f"({ratio:g}x, floor {_ms(floor)}), {_pct(1 - q)} allowed (p={p:.3g})")
    return Check(limit.name, _finding(worse, within), estimate, lo, hi, 1 - q, p, a, detail,
                 {"quantile": ring_q, "baseline_quantile": base_q, "limit_seconds": t,
                  "timed": ring.timed, "baseline_timed": base.timed})


def _absolute_latency(ring: Evidence, limit: AbsoluteLatency, a: float, tail: _Tail) -> Check:
    q, seconds = limit.quantile, limit.seconds
    index = index_of(seconds)
    surely_slower = tail.share(index)  # above an edge at or over the limit: undercounts
    maybe_slower = tail.share(index - 1)  # above an edge under the limit: overcounts
    lo = lower_bound(surely_slower, a)
    hi = upper_bound(maybe_slower, a)
    p = p_above(surely_slower, 1 - q)
    ring_q = ring.quantile(q)
    estimate = None if not ring.timed else surely_slower.events / ring.timed
    detail = (f"{limit.name[4:]} {_ms(ring_q)}: {_pct(estimate)} of requests slower than "
              f"{_ms(seconds)}, {_pct(1 - q)} allowed (p={p:.3g})")
    return Check(limit.name, _finding(lo > 1 - q, ring.timed > 0 and hi <= 1 - q), estimate,
                 lo, hi, 1 - q, p, a, detail, {"quantile": ring_q, "limit_seconds": seconds})


# --------------------------------------------------------------------------- fast path


# How improbable the ring's recent errors must be at its baseline's recent rate: per look
# (every 0.1 s), so 18,000 looks in 30 minutes stay below 2e-4 by a union bound.
FAST_LEVEL = 1e-8


def judge_fast(
    requests: int, errors: int, fast: FastRollback,
    baseline_requests: int = 0, baseline_errors: int = 0,
) -> Verdict | None:
    """The fast path: a rollback when the recent error rate is above a hard limit, else None.

    A hard limit on the last ``fast.window`` seconds, for a ring that turns to errors all
    at once: more than ``fast.max_error_rate`` of at least ``fast.min_requests`` requests,
    and, when the baseline had traffic over the same window, errors the baseline's rate
    there makes improbable: P(X >= errors) <= ``FAST_LEVEL`` for X ~ Binomial(requests,
    p) with p = (baseline errors + 1) / (baseline requests + 2) (Laplace's rule keeps a
    quiet baseline window from reading as a 0 % rate).  Trouble both rings share (an
    incident of a common dependency) is then left to the sequential judge, and so is a
    ring with a merely high error rate: 6 errors of 10 requests against a 1 % baseline is
    2e-10, against a 5 % one 3e-6 (not enough).
    """
    if requests < fast.min_requests or errors / requests <= fast.max_error_rate:
        return None
    chance = None
    if baseline_requests:
        reference = (baseline_errors + 1) / (baseline_requests + 2)
        chance = binomial_tail(errors, requests, reference)
        if chance > FAST_LEVEL:
            return None
    rate = errors / requests
    against = "" if chance is None else f", a {chance:.1g} chance at the baseline's rate"
    check = Check(
        "fast_error_rate", Finding.WORSE, rate, rate, rate, fast.max_error_rate,
        0.0 if chance is None else chance, FAST_LEVEL,
        f"error rate {_pct(rate)} ({errors}/{requests}) over the last {fast.window:g}s, "
        f"above the fast-rollback limit {_pct(fast.max_error_rate)}{against}",
        {"errors": errors, "requests": requests, "window": fast.window,
         "baseline_errors": baseline_errors, "baseline_requests": baseline_requests})
    return Verdict(Outcome.ROLLBACK, (check,), requests)


# --------------------------------------------------------------------------- marks


MARK_ONE_SHARE = 0.9  # of alpha, for the step's start; later marks share the rest


def mark_alpha(alpha: float, j: int) -> float:
    """The share of ``alpha`` the j-th evidence mark (from 1) is judged at.

    Mark 1 (the step's start: what a rollout judged from its start needs) gets
    ``MARK_ONE_SHARE``; mark j >= 2 gets the rest times 1 / ((j - 1) j).  The sum of
    1 / ((j - 1) j) over j >= 2 telescopes to 1, so however many marks a step has, the
    chance that any of them rolls back a ring within tolerance is at most alpha.
    """
    if j == 1:
        return alpha * MARK_ONE_SHARE
    return alpha * (1 - MARK_ONE_SHARE) / ((j - 1) * j)


def judge_marks(
    marks: Sequence[tuple[int, Evidence, Evidence]], c: Criteria
) -> Verdict:
    """The verdict over evidence since several marks: (j, ring since mark j, baseline since).

    Mark 1 is the step's start; later marks are taken on a clock, never chosen by the data,
    so a ring that turns bad after a long healthy stretch is judged on what it did since a
    recent mark instead of being diluted by all of its step.  Each mark is judged at its
    share of alpha (``mark_alpha``).  A rollback from any mark stands; otherwise the verdict
    is mark 1's (health needs the whole step's evidence).  Dropping old marks keeps the
    guarantee (fewer tests); their numbers j are never reused.
    """
    if not marks:
        raise ValueError("judge_marks needs at least the step's start")
    first: Verdict | None = None
    for j, ring, baseline in marks:
        verdict = judge(ring, baseline, replace(c, alpha=mark_alpha(c.alpha, j)))
        if verdict.outcome is Outcome.ROLLBACK:
            return verdict
        if first is None:
            first = verdict
    if first is None:  # pragma: no cover - marks is not empty
        raise ValueError("no marks")
    return first


Tallied = tuple[int, int, int, int]  # (ring requests, ring errors, baseline requests, errors)


def errors_worse(marks: Sequence[tuple[int, Tallied]], c: Criteria) -> int | None:
    """The first mark whose error checks roll the ring back, from counts alone (else None).

    The controller's quick look between two full rounds (every 0.1 s): the same checks at
    the same shares of alpha as ``judge_marks``, so looking at them more often keeps the
    guarantee (the tests are anytime-valid), and nothing but the decision is computed;
    the verdict that explains a rollback is then ``judge_marks``' own.
    """
    shares = alpha_shares(c)
    for j, (requests, errors, base_requests, base_errors) in marks:
        a = mark_alpha(c.alpha, j)
        ring = Counts(errors, requests)
        if c.max_error_rate_increase is not None and compare(
                ring, Counts(base_errors, base_requests), c.max_error_rate_increase,
                a * shares["error_rate_increase"], shown=False).worse:
            return j
        if c.max_error_rate is not None and \
                lower_bound(ring, a * shares["error_rate"]) > c.max_error_rate:
            return j
    return None
