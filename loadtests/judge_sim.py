"""The sequential judge under simulated traffic: false rollbacks, time to rollback, time to health.

Drives the pure judge (``proxy.rollout.judge``) with simulated rollouts, no sockets: a
canary ring and its baseline share a route's traffic (Poisson arrivals, ``--rps``), errors
are Bernoulli per request, latencies come from lognormal distributions (and mixtures of
them).  The looks are the controller's (``Watch``): in 0.1 s ticks of simulated time, the
quick error look on the counts since the step's start and each evidence mark (and the
fast path where a row has one), and every second a full round, ``judge_marks`` over the
marks (``proxy.control.looks.Marks``).  Prints markdown tables:

1. **False rollbacks** of A/A rings (same error rate, same latency distribution) over
   30-minute rollouts, canary weight 1-50 %: rollouts rolled back at alpha 0.1,
   ``--alpha`` and 0.001 (the same simulated traffic judged at each level), and by the
   fast path (the default, and over 1 s with at least 10 requests).
2. **Time to rollback** of bad canaries (median and p95), and the canary requests (and
   errors) served until then.
3. **Time to health**: how long a healthy A/A canary waits until the verdict first says
   HEALTHY (a step could advance after its ``min_step_duration``).
4. **Limits** (``--only limits``): for the goals on the p95 (20 % errors, a 3 % p99 tail,
   low traffic), a lower bound that holds for any test at the check's alpha (the most
   powerful fixed-sample test, the baseline's rate known), Wald's SPRT knowing both rates,
   and the joint test knowing the rates but estimating the baseline's.

    .venv/bin/python loadtests/judge_sim.py --quick             # ~3 min
    nice .venv/bin/python loadtests/judge_sim.py --runs 200     # ~1.5 h of one core

Efficiency (pure Python: numpy is not a dependency).  Each tick adds a batch to each ring's
``Tally``: a Poisson number of requests, a binomial number of errors among them, and one
latency sketch bucket per request drawn from the distribution's exact bucket probabilities
(``random.choices`` over the sketch's cumulative weights).  A look the judge cannot possibly
roll back at is skipped by an exact screen: a rollback needs some check's confidence bound
beyond its limit, and a bound never lies beyond the point estimate, so when, since every
mark, every point estimate is inside its limit (error rate difference <= tolerance; the
ring's share slower than the limit computed from the baseline's *empirical* quantile <=
1 - q, a limit the judge's own, from an upper bound of that quantile, can only exceed) the
verdict cannot be ROLLBACK.  Every other full round calls ``judge_marks()``.  ``--verify
N`` also calls it at every N-th screened round and counts disagreements (there must be
none).  Runs are seeded per scenario and run index, so a report is reproducible with
``--seed`` and a run's outcome does not depend on ``--runs``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist

from proxy.config.analysis import Criteria, FastRollback
from proxy.control.looks import Marks
from proxy.rollout.evidence import Tally
from proxy.rollout.judge import (
    Outcome,
    Tallied,
    alpha_shares,
    errors_worse,
    judge,
    judge_fast,
    judge_marks,
    mark_alpha,
)
from proxy.rollout.sketch import SIZE, index_of, upper_edge

BUCKETS = range(SIZE)
Namespace = argparse.Namespace

# ------------------------------------------------------------------- random variates


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson(lam) variate: inversion for small means, Hormann's PTRS otherwise
    ("The transformed rejection method for generating Poisson random variables", 1993)."""
    if lam <= 0.0:
        return 0
    if lam < 10.0:
        k, p = 0, math.exp(-lam)
        total, u = p, rng.random()
        while u > total:
            k += 1
            p *= lam / k
            total += p
            if p < 1e-300:
                break
        return k
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if (math.log(v) + math.log(inv_alpha) - math.log(a / (us * us) + b)
                <= -lam + k * loglam - math.lgamma(k + 1)):
            return k


