"""Each ring's recent story, second by second, for the status page's charts.  Pure.

No asyncio, no clock: ``proxy.admin.sampler`` feeds a ``SeriesStore`` one point per ring
per second, read off the metrics layer's per-ring windows (``RingWindow``, 1 s buckets of
the upstream's outcomes: the requests the judge counts), with the ring's live weight.  The
admin API answers ``GET /api/routes/{route}/series`` from it through ``series_view``.

Two tiers per ring, both fixed-size ring buffers of typed arrays allocated once:

* fine: one point per second (the window's resolution) for the last ``FINE_POINTS``
  (15 minutes);
* coarse: one point per ``COARSE_EVERY`` seconds for the last ``COARSE_POINTS`` (4 hours),
  built as the seconds arrive: counts are summed and the latency histograms merged, so a
  coarse point's p95/p99 are the quantiles of its requests (never an average of per-second
  quantiles).

A ring costs ``MEMORY_PER_RING`` bytes whatever its traffic (measured with tracemalloc in
``tests/test_series.py``).  Latencies and weights are kept as 32-bit floats (7 significant
digits): the API rounds them to microseconds and hundredths of a percent, which is what
the page draws.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import TypedDict

from proxy.rollout.window import LATENCY_BUCKETS, quantile

FINE_POINTS = 900  # 15 minutes of 1 s points
COARSE_EVERY = 10  # fine points per coarse point
COARSE_POINTS = 1440  # 4 hours of 10 s points
SHOWN = 900.0  # seconds the page shows at least (more when a step started earlier)
# Measured in tests/test_series.py (tracemalloc, a RingSeries filled to capacity).
MEMORY_PER_RING = 78_000  # bytes; 76.7 kB measured (CPython 3.11, 64-bit)

_NAN = float("nan")


class PointsView(TypedDict):
    """A ring's points as columns, oldest first; ``t`` is the Unix time a point starts,
    ``seconds`` how long it covers (1, or up to 10 for the coarse points older than 15 min).
    ``rps`` is requests / seconds; ``error_rate`` errors / requests, null without requests;
    ``p95``/``p99`` in seconds, null without timed requests; ``weight`` in percent, null
    for a ring without a sticky share."""

    t: list[float]
    seconds: list[float]
    requests: list[int]
    errors: list[int]
    rps: list[float]
    error_rate: list[float | None]
    p95: list[float | None]
    p99: list[float | None]
    weight: list[float | None]


class RingSeriesView(TypedDict):
    name: str
    baseline: bool
    phase: str | None
    step_since: float | None  # Unix time the ring's current step began (None: no rollout)
    points: PointsView


class SeriesView(TypedDict):
    route: str
    baseline: str | None
    now: float  # the server's Unix time when it answered
    since: float | None  # as asked; points and events are those after it
    start: float  # where the page's time axis starts: see ``axis_start``
    resolution: float  # seconds of a fine point
    coarse_resolution: float
    retention: float  # seconds the coarse tier reaches back
    rings: list[RingSeriesView]
    events: list[dict[str, object]]


def _opt(x: float, digits: int) -> float | None:
    return None if math.isnan(x) else round(x, digits)


class Tier:
    """A ring buffer of points: start time, length, counts, quantiles and weight."""

    __slots__ = ("_errors", "_n", "_p95", "_p99", "_requests", "_seconds", "_start",
                 "_t", "_weight", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"series tier: capacity {capacity!r} is not a positive count")
        self.capacity = capacity
        self._t = array("d", [0.0]) * capacity
        self._seconds = array("f", [0.0]) * capacity
        self._requests = array("I", [0]) * capacity
        self._errors = array("I", [0]) * capacity
        self._p95 = array("f", [0.0]) * capacity
        self._p99 = array("f", [0.0]) * capacity
        self._weight = array("f", [0.0]) * capacity
        self._start = 0  # index of the oldest point
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def append(self, t: float, seconds: float, requests: int, errors: int,
               p95: float | None, p99: float | None, weight: float | None) -> None:
        if self._n == self.capacity:
            i = self._start
            self._start = (self._start + 1) % self.capacity
        else:
            i = (self._start + self._n) % self.capacity
            self._n += 1
        self._t[i] = t
        self._seconds[i] = seconds
        self._requests[i] = min(requests, 0xFFFFFFFF)
        self._errors[i] = min(errors, 0xFFFFFFFF)
        self._p95[i] = _NAN if p95 is None else p95
        self._p99[i] = _NAN if p99 is None else p99
        self._weight[i] = _NAN if weight is None else weight

    def first(self) -> float | None:
        """The start time of the oldest point (None: empty)."""
        return self._t[self._start] if self._n else None

    def indexes(self, after: float, before: float = math.inf) -> list[int]:
        """Slots of the points with ``after < t`` whose end is at most ``before``, oldest
        first (a scan from the newest point back: the cost is what is returned)."""
        out = []
        for k in range(self._n - 1, -1, -1):
            i = (self._start + k) % self.capacity
            if self._t[i] <= after:
                break
            if self._t[i] + self._seconds[i] <= before + 1e-6:
                out.append(i)
        out.reverse()
        return out

    def write(self, slots: Iterable[int], view: PointsView) -> None:
        """Append the points in ``slots`` to ``view``'s columns."""
        for i in slots:
            seconds, requests, errors = float(self._seconds[i]), self._requests[i], self._errors[i]
            view["t"].append(round(self._t[i], 3))
            view["seconds"].append(seconds)
            view["requests"].append(requests)
            view["errors"].append(errors)
            view["rps"].append(round(requests / seconds, 3) if seconds > 0 else 0.0)
            view["error_rate"].append(round(errors / requests, 6) if requests else None)
            view["p95"].append(_opt(self._p95[i], 6))
            view["p99"].append(_opt(self._p99[i], 6))
            view["weight"].append(_opt(self._weight[i], 2))


