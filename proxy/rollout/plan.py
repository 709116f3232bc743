"""A route's rollout plan, read off the config: what the state machine needs of it.  Pure.

The plan holds the config's own settings objects (``Analysis``, ``Progression``), never
copies of their fields, so every default is written once, on the settings class.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from proxy.config import Config, Route
from proxy.config.analysis import Analysis
from proxy.config.checks import RingHealthCheck
from proxy.config.rollout import Progression, Step


@dataclass(frozen=True, slots=True)
class RingPlan:
    """What the config says about one ring's rollout."""

    name: str
    pool: str
    weight: int | None  # configured basis points; None: rule-only ring
    progression: Progression | None = None
    pinned: bool = False
    fingerprint: str = ""  # changes when pool, servers, rules, weight or steps change
    health_checks: tuple[RingHealthCheck, ...] = ()  # custom checks of its version

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.progression.steps if self.progression is not None else ()


@dataclass(frozen=True, slots=True)
class RoutePlan:
    route: str
    rings: tuple[RingPlan, ...]
    baseline: str  # the ring others are compared with (never rolled back)
    analysis: Analysis | None = None  # None: the route is never analysed

    def ring(self, name: str) -> RingPlan:
        for r in self.rings:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def analysed(self) -> tuple[RingPlan, ...]:
        return tuple(r for r in self.rings if r.name != self.baseline)

    @property
    def rollback_to_previous(self) -> bool:
        return self.analysis is not None and self.analysis.rollback_to_previous


def fingerprint(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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
            progression=ring.progression,
            pinned=ring.pinned,
            # A new pool, new servers (a new version), new rules or a new schedule (its
            # weights and approvals) start the ring's rollout over; anything else, a
            # step's duration and limits too, keeps its live state.
            fingerprint=fingerprint(ring.pool, [s.url for s in pool.servers], ring.rules,
                                    ring.weight, [s.criteria_key for s in steps],
                                    ring.pinned),
            health_checks=ring.health_checks,
        ))
    analysis = route.analysis
    baseline = (analysis.baseline if analysis and analysis.baseline else route.rings[-1].name)
    return RoutePlan(route.name, tuple(rings), baseline, analysis)