def binomial(rng: random.Random, n: int, p: float) -> int:
    """Successes in n Bernoulli(p) trials (geometric skips over the failures)."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1.0 - p)
    log_q, k, i = math.log1p(-p), 0, -1
    while True:
        i += 1 + int(math.log(1.0 - rng.random()) / log_q)
        if i >= n:
            return k
        k += 1


# ------------------------------------------------------------------ latency models

N01 = NormalDist()


@dataclass(frozen=True)
class Latency:
    """A latency distribution as a CDF, turned into exact sketch-bucket probabilities."""

    name: str
    cdf: Callable[[float], float]
    cum: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cum = [min(1.0, max(0.0, self.cdf(upper_edge(i)))) for i in BUCKETS]
        cum[-1] = 1.0  # everything slower than the top edge is in the last bucket
        for i in range(1, SIZE):  # monotone against rounding
            cum[i] = max(cum[i], cum[i - 1])
        object.__setattr__(self, "cum", tuple(cum))

    def draw(self, rng: random.Random, n: int) -> list[int]:
        return rng.choices(BUCKETS, cum_weights=self.cum, k=n) if n else []


def lognormal(median: float, sigma: float) -> Callable[[float], float]:
    mu = math.log(median)
    return lambda x: 0.0 if x <= 0 else N01.cdf((math.log(x) - mu) / sigma)


def lognormal_latency(median: float, sigma: float, scale: float = 1.0) -> Latency:
    return Latency(f"lognormal({median * scale * 1000:g}ms, {sigma:g})",
                   lognormal(median * scale, sigma))


def tail_latency(median: float, sigma: float, share: float, extra: float) -> Latency:
    """A share of requests ``extra`` seconds slower (a slow dependency on some calls)."""
    f = lognormal(median, sigma)
    return Latency(f"{share:.0%} +{extra * 1000:g}ms",
                   lambda x: (1 - share) * f(x) + share * f(x - extra))


def slow_tail_latency(median: float, sigma: float, above: float, factor: float) -> Latency:
    """Requests slower than the ``above`` quantile take ``factor`` times as long."""
    f = lognormal(median, sigma)
    cut = median * math.exp(sigma * N01.inv_cdf(above))

    def cdf(x: float) -> float:
        return f(min(x, cut)) + (f(x / factor) - above if x >= factor * cut else 0.0)

    return Latency(f"slowest {1 - above:.0%} x{factor:g}", cdf)


# ------------------------------------------------------------------------- traffic


@dataclass
class Pool:
    """One ring's traffic: its share of the route's requests, errors and latency."""

    weight: float
    error: float
    latency: Latency
    tally: Tally = field(default_factory=Tally)

    def serve(self, rng: random.Random, rps: float, dt: float, shift: int = 0,
              error: float | None = None) -> tuple[int, int]:
        n = poisson(rng, rps * self.weight * dt)
        e = binomial(rng, n, self.error if error is None else error)
        t = self.tally
        t.requests += n
        t.errors += e
        counts = t.latency
        if shift:
            top = SIZE - 1
            for i in self.latency.draw(rng, n):
                counts[min(top, max(0, i + shift))] += 1
        else:
            for i in self.latency.draw(rng, n):
                counts[i] += 1
        return n, e


class Screen:
    """Whether a look could be a rollback (exact: see the module docstring)."""

    def __init__(self, criteria: Criteria) -> None:
        self.c = criteria
        self.exact = criteria.max_error_rate is None and not criteria.max_latency
        self.screened = self.judged = self.verified = self.disagreements = 0

    def may_roll_back(self, ring: Tally, base: Tally) -> bool:
        if not self.exact:
            return True
        c = self.c
        tol = c.max_error_rate_increase
        if (tol is not None and ring.requests and base.requests
                and ring.errors / ring.requests - base.errors / base.requests > tol):
            return True
        if not c.latency:
            return False
        ring_timed = sum(ring.latency)
        base_timed = sum(base.latency)
        if not ring_timed or not base_timed:
            return False
        for limit in c.latency:
            allowed = 1.0 - limit.quantile
            # J0: the first edge the baseline's empirical share slower is <= 1 - q at (with
            # a hair of slack toward a lower edge: a lower limit only widens the screen).
            j0 = _first_within(base.latency, allowed * base_timed * (1 + 1e-9) + 1e-9)
            edge = upper_edge(j0)
            e0 = index_of(max(limit.ratio * edge, edge + c.latency_floor))
            slower = sum(ring.latency[e0 + 1:])
            if slower > allowed * ring_timed * (1 - 1e-9) - 1e-9:
                return True
        return False


def _first_within(counts: Sequence[int], most: float) -> int:
    """The smallest edge index j with (count above j) <= most."""
    running = 0
    for j in range(SIZE - 1, -1, -1):
        if running + counts[j] > most:
            return j
        running += counts[j]
    return 0


# --------------------------------------------------------------------- reporting


def fmt_time(x: float) -> str:
    if math.isinf(x):
        return "never"
    return f"{x:.1f} s" if x < 100 else f"{x:.0f} s"


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (inf when more than a share 1 - q never happened)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def upper_95(k: int, n: int) -> float:
    """One-sided 95 % Clopper-Pearson upper bound on a rate seen k times in n."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0

    def cdf(p: float) -> float:
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                            + i * math.log(p) + (n - i) * math.log1p(-p))
                   for i in range(k + 1))

    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if cdf(mid) > 0.05:
            lo = mid
        else:
            hi = mid
    return hi