def empty_points() -> PointsView:
    return {"t": [], "seconds": [], "requests": [], "errors": [], "rps": [],
            "error_rate": [], "p95": [], "p99": [], "weight": []}


class RingSeries:
    """One ring's fine and coarse tiers, and the coarse point being built."""

    __slots__ = ("_acc_errors", "_acc_group", "_acc_hist", "_acc_requests", "_acc_seconds",
                 "_acc_t", "_acc_weight", "_last", "bounds", "coarse", "fine", "resolution")

    def __init__(self, resolution: float = 1.0, fine_points: int = FINE_POINTS,
                 coarse_points: int = COARSE_POINTS,
                 bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        if not (math.isfinite(resolution) and resolution > 0):
            raise ValueError(f"series resolution: {resolution!r} is not a positive number")
        self.resolution = resolution
        self.bounds = tuple(bounds)
        self.fine = Tier(fine_points)
        self.coarse = Tier(coarse_points)
        self._last: int | None = None  # the last bucket added
        self._acc_group: int | None = None
        self._acc_t = 0.0
        self._acc_seconds = 0
        self._acc_requests = 0
        self._acc_errors = 0
        self._acc_hist = array("I", [0]) * (len(self.bounds) + 1)
        self._acc_weight: float | None = None

    def add(self, bucket: int, t: float, requests: int, errors: int,
            histogram: Sequence[int], weight: float | None) -> bool:
        """The ring's bucket number ``bucket`` (its window's ``floor(now / resolution)``),
        starting at Unix time ``t``: its counts and latency histogram, the weight then.

        Buckets come in increasing order; an older or repeated one is ignored (False).
        """
        if len(histogram) != len(self.bounds) + 1:
            raise ValueError(f"series: {len(histogram)} histogram counts for "
                             f"{len(self.bounds)} bounds; expected {len(self.bounds) + 1}")
        if self._last is not None and bucket <= self._last:
            return False
        self._last = bucket
        self.fine.append(t, self.resolution, requests, errors,
                         quantile(0.95, self.bounds, histogram),
                         quantile(0.99, self.bounds, histogram), weight)
        group = bucket // COARSE_EVERY
        if group != self._acc_group:
            self._flush()
            self._acc_group = group
            self._acc_t = t  # its first second (a sampler that starts mid-group: a short one)
        self._acc_seconds += 1
        self._acc_requests += requests
        self._acc_errors += errors
        for k, n in enumerate(histogram):
            self._acc_hist[k] += n
        self._acc_weight = weight  # the last: the step line holds a weight until it changes
        return True

    def _flush(self) -> None:
        if self._acc_group is None or not self._acc_seconds:
            return
        hist = self._acc_hist
        self.coarse.append(self._acc_t, self._acc_seconds * self.resolution, self._acc_requests,
                           self._acc_errors, quantile(0.95, self.bounds, hist),
                           quantile(0.99, self.bounds, hist), self._acc_weight)
        self._acc_seconds = self._acc_requests = self._acc_errors = 0
        for k in range(len(hist)):
            hist[k] = 0

    def first(self) -> float | None:
        """The start of the oldest point kept (None: nothing yet)."""
        starts = [t for t in (self.coarse.first(), self.fine.first()) if t is not None]
        return min(starts) if starts else None

    def points(self, since: float) -> PointsView:
        """The points that start after ``since``: coarse ones for the time before the fine
        tier, then every fine one."""
        view = empty_points()
        fine_from = self.fine.first()
        if fine_from is None:
            return view
        if since < fine_from:
            self.coarse.write(self.coarse.indexes(since, before=fine_from), view)
        self.fine.write(self.fine.indexes(since), view)
        return view

    def __repr__(self) -> str:
        return (f"<RingSeries fine={len(self.fine)}/{self.fine.capacity} "
                f"coarse={len(self.coarse)}/{self.coarse.capacity}>")


class SeriesStore:
    """A ``RingSeries`` per (route, ring) the current config has."""

    def __init__(self, resolution: float = 1.0, fine_points: int = FINE_POINTS,
                 coarse_points: int = COARSE_POINTS) -> None:
        self.resolution = resolution
        self.fine_points, self.coarse_points = fine_points, coarse_points
        self._rings: dict[tuple[str, str], RingSeries] = {}

    def keep(self, keys: Iterable[tuple[str, str]]) -> None:
        """Forget the rings not in ``keys`` (a reload removed them)."""
        wanted = set(keys)
        for key in [k for k in self._rings if k not in wanted]:
            del self._rings[key]

    def ring(self, route: str, ring: str) -> RingSeries:
        """The ring's series, created empty on first use."""
        series = self._rings.get((route, ring))
        if series is None:
            series = RingSeries(self.resolution, self.fine_points, self.coarse_points)
            self._rings[route, ring] = series
        return series

    def get(self, route: str, ring: str) -> RingSeries | None:
        return self._rings.get((route, ring))

    def __len__(self) -> int:
        return len(self._rings)

    def __repr__(self) -> str:
        return f"<SeriesStore rings={len(self._rings)}>"


def axis_start(now: float, step_starts: Iterable[float], oldest: float | None) -> float:
    """Where the charts' time axis starts: the last ``SHOWN`` seconds, or earlier when a
    ring's current step began earlier (the whole step), but never before the oldest point
    kept (``None``: nothing kept yet): a proxy that just started shows what it has."""
    start = min([now - SHOWN, *step_starts])
    if oldest is not None:
        start = max(start, oldest)
    return round(start, 3)


RingInfo = tuple[str, bool, str | None, float | None]  # name, baseline, phase, step_since


def series_view(
    store: SeriesStore,
    route: str,
    rings: Sequence[RingInfo],
    baseline: str | None,
    history: Iterable[Mapping[str, object]],
    now: float,
    since: float | None,
) -> SeriesView:
    """The route's series as the API answers it.  ``rings`` in the route's order;
    ``history`` the audit trail's events (any route; this one's are picked);
    ``since`` None: everything from the axis start."""
    active = [s for _, _, phase, s in rings
              if s is not None and phase in ("progressing", "awaiting_approval", "paused")]
    olds = [f for name, *_ in rings if (series := store.get(route, name)) is not None
            and (f := series.first()) is not None]
    start = axis_start(now, active, min(olds) if olds else None)
    after = start - 0.0005 if since is None else since  # times are kept to the ms
    out: list[RingSeriesView] = []
    for name, is_base, phase, step_since in rings:
        series = store.get(route, name)
        out.append({
            "name": name, "baseline": is_base, "phase": phase, "step_since": step_since,
            "points": series.points(after) if series is not None else empty_points(),
        })
    events = [dict(e) for e in history if e.get("route") == route
              and _time(e) > after]
    return {
        "route": route, "baseline": baseline, "now": round(now, 3), "since": since,
        "start": start, "resolution": store.resolution,
        "coarse_resolution": store.resolution * COARSE_EVERY,
        "retention": store.resolution * COARSE_EVERY * store.coarse_points,
        "rings": out, "events": events,
    }


def _time(event: Mapping[str, object]) -> float:
    when = event.get("time", 0)
    return float(when) if isinstance(when, int | float) else 0.0
