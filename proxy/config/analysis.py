"""A route's analysis settings: what the judge tests each ring for, and how sure it must be.

Models and their validation.  Pure: no I/O.  ``proxy.rollout.judge`` reads ``Criteria``.

The judge is sequential (see ``proxy.rollout.judge``): it accumulates each ring's evidence
from the start of its step and compares it with the baseline ring's over the same time, so
there is no window, no significance per look and no count of failing looks; the keys that
set those in earlier versions are refused with what to write instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.config.checks import ExternalCheck, Hook, read_checks, read_hook
from proxy.config.reader import Ctx, Section, kind
from proxy.config.values import parse_weight


@dataclass(frozen=True, slots=True)
class LatencyLimit:
    """The ring's ``quantile`` at most ``ratio`` x the baseline's (and at least the floor
    above it): ``latency: {p95: 1.5}``."""

    quantile: float  # 0.95
    ratio: float

    @property
    def name(self) -> str:
        return quantile_name(self.quantile)


@dataclass(frozen=True, slots=True)
class AbsoluteLatency:
    """The ring's ``quantile`` at most ``seconds``, whatever the baseline does: ``max_p95``."""

    quantile: float
    seconds: float

    @property
    def name(self) -> str:
        return "max_" + quantile_name(self.quantile)


def quantile_name(q: float) -> str:
    """0.95 -> "p95", 0.999 -> "p999", 0.5 -> "p50"."""
    digits = f"{q:.6f}"[2:].rstrip("0")
    return "p" + (digits + "0" if len(digits) == 1 else digits)


QUANTILES = {"p50": 0.5, "p75": 0.75, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}
DEFAULT_LATENCY = (LatencyLimit(0.5, 1.5), LatencyLimit(0.95, 1.5), LatencyLimit(0.99, 2.0))


@dataclass(frozen=True, slots=True)
class Criteria:
    """What a ring must show, against its baseline and in absolute terms."""

    alpha: float = 0.01  # at most this chance of rolling back a ring within tolerance
    max_error_rate_increase: float | None = 0.01  # fraction (0.01 = 1 percentage point)
    latency: tuple[LatencyLimit, ...] = DEFAULT_LATENCY
    latency_floor: float = 0.020  # seconds: a limit is never closer to the baseline
    max_error_rate: float | None = None  # fraction, absolute
    max_latency: tuple[AbsoluteLatency, ...] = ()
    min_requests: int = 100  # a step never advances on fewer of the ring's requests


SERVER_ERRORS = frozenset(range(500, 600))


@dataclass(frozen=True, slots=True)
class FastRollback:
    """Roll back at once when a ring's error rate over ``window`` is above this."""

    max_error_rate: float  # fraction
    # At least this many requests in the window; the judge also wants the errors to be
    # improbable at the baseline's rate over the same window (proxy.rollout.judge).
    min_requests: int = 5
    window: float = 0.5  # seconds: five of the control loop's 0.1 s looks


@dataclass(frozen=True, slots=True)
class Analysis:
    interval: float = 1.0  # how often the judge looks (the evidence is cumulative)
    baseline: str | None = None  # default: the route's default (last) ring
    criteria: Criteria = field(default_factory=Criteria)
    # Upstream answers that count as errors (besides getting no usable answer at all).
    error_statuses: frozenset[int] = SERVER_ERRORS
    max_blind: float = 600.0  # undecided that long in a step: an analysis_starved alarm
    rollback_to_previous: bool = False
    fast: FastRollback | None = None
    # Checks from outside the proxy's traffic (Prometheus queries, webhooks) and the gates
    # around a step: proxy.config.checks, run by proxy.checks.
    checks: tuple[ExternalCheck, ...] = ()
    pre_advance: Hook | None = None  # must answer 2xx before each step advance
    post_rollback: Hook | None = None  # told of every rollback (fire and forget)


FAST_WINDOW_MAX = 10.0  # seconds of recent history the fast path may read

# Keys of earlier versions, refused with what to write instead.
_RETIRED = {
    "window": "the judge reads everything since the ring's step began; remove window",
    "failure_limit": "one crossing of the anytime-valid bound decides (its false rollback "
                     "probability is alpha however often it looks); remove failure_limit",
    "significance": "write alpha: the chance of rolling back a healthy ring over its whole "
                    "step (default 0.01)",
    "max_latency_ratio": "write latency: {p95: RATIO} (and p50/p99 as you need; the "
                         "default is {p50: 1.5, p95: 1.5, p99: 2})",
}
_ANALYSIS = Analysis()
_CRITERIA = Criteria()


def read_analysis(ctx: Ctx, data: object, path: str) -> Analysis | None:
    if data is None:
        return None
    sec = Section(ctx, data, path)
    for key, instead in _RETIRED.items():
        if sec.has(key):
            sec.raw(key)
            ctx.err(sec.sub(key), f"no longer used: {instead}")
    interval = sec.duration("interval", _ANALYSIS.interval, minimum=0.1)
    baseline = sec.text("baseline", "") or None
    criteria = _read_criteria(ctx, sec)
    statuses = _read_statuses(ctx, sec)
    max_blind = sec.duration("max_blind", _ANALYSIS.max_blind, minimum=1.0)
    fast = _read_fast(ctx, sec.raw("fast_rollback", None), sec.sub("fast_rollback"))
    checks = read_checks(ctx, sec.raw("checks", None), sec.sub("checks"))
    pre_advance = read_hook(ctx, sec.raw("pre_advance", None), sec.sub("pre_advance"))
    post_rollback = read_hook(ctx, sec.raw("post_rollback", None), sec.sub("post_rollback"))
    sec.close()
    return Analysis(interval=interval, baseline=baseline, criteria=criteria,
                    error_statuses=statuses, max_blind=max_blind, fast=fast, checks=checks,
                    pre_advance=pre_advance, post_rollback=post_rollback)