def pct(x: float) -> str:
    return f"{x * 100:.2f} %" if x >= 0.0001 or x == 0 else f"{x * 100:.3f} %"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def rng_for(seed: int, name: str, run: int) -> random.Random:
    return random.Random(f"{seed}:{name}:{run}")


# ------------------------------------------------ the controller's looks, simulated


TICK = 0.1  # seconds: the controller's quick look (and fast path) cadence
FULL_EVERY = 10  # ticks between full rounds: analysis.interval 1 s
Rolled = dict[float | str, tuple[float, tuple[str, ...]]]


class Watch:
    """One ring and its baseline under the controller's looks, as ``proxy.control`` runs
    them: every tick the fast paths (``judge_fast`` over their windows, with the
    baseline's same window) and the quick error look (``judge.errors_worse`` on the counts
    since each mark; a full round when it fires); every ``FULL_EVERY`` ticks a full round,
    ``judge_marks`` on the evidence since the step's start and the marks kept
    (``proxy.control.looks.Marks``: every 5 minutes on the clock, the last six kept).
    The same traffic is judged at every alpha in ``levels``; a rollback at a level ends
    the judging at it (the ring would be gone), and the first rollback at each level and
    of each fast path is recorded as (seconds, checks)."""

    def __init__(self, ring: Pool, base: Pool, levels: Sequence[float], args: Namespace,
                 screen: Screen, fast: dict[str, FastRollback]) -> None:
        self.ring, self.base, self.screen, self.args = ring, base, screen, args
        self.criteria = {a: replace(args.criteria, alpha=a) for a in levels}
        self.pending = sorted(levels, reverse=True)  # a rollback at a level implies above
        self.fast = fast
        self.slots = {k: round(f.window / TICK) for k, f in fast.items()}
        self.recent: deque[tuple[int, int, int, int]] = deque(
            maxlen=max(self.slots.values(), default=1))
        self.marks = Marks(0.0)
        self.rolled: Rolled = {}
        self.tol = args.criteria.max_error_rate_increase
        self.ticks = 0

    def tick(self, now: float, n: int, e: int, bn: int, be: int) -> None:
        self.ticks += 1
        if self.fast:
            self.recent.append((n, e, bn, be))
            for key, fast in self.fast.items():
                if key in self.rolled:
                    continue
                last = list(self.recent)[-self.slots[key]:]
                sums = [sum(x[i] for x in last) for i in range(4)]
                v = judge_fast(sums[0], sums[1], fast, sums[2], sums[3])
                if v is not None:
                    self.rolled[key] = (now, v.broken)
        if not self.pending:
            return
        if self.ticks % FULL_EVERY == 0:
            self.full(now)
        elif self.quick_may_roll_back():
            counts = self.counts()
            if errors_worse(counts, self.criteria[self.pending[0]]) is not None:
                self.full(now)

    def counts(self) -> list[tuple[int, Tallied]]:
        r, b = self.ring.tally, self.base.tally
        out: list[tuple[int, Tallied]] = [(1, (r.requests, r.errors, b.requests, b.errors))]
        out += [(j, (r.requests - rm.requests, r.errors - rm.errors,
                     b.requests - bm.requests, b.errors - bm.errors))
                for j, rm, bm in self.marks.kept]
        return out

    def quick_may_roll_back(self) -> bool:
        """Exact: a check can be worse only if the estimates differ by more than the
        tolerance (a confidence bound never lies beyond its estimate)."""
        if self.tol is None:
            return self.args.criteria.max_error_rate is not None
        if self.args.criteria.max_error_rate is not None:
            return True
        for _, (rn, re, bn, be) in self.counts():
            if rn and bn and re / rn - be / bn > self.tol:
                return True
        return False

    def full(self, now: float) -> None:
        ring_now, base_now = self.ring.tally.evidence(), self.base.tally.evidence()
        self.marks.look(now, ring_now, base_now)
        marks = [(1, ring_now, base_now),
                 *((j, ring_now.since(r), base_now.since(b)) for j, r, b in self.marks.kept)]
        screen = self.screen
        if not any(screen.may_roll_back(r, b) for _, r, b in marks):
            screen.screened += 1
            if self.args.verify and screen.screened % self.args.verify == 0:
                screen.verified += 1
                v = judge_marks(marks, self.criteria[self.pending[0]])
                if v.outcome is Outcome.ROLLBACK:
                    screen.disagreements += 1
            return
        screen.judged += 1
        for a in list(self.pending):
            v = judge_marks(marks, self.criteria[a])
            if v.outcome is not Outcome.ROLLBACK:
                break
            self.rolled[a] = (now, v.broken)
            self.pending.remove(a)


# -------------------------------------------------- 1. false rollbacks of A/A rings


