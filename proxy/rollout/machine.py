"""The rollout state machine: verdicts and operator actions in, new ring states and events out.

Pure: no asyncio, no I/O, no clock (``now`` is wall-clock seconds passed in).  The control
loop feeds it and applies what it returns; incidents can be replayed through it.

Phases of a ring (the whole machine is the ``TRANSITIONS`` table below: (phase, trigger)
-> target phase and the guards that must hold; ``act``, ``on_verdicts`` and
``on_fast_failure`` only produce triggers and read the table):

    steady             no progression steps: analysed, can be rolled back
    progressing        at a step, advancing after ``min_step_duration`` on evidence of health
    awaiting_approval  the next step needs an operator's approve; still analysed
    paused             an operator stopped progression; still analysed
    completed          at the last step; still analysed
    rolled_back        weight 0 (or the previous step) and its rules off; stays until an
                       operator resumes it or the ring's config changes

What a verdict (the sequential judge's, on the evidence since the ring's step began) does:

    rollback   FAILED at once: the ring, and every other non-pinned ring of the route that
               sends to the same pool, goes back (one crossing of the anytime-valid bound
               decides; its false rollback probability over the step is alpha)
    healthy    STEP_DUE once the step's minimum duration is over (its own
               ``min_duration``, else ``min_step_duration``, counted from ``step_since``:
               ``proxy.rollout.steps``): a step advances only on evidence of health,
               and, with a ``pre_advance`` hook, only once the hook passed for this step
               (``gates_open``; until then the ring is held, and still judged)
    undecided  nothing; but a ring still undecided ``max_blind`` after its step began gets
               STARVED, once per step: an ``analysis_starved`` event and the state's
               ``starved`` flag (the phase stays; a new step or a resume clears it)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from proxy.errors import RolloutConflict
from proxy.rollout.judge import Outcome, Verdict
from proxy.rollout.plan import RingPlan, RoutePlan
from proxy.rollout.state import Event, Phase, RingState, percent_text
from proxy.rollout.steps import min_duration, needs_gate


class Trigger(StrEnum):
    FAILED = "failed"  # a verdict (or the fast path) says roll back
    STEP_DUE = "step_due"  # healthy, and the step's minimum duration is over
    STARVED = "starved"  # undecided for max_blind since the step began
    PROMOTE = "promote"
    APPROVE = "approve"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"
    SET_WEIGHT = "set_weight"


ANALYSIS_TRIGGERS = frozenset({Trigger.FAILED, Trigger.STEP_DUE, Trigger.STARVED})


def initial_state(plan: RingPlan, now: float) -> RingState:
    if plan.steps:
        return RingState(Phase.PROGRESSING, plan.steps[0].weight, 0, now,
                         fingerprint=plan.fingerprint)
    return RingState(Phase.STEADY, plan.weight, None, now, fingerprint=plan.fingerprint)


def restore(plan: RoutePlan, saved: Mapping[str, RingState], now: float) -> dict[str, RingState]:
    """States for ``plan``: saved ones whose ring config did not change, fresh for the rest.

    A saved rolled-back state that cannot be matched to its ring (no fingerprint: written
    by hand or damaged; see ``unmatched``) stays rolled back, now bound to the ring's
    config: whether that config changed cannot be known, and a guess must never put users
    back on a version that was taken away.  An operator's resume brings it back.
    """
    states = {}
    for ring in plan.rings:
        old = saved.get(ring.name)
        if old is not None and old.fingerprint == ring.fingerprint:
            states[ring.name] = old
        elif old is not None and _unmatched(old):
            states[ring.name] = replace(old, fingerprint=ring.fingerprint)
        else:
            states[ring.name] = initial_state(ring, now)
    return states


def unmatched(plan: RoutePlan, saved: Mapping[str, RingState]) -> list[str]:
    """Rings of ``plan`` whose saved state ``restore`` keeps rolled back for want of a
    fingerprint (say so: the operator decides when they come back)."""
    return [ring.name for ring in plan.rings
            if (old := saved.get(ring.name)) is not None and old.fingerprint != ring.fingerprint
            and _unmatched(old)]


def _unmatched(state: RingState) -> bool:
    return not state.fingerprint and state.phase is Phase.ROLLED_BACK


# --------------------------------------------------------------------------- the table


class Goal(StrEnum):
    """A target the table cannot name as one phase: it follows from the ring's schedule."""

    NEXT_STEP = "next_step"  # progressing at the next step; completed at the last one
    NEXT_STEP_GATED = "next_step_gated"  # the same, but awaiting approval first if it needs it
    PAUSED_FROM = "paused_from"  # the phase the pause interrupted
    FIRST_STEP = "first_step"  # the rollout over: its first step, or steady without steps
    STAY = "stay"  # the phase it is in


