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

Besides the step's start, marks are taken on the controller's clock every ``MARK_EVERY``
seconds of the step (never chosen by the data; the last ``MARKS_KEPT`` are kept), so that a
ring turning bad after a long healthy stretch is judged on what it did since a recent mark
(``proxy.rollout.judge.judge_marks``) instead of being diluted by its whole step.

No clock and no I/O: the caller passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.rollout.evidence import Evidence, Tally
from proxy.rollout.judge import Tallied
from proxy.rollout.state import RingState
from proxy.rollout.window import Recent

Step = tuple[int | None, float, str]  # (step, step_since, fingerprint): one step of a ring
Key = tuple[str, str]  # (route, ring)
MARK_EVERY = 300.0  # seconds between evidence marks within a step
MARKS_KEPT = 6  # the recent marks judged besides the step's start (the last half hour)
Since = tuple[int, Evidence, Evidence]  # (mark number, ring since the mark, baseline since)


class Marks:
    """A step's evidence marks after its start: (number, ring then, baseline then)."""

    __slots__ = ("kept", "next_at", "taken")

    def __init__(self, now: float) -> None:
        self.next_at = now + MARK_EVERY
        self.taken = 1  # the step's start is mark 1
        self.kept: list[Since] = []

    def look(self, now: float, ring: Evidence, baseline: Evidence) -> None:
        if now < self.next_at:
            return
        self.taken += 1
        self.kept = [*self.kept[-(MARKS_KEPT - 1):], (self.taken, ring, baseline)]
        while self.next_at <= now:
            self.next_at += MARK_EVERY


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
        self.marks: dict[Key, tuple[StepStart, Marks]] = {}
        self.fast: dict[Key, FastLooks] = {}

    def keep(self, rings: set[Key]) -> None:
        """Forget the rings that are no longer analysed (a reload removed them)."""
        self.starts = {k: v for k, v in self.starts.items() if k in rings}
        self.marks = {k: v for k, v in self.marks.items() if k in rings}
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

    def since_marks(
        self, key: Key, state: RingState, tally: Tally, baseline: Tally,
        baseline_now: Evidence, now: float,
    ) -> list[Since]:
        """The evidence since the step began (mark 1) and since each kept mark after it."""
        start = self.start(key, state, tally, baseline)
        held = self.marks.get(key)
        if held is None or held[0] is not start:
            held = self.marks[key] = (start, Marks(now))
        ring_now = tally.evidence()
        marks = held[1]
        marks.look(now, ring_now, baseline_now)
        return [(1, ring_now.since(start.ring_at), baseline_now.since(start.baseline_at)),
                *((j, ring_now.since(r), baseline_now.since(b)) for j, r, b in marks.kept)]

    def counts_since_marks(
        self, key: Key, state: RingState, tally: Tally, baseline: Tally
    ) -> list[tuple[int, Tallied]]:
        """(requests, errors) of the ring and its baseline since each mark, for the quick
        error look between two full rounds (the marks are taken by the full rounds)."""
        start = self.start(key, state, tally, baseline)
        held = self.marks.get(key)
        kept = held[1].kept if held is not None and held[0] is start else []
        r_n, r_e, b_n, b_e = tally.requests, tally.errors, baseline.requests, baseline.errors
        points = [(1, start.ring_at, start.baseline_at), *kept]
        return [(j, (r_n - r.requests, r_e - r.errors, b_n - b.requests, b_e - b.errors))
                for j, r, b in points]

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