@dataclass
class AACell:
    name: str
    weight: float
    error: float
    latency: Latency
    drift: bool = False  # a shared per-second latency drift and a 60 s shared incident


# The fast path as the proxy runs it on the same traffic (the default: the last 0.5 s, at
# least 5 requests, improbable at the baseline's rate), and as it was before (1 s, min 10).
FAST = {"fast_default": FastRollback(0.5),
        "fast_1s_min10": FastRollback(0.5, min_requests=10, window=1.0)}


def aa_rollout(rng: random.Random, cell: AACell, levels: Sequence[float], args: Namespace,
               screen: Screen) -> Rolled:
    """One 30-minute A/A rollout under the controller's looks: when (if ever) it was
    rolled back at each alpha level, and by which checks; and when the fast paths would
    have."""
    ring = Pool(cell.weight, cell.error, cell.latency)
    base = Pool(1.0 - cell.weight, cell.error, cell.latency)
    watch = Watch(ring, base, levels, args, screen, FAST)
    shift = 0
    for tick in range(1, round(args.duration / TICK) + 1):
        now = tick * TICK
        error = None
        if cell.drift:
            if tick % FULL_EVERY == 1:
                shift = round(rng.gauss(0.0, 3.0))  # ~12 % up or down, both rings alike
            if 600 <= now < 660:  # a shared dependency's incident: both rings suffer
                error = 0.2
        extra = 18 if cell.drift and 600 <= now < 660 else 0  # x2 latency then
        n, e = ring.serve(rng, args.rps, TICK, shift + extra, error)
        bn, be = base.serve(rng, args.rps, TICK, shift + extra, error)
        watch.tick(now, n, e, bn, be)
        if not watch.pending and len(watch.rolled) == len(levels) + len(FAST):
            break
    return watch.rolled


def false_rollbacks(args: Namespace) -> str:
    levels = sorted({0.1, args.alpha, 0.001}, reverse=True)
    lat = lognormal_latency(args.median, args.sigma)
    cells = [AACell(f"A/A {e:.0%} errors", w, e, lat)
             for e in (0.01, 0.05) for w in (0.01, 0.05, 0.10, 0.25, 0.50)]
    cells.append(AACell("A/A 1% errors, shared drift + incident", 0.10, 0.01, lat, drift=True))
    screen = Screen(args.criteria)
    keys: list[float | str] = [*levels, *FAST]
    rows, totals = [], Counter[float | str]()
    by_check: Counter[str] = Counter()
    runs = 0
    for cell in cells:
        hits: Counter[float | str] = Counter()
        for i in range(args.runs):
            rng = rng_for(args.seed, f"aa:{cell.name}:{cell.weight}", i)
            for a, (_, broken) in aa_rollout(rng, cell, levels, args, screen).items():
                hits[a] += 1
                if a == args.alpha:
                    by_check.update(broken)
        runs += args.runs
        totals.update(hits)
        rows.append([cell.name, f"{cell.weight:.0%}", str(args.runs)]
                    + [f"{hits[a]} ({pct(hits[a] / args.runs)})" for a in keys])
    rows.append(["**all**", "", str(runs)]
                + [f"**{totals[a]}** ({pct(totals[a] / runs)}, 95 % upper "
                   f"{pct(upper_95(totals[a], runs))})" for a in levels]
                + [f"**{totals[a]}** ({pct(totals[a] / runs)})" for a in FAST])
    header = (["pools", "canary weight", "rollouts"]
              + [f"rolled back, alpha {a:g}" for a in levels]
              + [f"judge_fast >50 % of the last {f.window:g} s, min {f.min_requests}"
                 for f in FAST.values()])
    notes = [f"Full rounds: {screen.judged} judged, {screen.screened} skipped by the exact "
             "screen"]
    if args.verify:
        notes.append(f"{screen.verified} skipped rounds re-judged: "
                     f"{screen.disagreements} disagreements")
    if by_check:
        notes.append("checks that fired at alpha "
                     f"{args.alpha:g}: " + ", ".join(f"{k} {v}" for k, v in by_check.items()))
    if screen.disagreements:
        args.failed = True
    return table(header, rows) + "\n\n" + "; ".join(notes) + "."


# -------------------------------------------------------- 2. time to rollback


@dataclass
class Bad:
    name: str
    weight: float
    error: float
    latency: Latency
    base_error: float = 0.01
    base_latency: Latency | None = None
    rps: float | None = None
    onset: float = 0.0  # seconds of healthy canary before it breaks
    fast: FastRollback | None = None  # the fast path too (else the judge alone)
    cap: float = 600.0
    goal: str = ""


