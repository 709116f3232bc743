"""The rollout state machine: verdicts and operator actions in, new ring states and events out.

Pure: no asyncio, no I/O, no clock (``now`` is wall-clock seconds passed in).  The control
loop feeds it and applies what it returns; incidents can be replayed through it.

Phases of a ring (the whole machine is the ``TRANSITIONS`` table below):

    steady             no progression steps: analysed, can be rolled back
    progressing        at a step, advancing after ``min_step_duration`` of passing verdicts
    awaiting_approval  the next step needs an operator's approve; still analysed
    paused             an operator stopped progression; still analysed
    completed          at the last step; still analysed
    rolled_back        weight 0 (or the previous step) and its rules off; stays until an
                       operator resumes it or the ring's config changes

``failure_limit`` consecutive failing verdicts roll back the ring and every other
non-pinned ring of the route that sends to the same pool.  Not-enough-data never advances
and never rolls back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from proxy.config.rollout import Step, Thresholds
from proxy.errors import RolloutConflict
from proxy.rollout.judge import Outcome, Verdict


class Phase(StrEnum):
    STEADY = "steady"
    PROGRESSING = "progressing"
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"


class Trigger(StrEnum):
    FAILED = "failed"  # failure_limit consecutive failing verdicts
    STEP_DUE = "step_due"  # passing, and the step's minimum duration is over
    PROMOTE = "promote"
    APPROVE = "approve"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"
    SET_WEIGHT = "set_weight"



@dataclass(frozen=True, slots=True)
class RingPlan:
    """What the config says about one ring's rollout."""

    name: str
    pool: str
    weight: int | None  # configured basis points; None: rule-only ring
    steps: tuple[Step, ...] = ()
    min_step_duration: float = 300.0
    pinned: bool = False
    fingerprint: str = ""  # changes when pool, servers, rules, weight or steps change


@dataclass(frozen=True, slots=True)
class RoutePlan:
    route: str
    rings: tuple[RingPlan, ...]
    baseline: str  # the ring others are compared with (never rolled back)
    thresholds: Thresholds = field(default_factory=Thresholds)
    failure_limit: int = 3
    rollback_to_previous: bool = False
    interval: float = 10.0
    window: float = 60.0
    # Fast path: (max error rate, min requests, window seconds), checked every few 100 ms.
    fast: tuple[float, int, float] | None = None

    def ring(self, name: str) -> RingPlan:
        for r in self.rings:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def analysed(self) -> tuple[RingPlan, ...]:
        return tuple(r for r in self.rings if r.name != self.baseline)


