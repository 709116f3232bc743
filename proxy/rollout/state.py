"""Ring states and events: the values the rollout machine reads and writes.  Pure.

A state's JSON form is what the state file keeps; ``RingState.from_dict`` checks every
field's type (a state file is input), naming the field that is wrong.  Files of earlier
versions load: their ``failures`` (a count of failing verdicts in a row, which the
sequential judge no longer keeps) is read for its type and dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Phase(StrEnum):
    STEADY = "steady"
    PROGRESSING = "progressing"
    AWAITING_APPROVAL = "awaiting_approval"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, slots=True)
class RingState:
    phase: Phase
    weight: int | None  # live basis points (None: rule-only ring)
    step: int | None = None  # index into the plan's steps
    step_since: float = 0.0  # wall-clock start of the current step
    resume_to: Phase | None = None  # the phase a pause returns to
    fingerprint: str = ""
    # The analysis stayed undecided for the route's max_blind in this step (its
    # analysis_starved event is raised once per step); cleared by a new step or a resume.
    starved: bool = False

    @property
    def enabled(self) -> bool:
        return self.phase is not Phase.ROLLED_BACK

    def as_dict(self) -> dict[str, object]:
        return {
            "phase": self.phase.value,
            "weight": self.weight,
            "step": self.step,
            "step_since": self.step_since,
            "resume_to": self.resume_to.value if self.resume_to else None,
            "fingerprint": self.fingerprint,
            "starved": self.starved,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RingState:
        """A saved state; ValueError naming the field whose value is not what it must be."""
        resume = data.get("resume_to")
        _whole(data.get("failures", 0), "failures")  # an earlier version's field: dropped
        return cls(
            phase=_phase(data.get("phase"), "phase"),
            weight=_optional_whole(data.get("weight"), "weight"),
            step=_optional_whole(data.get("step"), "step"),
            step_since=_seconds(data.get("step_since", 0.0), "step_since"),
            resume_to=None if resume is None else _phase(resume, "resume_to"),
            fingerprint=_text(data.get("fingerprint", ""), "fingerprint"),
            starved=_flag(data.get("starved", False), "starved"),
        )


def _phase(value: object, name: str) -> Phase:
    if isinstance(value, str) and value in _PHASES:
        return Phase(value)
    raise ValueError(f"{name}: {value!r} is not one of {', '.join(_PHASES)}")


_PHASES = tuple(p.value for p in Phase)


def _whole(value: object, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"{name}: expected a whole number >= 0, got {value!r}")


def _flag(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def _optional_whole(value: object, name: str) -> int | None:
    return None if value is None else _whole(value, name)


def _seconds(value: object, name: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name}: expected a number of seconds, got {value!r}")


def _text(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"{name}: expected a string, got {value!r}")


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    route: str
    ring: str
    # rollback | advance | awaiting_approval | completed | pause | resume | set_weight |
    # analysis_starved
    kind: str
    from_weight: int | None
    to_weight: int | None
    from_phase: str
    phase: str
    reason: str
    label: str = "manual"  # bounded reason for metrics: a check name or "manual"
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
            moved = f" {percent_text(self.from_weight)} -> {percent_text(self.to_weight)}"
        why = f": {self.reason}" if self.reason else ""
        return f"ringproxy {self.route}/{self.ring} {self.kind}{moved} ({self.phase}){why}"


def percent_text(bp: int | None) -> str:
    return "-" if bp is None else f"{bp / 100:g}%"