@dataclass
class Caught:
    time: float  # from onset
    requests: int  # canary requests since onset
    errors: int
    broken: tuple[str, ...]
    delay: float = 0.0  # from the tick of the last canary request before it to the look


def bad_rollout(rng: random.Random, s: Bad, args: Namespace, screen: Screen) -> Caught | None:
    base_lat = s.base_latency or lognormal_latency(args.median, args.sigma)
    rps = s.rps or args.rps
    ring = Pool(s.weight, s.base_error, base_lat)
    base = Pool(1.0 - s.weight, s.base_error, base_lat)
    fast = {"fast": s.fast} if s.fast else {}
    watch = Watch(ring, base, [args.alpha], args, screen, fast)
    served = errors = 0
    broken = False
    last = 0.0
    for tick in range(1, round((s.onset + s.cap) / TICK) + 1):
        now = tick * TICK
        if not broken and now > s.onset + 1e-9:
            broken, ring.error, ring.latency = True, s.error, s.latency
        n, e = ring.serve(rng, rps, TICK)
        bn, be = base.serve(rng, rps, TICK)
        if broken:
            served, errors = served + n, errors + e
        if n:
            last = now
        watch.tick(now, n, e, bn, be)
        if watch.rolled:
            _, (_, checks) = next(iter(watch.rolled.items()))
            return Caught(now - s.onset, served, errors, checks, now - last) if broken else \
                Caught(-1, 0, 0, checks)  # a false rollback before the onset
    return None


def bad_scenarios(args: Namespace) -> list[Bad]:
    m, sg = args.median, args.sigma
    healthy = lognormal_latency(m, sg)
    fast = FastRollback(max_error_rate=0.5)  # the default window and min_requests
    old_fast = FastRollback(max_error_rate=0.5, min_requests=10, window=1.0)
    return [
        Bad("20 % errors (baseline 1 %)", 0.10, 0.20, healthy, goal="<= 2 s"),
        # Onsets half-way between two evidence marks (taken every 300 s): the most dilution.
        Bad("20 % errors after 32.5 min healthy (mid-step)", 0.10, 0.20, healthy,
            onset=1950.0),
        Bad("5 % errors (baseline 1 %)", 0.10, 0.05, healthy),
        Bad("100 % errors from the step's start, the judge alone", 0.10, 1.0, healthy),
        Bad("100 % errors after 450 s healthy, the judge alone", 0.10, 1.0, healthy,
            onset=450.0),
        Bad(f"100 % errors after 450 s healthy, fast path (last {fast.window:g} s, >50 %, "
            f"min {fast.min_requests}, vs the baseline)", 0.10, 1.0, healthy, onset=450.0,
            fast=fast, goal="<= 0.5 s"),
        Bad("100 % errors after 450 s healthy, the earlier fast path (last 1 s, >50 %, "
            "min 10)", 0.10, 1.0, healthy, onset=450.0, fast=old_fast, goal="<= 0.5 s"),
        Bad("p99 tail: 3 % of requests +300 ms", 0.10, 0.01,
            tail_latency(m, sg, 0.03, 0.3), goal="<= 30 s"),
        Bad("p99 tail: 3 % of requests +300 ms, 25 % weight", 0.25, 0.01,
            tail_latency(m, sg, 0.03, 0.3), goal="<= 30 s"),
        # Around a 100 ms median, so that the 20 ms floor does not hide a 2x shift.
        Bad("2x latency (p50, p95, p99 all x2), 100 ms median", 0.10, 0.01,
            lognormal_latency(0.1, sg, 2.0), base_latency=lognormal_latency(0.1, sg)),
        Bad("2x p95 (slowest 10 % x2, p50 unchanged), 100 ms median", 0.10, 0.01,
            slow_tail_latency(0.1, sg, 0.90, 2.0), base_latency=lognormal_latency(0.1, sg)),
        Bad("low traffic: 2 req/s, 100 % errors", 0.05, 1.0, healthy, rps=2.0,
            cap=900.0, goal="<= 60 s"),
    ]


