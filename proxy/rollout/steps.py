"""What a ring must show at its current step: the step's own duration, limits and checks.

Pure: no asyncio, no clock, no I/O.

A progression step may tighten the route's analysis (``proxy.config.rollout.Step``):

* ``min_duration`` replaces ``min_step_duration`` for the step.  It counts from the
  step's start, ``RingState.step_since``, which the state file keeps: a restart, however
  long, never resets a 72 h step (evidence starts again after a restart, the time in the
  step does not).
* ``max_error_rate`` and ``max_pXX`` are absolute limits for the step.  They become the
  judge's own absolute checks (``Criteria.max_error_rate`` and ``max_latency``), so they
  are judged by the same anytime-valid standard as the rest of the verdict
  (``proxy.rollout.judge``, on ``proxy.rollout.sequential``): the check is *within* only
  when the confidence sequence's upper bound on the ring's error rate (or on its share of
  requests slower than the limit) is inside the limit, *worse* (a rollback) when its lower
  bound is above it, undecided in between; a step advances only when every check is
  within.  Where the route sets the same limit, the stricter of the two holds (a step
  tightens, never loosens).  The checks then share the route's ``alpha`` with the others
  (``judge.alpha_shares``: fixed by the config of the step, never by the data; the
  evidence starts at the step's start, so each step is a test of its own).
* ``checks`` names the ``analysis.checks`` that apply at this step; a check that no step
  names applies at every step (and to rings without steps).
"""

from __future__ import annotations

from dataclasses import replace

from proxy.config.analysis import AbsoluteLatency, Analysis, Criteria
from proxy.config.checks import ExternalCheck
from proxy.config.rollout import Step
from proxy.rollout.plan import RingPlan
from proxy.rollout.state import RingState


def step_of(ring: RingPlan, state: RingState) -> Step | None:
    """The step ``ring`` is at (None: no schedule, or a step the plan does not have)."""
    if state.step is None or not 0 <= state.step < len(ring.steps):
        return None
    return ring.steps[state.step]


def min_duration(ring: RingPlan, state: RingState) -> float:
    """The least time at the ring's current step before it may advance (seconds)."""
    if ring.progression is None:
        return float("inf")  # a ring without a schedule never has a step due
    step = step_of(ring, state)
    if step is not None and step.min_duration is not None:
        return step.min_duration
    return ring.progression.min_step_duration


def _stricter(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def criteria_at(criteria: Criteria, step: Step | None) -> Criteria:
    """The route's criteria with the step's absolute limits added (the stricter wins)."""
    if step is None or (step.max_error_rate is None and not step.max_latency):
        return criteria
    limits = {a.quantile: a.seconds for a in criteria.max_latency}
    for extra in step.max_latency:
        limits[extra.quantile] = min(limits.get(extra.quantile, extra.seconds), extra.seconds)
    return replace(
        criteria,
        max_error_rate=_stricter(criteria.max_error_rate, step.max_error_rate),
        max_latency=tuple(AbsoluteLatency(q, s) for q, s in sorted(limits.items())),
    )


def ring_criteria(analysis: Analysis, ring: RingPlan, state: RingState) -> Criteria:
    """What the judge holds ``ring`` to now."""
    return criteria_at(analysis.criteria, step_of(ring, state))


def scoped(analysis: Analysis, ring: RingPlan) -> frozenset[str]:
    """The checks some step of ``ring`` names (they apply only at those steps)."""
    return frozenset(name for step in ring.steps for name in step.checks)


def active_checks(
    analysis: Analysis, ring: RingPlan, state: RingState
) -> tuple[ExternalCheck, ...]:
    """The ``analysis.checks`` that apply to ``ring`` at its current step."""
    named = scoped(analysis, ring)
    step = step_of(ring, state)
    here = set(step.checks) if step is not None else set()
    return tuple(c for c in analysis.checks if c.name not in named or c.name in here)


def needs_gate(analysis: Analysis | None, ring: RingPlan, state: RingState) -> bool:
    """Whether an advance of ``ring`` from its step waits for the ``pre_advance`` hook:
    when there is one and a next step to move to (completing the last step is no step)."""
    return (analysis is not None and analysis.pre_advance is not None
            and state.step is not None and state.step + 1 < len(ring.steps))
