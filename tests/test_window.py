"""The sliding window store, driven with a hand-made clock.  Pure: no sockets, no sleep."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from proxy.rollout.window import (
    LATENCY_BUCKETS,
    Recent,
    RingWindow,
    Summary,
    quantile,
    summarize,
)

B = (1.0, 2.0, 4.0)  # small bounds for hand-checked percentiles


# --------------------------------------------------------------------------- quantile


@pytest.mark.parametrize(
    ("q", "counts", "expected"),
    [
        (0.5, [0, 10, 0, 0], 1.5),  # interpolated inside (1, 2]
        (0.99, [0, 10, 0, 0], 1.99),
        (1.0, [0, 10, 0, 0], 2.0),  # the top of the bucket
        (0.5, [4, 0, 0, 0], 0.5),  # the first bucket starts at 0
        (0.5, [1, 1, 1, 1], 2.0),  # rank 2 is exactly the top of the second bucket
        (0.25, [1, 1, 1, 1], 1.0),
        (0.75, [1, 1, 1, 1], 4.0),
        (0.95, [1, 1, 1, 1], 4.0),  # rank in +Inf: the highest finite bound
        (0.5, [0, 0, 0, 5], 4.0),
        (0.9, [5, 0, 0, 5], 4.0),
        (0.5, [0, 0, 4, 0], 3.0),  # (2, 4]: 2 + 2 * 2/4
        (0.5, [1, 0, 3, 0], 2 + 2 * (2 - 1) / 3),  # empty buckets below are skipped
    ],
)
def test_quantile_interpolates_like_prometheus_histogram_quantile(
    q: float, counts: list[int], expected: float
) -> None:
    result = quantile(q, B, counts)
    assert result is not None
    assert math.isclose(result, expected, rel_tol=1e-12)


def test_quantile_of_an_empty_histogram_is_none() -> None:
    assert quantile(0.5, B, [0, 0, 0, 0]) is None


def test_quantile_rejects_bad_arguments_with_the_value() -> None:
    with pytest.raises(ValueError, match=r"q=1\.5 is outside \[0, 1\]"):
        quantile(1.5, B, [1, 0, 0, 0])
    with pytest.raises(ValueError, match="3 counts for 3 bounds; expected 4"):
        quantile(0.5, B, [1, 0, 0])


def test_summarize_computes_error_rate_and_percentiles() -> None:
    s = summarize(10, requests=8, errors=2, histogram=[0, 8, 0, 0], bounds=B)
    assert (s.requests, s.errors, s.error_rate, s.observed) == (8, 2, 0.25, 8)
    assert (s.p50, s.p95, s.p99) == (1.5, 1.95, 1.99)
    assert s.quantile(0.25) == 1.25
    empty = summarize(10, 0, 0, [0, 0, 0, 0], B)
    assert (empty.error_rate, empty.p50, empty.p95, empty.p99) == (0.0, None, None, None)
    assert repr(s) == "<Summary 10s requests=8 errors=2 p50=1500.0ms p95=1950.0ms p99=1990.0ms>"
    assert repr(empty) == "<Summary 10s requests=0 errors=0 p50=- p95=- p99=->"


# --------------------------------------------------------------------------- window


def test_an_empty_window_summarises_to_zero() -> None:
    w = RingWindow(horizon=60)
    s = w.summary(now=1000.0, seconds=60)
    assert s == Summary(60, 0, 0, 0.0, None, None, None, (0,) * (len(LATENCY_BUCKETS) + 1))


def test_records_land_in_their_latency_buckets_inclusive_upper_bounds() -> None:
    w = RingWindow(horizon=10, bounds=B)
    for d in (0.5, 1.0, 1.0001, 2.0, 3.9, 4.0, 4.0001, 100.0):
        w.record(5.0, d, error=False)
    # le is inclusive, as in Prometheus: 1.0 is in (0, 1], 4.0 in (2, 4].
    assert w.summary(5.0, 1).histogram == (2, 2, 2, 2)


def test_errors_and_untimed_requests_are_counted() -> None:
    w = RingWindow(horizon=10, bounds=B)
    w.record(1.0, 0.5, error=True)
    w.record(1.0, None, error=False)  # e.g. a WebSocket: counted, no latency
    s = w.summary(1.0, 1)
    assert (s.requests, s.errors, s.error_rate, s.observed) == (2, 1, 0.5, 1)
    assert s.p50 == 0.5


def test_bucket_rollover_only_the_last_seconds_count() -> None:
    w = RingWindow(horizon=10, bounds=B)
    w.record(0.2, 0.5, False)
    w.record(0.9, 0.5, False)  # same 1 s bucket as 0.2
    w.record(1.0, 0.5, True)  # the next bucket starts exactly at 1.0
    w.record(1.99, 0.5, False)
    assert w.summary(1.5, 1).requests == 2  # bucket [1, 2) only, the current one
    assert w.summary(1.5, 2).requests == 4
    assert w.summary(0.99, 1).requests == 2  # bucket [1, 2) is in the future for now=0.99
    assert w.summary(2.0, 1).requests == 0  # a new, empty current bucket
    assert w.summary(2.0, 2).requests == 2
    assert w.summary(2.0, 2).errors == 1


def test_fractional_seconds_round_up_to_whole_buckets() -> None:
    w = RingWindow(horizon=10)
    for t in range(10):
        w.record(t + 0.5, 0.01, False)
    assert w.summary(9.5, 2.5).requests == 3
    assert w.summary(9.5, 0.1).requests == 1
    assert w.summary(9.5, 10).requests == 10
    assert w.summary(9.5, 2.5).seconds == 2.5


def test_gaps_read_as_empty_buckets() -> None:
    w = RingWindow(horizon=60, bounds=B)
    w.record(100.0, 0.5, True)
    w.record(130.0, 3.0, False)
    assert w.summary(130.0, 30).requests == 1  # buckets 101..130
    s = w.summary(130.0, 31)
    assert (s.requests, s.errors) == (2, 1)
    assert w.summary(150.0, 19).requests == 0  # nothing in 132..150
    assert w.summary(150.0, 21).requests == 1


def test_buckets_older_than_the_horizon_are_forgotten_when_their_slot_is_reused() -> None:
    w = RingWindow(horizon=5, bounds=B)  # five 1 s slots
    w.record(0.5, 0.5, True)  # epoch 0, slot 0
    w.record(3.5, 0.5, False)  # epoch 3, slot 3
    w.record(5.5, 3.0, False)  # epoch 5 reuses slot 0: epoch 0 is dropped
    s = w.summary(5.5, 5)
    assert (s.requests, s.errors, s.histogram) == (2, 0, (1, 0, 1, 0))
    # Even without a newer record on its slot, an old bucket is outside the window.
    w2 = RingWindow(horizon=5)
    w2.record(0.5, 0.5, False)
    assert w2.summary(4.9, 5).requests == 1
    assert w2.summary(5.0, 5).requests == 0


def test_late_records_within_the_horizon_count_older_ones_are_dropped() -> None:
    w = RingWindow(horizon=5, bounds=B)
    w.record(10.5, 0.5, False)  # epoch 10, slot 0
    w.record(8.5, 0.5, False)  # late but inside the horizon: epoch 8, slot 3
    w.record(5.5, 0.5, False)  # epoch 5 -> slot 0, which holds epoch 10: dropped
    w.record(9.5, 0.5, False)  # epoch 9 -> slot 4, never used: kept
    assert w.summary(10.5, 5).requests == 3
    assert w.summary(10.5, 1).requests == 1


def test_a_sub_second_resolution() -> None:
    w = RingWindow(horizon=2, resolution=0.25, bounds=B)
    for t in (0.0, 0.1, 0.25, 0.5, 1.75, 1.99):
        w.record(t, 0.5, False)
    assert w.summary(1.99, 0.25).requests == 2  # [1.75, 2.0)
    assert w.summary(1.99, 2).requests == 6
    assert w.summary(2.0, 0.5).requests == 2  # [1.5, 2.0) and the empty [2.0, 2.25)
    assert repr(w) == "<RingWindow horizon=2s resolution=0.25s buckets=8>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 0.0}, "window resolution: 0.0 is not a positive number"),
        ({"resolution": math.nan}, "window resolution: nan is not a positive number"),
        ({"horizon": 0.5}, r"window horizon: 0\.5 is not a number >= the resolution 1\.0"),
        ({"horizon": math.inf}, "window horizon: inf is not"),
        ({"bounds": ()}, r"window bounds: \(\) are not"),
        ({"bounds": (1.0, 1.0)}, "strictly increasing"),
        ({"bounds": (0.0, 1.0)}, "positive"),
        ({"bounds": (1.0, math.inf)}, "finite"),
    ],
)
def test_window_settings_are_validated(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RingWindow(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("seconds", [0, -1, 61, math.nan, math.inf])
def test_summary_seconds_must_be_within_the_horizon(seconds: float) -> None:
    w = RingWindow(horizon=60)
    with pytest.raises(ValueError, match=r"is not in \(0, horizon=60\]"):
        w.summary(100.0, seconds)


def test_random_histories_match_a_brute_force_model() -> None:
    rng = random.Random(20261123)
    for _ in range(40):
        horizon = rng.choice([3, 5, 10, 60])
        resolution = rng.choice([0.5, 1.0])
        w = RingWindow(horizon=horizon, resolution=resolution, bounds=B)
        slots = math.ceil(horizon / resolution)
        log: list[tuple[int, float | None, bool]] = []  # (epoch, duration, error) kept
        newest: dict[int, int] = {}  # slot -> newest epoch written there
        now = rng.uniform(0, 100)
        for _ in range(rng.randrange(0, 400)):
            # Mostly forward with gaps, sometimes a late record.
            now += rng.choice([0.0, 0.01, 0.3, 1.0, 2.7, 7.0, 40.0])
            t = now - rng.choice([0.0, 0.0, 0.0, 1.0, horizon * 1.5])
            d = rng.choice([None, 0.2, 1.0, 1.5, 3.0, 9.0])
            err = rng.random() < 0.3
            w.record(t, d, err)
            epoch = math.floor(t / resolution)
            slot = epoch % slots
            if newest.get(slot, -(10**9)) > epoch:
                continue  # the model drops it too
            if newest.get(slot) != epoch:
                log = [e for e in log if e[0] % slots != slot]
                newest[slot] = epoch
            log.append((epoch, d, err))
        for _ in range(10):
            at = now - rng.choice([0.0, 0.5, 3.0])
            seconds = rng.uniform(0.01, horizon)
            current = math.floor(at / resolution)
            k = math.ceil(seconds / resolution - 1e-9)
            inside = [e for e in log if current - k < e[0] <= current]
            hist = [0, 0, 0, 0]
            for _, d, _ in inside:
                if d is not None:
                    hist[sum(1 for b in B if d > b)] += 1
            expected = summarize(seconds, len(inside), sum(e[2] for e in inside), hist, B)
            assert w.summary(at, seconds) == expected


def test_add_with_the_bucket_found_is_record() -> None:
    by_record, by_add = RingWindow(horizon=10, bounds=B), RingWindow(horizon=10, bounds=B)
    history = [(1.0, 0.5, False), (1.2, 4.0, True), (2.5, None, False), (3.0, 9.0, True)]
    for t, d, err in history:
        by_record.record(t, d, err)
        by_add.add(t, -1 if d is None else sum(1 for b in B if d > b), err)
    assert by_record.summary(3.0, 10) == by_add.summary(3.0, 10)
    assert by_add.summary(3.0, 10).histogram == (1, 0, 1, 1)  # le inclusive: 4.0 in (2, 4]


# --------------------------------------------------------------------------- recent


def test_recent_counts_what_a_running_total_added_over_the_last_seconds() -> None:
    r = Recent(1.0)
    assert r.look(10.0, 100, 7) == (0, 0)  # the history starts at the first look
    assert r.look(10.1, 102, 7) == (2, 0)
    assert r.look(10.5, 110, 9) == (10, 2)  # shorter than a second: since the first look
    assert r.look(11.0, 120, 9) == (20, 2)  # exactly a second: 10.0 still counts
    assert r.look(11.05, 121, 10) == (19, 3)  # now since 10.1, the oldest look in range
    assert r.look(13.0, 122, 10) == (0, 0)  # nothing looked at in the last second
    assert repr(r) == "<Recent 1s looks=1>"


def test_recent_is_never_diluted_by_what_came_before_its_seconds() -> None:
    # 20 requests/s, healthy, then only errors from t=50: looks every 0.1 s.
    r = Recent(1.0)
    total = errors = 0
    shares = {}
    for tick in range(0, 560, 1):  # tenths of a second from 0 to 56
        t = tick / 10
        total += 2
        errors += 2 if t > 50 else 0
        n, e = r.look(t, total, errors)
        shares[tick] = e / n if n else 0.0
    assert shares[499] == 0.0 and shares[500] == 0.0
    assert shares[503] == 0.3  # 0.3 s after the onset: 6 of the last 20
    assert shares[510] == 1.0  # a second after: nothing else


def test_recent_rejects_time_going_back_and_a_bad_span() -> None:
    r = Recent(2.0)
    r.look(5.0, 1, 0)
    with pytest.raises(ValueError, match=r"now=4\.0 is before the last look 5\.0"):
        r.look(4.0, 1, 0)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="is not a positive number"):
            Recent(bad)


def test_recent_matches_a_brute_force_model() -> None:
    rng = random.Random(7)
    for _ in range(30):
        seconds = rng.choice([0.5, 1.0, 2.5])
        r = Recent(seconds)
        looks: list[tuple[float, int, int]] = []
        now, total, errors = rng.uniform(0, 100), 0, 0
        for _ in range(rng.randrange(1, 200)):
            now += rng.choice([0.0, 0.05, 0.1, 0.1, 0.3, 1.7, 5.0])
            added = rng.randrange(0, 6)
            total, errors = total + added, errors + rng.randrange(0, added + 1)
            looks.append((now, total, errors))
            base = min((x for x in looks if x[0] >= now - seconds - 1e-9), key=lambda x: x[0])
            assert r.look(now, total, errors) == (total - base[1], errors - base[2])


# --------------------------------------------------------------------------- the core line


def test_only_the_metrics_module_imports_prometheus_client() -> None:
    package = Path(__file__).resolve().parent.parent / "proxy"
    users = sorted(
        str(p.relative_to(package)) for p in package.rglob("*.py")
        if "prometheus_client" in p.read_text()
    )
    assert users == ["metrics.py"]
