"""What workers report and how the supervisor adds it in (``proxy.workers.deltas``): the
sum of two workers' reports equals one recorder that saw all the traffic, exactly.  Pure:
recorders fed by hand on a hand-driven clock; the channel's framing over a socketpair."""

from __future__ import annotations

import json
import random
import socket

import pytest

from proxy.metrics import RingRecorder
from proxy.rollout.window import RingWindow
from proxy.workers.channel import Channel, ChannelClosed
from proxy.workers.deltas import DeltaWindow, add, take

OUTCOMES = [(200, ""), (500, ""), (404, ""), (0, "connect"), (502, "timeout"), (503, "overload"),
            (0, "client_closed"), (101, ""), (200, "internal")]


def _feed(recorders: list[RingRecorder], n: int, seed: int, start: float) -> float:
    rng = random.Random(seed)
    now = start
    for _ in range(n):
        now += rng.random() * 0.05
        status, error = rng.choice(OUTCOMES)
        duration = rng.lognormvariate(-4, 1.5)
        recorder = rng.choice(recorders)
        if rng.random() < 0.1:
            recorder.attempt(503, "", duration, now)
        recorder.record(status, error, duration, rng.randrange(100), rng.randrange(1000), now)
    return now


def _worker() -> RingRecorder:
    return RingRecorder("api", "canary", "v2", DeltaWindow())


def _state(r: RingRecorder, now: float) -> tuple[object, ...]:
    return (r.requests, r.upstream_errors, r.buckets, round(r.duration_sum, 9), r.sent,
            r.received, r.tally.evidence(), r.window.summary(now, 300))


def test_two_workers_reports_add_up_to_one_recorder_that_saw_everything() -> None:
    workers = [_worker(), _worker()]
    merged = RingRecorder("api", "canary", "v2", RingWindow(300, 1))
    alone = RingRecorder("api", "canary", "v2", RingWindow(300, 1))
    now = 1000.0
    for round_ in range(20):  # reports interleaved with traffic, as every 250 ms
        end = _feed(workers, 300, round_, now)
        _feed([alone], 300, round_, now)  # the same outcomes, the same times
        now = end
        for worker in workers:
            delta = take(worker)
            if delta is not None:
                add(merged, json.loads(json.dumps(delta)))  # through the channel's JSON
    assert _state(merged, now) == _state(alone, now)
    assert merged.tally.requests > 1000
    # Taken means gone: the next report is empty.
    assert [take(w) for w in workers] == [None, None]


def test_a_malformed_delta_adds_nothing() -> None:
    worker, merged = _worker(), RingRecorder("api", "canary", "v2", RingWindow(300, 1))
    worker.record(200, "", 0.01, 1, 1, 5.0)
    delta = take(worker)
    assert delta is not None
    delta["buckets"] = delta["buckets"][:-1]
    with pytest.raises(ValueError, match="expected 16 counts"):
        add(merged, delta)
    assert merged.tally.requests == 0 and sum(merged.requests) == 0


async def test_the_channel_keeps_order_and_reports_the_end() -> None:
    a, b = socket.socketpair()
    left, right = await Channel.open(a), await Channel.open(b)
    big = "x" * 300_000  # more than a socket buffer: framing, not luck
    for i in range(50):
        left.send({"type": "states", "i": i, "pad": big if i == 7 else ""})
    got = [await right.receive() for _ in range(50)]
    assert [m["i"] for m in got] == list(range(50)) and got[7]["pad"] == big
    left.close()
    with pytest.raises(ChannelClosed):
        await right.receive()
    right.close()
