"""The admin API's JSON views of routes and rings, as typed records.

Built from typed sources only (the routing table, the ring runtimes, the controller's plans,
states and verdicts, the metrics windows), so every field has one precise type; the CLI
and the status page read the same shapes back (``proxy.admin.client``, ``status.html``).

A ring's ``verdict`` carries the judge's evidence as it decided: per check the finding,
the estimate and its anytime-valid bounds, the tolerance, the p-value against the check's
share of ``alpha``, the progress toward a rollback (0..1), the progress toward an advance
(``advance_progress``, 0..1) and the counts.  Floats that are
not finite are written as null (JSON has no infinity).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, TypedDict

from proxy.checks.results import Result, is_external
from proxy.config.analysis import Analysis, quantile_name
from proxy.config.checks import shown_url
from proxy.config.rollout import Step
from proxy.health.monitor import ServerView
from proxy.rollout.judge import Check, Finding, Outcome, Verdict
from proxy.rollout.steps import min_duration

if TYPE_CHECKING:
    from proxy.control.controller import Controller
    from proxy.metrics import Metrics
    from proxy.routing.assign import CompiledRoute
    from proxy.runtime import RingRuntime


TRAFFIC_WINDOW = 60.0  # seconds of recent traffic a ring view shows

# The checks whose counts are the ring's errors among its judged requests since its step
# began (the fast path's counts are of its last seconds only).
_ERROR_CHECKS = ("error_rate_increase", "error_rate")
FAST_CHECK = "fast_error_rate"  # judge_fast's one check

Scalar = float | int | str | None
FindingName = Literal["worse", "within", "undecided"]
OutcomeName = Literal["rollback", "healthy", "undecided"]
_FINDINGS: dict[Finding, FindingName] = {
    Finding.WORSE: "worse", Finding.WITHIN: "within", Finding.UNDECIDED: "undecided"}


class TrafficView(TypedDict):
    window_seconds: float
    requests: int
    errors: int
    error_rate: float
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None


class CheckView(TypedDict):
    """One check of a verdict: ``Check.as_dict()``, with non-finite floats as null."""

    name: str
    finding: FindingName
    estimate: float | None
    lower: float | None
    upper: float | None
    limit: float | None
    p_value: float | None
    alpha: float | None
    progress: float  # 0 no evidence against the ring .. 1 rolled back
    advance: float  # 0 no evidence of health .. 1 within tolerance (see advance_progress)
    detail: str
    numbers: dict[str, Scalar]


class VerdictView(TypedDict):
    outcome: OutcomeName
    reason: str
    note: str
    requests: int
    baseline_requests: int
    checks: list[CheckView]


class EvidenceView(TypedDict):
    """The counts the verdict judged: the ring's since its step began, and its baseline's
    over the same time (errors: None when no error check counted them)."""

    requests: int
    errors: int | None
    baseline_requests: int
    baseline_errors: int | None


class PoolHealthView(TypedDict):
    """The ring's pool's servers as its health keeping sees them."""

    checks: bool  # active health checks configured
    outlier: bool  # passive outlier ejection on
    retries: bool
    available: int  # servers in rotation
    one_host: str | None  # the one server out while all the others are in (its URL)
    servers: list[ServerView]


class ExternalResultView(TypedDict):
    """The latest result of an external check (``proxy.checks.results.Result``)."""

    name: str
    kind: str  # prometheus | webhook | health
    status: str  # pass | fail | no_data | pending
    value: float | None
    bound: str
    limit: float | None
    on_fail: str
    detail: str
    at: float
    failures: int
    threshold: int


class StepView(TypedDict):
    """A progression step and what a ring must show at it."""

    weight: float
    approval: bool
    min_duration: float | None  # None: the progression's min_step_duration
    max_error_rate: float | None
    max_latency: dict[str, float]  # quantile name -> seconds
    checks: list[str]


class ExternalCheckView(TypedDict):
    """An ``analysis.checks`` entry as configured (header values never shown)."""

    name: str
    kind: str
    url: str
    query: str | None
    bound: str
    on_fail: str
    interval: float
    threshold: int


class RingView(TypedDict):
    name: str
    pool: str
    servers: list[str]
    health: PoolHealthView
    rules: list[str]
    default: bool
    weight: float | None
    range: tuple[int, int] | None
    phase: str | None
    step: int | None
    steps: list[float]
    seconds_in_step: float | None
    min_step_duration: float | None  # seconds the current step lasts at least (None: no steps)
    step_criteria: list[StepView]
    health_checks: list[str]  # the ring's custom health checks, by name
    external_checks: list[ExternalResultView]  # every latest result, step-scoped or not
    baseline: bool
    pinned: bool
    starved: bool  # undecided for the route's max_blind: an analysis_starved alarm
    verdict: VerdictView | None
    evidence: EvidenceView | None
    inflight: int
    traffic: TrafficView | None


class ConfiguredCheck(TypedDict):
    """A check the route's analysis runs, as configured."""

    name: str
    kind: Literal["error_rate_increase", "error_rate", "latency", "max_latency"]
    quantile: float | None
    limit: float  # points as a fraction, a rate, a ratio, or seconds (by kind)
    text: str


