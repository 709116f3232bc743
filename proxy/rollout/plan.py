"""A route's rollout plan, read off the config: what the state machine needs of it.  Pure."""

from __future__ import annotations

from proxy.config import Config, Route
from proxy.config.rollout import Thresholds
from proxy.rollout.machine import RingPlan, RoutePlan, fingerprint


def build_plan(config: Config, route: Route) -> RoutePlan:
    pools = {p.name: p for p in config.pools}
    rings = []
    for ring in route.rings:
        steps = ring.progression.steps if ring.progression else ()
        pool = pools[ring.pool]
        rings.append(RingPlan(
            name=ring.name,
            pool=ring.pool,
            weight=ring.weight,
            steps=steps,
            min_step_duration=ring.progression.min_step_duration if ring.progression else 0.0,
            pinned=ring.pinned,
            # A new pool, new servers (a new version), new rules or a new schedule start
            # the ring's rollout over; anything else keeps its live state.
            fingerprint=fingerprint(ring.pool, [s.url for s in pool.servers], ring.rules,
                                    ring.weight, steps, ring.pinned),
        ))
    analysis = route.analysis
    baseline = (analysis.baseline if analysis and analysis.baseline else route.rings[-1].name)
    return RoutePlan(
        route=route.name,
        rings=tuple(rings),
        baseline=baseline,
        thresholds=analysis.thresholds if analysis else Thresholds(),
        failure_limit=analysis.failure_limit if analysis else 3,
        rollback_to_previous=analysis.rollback_to_previous if analysis else False,
        interval=analysis.interval if analysis else 0.0,
        window=analysis.window if analysis else 60.0,
        fast=analysis.fast if analysis else None,
    )