def time_to_rollback(args: Namespace) -> str:
    screen = Screen(args.criteria)
    rows = []
    only = args.scenario
    for s in bad_scenarios(args):
        if only and only not in s.name:
            continue
        times: list[float] = []
        exposed: list[float] = []
        bad_errors: list[float] = []
        delays: list[float] = []
        checks: Counter[str] = Counter()
        early = 0
        for i in range(args.runs):
            got = bad_rollout(rng_for(args.seed, "bad:" + s.name, i), s, args, screen)
            if got is None:
                times.append(math.inf)
                continue
            if got.time < 0:
                early += 1
                continue
            times.append(got.time)
            exposed.append(got.requests)
            bad_errors.append(got.errors)
            delays.append(got.delay)
            checks.update(got.broken)
        caught = sum(not math.isinf(x) for x in times)
        rps = s.rps or args.rps
        rows.append([
            s.name, f"{rps:g} req/s, {s.weight:.0%}", f"{len(times)}",
            f"{caught}" + (f" (+{early} before onset)" if early else ""),
            fmt_time(quantile(times, 0.5)), fmt_time(quantile(times, 0.95)),
            f"{quantile(exposed, 0.5):.0f} / {quantile(exposed, 0.95):.0f}" if exposed else "-",
            f"{quantile(bad_errors, 0.5):.0f}" if bad_errors else "-",
            f"{quantile(delays, 0.5):.1f} / {quantile(delays, 0.95):.1f} s" if delays else "-",
            ", ".join(k for k, _ in checks.most_common(3)) or "-", s.goal or "-",
        ])
    header = ["canary", "traffic, weight", "runs", "rolled back", "median", "p95",
              "canary requests median / p95", "errors served (median)",
              "look delay median / p95", "checks", "goal"]
    return table(header, rows) + f"\n\nFull rounds: {screen.judged} judged, " \
        f"{screen.screened} skipped by the exact screen.  Times are from the onset to the " \
        "look that rolled back (quick looks every 0.1 s, full rounds every 1 s); the " \
        "look delay is the part after the tick of the last canary request before it " \
        "(the rest is waiting for the requests whose evidence decides)."


# ----------------------------------------------------------------- 3. time to health


def healthy_rollout(rng: random.Random, weight: float, error: float, args: Namespace,
                    cap: float) -> tuple[float, int]:
    """Seconds (looks every 1 s) until the verdict first says HEALTHY, and the canary's
    requests then.  A cheaper judge() with the error check alone, at the same share of
    alpha, screens the looks: HEALTHY needs that check within."""
    lat = lognormal_latency(args.median, args.sigma)
    ring, base = Pool(weight, error, lat), Pool(1.0 - weight, error, lat)
    # Health comes from the step's start, mark 1, judged at its share of alpha.
    c = replace(args.criteria, alpha=mark_alpha(args.criteria.alpha, 1))
    first = None
    if c.max_error_rate_increase is not None and not c.max_error_rate:
        first = replace(c, alpha=c.alpha * alpha_shares(c)["error_rate_increase"],
                        latency=(), max_latency=(),
                        min_requests=1)
    for look in range(1, int(cap) + 1):
        ring.serve(rng, args.rps, 1.0)
        base.serve(rng, args.rps, 1.0)
        if ring.tally.requests < c.min_requests:
            continue
        r, b = ring.tally.evidence(), base.tally.evidence()
        if first is not None and judge(r, b, first).outcome is not Outcome.HEALTHY:
            continue
        if judge(r, b, c).outcome is Outcome.HEALTHY:
            return float(look), r.requests
    return math.inf, ring.tally.requests


def time_to_health(args: Namespace) -> str:
    rows = []
    cap = 3600.0
    for weight, error in ((0.05, 0.01), (0.10, 0.01), (0.25, 0.01), (0.10, 0.001),
                          (0.10, 0.05)):
        times, reqs = [], []
        for i in range(args.health_runs):
            rng = rng_for(args.seed, f"health:{weight}:{error}", i)
            t, n = healthy_rollout(rng, weight, error, args, cap)
            times.append(t)
            if not math.isinf(t):
                reqs.append(n)
        healthy = sum(not math.isinf(x) for x in times)
        rows.append([f"{error:.1%} errors on both", f"{weight:.0%}", str(len(times)),
                     str(healthy), fmt_time(quantile(times, 0.5)),
                     fmt_time(quantile(times, 0.9)),
                     f"{quantile(reqs, 0.5):.0f}" if reqs else "-"])
    header = ["A/A pools", "canary weight", "runs", f"HEALTHY within {cap:.0f} s",
              "median", "p90", "canary requests then (median)"]
    return table(header, rows)


# ------------------------------------------------- 4. what any test could do


def binomial_pmf(n: int, p: float) -> list[float]:
    if p >= 1.0:
        return [0.0] * n + [1.0]
    lp, lq = math.log(p), math.log1p(-p)
    return [math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                     + i * lp + (n - i) * lq) for i in range(n + 1)]


def np_power(n: int, p0: float, p1: float, a: float) -> float:
    """The power at rate ``p1`` of the most powerful level-``a`` test of rate ``p0`` on n
    trials (Neyman-Pearson: reject for many events, randomized at the cut)."""
    f0, f1 = binomial_pmf(n, p0), binomial_pmf(n, p1)
    size = power = 0.0
    for k in range(n, -1, -1):
        if size + f0[k] <= a:
            size, power = size + f0[k], power + f1[k]
        else:
            return power + f1[k] * (a - size) / f0[k]
    return power