class Guard(StrEnum):
    """What must also hold for a transition; when it does not, a conflict says which."""

    NOT_BASELINE = "not_baseline"
    HAS_STEPS = "has_steps"
    HAS_WEIGHT = "has_weight"
    WEIGHTS_FIT = "weights_fit"  # the new weight and the others' add up to at most 100 %


@dataclass(frozen=True, slots=True)
class Transition:
    target: Phase | Goal
    guards: tuple[Guard, ...] = ()


_ANALYSED = (Phase.STEADY, Phase.PROGRESSING, Phase.AWAITING_APPROVAL, Phase.PAUSED,
             Phase.COMPLETED)
_ROLL_BACK = Transition(Phase.ROLLED_BACK, (Guard.NOT_BASELINE,))
_PROMOTE = Transition(Goal.NEXT_STEP, (Guard.HAS_STEPS,))
_PAUSE = Transition(Phase.PAUSED, (Guard.NOT_BASELINE,))
_SET_WEIGHT = Transition(Phase.PAUSED, (Guard.HAS_WEIGHT, Guard.WEIGHTS_FIT))

# (phase, trigger) -> transition: the whole machine.  A pair not in the table is a conflict
# (409) for an operator action and nothing at all for analysis.
TRANSITIONS: dict[tuple[Phase, Trigger], Transition] = {
    **{(p, Trigger.FAILED): _ROLL_BACK for p in _ANALYSED},
    **{(p, Trigger.ROLLBACK): _ROLL_BACK for p in _ANALYSED},
    **{(p, Trigger.STARVED): Transition(Goal.STAY) for p in _ANALYSED},
    (Phase.PROGRESSING, Trigger.STEP_DUE): Transition(Goal.NEXT_STEP_GATED),
    (Phase.PROGRESSING, Trigger.PROMOTE): _PROMOTE,
    (Phase.AWAITING_APPROVAL, Trigger.PROMOTE): _PROMOTE,
    (Phase.PAUSED, Trigger.PROMOTE): _PROMOTE,
    (Phase.AWAITING_APPROVAL, Trigger.APPROVE): Transition(Goal.NEXT_STEP),
    **{(p, Trigger.PAUSE): _PAUSE for p in (Phase.STEADY, Phase.PROGRESSING,
                                            Phase.AWAITING_APPROVAL, Phase.COMPLETED)},
    (Phase.PAUSED, Trigger.RESUME): Transition(Goal.PAUSED_FROM),
    (Phase.ROLLED_BACK, Trigger.RESUME): Transition(Goal.FIRST_STEP),
    **{(p, Trigger.SET_WEIGHT): _SET_WEIGHT for p in (*_ANALYSED, Phase.ROLLED_BACK)},
}

_PARTICIPLE = {Trigger.ROLLBACK: "rolled back", Trigger.PAUSE: "paused",
               Trigger.FAILED: "rolled back"}