def _read_criteria(ctx: Ctx, sec: Section) -> Criteria:
    increase = _percent(sec, "max_error_rate_increase", _CRITERIA.max_error_rate_increase)
    return Criteria(
        alpha=_alpha(ctx, sec),
        max_error_rate_increase=increase,
        latency=_read_latency(ctx, sec),
        latency_floor=sec.duration("latency_floor", _CRITERIA.latency_floor, minimum=0.0),
        max_error_rate=_percent(sec, "max_error_rate", None),
        max_latency=tuple(
            AbsoluteLatency(q, seconds) for name, q in QUANTILES.items()
            if (seconds := sec.duration(f"max_{name}", 0.0, minimum=0.0))
        ),
        min_requests=sec.integer("min_requests", _CRITERIA.min_requests, 1, 100_000_000),
    )


def _percent(sec: Section, key: str, default: float | None) -> float | None:
    """A percentage key as a fraction; ``off`` (or null) turns the check off."""
    if not sec.has(key):
        sec.seen.add(key)
        return default
    if sec.raw(key) in (None, "off", False):
        return None
    bp = sec.parsed(key, parse_weight, -1)
    return None if bp < 0 else bp / 10_000


percent_key = _percent  # for a progression step's own limits (proxy.config.rollout)


def _alpha(ctx: Ctx, sec: Section) -> float:
    value = sec.raw("alpha", _CRITERIA.alpha)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 0.5:
        ctx.err(sec.sub("alpha"), f"expected a probability between 0 and 0.5 (e.g. 0.01), "
                f"got {value!r}")
        return _CRITERIA.alpha
    return float(value)


def _read_latency(ctx: Ctx, sec: Section) -> tuple[LatencyLimit, ...]:
    """``latency: {p50: 1.5, p95: 1.5, p99: 2}``, or ``off``."""
    if not sec.has("latency"):
        sec.seen.add("latency")
        return _CRITERIA.latency
    raw = sec.raw("latency")
    if raw in (None, "off", False):
        return ()
    where = sec.sub("latency")
    if not isinstance(raw, dict):
        ctx.err(where, f"expected a mapping of quantile to ratio, e.g. {{p95: 1.5}}, or off; "
                f"got {kind(raw)}")
        return _CRITERIA.latency
    limits = []
    for name, ratio in raw.items():
        q = QUANTILES.get(name)
        if q is None:
            ctx.err(f"{where}.{name}", f"unknown quantile (known: {', '.join(QUANTILES)})")
        elif isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio < 1:
            ctx.err(f"{where}.{name}", f"expected a ratio of at least 1 (e.g. 1.5), "
                    f"got {ratio!r}")
        else:
            limits.append(LatencyLimit(q, float(ratio)))
    return tuple(sorted(limits, key=lambda limit: limit.quantile))


def _read_statuses(ctx: Ctx, sec: Section) -> frozenset[int]:
    """``error_statuses: [5xx, 429, 404]``: classes (``4xx``, ``5xx``) and single codes."""
    if not sec.has("error_statuses"):
        sec.seen.add("error_statuses")
        return _ANALYSIS.error_statuses
    raw = sec.raw("error_statuses")
    items = raw if isinstance(raw, list) else [raw]
    codes: set[int] = set()
    for i, item in enumerate(items):
        where = f"{sec.sub('error_statuses')}[{i}]" if isinstance(raw, list) else \
            sec.sub("error_statuses")
        text = str(item).strip().lower()
        if text in ("4xx", "5xx"):
            first = int(text[0]) * 100
            codes.update(range(first, first + 100))
        elif text.isdigit() and 400 <= int(text) <= 599:
            codes.add(int(text))
        else:
            ctx.err(where, f"{item!r} is not an error status; expected 4xx, 5xx or a code "
                    "from 400 to 599")
    return frozenset(codes)


def _read_fast(ctx: Ctx, data: object, path: str) -> FastRollback | None:
    """``fast_rollback: {max_error_rate: 50, min_requests: 10, window: 1s}``."""
    if data is None:
        return None
    sec = Section(ctx, data, path)
    rate = _percent(sec, "max_error_rate", None)
    if rate is None and sec.ok:
        ctx.err(sec.sub("max_error_rate"), "is required")
    base = FastRollback(0.0)
    minimum = sec.integer("min_requests", base.min_requests, 1, 100_000_000)
    window = sec.duration("window", base.window, minimum=0.1)
    if window > FAST_WINDOW_MAX:
        ctx.err(sec.sub("window"), f"{window:g}s is longer than {FAST_WINDOW_MAX:g}s (the fast "
                "path reads only recent history)")
        window = base.window
    sec.close()
    return None if rate is None else FastRollback(rate, minimum, window)
