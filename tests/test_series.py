"""The status page's series store (``proxy.admin.series``), synchronously: no sockets, no loop.

The sampler that feeds it runs against a real ``Metrics`` on a hand-driven clock here;
the endpoint and the page are tested over sockets and in a browser elsewhere.
"""

from __future__ import annotations

import json
import math
import random
import tracemalloc
from typing import Any

import pytest

from proxy.admin.sampler import Sampler
from proxy.admin.series import (
    COARSE_EVERY,
    COARSE_POINTS,
    FINE_POINTS,
    MEMORY_PER_RING,
    SHOWN,
    RingSeries,
    SeriesStore,
    Tier,
    axis_start,
    series_view,
)
from proxy.admin.views import advance_progress
from proxy.config import parse_config
from proxy.metrics import Metrics
from proxy.rollout.judge import Check, Finding
from proxy.rollout.window import LATENCY_BUCKETS, RingWindow, quantile
from proxy.runtime import Runtime

T0 = 1_700_000_000.0
NBUCKETS = len(LATENCY_BUCKETS) + 1


def hist(**at: int) -> list[int]:
    """A histogram with ``b<i>=count`` in bucket i."""
    h = [0] * NBUCKETS
    for key, n in at.items():
        h[int(key[1:])] = n
    return h


def test_a_second_becomes_one_fine_point_with_its_quantiles() -> None:
    s = RingSeries()
    h = hist(b3=90, b9=10)
    assert s.add(100, T0, 100, 7, h, 12.5)
    p = s.points(0)
    assert p["t"] == [T0] and p["seconds"] == [1.0]
    assert (p["requests"], p["errors"], p["rps"]) == ([100], [7], [100.0])
    assert p["error_rate"] == [0.07]
    assert p["p95"] == [round(quantile(0.95, LATENCY_BUCKETS, h), 6)]
    assert p["p99"] == [round(quantile(0.99, LATENCY_BUCKETS, h), 6)]
    assert p["weight"] == [12.5]
    # the same bucket again, or an older one, is ignored
    assert not s.add(100, T0, 5, 0, h, 1.0) and not s.add(99, T0 - 1, 5, 0, h, 1.0)
    assert len(s.fine) == 1


def test_a_quiet_second_has_no_rate_or_latency_and_a_rules_ring_no_weight() -> None:
    s = RingSeries()
    s.add(1, T0, 0, 0, hist(), None)
    p = s.points(0)
    assert p["requests"] == [0] and p["rps"] == [0.0]
    assert p["error_rate"] == [None] and p["p95"] == [None] and p["p99"] == [None]
    assert p["weight"] == [None]
    json.dumps(p, allow_nan=False)  # JSON: no NaN anywhere