def np_p95_time(rate: float, p0: float, p1: float, a: float, step: float) -> float:
    """A lower bound on the p95 time to rollback of *any* test with a false rollback
    probability <= ``a`` for a ring at rate p0, whatever the arrivals: rolled back by
    time t implies rolled back on the first N_t requests (N_t ~ Poisson(rate t)), an
    event of probability <= a at p0 given N_t, so of probability <= the most powerful
    fixed-sample test's power at p1.  The first t where E[power(N_t)] >= 0.95."""
    power: dict[int, float] = {0: 0.0}
    t = step
    while t < 10_000:
        lam = rate * t
        lo, hi = max(0, int(lam - 8 * math.sqrt(lam) - 5)), int(lam + 8 * math.sqrt(lam) + 10)
        total = 0.0
        for k in range(lo, hi):
            if k not in power:
                power[k] = np_power(k, p0, p1, a)
            total += math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1)) * power[k]
        if total >= 0.95:
            return t
        t += step
    return math.inf


def oracle_sprt(rng: random.Random, rate: float, p0: float, p1: float, a: float) -> float:
    """Wald's SPRT that knows both rates (the likelihood ratio of p1 to p0 against 1/a,
    after every request, arrivals Poisson): anytime-valid at p0, the benchmark a test
    that must work at every alternative rate can only approach."""
    up = math.log(p1 / p0)
    down = math.log((1 - p1) / (1 - p0)) if p1 < 1.0 else -math.inf
    limit, t, ratio = math.log(1 / a), 0.0, 0.0
    while ratio < limit:
        t += rng.expovariate(rate)
        ratio += up if rng.random() < p1 else down
    return t


def oracle_joint(rng: random.Random, rate: float, weight: float, p_ring: float,
                 p_base: float, tol: float, a: float) -> float:
    """The joint test with the true rates as its alternative (no mixture to pay for) but
    the baseline's rate unknown, as the judge has it: min over p_b of the log-likelihood
    ratios (p_ring vs p_b + tol on the ring, p_base vs p_b on the baseline), looked at
    every TICK.  What the baseline's uncertainty alone costs."""
    limit = math.log(1 / a)
    rn = re = bn = be = 0
    for tick in range(1, 100_000):
        n = poisson(rng, rate * weight * TICK)
        m = poisson(rng, rate * (1 - weight) * TICK)
        rn, re = rn + n, re + binomial(rng, n, p_ring)
        bn, be = bn + m, be + binomial(rng, m, p_base)
        if not (rn and bn and re / rn - be / bn > tol):
            continue

        def v(pb: float, rn: int = rn, re: int = re, bn: int = bn, be: int = be) -> float:
            pr = pb + tol
            return (re * math.log(p_ring / pr) + (rn - re) * math.log1p(-p_ring)
                    - (rn - re) * math.log1p(-pr) + be * math.log(p_base / pb)
                    + (bn - be) * (math.log1p(-p_base) - math.log1p(-pb)))

        lo, hi = 1e-12, 1.0 - tol - 1e-12
        for _ in range(80):  # v is convex in p_b: ternary search
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            lo, hi = (lo, m2) if v(m1) < v(m2) else (m1, hi)
        if v((lo + hi) / 2) >= limit:
            return tick * TICK
    return math.inf


