"""The task that fills the admin API's series: every second, each ring's last second.

Started and stopped with the admin app (``admin_app``'s cleanup context), never on the
request path.  Each tick reads, for every ring of the current runtime, the buckets of its
metrics window (``Metrics.window``) completed since the last tick, and the ring's live
weight, into the pure ``SeriesStore``.  A ring without metrics (``metrics.enabled:
false``) gets no points.  A tick costs about 10 us per ring (two quantiles of a 16-bucket
histogram, measured with 100 rings); a loop stalled for longer than ``CATCH_UP`` seconds
loses the older seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.admin.series import SeriesStore
from proxy.tasks import cancel_and_wait

if TYPE_CHECKING:
    from proxy.metrics import Metrics
    from proxy.runtime import Runtime

log = logging.getLogger("ringproxy.admin")

CATCH_UP = 10  # buckets a late tick still reads back (the window keeps minutes)
LAG = 0.05  # seconds after a bucket's end before it is read (requests record at their end)


class Sampler:
    """Reads completed window buckets into ``store``; ``runtime`` is read on every tick
    (a reload swaps it)."""

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        metrics: Metrics,
        store: SeriesStore | None = None,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.runtime, self.metrics = runtime, metrics
        self.resolution = metrics.window_resolution
        self.store = store if store is not None else SeriesStore(self.resolution)
        self.mono = mono
        # Unix time of monotonic 0, taken once: points are evenly spaced on the wall clock
        # too, whatever NTP does to it meanwhile.
        self.offset = wall() - mono()
        self._last: int | None = None  # the last bucket read
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> int:
        """Read the buckets completed since the last tick; returns how many."""
        now = self.mono()
        res = self.resolution
        done = math.floor(now / res) - 1  # the newest complete bucket
        first = done if self._last is None else max(self._last + 1, done - CATCH_UP + 1)
        runtime = self.runtime()
        keys = [(ring.route, ring.name) for rings in runtime.rings.values() for ring in rings]
        self.store.keep(keys)
        for bucket in range(first, done + 1):
            at = (bucket + 0.5) * res
            for rings in runtime.rings.values():
                for ring in rings:
                    try:
                        summary = self.metrics.window(ring.route, ring.name, at, res)
                    except KeyError:
                        continue  # no metrics for it
                    self.store.ring(ring.route, ring.name).add(
                        bucket, round(bucket * res + self.offset, 3), summary.requests,
                        summary.errors, summary.histogram, ring.weight)
        read = max(0, done - first + 1)
        self._last = done if self._last is None else max(self._last, done)
        return read

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bug here must not stop the charts for good
                log.exception("series sampler: tick failed")
            res = self.resolution
            now = self.mono()
            await asyncio.sleep((math.floor(now / res) + 1) * res - now + LAG)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def __repr__(self) -> str:
        return f"<Sampler rings={len(self.store)} last={self._last}>"
