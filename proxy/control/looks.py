"""Where each ring's evidence starts, and the fast path's recent history: the controller's
bookkeeping over the rings' tallies (``proxy.metrics`` keeps one ``Tally`` per ring).

Evidence is per step.  For every analysed ring the controller keeps snapshots of the
ring's tally and its baseline's, taken the first time it looks at the ring's current step
(a step is (step, step_since, fingerprint): a new step, a resume, a new weight or a new
version is a new one): when it configures the ring and after every change of its state,
else at the next analysis round.  The judge reads what both did since.  After a process
restart the evidence starts again at the first look: counts are not persisted (the step's
start time is).  A new tally on either side (a ring's pool changed, so its recorder is new) starts
the ring's evidence over.

No clock and no I/O: the caller passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.rollout.evidence import Evidence, Tally
from proxy.rollout.state import RingState
from proxy.rollout.window import Recent

Step = tuple[int | None, float, str]  # (step, step_since, fingerprint): one step of a ring
Key = tuple[str, str]  # (route, ring)


def step_of(state: RingState) -> Step:
    return state.step, state.step_since, state.fingerprint


@dataclass(frozen=True, slots=True)
class StepStart:
    """Where a ring's evidence starts: its step, and both tallies as they were then."""

    step: Step
    ring: Tally
    baseline: Tally
    ring_at: Evidence
    baseline_at: Evidence


@dataclass(frozen=True, slots=True)
class FastLooks:
    """The fast path's history of one ring in one step."""

    step: Step
    tally: Tally
    recent: Recent


class Looks:
    """Per (route, ring): where its evidence starts, and the fast path's recent looks."""

    def __init__(self) -> None:
        self.starts: dict[Key, StepStart] = {}
        self.fast: dict[Key, FastLooks] = {}

    def keep(self, rings: set[Key]) -> None:
        """Forget the rings that are no longer analysed (a reload removed them)."""
        self.starts = {k: v for k, v in self.starts.items() if k in rings}
        self.fast = {k: v for k, v in self.fast.items() if k in rings}

    def start(self, key: Key, state: RingState, tally: Tally, baseline: Tally) -> StepStart:
        """Where the ring's evidence in its current step starts (taken now if not yet)."""
        start = self.starts.get(key)
        step = step_of(state)
        if (start is None or start.step != step or start.ring is not tally
                or start.baseline is not baseline):
            start = self.starts[key] = StepStart(step, tally, baseline, tally.evidence(),
                                                 baseline.evidence())
        return start

    def since_step(
        self, key: Key, state: RingState, tally: Tally, baseline: Tally, baseline_now: Evidence
    ) -> tuple[Evidence, Evidence]:
        """The ring's evidence since its step began, and its baseline's over the same time."""
        start = self.start(key, state, tally, baseline)
        return tally.evidence().since(start.ring_at), baseline_now.since(start.baseline_at)

    def recent(
        self, key: Key, state: RingState, tally: Tally, seconds: float, now: float
    ) -> tuple[int, int]:
        """(requests, errors) of the ring over its last ``seconds`` in this step."""
        looks = self.fast.get(key)
        step = step_of(state)
        if (looks is None or looks.step != step or looks.tally is not tally
                or looks.recent.seconds != seconds):
            looks = self.fast[key] = FastLooks(step, tally, Recent(seconds))
        return looks.recent.look(now, tally.requests, tally.errors)

    def __repr__(self) -> str:
        return f"<Looks steps={len(self.starts)} fast={len(self.fast)}>"
