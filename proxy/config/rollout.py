"""Config for automatic rollback and progression: analysis, steps, rollback, state, webhooks.

Models and their validation; ``proxy.rollout.plan.build_plan`` turns them into ``RoutePlan``s.
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proxy.config.reader import Ctx, Section, kind
from proxy.config.source import join
from proxy.config.values import parse_weight

WINDOW_HORIZON = 300.0  # seconds of per-ring history kept in memory (metrics windows)


@dataclass(frozen=True, slots=True)
class Step:
    weight: int  # basis points
    approval: bool = False  # an operator must approve moving *to* this step


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_requests: int = 50
    max_error_rate: float | None = None  # fraction, e.g. 0.05
    max_p95: float | None = None  # seconds
    max_p99: float | None = None
    max_error_rate_increase: float | None = None  # fraction (0.01 = 1 percentage point)
    max_latency_ratio: float | None = None  # ring p95 / baseline p95
    latency_floor: float = 0.020  # seconds
    significance: float = 0.05  # one-sided p-value below which an increase is real


@dataclass(frozen=True, slots=True)
class FastRollback:
    """Roll back at once when a ring's error rate over ``window`` is above this."""

    max_error_rate: float  # fraction
    min_requests: int = 20
    window: float = 5.0  # seconds


@dataclass(frozen=True, slots=True)
class Analysis:
    interval: float = 10.0
    window: float = 60.0
    baseline: str | None = None  # default: the route's default (last) ring
    failure_limit: int = 3
    rollback_to_previous: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    fast: FastRollback | None = None


@dataclass(frozen=True, slots=True)
class Progression:
    steps: tuple[Step, ...]
    min_step_duration: float = 300.0


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    timeout: float = 5.0
    retries: int = 3


@dataclass(frozen=True, slots=True)
class StateFiles:
    path: str = "ringproxy-state.json"  # relative to the working directory
    audit: str = "ringproxy-audit.jsonl"


def _percent(ctx: Ctx, sec: Section, key: str) -> float | None:
    if not sec.has(key):
        sec.seen.add(key)
        return None
    bp = sec.parsed(key, parse_weight, -1)
    return None if bp < 0 else bp / 10_000


# The defaults, read off the settings classes (the one place they are written).
_ANALYSIS = Analysis()
_THRESHOLDS = Thresholds()
_PROGRESSION = Progression(())
_WEBHOOK = Webhook("")


def read_analysis(ctx: Ctx, data: object, path: str) -> Analysis | None:
    if data is None:
        return None
    sec = Section(ctx, data, path)
    interval = sec.duration("interval", _ANALYSIS.interval, minimum=0.1)
    window = sec.duration("window", _ANALYSIS.window, minimum=1.0)
    if window > WINDOW_HORIZON:
        ctx.err(sec.sub("window"), f"{window:g}s is longer than the {WINDOW_HORIZON:g}s of "
                "history kept per ring")
        window = _ANALYSIS.window
    if window < interval:
        ctx.err(sec.sub("window"), f"{window:g}s is shorter than the interval {interval:g}s")
    thresholds = _read_thresholds(ctx, sec)
    baseline = sec.text("baseline", "") or None
    limit = sec.integer("failure_limit", _ANALYSIS.failure_limit, 1, 1000)
    fast = _read_fast(ctx, sec.raw("fast_rollback", None), sec.sub("fast_rollback"))
    result = Analysis(interval=interval, window=window, baseline=baseline, failure_limit=limit,
                      thresholds=thresholds, fast=fast)
    sec.close()
    if not any((thresholds.max_error_rate, thresholds.max_p95, thresholds.max_p99,
                thresholds.max_error_rate_increase, thresholds.max_latency_ratio)):
        ctx.err(path, "analysis needs at least one threshold (max_error_rate, max_p95, "
                "max_p99, max_error_rate_increase or max_latency_ratio)")
    return result


def _read_thresholds(ctx: Ctx, sec: Section) -> Thresholds:
    return Thresholds(
        min_requests=sec.integer("min_requests", _THRESHOLDS.min_requests, 1, 100_000_000),
        max_error_rate=_percent(ctx, sec, "max_error_rate"),
        max_p95=sec.duration("max_p95", 0.0, minimum=0.0) or None,
        max_p99=sec.duration("max_p99", 0.0, minimum=0.0) or None,
        max_error_rate_increase=_percent(ctx, sec, "max_error_rate_increase"),
        max_latency_ratio=_ratio(ctx, sec, "max_latency_ratio"),
        latency_floor=sec.duration("latency_floor", _THRESHOLDS.latency_floor, minimum=0.0),
        significance=_significance(ctx, sec),
    )


