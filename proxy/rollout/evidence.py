"""A ring's evidence: what its upstream did, counted since a point in time.  Pure.

The shell keeps one ``Tally`` per ring for the life of the process and records into it
only what the version did (an upstream answer, or the upstream failing to give one; never
the proxy's own refusals nor clients that left).  The judge reads differences of two
``Evidence`` snapshots: the ring's since its step began, and its baseline's over the same
time, so both sides cover the same traffic conditions.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.rollout.sketch import SIZE, index_of, quantile_index, representative, slower_than


@dataclass(frozen=True, slots=True)
class Evidence:
    """Judged requests, errors among them, and the latencies of the timed ones."""

    requests: int = 0
    errors: int = 0
    latency: tuple[int, ...] = (0,) * SIZE  # per sketch bucket

    def since(self, start: Evidence) -> Evidence:
        """What happened after ``start`` (an earlier snapshot of the same tally)."""
        return Evidence(
            self.requests - start.requests,
            self.errors - start.errors,
            tuple(a - b for a, b in zip(self.latency, start.latency, strict=True)),
        )

    @property
    def timed(self) -> int:
        """Requests with a latency (an upgraded WebSocket is counted, not timed)."""
        return sum(self.latency)

    def slower_than(self, index: int) -> int:
        return slower_than(self.latency, index)

    def quantile(self, q: float) -> float | None:
        i = quantile_index(self.latency, q)
        return None if i is None else representative(i)

    def __repr__(self) -> str:
        p95 = self.quantile(0.95)
        shown = "-" if p95 is None else f"{p95 * 1000:.1f}ms"
        return f"<Evidence requests={self.requests} errors={self.errors} p95={shown}>"



class Tally:
    """A ring's running totals; ``record`` is on the request path (a few increments)."""

    __slots__ = ("errors", "latency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = [0] * SIZE

    def record(self, error: bool, duration: float | None) -> None:
        self.requests += 1
        if error:
            self.errors += 1
        if duration is not None:
            self.latency[index_of(duration)] += 1

    def evidence(self) -> Evidence:
        return Evidence(self.requests, self.errors, tuple(self.latency))

    def __repr__(self) -> str:
        return f"<Tally requests={self.requests} errors={self.errors}>"
