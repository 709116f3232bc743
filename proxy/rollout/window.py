"""Recent history of one ring's outcomes: what it did in the last seconds.

Pure: no asyncio, no clock.  The caller passes ``now`` (seconds on one monotonic clock,
e.g. ``time.monotonic()``) to every method, so tests and incident replays drive time by
hand.

Two views of the recent past, neither of them the judge's (the judge reads a ring's
cumulative ``Evidence`` since its step began, ``proxy.rollout.evidence``):

* ``RingWindow``: per-second counts and latency histograms over minutes, for people (the
  admin API's traffic view).  The metrics layer records into it only what the ring's
  upstream did, the outcomes the judge counts too (never the proxy's own refusals or
  clients that left).
* ``Recent``: the fast path's last second, taken from snapshots of a ring's running
  totals that the control loop takes as often as it looks (every 0.1 s): nothing more
  on the request path.

A window is a ring buffer of ``ceil(horizon / resolution)`` buckets.  Bucket ``e`` holds
the requests recorded with ``floor(now / resolution) == e``: a count, an error count and a
latency histogram with the same bounds as the Prometheus histogram, so the percentiles
the analysis loop judges agree with what Grafana shows.  A slot is reset lazily when a
newer bucket lands on it, so an idle ring costs nothing and gaps read as empty buckets.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from math import floor

# Upper bounds (seconds) of the latency buckets, ~1 ms to 10 s; one more bucket (+Inf)
# holds everything slower.  Shared with ringproxy_request_duration_seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,
    0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)

_NEVER = -(1 << 62)  # epoch of a slot that never held data; older than any real bucket
_EPS = 1e-9  # absorbs float noise in seconds / resolution (1.1 / 0.1 == 11.000000000000002)


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The q-quantile of a histogram, interpolated the way Prometheus' histogram_quantile is.

    ``counts`` are per bucket (not cumulative), one more than ``bounds`` (the last is
    +Inf).  The rank ``q * total`` falls in the first bucket whose cumulative count
    reaches it; the result is interpolated linearly inside that bucket, whose lower
    bound is the previous bound (0 for the first).  A rank in the +Inf bucket returns the
    highest finite bound.  None when the histogram is empty.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: q={q!r} is outside [0, 1]")
    if len(counts) != len(bounds) + 1:
        raise ValueError(
            f"quantile: {len(counts)} counts for {len(bounds)} bounds; expected {len(bounds) + 1}"
        )
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for i, count in enumerate(counts):
        if below + count >= rank and count > 0:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / count
        below += count
    return bounds[-1]  # pragma: no cover - the loop always returns once below == total


@dataclass(frozen=True, slots=True)
class Summary:
    """What a ring did over the last ``seconds``: the numbers the analysis loop judges."""

    seconds: float
    requests: int
    errors: int
    error_rate: float  # errors / requests; 0.0 when there were no requests
    p50: float | None  # seconds; None when no latency was recorded
    p95: float | None
    p99: float | None
    histogram: tuple[int, ...]  # per-bucket counts over the window, the last is +Inf
    bounds: tuple[float, ...] = LATENCY_BUCKETS

    @property
    def observed(self) -> int:
        """Requests with a latency (upgraded WebSockets are counted but not timed)."""
        return sum(self.histogram)

    def quantile(self, q: float) -> float | None:
        return quantile(q, self.bounds, self.histogram)

    def __repr__(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.1f}ms"

        return (f"<Summary {self.seconds:g}s requests={self.requests} errors={self.errors} "
                f"p50={ms(self.p50)} p95={ms(self.p95)} p99={ms(self.p99)}>")


def summarize(
    seconds: float, requests: int, errors: int, histogram: Sequence[int],
    bounds: tuple[float, ...] = LATENCY_BUCKETS,
) -> Summary:
    hist = tuple(histogram)
    return Summary(
        seconds=seconds,
        requests=requests,
        errors=errors,
        error_rate=errors / requests if requests else 0.0,
        p50=quantile(0.50, bounds, hist),
        p95=quantile(0.95, bounds, hist),
        p99=quantile(0.99, bounds, hist),
        histogram=hist,
        bounds=bounds,
    )


class RingWindow:
    """Per-``resolution`` buckets of requests, errors and latencies over ``horizon`` seconds."""

    __slots__ = ("_bounds", "_count", "_epoch", "_errors", "_hist", "_n", "horizon", "resolution")

    def __init__(
        self,
        horizon: float = 300.0,
        resolution: float = 1.0,
        bounds: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        if not (math.isfinite(resolution) and resolution > 0):
            raise ValueError(f"window resolution: {resolution!r} is not a positive number")
        if not (math.isfinite(horizon) and horizon >= resolution):
            raise ValueError(
                f"window horizon: {horizon!r} is not a number >= the resolution {resolution!r}"
            )
        bounds = tuple(bounds)
        if not bounds or any(b <= 0 or not math.isfinite(b) for b in bounds) or any(
            a >= b for a, b in pairwise(bounds)
        ):
            raise ValueError(
                f"window bounds: {bounds!r} are not finite, positive and strictly increasing"
            )
        self.horizon = horizon
        self.resolution = resolution
        self._bounds = bounds
        self._n = math.ceil(horizon / resolution - _EPS)
        self._epoch = [_NEVER] * self._n
        self._count = [0] * self._n
        self._errors = [0] * self._n
        self._hist: list[list[int]] = [[0] * (len(bounds) + 1) for _ in range(self._n)]

    @property
    def bounds(self) -> tuple[float, ...]:
        return self._bounds

    def record(self, now: float, duration: float | None, error: bool) -> None:
        """Count one finished request; ``duration`` None counts it without a latency."""
        self.add(now, -1 if duration is None else bisect_left(self._bounds, duration), error)

    def add(self, now: float, bucket: int, error: bool) -> None:
        """``record`` with the latency bucket already found (the index ``bisect_left`` of
        the bounds gives; -1: not timed).  The request path's way in: one search for the
        Prometheus histogram and this one."""
        epoch = floor(now / self.resolution)
        slot = epoch % self._n
        if self._epoch[slot] != epoch and not self._renew(slot, epoch):
            return
        self._count[slot] += 1
        if error:
            self._errors[slot] += 1
        if bucket >= 0:
            self._hist[slot][bucket] += 1

    def merge(self, epoch: int, count: int, errors: int, hist: Sequence[int]) -> None:
        """Add counts recorded elsewhere (another process's window with the same resolution
        and bounds, on the same monotonic clock) to bucket ``epoch``.  Counts older than
        the horizon are dropped, as ``add`` drops them."""
        if len(hist) != len(self._bounds) + 1:
            raise ValueError(f"window merge: {len(hist)} counts for {len(self._bounds)} bounds")
        slot = epoch % self._n
        if self._epoch[slot] != epoch and not self._renew(slot, epoch):
            return
        self._count[slot] += count
        self._errors[slot] += errors
        bucket = self._hist[slot]
        for i, n in enumerate(hist):
            if n:
                bucket[i] += n

    def _renew(self, slot: int, epoch: int) -> bool:
        """Give ``slot`` to ``epoch``; False when the slot holds a newer one already (the
        request is older than the horizon)."""
        if self._epoch[slot] > epoch:
            return False
        self._epoch[slot] = epoch
        self._count[slot] = 0
        self._errors[slot] = 0
        self._hist[slot] = [0] * (len(self._bounds) + 1)
        return True

    def summary(self, now: float, seconds: float) -> Summary:
        """The last ``seconds`` up to ``now``, in whole buckets, the current (partial) one included.

        ``seconds`` is rounded up to whole buckets and may not exceed the horizon.
        Buckets recorded with a later ``now`` than this one are not included.
        """
        if not (math.isfinite(seconds) and 0 < seconds <= self.horizon + _EPS):
            raise ValueError(
                f"window summary: seconds={seconds!r} is not in (0, horizon={self.horizon:g}]"
            )
        buckets = min(self._n, math.ceil(seconds / self.resolution - _EPS))
        current = math.floor(now / self.resolution)
        requests = errors = 0
        hist = [0] * (len(self._bounds) + 1)
        for epoch in range(current - buckets + 1, current + 1):
            slot = epoch % self._n
            if self._epoch[slot] != epoch:
                continue
            requests += self._count[slot]
            errors += self._errors[slot]
            for i, count in enumerate(self._hist[slot]):
                hist[i] += count
        return summarize(seconds, requests, errors, hist, self._bounds)

    def __repr__(self) -> str:
        return (f"<RingWindow horizon={self.horizon:g}s resolution={self.resolution:g}s "
                f"buckets={self._n}>")


class Recent:
    """A running (requests, errors) count over the last ``seconds``, from snapshots.

    ``look(now, requests, errors)`` keeps the totals seen at ``now`` and answers what was
    added since the oldest snapshot at most ``seconds`` old: a span of at most ``seconds``
    (and at least ``seconds`` less the time between two looks), so a ring that broke a
    moment ago is not diluted by older, healthy traffic.  The history starts at the first
    look: until ``seconds`` have passed the span is shorter.
    """

    __slots__ = ("_seen", "seconds")

    def __init__(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"recent: seconds={seconds!r} is not a positive number")
        self.seconds = seconds
        self._seen: deque[tuple[float, int, int]] = deque()

    def look(self, now: float, requests: int, errors: int) -> tuple[int, int]:
        """(requests, errors) added over the last ``seconds`` up to ``now``."""
        seen = self._seen
        if seen and now < seen[-1][0]:
            raise ValueError(f"recent: now={now!r} is before the last look {seen[-1][0]!r}")
        seen.append((now, requests, errors))
        oldest = now - self.seconds - _EPS
        while seen[0][0] < oldest:
            seen.popleft()
        _, base_requests, base_errors = seen[0]
        return requests - base_requests, errors - base_errors

    def __repr__(self) -> str:
        return f"<Recent {self.seconds:g}s looks={len(self._seen)}>"
