"""What a worker recorded since its last report, taken out and added in elsewhere.

A worker process's recorders (``proxy.metrics.RingRecorder``) count as a single process's
do; every report (``take``) reads them and sets them back to zero, on the event loop
thread, so nothing recorded is counted twice or lost.  Its supervisor adds each delta to
its own recorder of the same (route, ring, pool) (``add``): its counters, histograms,
tallies (what the judge reads) and windows (what the admin views read) are then the
host's totals, exactly.

A worker's window (``DeltaWindow``) keeps only the per-second counts not reported yet;
the supervisor's ``RingWindow.merge`` puts them into the same second, both processes
reading the one monotonic clock of the host.

Messages are plain JSON values (lists of numbers), see ``proxy.workers.channel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import floor
from typing import Any

from proxy.metrics import CODE_CLASSES, ERROR_KINDS, RingRecorder
from proxy.rollout.window import LATENCY_BUCKETS, RingWindow

Delta = dict[str, Any]

_HIST = len(LATENCY_BUCKETS) + 1


class DeltaWindow(RingWindow):
    """A worker's window: the counts per second not reported yet, nothing older."""

    __slots__ = ("pending",)

    def __init__(self, resolution: float = 1.0) -> None:
        super().__init__(resolution, resolution)  # one slot: never read
        self.pending: dict[int, list[Any]] = {}  # epoch -> [count, errors, hist]

    def add(self, now: float, bucket: int, error: bool) -> None:
        epoch = floor(now / self.resolution)
        entry = self.pending.get(epoch)
        if entry is None:
            entry = self.pending[epoch] = [0, 0, [0] * _HIST]
        entry[0] += 1
        if error:
            entry[1] += 1
        if bucket >= 0:
            entry[2][bucket] += 1

    def take(self) -> list[list[Any]]:
        """[[epoch, count, errors, hist], ...] since the last take; then empty."""
        out = [[epoch, *entry] for epoch, entry in self.pending.items()]
        self.pending = {}
        return out


def take(recorder: RingRecorder) -> Delta | None:
    """The recorder's counts since the last take (None: nothing), set back to zero."""
    tally = recorder.tally
    window = recorder.window
    pending = window.pending if isinstance(window, DeltaWindow) else None
    if not (tally.requests or pending or recorder.sent or recorder.received
            or any(recorder.requests) or any(recorder.upstream_errors)):
        return None
    latency = tally.latency
    sparse = [[i, n] for i, n in enumerate(latency) if n]
    for i, _ in sparse:
        latency[i] = 0
    delta: Delta = {
        "key": list(recorder.labels),
        "requests": recorder.requests,
        "upstream_errors": recorder.upstream_errors,
        "buckets": recorder.buckets,
        "duration_sum": recorder.duration_sum,
        "sent": recorder.sent,
        "received": recorder.received,
        "judged": tally.requests,
        "errors": tally.errors,
        "latency": sparse,
        "window": window.take() if isinstance(window, DeltaWindow) else [],
    }
    recorder.requests = [0] * len(CODE_CLASSES)
    recorder.upstream_errors = [0] * len(ERROR_KINDS)
    recorder.buckets = [0] * _HIST
    recorder.duration_sum = 0.0
    recorder.sent = recorder.received = 0
    tally.requests = tally.errors = 0
    return delta


def add(recorder: RingRecorder, delta: Delta) -> None:
    """Add a worker's ``delta`` (from ``take``) into ``recorder``; ValueError if malformed
    (nothing is added then)."""
    requests = _counts(delta["requests"], len(CODE_CLASSES))
    errors = _counts(delta["upstream_errors"], len(ERROR_KINDS))
    buckets = _counts(delta["buckets"], _HIST)
    windows = [(int(e), int(c), int(x), _counts(h, _HIST)) for e, c, x, h in delta["window"]]
    latency = [(int(i), int(n)) for i, n in delta["latency"]]
    tally = recorder.tally
    if any(not 0 <= i < len(tally.latency) for i, _ in latency):
        raise ValueError("latency index out of range")
    for i, n in enumerate(requests):
        recorder.requests[i] += n
    for i, n in enumerate(errors):
        recorder.upstream_errors[i] += n
    for i, n in enumerate(buckets):
        recorder.buckets[i] += n
    recorder.duration_sum += float(delta["duration_sum"])
    recorder.sent += int(delta["sent"])
    recorder.received += int(delta["received"])
    tally.requests += int(delta["judged"])
    tally.errors += int(delta["errors"])
    for i, n in latency:
        tally.latency[i] += n
    for epoch, count, errs, hist in windows:
        recorder.window.merge(epoch, count, errs, hist)


def _counts(value: Sequence[Any], size: int) -> list[int]:
    if len(value) != size:
        raise ValueError(f"expected {size} counts, got {len(value)}")
    return [int(n) for n in value]
