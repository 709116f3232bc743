"""The admin API's JSON views of routes and rings, as typed records.

Built from typed sources only (the routing table, the ring runtimes, the controller's plans,
states and verdicts, the metrics windows), so every field has one precise type; the CLI
reads the same shapes back (``proxy.admin.client``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict


if TYPE_CHECKING:
    from proxy.control.controller import Controller
    from proxy.metrics import Metrics
    from proxy.routing.assign import CompiledRoute
    from proxy.runtime import RingRuntime


TRAFFIC_WINDOW = 60.0  # seconds of recent traffic a ring view shows

class TrafficView(TypedDict):
    window_seconds: float
    requests: int
    errors: int
    error_rate: float
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None


class VerdictView(TypedDict):
    outcome: str
    reason: str
    numbers: dict[str, float | int | None]


class RingView(TypedDict):
    name: str
    pool: str
    servers: list[str]
    rules: list[str]
    default: bool
    weight: float | None
    range: tuple[int, int] | None
    phase: str | None
    step: int | None
    steps: list[float]
    seconds_in_step: float | None
    failures: int | None
    baseline: bool
    pinned: bool
    verdict: VerdictView | None
    inflight: int
    traffic: TrafficView | None


class AnalysisView(TypedDict):
    interval: float
    window: float
    baseline: str | None
    alpha: float


class RouteView(TypedDict):
    name: str
    hosts: list[str]
    path_prefix: str
    analysis: AnalysisView | None
    rings: list[RingView]


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


def ring_views(
    compiled: CompiledRoute,
    ring_runtimes: Sequence[RingRuntime],
    controller: Controller,
    metrics: Metrics,
    now: float,
    wall: float,
) -> list[RingView]:
    """Every ring of a route: config, live weight and range, rollout state, last verdict,
    traffic.  ``now`` is on the metrics' clock (monotonic), ``wall`` the Unix time."""
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
            "rules": [" and ".join(r.describe() for r in group) for group in ring.rules],
            "default": ring is compiled.route.rings[-1],
            "weight": ring_rt.weight,
            "range": compiled.range_of(ring.name),
            "phase": state.phase.value if state else None,
            "step": state.step if state else None,
            "steps": [s.weight / 100 for s in ring_plan.steps] if ring_plan else [],
            "seconds_in_step": round(wall - state.step_since, 1) if state else None,
            "failures": state.failures if state else None,
            "baseline": plan is not None and ring_plan is not None
            and ring.name == plan.baseline,
            "pinned": ring.pinned,
            "verdict": None if verdict is None else {
                "outcome": verdict.outcome.value, "reason": verdict.reason,
                "numbers": verdict.numbers,
            },
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
        "analysis": None if route.analysis is None else {
            "interval": route.analysis.interval,
            "window": TRAFFIC_WINDOW,
            "baseline": plan.baseline if plan else None,
            "alpha": route.analysis.criteria.alpha,
        },
        "rings": ring_views(compiled, ring_runtimes, controller, metrics, now, wall),
    }