class FastView(TypedDict):
    max_error_rate: float
    min_requests: int
    window: float


class AnalysisView(TypedDict):
    interval: float
    baseline: str | None
    alpha: float
    max_blind: float
    min_requests: int
    latency_floor: float
    error_statuses: str
    checks: list[ConfiguredCheck]
    fast_rollback: FastView | None
    external: list[ExternalCheckView]
    pre_advance: str | None  # the hook's URL
    post_rollback: str | None


class RouteView(TypedDict):
    name: str
    hosts: list[str]
    path_prefix: str
    analysis: AnalysisView | None
    rings: list[RingView]


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _scalar(x: Scalar) -> Scalar:
    return _finite(x) if isinstance(x, float) else x


def advance_progress(check: Check) -> float:
    """How far a check is toward *within* (its part of an advance): 0 none, 1 there.

    A check is within once its upper bound reaches the limit.  The bound's distance to the
    estimate shrinks about as 1 / sqrt(requests), so ``((limit - estimate) / (upper -
    estimate))**2`` is roughly the share of the requests it needs that the check has seen,
    at the current estimate: 0 when the estimate itself is at or past the limit (more
    traffic alone will not get it there) or unknown.
    """
    if check.finding is Finding.WITHIN:
        return 1.0
    if is_external(check):
        return 0.0  # no bound to close in on: it passes or it does not
    estimate, upper, limit = check.estimate, check.upper, check.limit
    if check.finding is Finding.WORSE or estimate is None or not (
            math.isfinite(estimate) and math.isfinite(upper) and math.isfinite(limit)):
        return 0.0
    need, width = limit - estimate, upper - estimate
    if need <= 0:
        return 0.0
    if width <= need:
        return 1.0
    return min(1.0, (need / width) ** 2)


def check_view(check: Check) -> CheckView:
    """``check.as_dict()``, typed (the same keys and values, non-finite floats as null),
    and ``advance``."""
    return {
        "name": check.name,
        "finding": _FINDINGS[check.finding],
        "estimate": _finite(check.estimate),
        "lower": _finite(check.lower),
        "upper": _finite(check.upper),
        "limit": _finite(check.limit),
        "p_value": _finite(check.p_value),
        "alpha": _finite(check.alpha),
        "progress": round(check.progress, 4),
        "advance": round(advance_progress(check), 4),
        "detail": check.detail,
        "numbers": {k: _scalar(v) for k, v in check.numbers.items()},
    }


_OUTCOMES: dict[Outcome, OutcomeName] = {
    Outcome.ROLLBACK: "rollback", Outcome.HEALTHY: "healthy", Outcome.UNDECIDED: "undecided"}


def verdict_view(verdict: Verdict) -> VerdictView:
    return {
        "outcome": _OUTCOMES[verdict.outcome],
        "reason": verdict.reason,
        "note": verdict.note,
        "requests": verdict.requests,
        "baseline_requests": verdict.baseline_requests,
        "checks": [check_view(c) for c in verdict.checks],
    }