@dataclass(frozen=True, slots=True)
class RingState:
    phase: Phase
    weight: int | None  # live basis points (None: rule-only ring)
    step: int | None = None  # index into the plan's steps
    step_since: float = 0.0  # wall-clock start of the current step
    failures: int = 0  # consecutive failing verdicts
    resume_to: Phase | None = None  # the phase a pause returns to
    fingerprint: str = ""

    @property
    def enabled(self) -> bool:
        return self.phase is not Phase.ROLLED_BACK

    def as_dict(self) -> dict[str, object]:
        return {
            "phase": self.phase.value,
            "weight": self.weight,
            "step": self.step,
            "step_since": self.step_since,
            "failures": self.failures,
            "resume_to": self.resume_to.value if self.resume_to else None,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RingState:
        resume = data.get("resume_to")
        weight = data.get("weight")
        step = data.get("step")
        return cls(
            phase=Phase(str(data["phase"])),
            weight=int(weight) if isinstance(weight, int) else None,
            step=int(step) if isinstance(step, int) else None,
            step_since=float(data.get("step_since", 0.0)),  # type: ignore[arg-type]
            failures=int(data.get("failures", 0)),  # type: ignore[call-overload]
            resume_to=Phase(str(resume)) if resume else None,
            fingerprint=str(data.get("fingerprint", "")),
        )


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    route: str
    ring: str
    # rollback | advance | awaiting_approval | completed | pause | resume | set_weight
    kind: str
    from_weight: int | None
    to_weight: int | None
    from_phase: str
    phase: str
    reason: str
    label: str = "manual"  # bounded reason for metrics: a threshold name or "manual"
    numbers: Mapping[str, object] = field(default_factory=dict)
    actor: str = "analysis"

    def as_dict(self) -> dict[str, object]:
        def pct(bp: int | None) -> float | None:
            return None if bp is None else bp / 100

        return {
            "time": self.time,
            "route": self.route,
            "ring": self.ring,
            "kind": self.kind,
            "from_weight": pct(self.from_weight),
            "to_weight": pct(self.to_weight),
            "from_phase": self.from_phase,
            "phase": self.phase,
            "reason": self.reason,
            "actor": self.actor,
            "numbers": dict(self.numbers),
        }

    @property
    def text(self) -> str:
        """One human sentence, for chat webhooks."""
        moved = ""
        if self.from_weight != self.to_weight:
            moved = f" {_pct(self.from_weight)} -> {_pct(self.to_weight)}"
        why = f": {self.reason}" if self.reason else ""
        return f"ringproxy {self.route}/{self.ring} {self.kind}{moved} ({self.phase}){why}"


def _pct(bp: int | None) -> str:
    return "-" if bp is None else f"{bp / 100:g}%"


def fingerprint(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def initial_state(plan: RingPlan, now: float) -> RingState:
    if plan.steps:
        return RingState(Phase.PROGRESSING, plan.steps[0].weight, 0, now, 0, None,
                         plan.fingerprint)
    return RingState(Phase.STEADY, plan.weight, None, now, 0, None, plan.fingerprint)


def restore(plan: RoutePlan, saved: Mapping[str, RingState], now: float) -> dict[str, RingState]:
    """States for ``plan``: saved ones whose ring config did not change, fresh for the rest."""
    states = {}
    for ring in plan.rings:
        old = saved.get(ring.name)
        if old is not None and old.fingerprint == ring.fingerprint:
            states[ring.name] = old
        else:
            states[ring.name] = initial_state(ring, now)
    return states


# --------------------------------------------------------------------------- transitions

States = dict[str, RingState]
Handler = Callable[["_Ctx"], None]


@dataclass(slots=True)
class _Ctx:
    plan: RoutePlan
    states: States
    ring: RingPlan
    now: float
    reason: str = ""
    label: str = "manual"
    numbers: Mapping[str, object] = field(default_factory=dict)
    actor: str = "analysis"
    weight: int | None = None
    events: list[Event] = field(default_factory=list)

    @property
    def state(self) -> RingState:
        return self.states[self.ring.name]

    def change(self, ring: str, kind: str, new: RingState) -> None:
        old = self.states[ring]
        self.states[ring] = new
        self.events.append(Event(self.now, self.plan.route, ring, kind, old.weight, new.weight,
                                 old.phase.value, new.phase.value, self.reason, self.label,
                                 self.numbers, self.actor))


def _roll_back(ctx: _Ctx) -> None:
    """The ring, and (for analysis) every other non-pinned ring on the same pool."""
    targets = [ctx.ring]
    if ctx.actor == "analysis":
        targets += [r for r in ctx.plan.rings
                    if r is not ctx.ring and r.pool == ctx.ring.pool and not r.pinned
                    and r.name != ctx.plan.baseline]
    for plan in targets:
        state = ctx.states[plan.name]
        if state.phase is Phase.ROLLED_BACK:
            continue
        weight: int | None = 0 if state.weight is not None else None
        step = state.step
        if ctx.plan.rollback_to_previous and state.step:
            step = state.step - 1
            weight = plan.steps[step].weight
        ctx.change(plan.name, "rollback", replace(
            state, phase=Phase.ROLLED_BACK, weight=weight, step=step, failures=0,
            step_since=ctx.now, resume_to=None))


def _advance(ctx: _Ctx) -> None:
    """Move to the next step; wait for approval first if that step needs it."""
    state, steps = ctx.state, ctx.ring.steps
    nxt = (state.step or 0) + 1
    if nxt >= len(steps):
        ctx.change(ctx.ring.name, "completed",
                   replace(state, phase=Phase.COMPLETED, resume_to=None))
        return
    waiting = state.phase is Phase.AWAITING_APPROVAL
    if steps[nxt].approval and not waiting and ctx.actor == "analysis":
        ctx.change(ctx.ring.name, "awaiting_approval",
                   replace(state, phase=Phase.AWAITING_APPROVAL))
        return
    phase = Phase.COMPLETED if nxt == len(steps) - 1 else Phase.PROGRESSING
    ctx.change(ctx.ring.name, "advance", replace(
        state, phase=phase, weight=steps[nxt].weight, step=nxt, step_since=ctx.now,
        failures=0, resume_to=None))


def _promote(ctx: _Ctx) -> None:
    if not ctx.ring.steps:
        raise RolloutConflict(f"ring {ctx.ring.name!r} has no progression steps to promote along")
    _advance(ctx)


def _pause(ctx: _Ctx) -> None:
    state = ctx.state
    ctx.change(ctx.ring.name, "pause", replace(state, phase=Phase.PAUSED, resume_to=state.phase))


def _resume(ctx: _Ctx) -> None:
    state = ctx.state
    if state.phase is Phase.PAUSED:
        ctx.change(ctx.ring.name, "resume", replace(
            state, phase=state.resume_to or Phase.PROGRESSING, resume_to=None,
            step_since=ctx.now))
        return
    # From rolled_back: start the rollout over (first step), or back to the configured weight.
    fresh = initial_state(ctx.ring, ctx.now)
    ctx.change(ctx.ring.name, "resume", fresh)


def _set_weight(ctx: _Ctx) -> None:
    if ctx.ring.weight is None and not ctx.ring.steps:
        raise RolloutConflict(f"ring {ctx.ring.name!r} has rules only, no weight to set")
    assert ctx.weight is not None
    others = sum(s.weight or 0 for name, s in ctx.states.items() if name != ctx.ring.name)
    if others + ctx.weight > 10_000:
        raise RolloutConflict(
            f"weights would add up to {(others + ctx.weight) / 100:g} %, above 100 %")
    state = ctx.state
    ctx.change(ctx.ring.name, "set_weight", replace(
        state, weight=ctx.weight, step_since=ctx.now,
        phase=Phase.PAUSED if state.phase is not Phase.PAUSED else state.phase,
        resume_to=state.resume_to if state.phase is Phase.PAUSED else (
            state.phase if state.phase is not Phase.ROLLED_BACK else Phase.STEADY)))


_ANALYSED = (Phase.STEADY, Phase.PROGRESSING, Phase.AWAITING_APPROVAL, Phase.PAUSED,
             Phase.COMPLETED)

# (phase, trigger) -> handler.  A pair not in the table is a conflict (409) for an operator
# action and nothing for analysis.
TRANSITIONS: dict[tuple[Phase, Trigger], Handler] = {
    **{(p, Trigger.FAILED): _roll_back for p in _ANALYSED},
    **{(p, Trigger.ROLLBACK): _roll_back for p in _ANALYSED},
    (Phase.PROGRESSING, Trigger.STEP_DUE): _advance,
    (Phase.PROGRESSING, Trigger.PROMOTE): _promote,
    (Phase.AWAITING_APPROVAL, Trigger.PROMOTE): _promote,
    (Phase.PAUSED, Trigger.PROMOTE): _promote,
    (Phase.AWAITING_APPROVAL, Trigger.APPROVE): _advance,
    **{(p, Trigger.PAUSE): _pause for p in (Phase.STEADY, Phase.PROGRESSING,
                                             Phase.AWAITING_APPROVAL, Phase.COMPLETED)},
    (Phase.PAUSED, Trigger.RESUME): _resume,
    (Phase.ROLLED_BACK, Trigger.RESUME): _resume,
    **{(p, Trigger.SET_WEIGHT): _set_weight for p in (*_ANALYSED, Phase.ROLLED_BACK)},
}


def _fire(ctx: _Ctx, trigger: Trigger, strict: bool) -> None:
    handler = TRANSITIONS.get((ctx.state.phase, trigger))
    if handler is None:
        if strict:
            raise RolloutConflict(
                f"cannot {trigger.value.replace('_', ' ')} ring {ctx.ring.name!r}: "
                f"it is {ctx.state.phase.value}")
        return
    handler(ctx)


def on_verdicts(
    plan: RoutePlan, states: Mapping[str, RingState], verdicts: Mapping[str, Verdict], now: float
) -> tuple[States, list[Event]]:
    """One analysis round for a route."""
    new: States = dict(states)
    events: list[Event] = []
    for ring in plan.analysed:
        verdict = verdicts.get(ring.name)
        state = new[ring.name]
        if verdict is None or not state.enabled:
            continue
        ctx = _Ctx(plan, new, ring, now, verdict.reason, (verdict.broken or ("manual",))[0],
                   verdict.numbers)
        if verdict.outcome is Outcome.FAIL:
            state = replace(state, failures=state.failures + 1)
            new[ring.name] = state
            if state.failures >= plan.failure_limit:
                ctx.reason = (f"{state.failures} failing verdicts in a row: {verdict.reason}")
                _fire(ctx, Trigger.FAILED, strict=False)
        elif verdict.outcome is Outcome.PASS:
            if state.failures:
                new[ring.name] = state = replace(state, failures=0)
            due = now - state.step_since >= ring.min_step_duration
            if state.phase is Phase.PROGRESSING and due:
                ctx.reason = (f"passing for {now - state.step_since:.0f}s at "
                              f"{_pct(state.weight)}")
                ctx.label = "progression"
                _fire(ctx, Trigger.STEP_DUE, strict=False)
        events += ctx.events
    return new, events


def on_fast_failure(
    plan: RoutePlan, states: Mapping[str, RingState], ring: str, verdict: Verdict, now: float
) -> tuple[States, list[Event]]:
    """The fast path: roll back at once, without waiting for failure_limit verdicts."""
    new: States = dict(states)
    ctx = _Ctx(plan, new, plan.ring(ring), now, f"fast rollback: {verdict.reason}",
               (verdict.broken or ("fast_error_rate",))[0], verdict.numbers)
    if new[ring].enabled:
        _fire(ctx, Trigger.FAILED, strict=False)
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
    if trigger in (Trigger.FAILED, Trigger.STEP_DUE):
        raise ValueError(f"{trigger.value} comes from analysis, not an operator")
    try:
        ring_plan = plan.ring(ring)
    except KeyError:
        raise RolloutConflict(f"route {plan.route!r} has no ring {ring!r}") from None
    if ring == plan.baseline and trigger in (Trigger.ROLLBACK, Trigger.PAUSE):
        raise RolloutConflict(f"ring {ring!r} is the baseline; it cannot be {trigger.value}ed")
    if trigger is Trigger.SET_WEIGHT and (weight is None or not 0 <= weight <= 10_000):
        raise RolloutConflict(f"weight {weight!r} is not a percentage from 0 to 100")
    new: States = dict(states)
    ctx = _Ctx(plan, new, ring_plan, now, reason or f"{trigger.value} by {actor}", "manual",
               {}, actor, weight)
    _fire(ctx, trigger, strict=True)
    return new, ctx.events