def limits(args: Namespace) -> str:
    """For the three goals not met at the p95: what any test, and what an oracle, could do."""
    c = args.criteria
    shares = alpha_shares(c)
    mark1 = mark_alpha(c.alpha, 1)
    err_a = mark1 * shares["error_rate_increase"]
    p99_a = mark1 * shares["p99"]
    base_p99 = args.median * math.exp(args.sigma * N01.inv_cdf(0.99))
    t99 = max(2.0 * base_p99, base_p99 + c.latency_floor)
    slow = 0.03 + 0.97 * (1 - lognormal(args.median, args.sigma)(t99))
    tol = c.max_error_rate_increase or 0.0
    cases = [  # name, ring req/s, null rate, true rate, the check's alpha, goal, joint?
        ("20 % errors vs 1 %, 10 % of 200 req/s", 20.0, 0.01 + tol, 0.2, err_a, "<= 2 s",
         True, 0.05),
        ("100 % errors, 5 % of 2 req/s", 0.1, 0.01 + tol, 1.0, err_a, "<= 60 s", False, 0.5),
        (f"p99 tail: {slow:.2%} slower than {t99 * 1000:.0f} ms, 1 % allowed, 10 % of "
         "200 req/s", 20.0, 0.01, slow, p99_a, "<= 30 s", False, 0.25),
    ]
    rows = []
    runs = max(args.runs, 1000)
    for name, rate, p0, p1, a, goal, joint, step in cases:
        fixed = [np_p95_time(rate, p0, p1, x, step) for x in (a, c.alpha)]
        sprt = [oracle_sprt(rng_for(args.seed, "sprt:" + name, i), rate, p0, p1, a)
                for i in range(runs)]
        row = [name, f"{a:.2g}", f"{fixed[0]:.1f} s / {fixed[1]:.1f} s",
               f"{fmt_time(quantile(sprt, 0.5))} / {fmt_time(quantile(sprt, 0.95))}"]
        if joint:
            j = [oracle_joint(rng_for(args.seed, "joint:" + name, i), 200.0, 0.1, p1,
                              0.01, tol, a) for i in range(runs)]
            row.append(f"{fmt_time(quantile(j, 0.5))} / {fmt_time(quantile(j, 0.95))}")
        else:
            row.append("-")
        rows.append([*row, goal])
    header = ["canary (baseline's rate known unless said)", "the check's alpha (mark 1)",
              "p95 of any test: lower bound at that alpha / at all of alpha",
              f"Wald's SPRT knowing both rates, median / p95 ({runs} runs)",
              "joint test knowing the rates, baseline estimated, median / p95", "goal"]
    return table(header, rows) + (
        "\n\nThe lower bound holds for every test, sequential or not, whose false "
        "rollback probability given the arrivals is at most the alpha shown, even one "
        "that knows the baseline's rate exactly (the judge's composite null contains "
        "that simple one): at the check's share of alpha, that check's p95 cannot be "
        "below it; at all of alpha, no judge's.  The SPRT knows the ring's true rate as "
        "well; the judge must work at every rate, and pays a mixture's regret (about "
        "ln(n)/2 nats) on each side.")


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100,
                   help="rollouts per row (A/A cells and bad canaries; default 100)")
    p.add_argument("--health-runs", type=int, default=None,
                   help="rollouts per time-to-health row (default: --runs / 2)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.01, help="the route's alpha (0.01)")
    p.add_argument("--rps", type=float, default=200.0, help="the route's requests/s (200)")
    p.add_argument("--duration", type=float, default=1800.0,
                   help="A/A rollout length, seconds (1800)")
    p.add_argument("--median", type=float, default=0.020, help="latency median, s (0.020)")
    p.add_argument("--sigma", type=float, default=0.5, help="lognormal sigma (0.5)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="re-judge every N-th screened look and count disagreements")
    p.add_argument("--quick", action="store_true",
                   help="10 runs per row, verify every 20th screened look")
    p.add_argument("--only", default="aa,bad,health",
                   help="sections: aa (false rollbacks), bad, health, limits (what any "
                        "test could do: not run unless named)")
    p.add_argument("--scenario", default="",
                   help="time to rollback: only the canaries whose name contains this")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.verify = 10, args.verify or 20
    if args.health_runs is None:
        args.health_runs = max(1, args.runs // 2)
    args.criteria = Criteria(alpha=args.alpha)
    args.failed = False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = set(args.only.split(","))
    started = time.process_time()
    c = args.criteria
    print("# Judge simulation\n")
    shares = alpha_shares(c)
    print(f"seed {args.seed}, {args.runs} runs per row, alpha {c.alpha:g} split over "
          f"{len(shares)} checks (error increase <= {c.max_error_rate_increase:g}, "
          + ", ".join(f"{x.name} <= {x.ratio:g}x" for x in c.latency)
          + f", floor {c.latency_floor * 1000:g} ms; shares of alpha "
          + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
          + f"), min_requests {c.min_requests}; "
          f"{args.rps:g} req/s, latency lognormal(median {args.median * 1000:g} ms, "
          f"sigma {args.sigma:g}) on both rings unless said; pure Python.\n")
    sections: list[tuple[str, str, Callable[[Namespace], str]]] = [
        ("aa", f"## False rollbacks: A/A rollouts of {args.duration / 60:g} min, "
               "looked at every second", false_rollbacks),
        ("bad", "## Time to rollback", time_to_rollback),
        ("health", f"## Time to HEALTHY: A/A canaries, looked at every second "
                   f"({args.health_runs} runs per row)", time_to_health),
        ("limits", "## What any test could do (the arithmetic behind the goals)", limits),
    ]
    for key, title, run in sections:
        if key in only:
            t0 = time.process_time()
            body = run(args)
            print(f"{title}\n\n{body}\n\n({time.process_time() - t0:.0f} s of CPU)\n",
                  flush=True)
    print(f"Total: {time.process_time() - started:.0f} s of CPU.")
    return 1 if args.failed else 0


if __name__ == "__main__":
    sys.exit(main())