def _count(numbers: Mapping[str, Scalar], key: str) -> int | None:
    value = numbers.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def evidence_view(verdict: Verdict) -> EvidenceView | None:
    """The counts since the step began; None for a fast-path verdict (its counts are of its
    last seconds only) or one without checks."""
    if not any(c.name != FAST_CHECK for c in verdict.checks):
        return None
    errors = base_errors = None
    for check in verdict.checks:
        if check.name in _ERROR_CHECKS and _count(check.numbers, "requests") == verdict.requests:
            if errors is None:
                errors = _count(check.numbers, "errors")
            if base_errors is None:
                base_errors = _count(check.numbers, "baseline_errors")
    return {"requests": verdict.requests, "errors": errors,
            "baseline_requests": verdict.baseline_requests, "baseline_errors": base_errors}


def error_statuses_text(codes: frozenset[int]) -> str:
    """``frozenset(500..599) | {429}`` -> ``"5xx, 429"``: whole classes, then single codes."""
    classes = [c for c in (4, 5) if set(range(c * 100, c * 100 + 100)) <= codes]
    covered = {code for c in classes for code in range(c * 100, c * 100 + 100)}
    singles = sorted(codes - covered)
    return ", ".join([f"{c}xx" for c in reversed(classes)] + [str(s) for s in singles]) \
        or "none"


def _points(x: float) -> str:
    return f"{x * 100:g}"


def configured_checks(analysis: Analysis) -> list[ConfiguredCheck]:
    """The checks the judge runs for this analysis, in the judge's order."""
    c = analysis.criteria
    out: list[ConfiguredCheck] = []
    if c.max_error_rate_increase is not None:
        out.append({"name": "error_rate_increase", "kind": "error_rate_increase",
                    "quantile": None, "limit": c.max_error_rate_increase,
                    "text": f"error rate at most {_points(c.max_error_rate_increase)} "
                            "points above the baseline's"})
    if c.max_error_rate is not None:
        out.append({"name": "error_rate", "kind": "error_rate", "quantile": None,
                    "limit": c.max_error_rate,
                    "text": f"error rate at most {_points(c.max_error_rate)}%"})
    for limit in c.latency:
        out.append({"name": limit.name, "kind": "latency", "quantile": limit.quantile,
                    "limit": limit.ratio,
                    "text": f"{limit.name} at most {limit.ratio:g}x the baseline's "
                            f"(and {c.latency_floor * 1000:g} ms above it)"})
    for absolute in c.max_latency:
        out.append({"name": absolute.name, "kind": "max_latency",
                    "quantile": absolute.quantile, "limit": absolute.seconds,
                    "text": f"{quantile_name(absolute.quantile)} at most "
                            f"{absolute.seconds * 1000:g} ms"})
    return out


def analysis_view(analysis: Analysis, baseline: str | None) -> AnalysisView:
    fast = analysis.fast
    return {
        "interval": analysis.interval,
        "baseline": baseline,
        "alpha": analysis.criteria.alpha,
        "max_blind": analysis.max_blind,
        "min_requests": analysis.criteria.min_requests,
        "latency_floor": analysis.criteria.latency_floor,
        "error_statuses": error_statuses_text(analysis.error_statuses),
        "checks": configured_checks(analysis),
        "fast_rollback": None if fast is None else {
            "max_error_rate": fast.max_error_rate, "min_requests": fast.min_requests,
            "window": fast.window},
        "external": [{
            "name": c.name, "kind": c.kind,
            # scheme://host[:port] only: a URL's path or query may hold its secret.
            "url": shown_url(c.prometheus.url if c.prometheus else
                             c.webhook.url if c.webhook else ""),
            "query": c.prometheus.query if c.prometheus else None, "bound": c.bound_text,
            "on_fail": c.on_fail.value, "interval": c.interval, "threshold": c.threshold,
        } for c in analysis.checks],
        "pre_advance": shown_url(analysis.pre_advance.url) if analysis.pre_advance else None,
        "post_rollback": (shown_url(analysis.post_rollback.url) if analysis.post_rollback
                          else None),
    }


def step_view(step: Step) -> StepView:
    return {"weight": step.weight / 100, "approval": step.approval,
            "min_duration": step.min_duration, "max_error_rate": step.max_error_rate,
            "max_latency": {quantile_name(a.quantile): a.seconds for a in step.max_latency},
            "checks": list(step.checks)}


