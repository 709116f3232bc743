"""External check results, and how they join a ring's verdict.  Pure: no asyncio, no I/O.

Each external check (a Prometheus query, a webhook, a ring's custom health check) keeps
its latest ``Result``: the value it saw, the bound it is held to, its status, why, and
when.  ``as_check`` turns a result into one of the verdict's ``Check``s and ``join``
adds them to the judge's verdict:

    status      finding     the verdict
    pass        within      may advance (when every other check is within)
    fail        worse       rolls back (``on_fail: rollback``, ``threshold`` failures in
                            a row reached)
    fail        undecided   holds (``on_fail: hold``, or fewer failures than threshold)
    no_data     undecided   holds: an unreachable Prometheus, a query error or an empty
                            result never rolls back
    pending     undecided   holds: no result yet at this step

A check's ``p_value`` is 0 when it rolls back and 1 otherwise (it is no statistical test:
the value is the application's own number, held to its bound), so its ``progress`` on
the status page is 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from proxy.config.checks import OnFail
from proxy.rollout.judge import Check, Finding, Outcome, Verdict


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NO_DATA = "no_data"
    PENDING = "pending"


KINDS = ("prometheus", "webhook", "health")


@dataclass(frozen=True, slots=True)
class Result:
    """The latest result of one external check for one ring."""

    name: str
    kind: str  # prometheus | webhook | health
    status: Status
    value: float | None  # the query's value, the HTTP status, ...
    bound: str  # ">= 3.5", "<= 0.05", "2xx"
    limit: float | None  # the number of the bound (None: webhook and health checks)
    on_fail: OnFail
    detail: str  # what was seen, for people
    at: float  # wall-clock time of the result
    failures: int = 0  # failing results in a row
    threshold: int = 1

    @property
    def finding(self) -> Finding:
        if self.status is Status.PASS:
            return Finding.WITHIN
        if self.status is Status.FAIL and self.failures >= self.threshold and \
                self.on_fail is OnFail.ROLLBACK:
            return Finding.WORSE
        return Finding.UNDECIDED

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "status": self.status.value,
                "value": self.value, "bound": self.bound, "limit": self.limit,
                "on_fail": self.on_fail.value, "detail": self.detail, "at": self.at,
                "failures": self.failures, "threshold": self.threshold}


def pending(name: str, kind: str, bound: str, limit: float | None, on_fail: OnFail,
            threshold: int, now: float) -> Result:
    return Result(name, kind, Status.PENDING, None, bound, limit, on_fail,
                  "no result yet", now, 0, threshold)


def advance(previous: Result | None, new: Result) -> Result:
    """``new`` with its count of failures in a row carried on from ``previous``."""
    if new.status is not Status.FAIL:
        return replace(new, failures=0)
    before = previous.failures if previous is not None and previous.status is Status.FAIL \
        else 0
    return replace(new, failures=before + 1)


def describe(result: Result) -> str:
    """One line: what the check saw, against what, and what it does about it."""
    what = {Status.PASS: "passes", Status.NO_DATA: "has no data (holds)",
            Status.PENDING: "has no result yet (holds)"}.get(result.status)
    if what is None:
        what = (f"fails {result.failures} of {result.threshold} times in a row"
                if result.failures < result.threshold else
                f"fails ({'rolls back' if result.on_fail is OnFail.ROLLBACK else 'holds'})")
    return f"check {result.name} ({result.kind}) {what}: {result.detail}"


def as_check(result: Result) -> Check:
    finding = result.finding
    value = result.value
    limit = result.limit if result.limit is not None else 0.0
    point = value if value is not None else limit
    return Check(
        result.name, finding, value, point, point, limit,
        0.0 if finding is Finding.WORSE else 1.0, 0.0, describe(result),
        {"kind": result.kind, "status": result.status.value, "value": value,
         "bound": result.bound, "on_fail": result.on_fail.value,
         "failures": result.failures, "threshold": result.threshold, "at": result.at})


def join(verdict: Verdict, results: Sequence[Result]) -> Verdict:
    """The judge's verdict with the external checks added: any of them worse rolls back,
    any not within holds an otherwise healthy ring (undecided)."""
    if not results:
        return verdict
    extra = tuple(as_check(r) for r in results)
    checks = verdict.checks + extra
    outcome = verdict.outcome
    if any(c.finding is Finding.WORSE for c in extra):
        outcome = Outcome.ROLLBACK
    elif outcome is Outcome.HEALTHY and any(c.finding is not Finding.WITHIN for c in extra):
        outcome = Outcome.UNDECIDED
    return replace(verdict, outcome=outcome, checks=checks)


def is_external(check: Check) -> bool:
    """Whether a verdict's check came from here (its numbers name its kind)."""
    return check.numbers.get("kind") in KINDS