def _guard_problem(
    guard: Guard, plan: RoutePlan, states: Mapping[str, RingState], ring: RingPlan,
    trigger: Trigger, weight: int | None,
) -> str | None:
    """Why ``guard`` does not hold (a 409 message), or None when it does."""
    name = ring.name
    if guard is Guard.NOT_BASELINE and name == plan.baseline:
        return f"ring {name!r} is the baseline; it cannot be {_PARTICIPLE[trigger]}"
    if guard is Guard.HAS_STEPS and not ring.steps:
        return f"ring {name!r} has no progression steps to promote along"
    if guard is Guard.HAS_WEIGHT and ring.weight is None and not ring.steps:
        return f"ring {name!r} has rules only, no weight to set"
    if guard is Guard.WEIGHTS_FIT:
        total = sum(s.weight or 0 for n, s in states.items() if n != name) + (weight or 0)
        if total > 10_000:
            return f"weights would add up to {total / 100:g} %, above 100 %"
    return None


def _next_step(ring: RingPlan, state: RingState, gated: bool) -> Phase:
    nxt = (state.step or 0) + 1
    if nxt >= len(ring.steps):
        return Phase.COMPLETED  # already at the last step
    if gated and ring.steps[nxt].approval:
        return Phase.AWAITING_APPROVAL
    return Phase.COMPLETED if nxt == len(ring.steps) - 1 else Phase.PROGRESSING


def target(
    plan: RoutePlan, states: Mapping[str, RingState], ring: str, trigger: Trigger,
    weight: int | None = None,
) -> Phase:
    """The phase ``trigger`` takes ``ring`` to, read off the table; RolloutConflict if none."""
    ring_plan, state = plan.ring(ring), states[ring]
    rule = TRANSITIONS.get((state.phase, trigger))
    if rule is None:
        raise RolloutConflict(f"cannot {trigger.value.replace('_', ' ')} ring {ring!r}: "
                              f"it is {state.phase.value}")
    for guard in rule.guards:
        problem = _guard_problem(guard, plan, states, ring_plan, trigger, weight)
        if problem is not None:
            raise RolloutConflict(problem)
    goal = rule.target
    if isinstance(goal, Phase):
        return goal
    if goal is Goal.STAY:
        return state.phase
    if goal is Goal.PAUSED_FROM:
        return state.resume_to or Phase.PROGRESSING
    if goal is Goal.FIRST_STEP:
        return initial_state(ring_plan, 0.0).phase
    return _next_step(ring_plan, state, gated=goal is Goal.NEXT_STEP_GATED)


# --------------------------------------------------------------------------- effects

States = dict[str, RingState]


@dataclass(slots=True)
class _Ctx:
    plan: RoutePlan
    states: States
    now: float
    reason: str = ""
    label: str = "manual"
    numbers: Mapping[str, object] = field(default_factory=dict)
    actor: str = "analysis"
    weight: int | None = None
    events: list[Event] = field(default_factory=list)

    def change(self, ring: str, kind: str, new: RingState) -> None:
        old = self.states[ring]
        self.states[ring] = new
        self.events.append(Event(self.now, self.plan.route, ring, kind, old.weight, new.weight,
                                 old.phase.value, new.phase.value, self.reason, self.label,
                                 self.numbers, self.actor))


Effect = Callable[[_Ctx, RingPlan, RingState, Phase], tuple[str, RingState]]


def _rolled_back(ctx: _Ctx, ring: RingPlan, state: RingState, to: Phase) -> tuple[str, RingState]:
    weight: int | None = 0 if state.weight is not None else None
    step = state.step
    if ctx.plan.rollback_to_previous and state.step:
        step = state.step - 1
        weight = ring.steps[step].weight
    return "rollback", replace(state, phase=to, weight=weight, step=step,
                               step_since=ctx.now, resume_to=None, starved=False)


def _advanced(ctx: _Ctx, ring: RingPlan, state: RingState, to: Phase) -> tuple[str, RingState]:
    nxt = (state.step or 0) + 1
    if nxt >= len(ring.steps):
        return "completed", replace(state, phase=to, resume_to=None)
    if to is Phase.AWAITING_APPROVAL:
        return "awaiting_approval", replace(state, phase=to)
    return "advance", replace(state, phase=to, weight=ring.steps[nxt].weight, step=nxt,
                              step_since=ctx.now, resume_to=None, starved=False)


