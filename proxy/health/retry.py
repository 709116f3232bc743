"""Which failed attempts may be retried, and the retry budget.  Pure: ``now`` is passed in.

A retry is allowed when the method is one the pool lists, the request's body was whole in
hand when it was sent (a streamed body is gone), the failure is one ``retries.on`` names,
attempts remain, and the pool's budget has room.  Where it goes (another server of the
same pool, never another ring's pool) is the exchange's to choose.

The budget is a share of the pool's requests over the last ``WINDOW`` seconds (Finagle's
RetryBudget, whose default is also 20 % over 10 s): retries in the window stay at or below
``budget x requests in the window``, or ``min_retries`` when that is more, so a few
retries still happen at low traffic and a failing pool never multiplies its load.
"""

from __future__ import annotations

from proxy.config.health import Retries

WINDOW = 10  # seconds, in one-second slots

# Reasons a retry was made: the metrics' ``reason`` label values.
CONNECT_FAILURE, RESET, TIMEOUT = "connect_failure", "reset", "timeout"
_KINDS = {"connect": CONNECT_FAILURE, "reset": RESET, "timeout": TIMEOUT}
REASONS = (CONNECT_FAILURE, RESET, TIMEOUT, "500", "502", "503", "504")


def failure_reason(kind: str) -> str | None:
    """The ``retries.on`` name of an upstream error kind (None: never retried)."""
    return _KINDS.get(kind)


class RetryBudget:
    """Requests and retries per second over the last ``WINDOW`` seconds."""

    __slots__ = ("_requests", "_retries", "_second", "budget", "denied", "min_retries")

    def __init__(self, budget: float, min_retries: int) -> None:
        self.budget = budget
        self.min_retries = min_retries
        self._requests = [0] * WINDOW
        self._retries = [0] * WINDOW
        self._second = 0  # the whole second of the newest slot
        self.denied = 0  # retries the budget refused (for people)

    def _advance(self, now: float) -> int:
        second = int(now)
        gap = second - self._second
        if gap:
            if gap >= WINDOW or gap < 0:
                self._requests = [0] * WINDOW
                self._retries = [0] * WINDOW
            else:
                for s in range(self._second + 1, second + 1):
                    self._requests[s % WINDOW] = 0
                    self._retries[s % WINDOW] = 0
            self._second = second
        return second % WINDOW

    def request(self, now: float) -> None:
        """A request (its first attempt) went to the pool."""
        slot = self._advance(now)  # (first: it may replace the lists)
        self._requests[slot] += 1

    def allow(self, now: float) -> bool:
        """May one more retry go now?  If so it is counted."""
        slot = self._advance(now)
        allowed = max(self.min_retries, self.budget * sum(self._requests))
        if sum(self._retries) + 1 > allowed:
            self.denied += 1
            return False
        self._retries[slot] += 1
        return True

    def __repr__(self) -> str:
        return (f"<RetryBudget {self.budget:.0%} requests={sum(self._requests)} "
                f"retries={sum(self._retries)}>")


def retryable(retries: Retries, method: str, body_whole: bool, attempt: int) -> bool:
    """Whether a failed ``attempt`` (1: the first) of this request may be tried again, the
    failure and the budget aside."""
    return body_whole and attempt <= retries.attempts and method in retries.methods