def test_coarse_points_merge_histograms_not_quantiles() -> None:
    rng = random.Random(3)
    s = RingSeries(fine_points=5, coarse_points=100)
    seconds = []
    for bucket in range(20, 60):  # groups 2..5 complete, 5 still open at 59? no: 50..59 open
        h = [rng.randrange(0, 30) if rng.random() < 0.4 else 0 for _ in range(NBUCKETS)]
        errors = rng.randrange(0, 5)
        seconds.append((bucket, sum(h), errors, h))
        s.add(bucket, T0 + bucket, sum(h), errors, h, float(bucket // 10))
    # groups 2, 3, 4 are complete; group 5 (50..59) is being built
    assert len(s.coarse) == 3 and len(s.fine) == 5
    view = s.points(0)
    coarse = [i for i, sec in enumerate(view["seconds"]) if sec == COARSE_EVERY]
    assert [view["t"][i] for i in coarse] == [T0 + 20, T0 + 30, T0 + 40]
    for i, group in zip(coarse, (2, 3, 4), strict=True):
        members = [x for x in seconds if x[0] // 10 == group]
        merged = [sum(x[3][k] for x in members) for k in range(NBUCKETS)]
        requests = sum(x[1] for x in members)
        assert view["requests"][i] == requests
        assert view["errors"][i] == sum(x[2] for x in members)
        assert view["rps"][i] == round(requests / 10, 3)
        want = quantile(0.95, LATENCY_BUCKETS, merged)
        assert view["p95"][i] == pytest.approx(want, abs=2e-6)  # float32 storage
        assert view["p99"][i] == pytest.approx(quantile(0.99, LATENCY_BUCKETS, merged),
                                               abs=2e-6)
        assert view["weight"][i] == float(group)  # the last second's
    # then the fine points, the last five seconds (55..59), at 1 s
    assert view["t"][3:] == [T0 + b for b in range(55, 60)]
    assert view["seconds"][3:] == [1.0] * 5
    # coarse points reach only up to where the fine tier starts
    assert view["t"][2] + 10 <= view["t"][3]


def test_a_coarse_point_covers_the_seconds_it_merged() -> None:
    s = RingSeries(fine_points=1)
    for bucket in range(17, 31):  # a sampler that started mid-group: 17..19 is short
        s.add(bucket, T0 + bucket, 6, 0, hist(b1=6), None)
    view = s.points(0)
    assert list(zip(view["t"], view["seconds"], view["rps"], strict=True))[:2] == [
        (T0 + 17, 3.0, 6.0), (T0 + 20, 10.0, 6.0)]
    assert s.first() == T0 + 17


def test_tiers_are_bounded_ring_buffers() -> None:
    s = RingSeries(fine_points=30, coarse_points=4)
    for bucket in range(1000):
        s.add(bucket, T0 + bucket, 1, 0, hist(b0=1), 1.0)
    assert len(s.fine) == 30 and len(s.coarse) == 4
    view = s.points(0)
    # 4 coarse points kept (950..989, 990.. is open); those before the fine tier are shown
    assert view["t"][:2] == [T0 + 950, T0 + 960]
    assert view["t"][2:] == [T0 + b for b in range(970, 1000)]
    assert view["rps"] == [1.0] * len(view["t"])
    assert s.first() == T0 + 950


def test_since_returns_only_newer_points() -> None:
    s = RingSeries(fine_points=30, coarse_points=10)
    for bucket in range(100):
        s.add(bucket, T0 + bucket, 2, 1, hist(b1=2), None)
    assert s.points(T0 + 97)["t"] == [T0 + 98, T0 + 99]
    assert s.points(T0 + 99)["t"] == []
    # before the fine tier: the coarse points after since, then all fine points
    got = s.points(T0 + 45)["t"]
    assert got == [T0 + 50, T0 + 60] + [T0 + b for b in range(70, 100)]
    assert Tier(3).indexes(0) == []


def test_bad_arguments_are_refused_with_what_was_expected() -> None:
    with pytest.raises(ValueError, match="capacity 0"):
        Tier(0)
    with pytest.raises(ValueError, match="resolution"):
        RingSeries(resolution=0)
    with pytest.raises(ValueError, match="3 histogram counts for 15 bounds; expected 16"):
        RingSeries().add(1, T0, 1, 0, [1, 0, 0], None)


def test_axis_start_is_the_last_15_minutes_or_the_whole_step() -> None:
    now = T0 + 10_000
    assert axis_start(now, [], None) == now - SHOWN
    assert axis_start(now, [now - 60], None) == now - SHOWN  # a young step: 15 min
    assert axis_start(now, [now - 3600], now - 5000) == now - 3600  # an old step: all of it
    # never before the oldest point kept: a young proxy shows what it has
    assert axis_start(now, [now - 9000], now - 5000) == now - 5000
    assert axis_start(now, [now - 9000], now - 60) == now - 60


def test_series_view_shape_events_and_json() -> None:
    store = SeriesStore()
    for bucket in range(10):
        store.ring("api", "canary").add(bucket, T0 + bucket, 10, 1, hist(b2=10), 5.0)
        store.ring("api", "stable").add(bucket, T0 + bucket, 90, 0, hist(b2=90), 95.0)
    history: list[dict[str, object]] = [
        {"time": T0 + 3.5, "route": "api", "ring": "canary", "kind": "rollback",
         "reason": "error_rate: 30 % > 5 %"},
        {"time": T0 + 4, "route": "web", "ring": "canary", "kind": "advance", "reason": ""},
    ]
    rings = [("canary", False, "progressing", T0 - 100), ("stable", True, "steady", T0 - 9e5)]
    view = series_view(store, "api", rings, "stable", history, T0 + 10, None)
    # the steady baseline's old step is no reason to reach back; a young store shows all
    assert view["start"] == T0
    assert [r["name"] for r in view["rings"]] == ["canary", "stable"]
    assert view["rings"][1]["baseline"] and view["baseline"] == "stable"
    assert view["rings"][0]["points"]["t"] == [T0 + b for b in range(10)]
    assert view["rings"][1]["points"]["rps"] == [90.0] * 10
    assert [e["kind"] for e in view["events"]] == ["rollback"]
    assert (view["resolution"], view["coarse_resolution"]) == (1.0, 10.0)
    assert view["retention"] == 10.0 * COARSE_POINTS
    later = series_view(store, "api", rings, "stable", history, T0 + 10, T0 + 7)
    assert later["since"] == T0 + 7 and later["events"] == []
    assert later["rings"][0]["points"]["t"] == [T0 + 8, T0 + 9]
    # a ring the store has not seen yet: empty columns
    fresh = series_view(SeriesStore(), "api", rings, "stable", [], T0, None)
    assert fresh["rings"][0]["points"]["t"] == [] and fresh["start"] == T0 - SHOWN
    json.dumps(view, allow_nan=False)


def test_the_store_forgets_rings_a_reload_removed() -> None:
    store = SeriesStore()
    store.ring("api", "a").add(1, T0, 1, 0, hist(), None)
    store.ring("api", "b").add(1, T0, 1, 0, hist(), None)
    store.keep([("api", "b")])
    assert store.get("api", "a") is None and store.get("api", "b") is not None
    assert len(store) == 1 and repr(store) == "<SeriesStore rings=1>"


def test_memory_per_ring_filled_to_capacity() -> None:
    # What README and the module promise: a ring costs MEMORY_PER_RING bytes at most,
    # measured on a full series (the arrays are allocated up front, so also when empty).
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        rings = [RingSeries() for _ in range(10)]
        for s in rings:
            for bucket in range(COARSE_POINTS + 10):  # each in a group of its own
                s.add(bucket * 50, T0 + bucket * 50, 123, 4, hist(b3=100, b9=23), 10.0)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_ring = sum(d.size_diff for d in after.compare_to(before, "filename")) / len(rings)
    assert len(rings[0].fine) == FINE_POINTS and len(rings[0].coarse) == COARSE_POINTS
    print(f"\nseries memory per ring: {per_ring / 1000:.1f} kB")
    assert per_ring <= MEMORY_PER_RING
    assert per_ring >= 0.9 * MEMORY_PER_RING, "MEMORY_PER_RING is stale: measure again"


def check(finding: Finding, estimate: float | None, lower: float, upper: float,
          limit: float) -> Check:
    return Check("c", finding, estimate, lower, upper, limit, 0.5, 0.01, "detail")


def test_advance_progress_is_the_share_of_the_needed_evidence() -> None:
    assert advance_progress(check(Finding.WITHIN, 0.01, 0.0, 0.019, 0.02)) == 1.0
    assert advance_progress(check(Finding.WORSE, 0.5, 0.3, 0.7, 0.02)) == 0.0
    assert advance_progress(check(Finding.UNDECIDED, None, 0, math.inf, 0.02)) == 0.0
    assert advance_progress(check(Finding.UNDECIDED, 0.03, 0.0, 0.1, 0.02)) == 0.0
    # estimate 0, bound 0.04 against a limit of 0.02: a quarter of the requests needed
    got = advance_progress(check(Finding.UNDECIDED, 0.0, -0.04, 0.04, 0.02))
    assert got == pytest.approx(0.25)
    # and it grows as the bound closes in on the limit
    shares = [advance_progress(check(Finding.UNDECIDED, 0.0, -u, u, 0.02))
              for u in (0.5, 0.1, 0.05, 0.03, 0.021)]
    assert shares == sorted(shares) and 0 < shares[0] < shares[-1] < 1


CONFIG = """
listen: 127.0.0.1:0
admin: {listen: 127.0.0.1:0}
pools:
  stable: {servers: ["http://127.0.0.1:9"]}
  canary: {servers: ["http://127.0.0.1:9"]}
routes:
  - name: api
    sticky: {key: ["header:X-User-Id"]}
    rings:
      - {name: canary, pool: canary, weight: 20}
      - {name: stable, pool: stable}
"""


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_sampler_reads_each_completed_second_of_the_metrics_windows() -> None:
    runtime = Runtime(parse_config(CONFIG))
    metrics = Metrics(window_horizon=300, process_metrics=False)
    metrics.attach(runtime)
    mono = Clock(1000.2)
    sampler = Sampler(lambda: runtime, metrics, mono=mono, wall=lambda: T0 + 1000.2)
    canary, stable = runtime.rings["api"]
    assert canary.recorder is not None and stable.recorder is not None
    assert sampler.tick() == 1  # bucket 999: empty
    for second in range(1000, 1004):
        for k in range(second - 995):  # 5, 6, 7, 8 requests
            canary.recorder.record(500 if k == 0 else 200, "", 0.004, 0, 0, second + 0.1 * k)
        stable.recorder.record(200, "", 0.02, 0, 0, second + 0.5)
    mono.t = 1003.06  # 1000..1002 complete; 1003 not yet
    assert sampler.tick() == 3
    view: dict[str, Any] = series_view(
        sampler.store, "api", [("canary", False, None, None), ("stable", True, None, None)],
        "stable", [], T0 + 1004, T0 + 999.5)
    points = view["rings"][0]["points"]
    assert points["t"] == [T0 + 1000, T0 + 1001, T0 + 1002]  # wall time of each bucket
    assert points["requests"] == [5, 6, 7] and points["errors"] == [1, 1, 1]
    assert points["weight"] == [20.0] * 3
    assert view["rings"][1]["points"]["requests"] == [1, 1, 1]
    assert view["rings"][1]["points"]["weight"] == [80.0] * 3
    mono.t = 1004.06
    assert sampler.tick() == 1
    mono.t = 1060.0  # a stalled loop: only the last CATCH_UP seconds are read back
    assert sampler.tick() == 10
    assert len(sampler.store.ring("api", "canary").fine) == 1 + 4 + 10
    assert repr(sampler) == "<Sampler rings=2 last=1059>"
    RingWindow()  # the window the metrics layer builds (the sampler never writes to it)