def _paused(ctx: _Ctx, ring: RingPlan, state: RingState, to: Phase) -> tuple[str, RingState]:
    return "pause", replace(state, phase=to, resume_to=state.phase)


def _resumed(ctx: _Ctx, ring: RingPlan, state: RingState, to: Phase) -> tuple[str, RingState]:
    if state.phase is Phase.ROLLED_BACK:
        # The rollout starts over: its first step, or back to the configured weight.
        return "resume", initial_state(ring, ctx.now)
    return "resume", replace(state, phase=to, resume_to=None, step_since=ctx.now,
                             starved=False)


def _weight_set(ctx: _Ctx, ring: RingPlan, state: RingState, to: Phase) -> tuple[str, RingState]:
    if state.phase is Phase.PAUSED:
        resume_to = state.resume_to
    else:
        resume_to = state.phase if state.phase is not Phase.ROLLED_BACK else Phase.STEADY
    return "set_weight", replace(state, phase=to, weight=ctx.weight, step_since=ctx.now,
                                 resume_to=resume_to, starved=False)


def _starved(ctx: _Ctx, ring: RingPlan, state: RingState, to: Phase) -> tuple[str, RingState]:
    return "analysis_starved", replace(state, phase=to, starved=True)


# What each trigger does to the ring's state; the phase it ends in is the table's.
EFFECTS: dict[Trigger, Effect] = {
    Trigger.FAILED: _rolled_back,
    Trigger.ROLLBACK: _rolled_back,
    Trigger.STEP_DUE: _advanced,
    Trigger.STARVED: _starved,
    Trigger.PROMOTE: _advanced,
    Trigger.APPROVE: _advanced,
    Trigger.PAUSE: _paused,
    Trigger.RESUME: _resumed,
    Trigger.SET_WEIGHT: _weight_set,
}


def _fire(ctx: _Ctx, ring: str, trigger: Trigger, strict: bool) -> None:
    """Apply ``trigger`` to ``ring`` as the table says; a conflict raises only if ``strict``."""
    try:
        to = target(ctx.plan, ctx.states, ring, trigger, ctx.weight)
    except RolloutConflict:
        if strict:
            raise
        return
    kind, new = EFFECTS[trigger](ctx, ctx.plan.ring(ring), ctx.states[ring], to)
    ctx.change(ring, kind, new)
    if trigger is Trigger.FAILED:
        # The failing ring's pool is suspect: every other non-pinned ring sending to it
        # goes back too (those the table refuses, the baseline and the rolled back, stay).
        pool = ctx.plan.ring(ring).pool
        for other in ctx.plan.rings:
            if other.name != ring and other.pool == pool and not other.pinned:
                _fire(ctx, other.name, Trigger.ROLLBACK, strict=False)


# --------------------------------------------------------------------------- entry points


def on_verdicts(
    plan: RoutePlan, states: Mapping[str, RingState], verdicts: Mapping[str, Verdict],
    now: float, gates_open: Collection[str] = frozenset(),
) -> tuple[States, list[Event]]:
    """One analysis round for a route (a route without analysis has none).

    ``gates_open``: the rings whose ``pre_advance`` hook passed for their current step; a
    ring that needs one and is not in it is held where it is (``waiting_for_gate``)."""
    new: States = dict(states)
    if plan.analysis is None:
        return new, []
    ctx = _Ctx(plan, new, now)
    for ring in plan.analysed:
        verdict = verdicts.get(ring.name)
        state = new[ring.name]
        if verdict is None or not state.enabled:
            continue
        gated = needs_gate(plan.analysis, ring, state)
        found = _trigger(plan.analysis.max_blind, ring, state, verdict, now,
                         held=gated and ring.name not in gates_open, gated=gated)
        if found is not None:
            trigger, ctx.reason, ctx.label = found
            ctx.numbers = verdict.numbers
            _fire(ctx, ring.name, trigger, strict=False)
    return new, ctx.events