def external_view(result: Result) -> ExternalResultView:
    return {"name": result.name, "kind": result.kind, "status": result.status.value,
            "value": _finite(result.value), "bound": result.bound,
            "limit": _finite(result.limit), "on_fail": result.on_fail.value,
            "detail": result.detail, "at": result.at, "failures": result.failures,
            "threshold": result.threshold}


def traffic_view(metrics: Metrics, route: str, ring: str, now: float,
                 window: float) -> TrafficView | None:
    """The ring's last ``window`` seconds; None for a ring the metrics do not know (yet)."""
    try:
        summary = metrics.window(route, ring, now, window)
    except KeyError:
        return None
    return {
        "window_seconds": window,
        "requests": summary.requests,
        "errors": summary.errors,
        "error_rate": summary.error_rate,
        "rps": summary.requests / window,
        "p50": summary.p50,
        "p95": summary.p95,
        "p99": summary.p99,
    }


def pool_health_view(ring: RingRuntime) -> PoolHealthView:
    pool = ring.pool
    servers = pool.health.view()
    up = [s for s in servers if s["up"]]
    out = [s["url"] for s in servers if not s["up"]]
    return {
        "checks": pool.config.health is not None,
        "outlier": pool.config.outlier is not None,
        "retries": pool.config.retries is not None,
        "available": len(up),
        "one_host": out[0] if len(out) == 1 and len(servers) > 1 else None,
        "servers": servers,
    }


def ring_views(
    compiled: CompiledRoute,
    ring_runtimes: Sequence[RingRuntime],
    controller: Controller,
    metrics: Metrics,
    now: float,
    wall: float,
) -> list[RingView]:
    """Every ring of a route: config, live weight and range, rollout state, last verdict
    with its evidence, traffic.  ``now`` is on the metrics' clock (monotonic), ``wall``
    the Unix time."""
    route = compiled.route.name
    plan = controller.plans.get(route)
    states = controller.states.get(route, {})
    verdicts = controller.verdicts.get(route, {})
    window = TRAFFIC_WINDOW
    plans = {r.name: r for r in plan.rings} if plan else {}
    rings: list[RingView] = []
    for ring_rt, ring in zip(ring_runtimes, compiled.route.rings, strict=True):
        state = states.get(ring.name)
        ring_plan = plans.get(ring.name)
        verdict = verdicts.get(ring.name)
        rings.append({
            "name": ring.name,
            "pool": ring.pool,
            "servers": [s.url for s in ring_rt.pool.config.servers],
            "health": pool_health_view(ring_rt),
            "rules": [" and ".join(r.describe() for r in group) for group in ring.rules],
            "default": ring is compiled.route.rings[-1],
            "weight": ring_rt.weight,
            "range": compiled.range_of(ring.name),
            "phase": state.phase.value if state else None,
            "step": state.step if state else None,
            "steps": [s.weight / 100 for s in ring_plan.steps] if ring_plan else [],
            "seconds_in_step": round(wall - state.step_since, 1) if state else None,
            "min_step_duration": min_duration(ring_plan, state)
            if ring_plan and ring_plan.progression and state else None,
            "step_criteria": [step_view(s) for s in ring_plan.steps] if ring_plan else [],
            "health_checks": [h.name for h in ring.health_checks],
            "external_checks": [external_view(r)
                                for r in controller.checks.shown(route, ring.name)],
            "baseline": plan is not None and ring_plan is not None
            and ring.name == plan.baseline,
            "pinned": ring.pinned,
            "starved": state.starved if state else False,
            "verdict": None if verdict is None else verdict_view(verdict),
            "evidence": None if verdict is None else evidence_view(verdict),
            "inflight": ring_rt.inflight,
            "traffic": traffic_view(metrics, route, ring.name, now, window),
        })
    return rings


def route_view(
    compiled: CompiledRoute,
    ring_runtimes: Sequence[RingRuntime],
    controller: Controller,
    metrics: Metrics,
    now: float,
    wall: float,
) -> RouteView:
    route = compiled.route
    plan = controller.plans.get(route.name)
    return {
        "name": route.name,
        "hosts": list(route.hosts),
        "path_prefix": route.path_prefix,
        "analysis": None if route.analysis is None else analysis_view(
            route.analysis, plan.baseline if plan else None),
        "rings": ring_views(compiled, ring_runtimes, controller, metrics, now, wall),
    }