def _read_fast(ctx: Ctx, data: object, path: str) -> FastRollback | None:
    """``fast_rollback: {max_error_rate: 50, min_requests: 20, window: 5s}``."""
    if data is None:
        return None
    sec = Section(ctx, data, path)
    rate = _percent(ctx, sec, "max_error_rate")
    if rate is None and sec.ok:
        ctx.err(sec.sub("max_error_rate"), "is required")
    base = FastRollback(0.0)
    minimum = sec.integer("min_requests", base.min_requests, 1, 100_000_000)
    window = sec.duration("window", base.window, minimum=1.0)
    if window > WINDOW_HORIZON:
        ctx.err(sec.sub("window"), f"{window:g}s is longer than {WINDOW_HORIZON:g}s")
    sec.close()
    return None if rate is None else FastRollback(rate, minimum, min(window, WINDOW_HORIZON))


def _ratio(ctx: Ctx, sec: Section, key: str) -> float | None:
    value = sec.raw(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 1:
        ctx.err(sec.sub(key), f"expected a number above 1 (e.g. 1.5), got {value!r}")
        return None
    return float(value)


def _significance(ctx: Ctx, sec: Section) -> float:
    value = sec.raw("significance", _THRESHOLDS.significance)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        ctx.err(sec.sub("significance"), f"expected a p-value between 0 and 1, got {value!r}")
        return _THRESHOLDS.significance
    return float(value)


def read_rollback(ctx: Ctx, data: object, path: str) -> bool:
    """``rollback: {to: zero | previous_step}`` -> whether to go back one step only."""
    if data is None:
        return False
    sec = Section(ctx, data, path)
    to = sec.text("to", "zero")
    if to not in ("zero", "previous_step"):
        ctx.err(sec.sub("to"), f"{to!r} is not one of: zero, previous_step")
    sec.close()
    return to == "previous_step"


def read_progression(ctx: Ctx, data: object, path: str) -> Progression | None:
    if data is None:
        return None
    sec = Section(ctx, data, path)
    steps: list[Step] = []
    items = sec.items("steps")
    if sec.ok and not items:
        ctx.err(sec.sub("steps"), "list at least one step, e.g. [1, 5, 25, 50]")
    for i, item in enumerate(items):
        where = join(sec.sub("steps"), i)
        approval = False
        value: object = item
        if isinstance(item, dict):
            ssec = Section(ctx, item, where)
            value = ssec.raw("weight")
            mode = ssec.text("approval", "none")
            if mode not in ("none", "required"):
                ctx.err(ssec.sub("approval"), f"{mode!r} is not one of: none, required")
            approval = mode == "required"
            ssec.close()
        try:
            weight = parse_weight(value)
        except ValueError as exc:
            ctx.err(where, str(exc) if not isinstance(value, dict | list) else
                    f"expected a weight or {{weight, approval}}, got {kind(value)}")
            continue
        if steps and weight <= steps[-1].weight:
            ctx.err(where, f"{weight / 100:g} is not above the previous step "
                    f"{steps[-1].weight / 100:g}")
        steps.append(Step(weight, approval))
    duration = sec.duration("min_step_duration", _PROGRESSION.min_step_duration, minimum=0.0)
    sec.close()
    return Progression(tuple(steps), duration)


def read_state_files(ctx: Ctx, data: object, path: str) -> StateFiles:
    if data is None:
        return StateFiles()
    sec = Section(ctx, data, path)
    base = StateFiles()
    result = StateFiles(sec.text("path", base.path) or base.path,
                        sec.text("audit", base.audit) or base.audit)
    sec.close()
    return result


def read_webhooks(ctx: Ctx, data: object, path: str) -> tuple[Webhook, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        ctx.err(path, f"expected a list of webhooks, got {kind(data)}")
        return ()
    hooks = []
    for i, item in enumerate(data):
        where = join(path, i)
        sec = Section(ctx, item if not isinstance(item, str) else {"url": item}, where)
        url = sec.text("url")
        parts = urlsplit(url)
        if url and (parts.scheme not in ("http", "https") or not parts.hostname):
            ctx.err(sec.sub("url"), f"{url!r} is not an http(s) URL")
        hooks.append(Webhook(url, sec.duration("timeout", _WEBHOOK.timeout),
                             sec.integer("retries", _WEBHOOK.retries, 0, 20)))
        sec.close()
    return tuple(hooks)