def step_due(ring: RingPlan, state: RingState, verdict: Verdict, now: float) -> bool:
    """Healthy, the step's minimum duration over, and a phase that advances."""
    return (verdict.outcome is Outcome.HEALTHY
            and now - state.step_since >= min_duration(ring, state)
            and (state.phase, Trigger.STEP_DUE) in TRANSITIONS)


def waiting_for_gate(
    plan: RoutePlan, states: Mapping[str, RingState], verdicts: Mapping[str, Verdict],
    now: float,
) -> list[str]:
    """The rings that would advance now but for their ``pre_advance`` hook (call it)."""
    return [ring.name for ring in plan.analysed
            if (verdict := verdicts.get(ring.name)) is not None
            and states[ring.name].enabled
            and needs_gate(plan.analysis, ring, states[ring.name])
            and step_due(ring, states[ring.name], verdict, now)]


def _trigger(
    max_blind: float, ring: RingPlan, state: RingState, verdict: Verdict, now: float,
    held: bool = False, gated: bool = False,
) -> tuple[Trigger, str, str] | None:
    """What ``verdict`` fires on ``ring`` (with the event's reason and label), if anything;
    ``gated``: an advance needs the pre_advance hook, ``held``: it has not passed."""
    elapsed = now - state.step_since
    at = percent_text(state.weight)
    if verdict.outcome is Outcome.ROLLBACK:
        return Trigger.FAILED, verdict.reason, (verdict.broken or ("manual",))[0]
    if verdict.outcome is Outcome.HEALTHY:
        if not held and step_due(ring, state, verdict, now):
            gate = "; pre_advance hook passed" if gated else ""
            return (Trigger.STEP_DUE, f"healthy after {elapsed:.0f}s at {at}: "
                    f"{verdict.reason}{gate}", "progression")
        return None
    if elapsed >= max_blind and not state.starved:
        return (Trigger.STARVED, f"undecided {elapsed:.0f}s into the step at {at} (max_blind "
                f"{max_blind:g}s): {verdict.reason}", "analysis_starved")
    return None


def on_fast_failure(
    plan: RoutePlan, states: Mapping[str, RingState], ring: str, verdict: Verdict, now: float
) -> tuple[States, list[Event]]:
    """The fast path: roll back at once, without waiting for the next analysis round."""
    new: States = dict(states)
    ctx = _Ctx(plan, new, now, f"fast rollback: {verdict.reason}",
               (verdict.broken or ("fast_error_rate",))[0], verdict.numbers)
    _fire(ctx, ring, Trigger.FAILED, strict=False)
    return new, ctx.events


def act(
    plan: RoutePlan,
    states: Mapping[str, RingState],
    ring: str,
    trigger: Trigger,
    now: float,
    reason: str = "",
    weight: int | None = None,
    actor: str = "operator",
) -> tuple[States, list[Event]]:
    """An operator's action on one ring; RolloutConflict when it does not apply."""
    if trigger in ANALYSIS_TRIGGERS:
        raise ValueError(f"{trigger.value} comes from analysis, not an operator")
    if ring not in states or not any(r.name == ring for r in plan.rings):
        raise RolloutConflict(f"route {plan.route!r} has no ring {ring!r}")
    if trigger is Trigger.SET_WEIGHT and (weight is None or not 0 <= weight <= 10_000):
        raise RolloutConflict(f"weight {weight!r} is not a percentage from 0 to 100")
    new: States = dict(states)
    ctx = _Ctx(plan, new, now, reason or f"{trigger.value} by {actor}", "manual", {}, actor,
               weight)
    _fire(ctx, ring, trigger, strict=True)
    return new, ctx.events


__all__ = [
    "ANALYSIS_TRIGGERS",
    "EFFECTS",
    "TRANSITIONS",
    "Event",
    "Goal",
    "Guard",
    "Phase",
    "RingPlan",
    "RingState",
    "RoutePlan",
    "Transition",
    "Trigger",
    "act",
    "initial_state",
    "on_fast_failure",
    "on_verdicts",
    "restore",
    "step_due",
    "target",
    "waiting_for_gate",
]
