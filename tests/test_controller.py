"""The control loop driven directly: a real Controller, Metrics, Runtime and state file, an
injected clock, synthetic traffic fed to the rings' recorders.  No sockets, no sleeping: a
whole rollout runs in milliseconds."""

from __future__ import annotations

import asyncio
import math
import random
import textwrap
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from proxy.config import Config, parse_config
from proxy.control.controller import Controller
from proxy.control.statefile import load_state, save_state
from proxy.errors import RolloutConflict
from proxy.metrics import Metrics
from proxy.rollout.judge import Outcome
from proxy.rollout.machine import Phase, RingState, Trigger
from proxy.rollout.state import Event
from proxy.runtime import RingRuntime, Runtime


def config_text(tmp_path: Path, ring: str = "weight: 50", extra_ring: str = "",
                analysis: str = "", max_blind: str = "60s") -> str:
    return textwrap.dedent(f"""
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        pools:
          stable: {{servers: ["http://127.0.0.1:9"]}}
          canary: {{servers: ["http://127.0.0.1:10"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis:
              interval: 1s
              min_requests: 100
              max_blind: {max_blind}
              {analysis}
            rings:
              {extra_ring}
              - name: canary
                pool: canary
                {ring}
              - name: stable
                pool: stable
    """)


class Clock:
    """Both of the controller's clocks, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Latency = Callable[[random.Random], float]


def jitter(rng: random.Random) -> float:
    """A healthy upstream: about 10 ms, a few ms either way."""
    return rng.lognormvariate(math.log(0.010), 0.25)


class Harness:
    """A controller wired as the proxy wires it, minus the listeners."""

    def __init__(
        self, config: Config,
        save: Callable[[Path, Mapping[str, Mapping[str, RingState]]], None] = save_state,
    ) -> None:
        self.clock = Clock()
        self.metrics = Metrics(window_horizon=300.0, process_metrics=False)
        self.runtime = Runtime(config)
        self.metrics.attach(self.runtime)
        self.controller = Controller(config, self.metrics, wall=self.clock, mono=self.clock,
                                     save=save)
        self.controller.load()
        self.controller.configure(self.runtime)
        self.rng = random.Random(12)

    def ring(self, name: str) -> RingRuntime:
        (ring_rt,) = [r for r in self.runtime.rings["api"] if r.name == name]
        return ring_rt

    def feed(self, ring: str, requests: int, errors: int = 0, latency: float = 0.010,
             status: int = 500, error: str = "") -> None:
        """``requests`` finished on ``ring`` at the clock's now, the first ``errors`` of
        them with ``status`` (and ``error``)."""
        recorder = self.ring(ring).recorder
        assert recorder is not None
        for i in range(requests):
            if i < errors:
                recorder.record(status, error, latency, 0, 0, self.clock.now)
            else:
                recorder.record(200, "", latency, 0, 0, self.clock.now)

    def traffic(self, ring: str, requests: int, error_rate: float,
                latency: Latency = jitter) -> None:
        """``requests`` on ``ring``, each an error with ``error_rate``, timed by ``latency``."""
        recorder = self.ring(ring).recorder
        assert recorder is not None
        for _ in range(requests):
            status = 500 if self.rng.random() < error_rate else 200
            recorder.record(status, "", latency(self.rng), 0, 0, self.clock.now)

    def reload(self, config: Config) -> Runtime:
        self.runtime = Runtime(config, self.runtime)
        self.metrics.attach(self.runtime)
        self.controller.configure(self.runtime)
        return self.runtime

    def phase(self, ring: str = "canary") -> Phase:
        return self.controller.states["api"][ring].phase

    async def run(self, seconds: float, rps: float = 200, canary_errors: float = 0.0,
                  stable_errors: float = 0.01, canary_latency: Latency = jitter,
                  until_rollback: bool = True) -> list[Event]:
        """``rps`` requests a second split by the canary's live weight, one analysis round a
        second, for ``seconds`` (or until the canary is rolled back)."""
        events: list[Event] = []
        for _ in range(int(seconds)):
            self.clock.now += 1
            share = (self.ring("canary").weight or 0) / 100
            self.traffic("canary", round(rps * share), canary_errors, canary_latency)
            self.traffic("stable", round(rps * (1 - share)), stable_errors)
            events += await self.controller.evaluate("api")
            if until_rollback and self.phase() is Phase.ROLLED_BACK:
                break
        return events


class SlowSave:
    """A state save that blocks (in its worker thread) until the test releases it, once."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, path: Path, states: Mapping[str, Mapping[str, RingState]]) -> None:
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            if not self.release.wait(10):
                raise TimeoutError("the test never released the save")
        save_state(path, states)


async def test_a_reload_during_a_slow_state_save_keeps_the_new_ring(tmp_path: Path) -> None:
    slow = SlowSave()
    h = Harness(parse_config(config_text(tmp_path)), save=slow)
    action = asyncio.ensure_future(
        h.controller.act("api", "canary", Trigger.ROLLBACK, "bad deploy"))
    assert await asyncio.to_thread(slow.started.wait, 5)
    # The reload lands while the action's state save is on the disk.
    text = config_text(tmp_path, extra_ring="- {name: beta, pool: canary, weight: 10}")
    runtime = h.reload(parse_config(text))
    slow.release.set()
    events = await action
    assert [(e.ring, e.kind, e.reason) for e in events] == [
        ("canary", "rollback", "bad deploy")]
    states = h.controller.states["api"]
    assert set(states) == {"beta", "canary", "stable"}
    assert states["canary"].phase is Phase.ROLLED_BACK
    assert {r.name: r.phase for r in runtime.rings["api"]} == {
        "beta": Phase.STEADY, "canary": Phase.ROLLED_BACK, "stable": Phase.STEADY}
    # Served as decided, and saved as decided: the new ring is on disk, the rollback too.
    compiled = runtime.table.routes["api"]
    assert compiled.range_of("canary") is None and compiled.range_of("beta") == (0, 1000)
    saved = load_state(tmp_path / "state.json")["api"]
    assert set(saved) == {"beta", "canary", "stable"}
    assert saved["canary"].phase is Phase.ROLLED_BACK
    # and the next analysis round works
    assert await h.controller.evaluate("api") == []


async def test_an_action_on_a_ring_a_reload_removed_is_a_conflict_and_not_saved(
    tmp_path: Path,
) -> None:
    slow = SlowSave()
    text = config_text(tmp_path, extra_ring="- {name: beta, pool: canary, weight: 10}")
    h = Harness(parse_config(text), save=slow)
    action = asyncio.ensure_future(h.controller.act("api", "beta", Trigger.ROLLBACK))
    assert await asyncio.to_thread(slow.started.wait, 5)
    h.reload(parse_config(config_text(tmp_path)))  # beta leaves the config
    slow.release.set()
    with pytest.raises(RolloutConflict, match="route 'api' has no ring 'beta'"):
        await action
    assert set(h.controller.states["api"]) == {"canary", "stable"}
    # the overtaken snapshot (beta rolled back) was replaced by what is live
    saved = load_state(tmp_path / "state.json")
    assert saved == h.controller.states
    assert list(h.controller.events) == []


async def test_an_analysis_round_overtaken_by_a_reload_of_its_route_is_dropped(
    tmp_path: Path,
) -> None:
    slow = SlowSave()
    h = Harness(parse_config(config_text(tmp_path)), save=slow)
    assert await h.controller.evaluate("api") == []  # the first look: evidence starts here
    h.feed("stable", 100)
    h.feed("canary", 100, errors=50)
    round_ = asyncio.ensure_future(h.controller.evaluate("api"))
    assert await asyncio.to_thread(slow.started.wait, 5)
    # new criteria: the verdict was judged under the old ones
    h.reload(parse_config(config_text(tmp_path).replace("min_requests: 100",
                                                        "min_requests: 200")))
    slow.release.set()
    assert await round_ == []
    assert h.phase() is Phase.STEADY  # the rollback verdict was dropped
    assert load_state(tmp_path / "state.json") == h.controller.states


async def test_ring_weights_are_read_off_the_live_layout_and_follow_it(tmp_path: Path) -> None:
    h = Harness(parse_config(config_text(tmp_path)))
    canary, stable = h.runtime.rings["api"]
    assert (canary.weight, stable.weight) == (50.0, 50.0)
    assert (canary.phase, stable.phase) == (Phase.STEADY, Phase.STEADY)
    await h.controller.act("api", "canary", Trigger.SET_WEIGHT, weight=1250)
    assert (canary.weight, stable.weight) == (12.5, 87.5)
    assert canary.phase is Phase.PAUSED
    await h.controller.act("api", "canary", Trigger.ROLLBACK)
    assert (canary.weight, stable.weight) == (0.0, 100.0)
    assert h.runtime.table.routes["api"].share_of("stable") == 10_000
    # A reload that adds a ring: the carried-over default ring reads the old table (still
    # serving) until the controller has put the live layout in the new one.
    text = config_text(tmp_path, extra_ring="- {name: beta, pool: canary, weight: 10}")
    old = h.runtime
    new = Runtime(parse_config(text), old)
    kept = new.rings["api"][-1]
    assert kept is stable and stable.weight == 100.0
    h.metrics.attach(new)
    h.controller.configure(new)
    assert [r.weight for r in new.rings["api"]] == [10.0, 0.0, 90.0]


async def test_a_canary_with_20_percent_errors_is_rolled_back_counted_audited_and_served(
    tmp_path: Path,
) -> None:
    h = Harness(parse_config(config_text(tmp_path, ring="weight: 10")))
    events = await h.run(30, canary_errors=0.20)
    (event,) = events
    took = event.time - 1000.0
    assert took <= 5, took  # 20 canary requests a second
    assert (event.ring, event.kind, event.label, event.to_weight) == (
        "canary", "rollback", "error_rate_increase", 0)
    increase = event.numbers["error_rate_increase"]
    assert isinstance(increase, dict) and increase["finding"] == "worse"
    assert increase["p_value"] <= 0.01 / 4  # alpha split over four checks
    assert event.reason.startswith("error rate ") and "points" in event.reason
    canary, stable = h.runtime.rings["api"]
    assert (canary.weight, stable.weight, canary.phase) == (0.0, 100.0, Phase.ROLLED_BACK)
    body, _ = h.metrics.exposition()
    assert (b'ringproxy_rollbacks_total{reason="error_rate_increase",ring="canary",'
            b'route="api"} 1.0' in body)
    assert (b'ringproxy_ring_evidence_progress{check="error_rate_increase",ring="canary",'
            b'route="api"} 1.0' in body)
    assert (tmp_path / "audit.jsonl").read_text().count('"kind": "rollback"') == 1
    assert load_state(tmp_path / "state.json") == h.controller.states
    # a rolled-back ring is no longer judged (its last verdict stays to explain it)
    assert await h.run(3, canary_errors=0.2, until_rollback=False) == []
    assert h.controller.verdicts["api"]["canary"].outcome is Outcome.ROLLBACK


@pytest.mark.parametrize(("stable_per_second", "most"), [(200, 3), (2, 4)])
async def test_a_canary_answering_only_errors_is_rolled_back_after_a_handful_of_requests(
    tmp_path: Path, stable_per_second: int, most: int
) -> None:
    # One canary request every 10 s (0.1 req/s), every one a 500, from its step's start; a
    # quiet baseline (2 req/s) is known less surely, so it takes one request more.
    h = Harness(parse_config(config_text(tmp_path, ring="weight: 5")))
    sent = 0
    for second in range(1, 120):
        h.clock.now += 1
        h.traffic("stable", stable_per_second, 0.01)
        if second % 10 == 0:
            h.feed("canary", 1, errors=1)
            sent += 1
        if await h.controller.evaluate("api"):
            break
    assert h.phase() is Phase.ROLLED_BACK
    assert sent <= most, sent
    print(f"\n100 % errors at 0.1 req/s (baseline {stable_per_second} req/s): rolled back "
          f"after {sent} of its requests")


async def test_a_tail_latency_canary_is_rolled_back(tmp_path: Path) -> None:
    # 3 % of the canary's requests take 300 ms more: its p50 and p95 are the baseline's.
    def tail(rng: random.Random) -> float:
        return jitter(rng) + (0.300 if rng.random() < 0.03 else 0.0)

    h = Harness(parse_config(config_text(tmp_path, ring="weight: 10")))
    events = await h.run(600, canary_latency=tail)
    (event,) = [e for e in events if e.kind == "rollback"]
    assert event.label == "p99"
    assert event.time - 1000 <= 300, event.time - 1000
    assert "p99" in event.reason and "slower than" in event.reason
    print(f"\n3 % +300 ms: rolled back after {event.time - 1000:.0f}s")


async def test_a_healthy_a_a_canary_progresses_through_every_step_and_is_never_rolled_back(
    tmp_path: Path,
) -> None:
    ring = "progression: {steps: [10, 25, 50], min_step_duration: 30s}"
    h = Harness(parse_config(config_text(tmp_path, ring=ring, max_blind="10m")))
    # Both pools: 1 % errors and the same latencies.
    events = await h.run(900, canary_errors=0.01)
    advances = [(e.kind, e.to_weight, e.time - 1000) for e in events]
    assert [kind for kind, *_ in advances] == ["advance", "advance"], advances
    assert h.phase() is Phase.COMPLETED and h.ring("canary").weight == 50
    assert all(t >= 30 for *_, t in advances)  # never before min_step_duration
    assert h.controller.verdicts["api"]["canary"].outcome is Outcome.HEALTHY
    print(f"\nA/A at 200 req/s: {advances}")
    # and it keeps being judged, healthy, at its last step
    assert await h.run(300, canary_errors=0.01) == []


async def test_the_proxys_own_503s_and_clients_that_left_never_roll_back(tmp_path: Path) -> None:
    ring = "progression: {steps: [10, 50], min_step_duration: 30s}"
    h = Harness(parse_config(config_text(tmp_path, ring=ring, max_blind="10m")))
    events: list[Event] = []
    for _ in range(400):
        h.clock.now += 1
        h.traffic("stable", 180, 0.01)
        h.traffic("canary", 20, 0.01)  # the upstream itself is as healthy as the stable one
        # A client fills the ring's max_concurrency, others leave: far more of these.
        h.feed("canary", 60, errors=60, status=503, error="overload")
        h.feed("canary", 30, errors=30, status=0, error="client_closed")
        h.feed("canary", 10, errors=10, status=500, error="client_closed")
        events += await h.controller.evaluate("api")
    assert [e.kind for e in events] == ["advance"]
    assert h.phase() is Phase.COMPLETED
    tally = h.metrics.tally("api", "canary")
    assert tally.requests == 400 * 20  # only the upstream's answers are judged
    body, _ = h.metrics.exposition()
    assert (b'ringproxy_requests_total{code_class="refused",pool="canary",ring="canary",'
            b'route="api"} 24000.0' in body)


async def test_a_blind_ring_raises_analysis_starved_once_and_does_not_advance(
    tmp_path: Path,
) -> None:
    ring = "progression: {steps: [10, 50], min_step_duration: 10s}"
    h = Harness(parse_config(config_text(tmp_path, ring=ring)))
    events = []
    for second in range(1, 200):
        h.clock.now += 1
        h.traffic("stable", 20, 0.0)
        if second % 10 == 0:
            h.feed("canary", 1)  # healthy, but far too little to tell
        events += await h.controller.evaluate("api")
    (event,) = events
    assert (event.kind, event.time - 1000, event.phase) == ("analysis_starved", 60,
                                                           "progressing")
    assert "max_blind 60s" in event.reason
    state = h.controller.states["api"]["canary"]
    assert state.starved and state.weight == 1000 and state.step == 0
    assert load_state(tmp_path / "state.json")["api"]["canary"].starved
    body, _ = h.metrics.exposition()
    assert b'ringproxy_ring_analysis_starved{ring="canary",route="api"} 1.0' in body
    # a resume starts the step over: the flag clears (and the metric with it)
    await h.controller.act("api", "canary", Trigger.PAUSE)
    await h.controller.act("api", "canary", Trigger.RESUME)
    assert not h.controller.states["api"]["canary"].starved
    body, _ = h.metrics.exposition()
    assert b'ringproxy_ring_analysis_starved{ring="canary",route="api"} 0.0' in body


async def test_evidence_starts_with_each_step(tmp_path: Path) -> None:
    ring = "progression: {steps: [10, 50], min_step_duration: 10s}"
    h = Harness(parse_config(config_text(tmp_path, ring=ring)))
    first = h.controller.looks.starts["api", "canary"]  # taken when configured
    assert first.ring_at.requests == 0
    h.feed("canary", 7)
    await h.run(6)
    assert h.controller.looks.starts["api", "canary"] is first
    verdict = h.controller.verdicts["api"]["canary"]
    assert (verdict.requests, verdict.baseline_requests) == (7 + 6 * 20, 6 * 180)
    await h.controller.act("api", "canary", Trigger.PROMOTE)  # a new step: a new start
    start = h.controller.looks.starts["api", "canary"]
    assert start is not first and start.ring_at.requests == 7 + 6 * 20
    await h.run(2)
    verdict = h.controller.verdicts["api"]["canary"]
    assert (verdict.requests, verdict.baseline_requests) == (2 * 100, 2 * 100)


async def test_an_approval_step_waits_for_approve_and_still_rolls_back(tmp_path: Path) -> None:
    ring = "progression: {steps: [10, {weight: 50, approval: required}], min_step_duration: 20s}"
    h = Harness(parse_config(config_text(tmp_path, ring=ring, max_blind="10m")))
    events = await h.run(400, canary_errors=0.01, until_rollback=False)
    assert [(e.kind, e.to_weight) for e in events] == [("awaiting_approval", 1000)]
    (approved,) = await h.controller.act("api", "canary", Trigger.APPROVE, actor="alice")
    assert (approved.kind, approved.to_weight, approved.actor) == ("advance", 5000, "alice")
    assert h.phase() is Phase.COMPLETED

    again = Harness(parse_config(config_text(tmp_path / "b", ring=ring, max_blind="10m")))
    await again.run(400, canary_errors=0.01, until_rollback=False)
    assert again.phase() is Phase.AWAITING_APPROVAL
    events = await again.run(30, canary_errors=0.5)
    assert [e.kind for e in events] == ["rollback"]


@pytest.mark.parametrize(
    ("fast", "within"),
    [
        # 6 of the last 10 requests erring is not yet improbable enough at the baseline's
        # rate over the window (1 of 90: P = 2e-8 > 1e-8); 8 of 10 is.
        ("{max_error_rate: 50, min_requests: 5, window: 500ms}", 0.4),
        ("{max_error_rate: 30, min_requests: 5, window: 1s}", 0.4),
        ("{max_error_rate: 50, min_requests: 5, window: 1s}", 0.6),  # half the window
    ],
)
async def test_the_fast_path_rolls_back_a_ring_that_turns_to_errors(
    tmp_path: Path, fast: str, within: float
) -> None:
    # 200 requests a second, the canary at 10 %; the fast path looks every 0.1 s.
    h = Harness(parse_config(config_text(tmp_path, ring="weight: 10",
                                         analysis=f"fast_rollback: {fast}")))
    onset = None
    for tick in range(1, 200):
        h.clock.now += 0.1
        broken = tick > 100
        if broken and onset is None:
            onset = h.clock.now - 0.1
        h.traffic("stable", 18, 0.01)
        h.feed("canary", 2, errors=2 if broken else 0)
        if await h.controller.check_fast("api"):
            break
    assert onset is not None and h.phase() is Phase.ROLLED_BACK
    (event,) = h.controller.events
    assert event.label == "fast_error_rate" and event.reason.startswith("fast rollback: ")
    took = event.time - onset
    assert took == pytest.approx(within), took
    assert h.controller.verdicts["api"]["canary"].checks[0].name == "fast_error_rate"
    assert await h.controller.check_fast("api") == []  # rolled back: not checked again


async def test_the_quick_error_look_rolls_back_between_two_full_rounds(
    tmp_path: Path,
) -> None:
    # 200 requests a second, the canary at 10 % answering 20 % errors (every 5th request),
    # the quick look every 0.1 s and no full round at all: rolled back on the counts.
    h = Harness(parse_config(config_text(tmp_path, ring="weight: 10")))
    events: list[Event] = []
    ticks = 0
    while not events and ticks < 100:
        ticks += 1
        h.clock.now += 0.1
        h.traffic("stable", 18, 0.01)
        h.feed("canary", 2, errors=1 if ticks % 5 in (1, 3) else 0)
        events = await h.controller.check_errors("api")
    (event,) = events
    assert event.kind == "rollback" and event.label == "error_rate_increase"
    assert ticks <= 25, ticks  # 50 canary requests (10 errors), 2.5 s
    verdict = h.controller.verdicts["api"]["canary"]
    assert verdict.outcome is Outcome.ROLLBACK and verdict.checks[0].finding.value == "worse"
    assert await h.controller.check_errors("api") == []  # rolled back: nothing to look at
    # A healthy canary: quick looks never call a full round, nothing changes.
    h2 = Harness(parse_config(config_text(tmp_path / "b", ring="weight: 10")))
    for _ in range(300):
        h2.clock.now += 0.1
        h2.traffic("stable", 18, 0.01)
        h2.traffic("canary", 2, 0.01)
        assert await h2.controller.check_errors("api") == []
    assert h2.phase() is Phase.STEADY


async def test_operator_actions_and_conflicts(tmp_path: Path) -> None:
    h = Harness(parse_config(config_text(tmp_path)))
    act = h.controller.act
    with pytest.raises(RolloutConflict, match="cannot promote ring 'canary': it is steady"):
        await act("api", "canary", Trigger.PROMOTE)
    with pytest.raises(RolloutConflict, match="no route 'nope'"):
        await act("nope", "canary", Trigger.PAUSE)
    with pytest.raises(RolloutConflict, match="'stable' is the baseline; it cannot be paused"):
        await act("api", "stable", Trigger.PAUSE)
    kinds = []
    for trigger in (Trigger.PAUSE, Trigger.RESUME, Trigger.ROLLBACK, Trigger.RESUME):
        kinds += [(e.kind, e.phase, e.actor) for e in await act("api", "canary", trigger,
                                                                   actor="bob")]
    assert kinds == [("pause", "paused", "bob"), ("resume", "steady", "bob"),
                     ("rollback", "rolled_back", "bob"), ("resume", "steady", "bob")]
    assert [e["kind"] for e in h.controller.history] == ["pause", "resume", "rollback", "resume"]
    assert repr(h.controller) == "<Controller routes=1 {'steady': 2}>"


async def test_a_failed_reload_puts_the_rollout_states_back_as_they_were(
    tmp_path: Path,
) -> None:
    # The canary is rolled back; a reload that gives it new servers (a new version: its
    # rollout would start over at 50 %) fails after the controller took it.  Going back must
    # restore the states as they were, not re-derive them from the failed config's.
    h = Harness(parse_config(config_text(tmp_path)))
    await h.controller.act("api", "canary", Trigger.ROLLBACK, "bad deploy")
    old_runtime = h.runtime
    changed = config_text(tmp_path).replace("http://127.0.0.1:10", "http://127.0.0.1:11")
    checkpoint = h.controller.checkpoint()
    new_runtime = Runtime(parse_config(changed), old_runtime)
    h.controller.configure(new_runtime)
    assert h.controller.states["api"]["canary"].phase is Phase.STEADY  # the new version
    h.controller.back_to(checkpoint)
    assert h.controller.states["api"]["canary"].phase is Phase.ROLLED_BACK
    (canary,) = [r for r in old_runtime.rings["api"] if r.name == "canary"]
    assert canary.phase is Phase.ROLLED_BACK and canary.weight == 0
    assert old_runtime.table.routes["api"].range_of("canary") is None
    # and what is saved next is the rollback, not the failed config's fresh start
    await h.controller.act("api", "canary", Trigger.RESUME, "fixed")
    assert load_state(tmp_path / "state.json")["api"]["canary"].phase is Phase.STEADY


async def test_a_route_removed_and_added_back_keeps_its_rollback(tmp_path: Path) -> None:
    h = Harness(parse_config(config_text(tmp_path)))
    await h.controller.act("api", "canary", Trigger.ROLLBACK, "bad deploy")
    h.reload(parse_config(config_text(tmp_path).replace("name: api", "name: web")))
    assert set(h.controller.states) == {"web"}
    runtime = h.reload(parse_config(config_text(tmp_path)))
    assert h.controller.states["api"]["canary"].phase is Phase.ROLLED_BACK
    assert runtime.table.routes["api"].range_of("canary") is None


async def test_a_ring_that_breaks_after_a_long_healthy_stretch_is_judged_on_recent_marks(
    tmp_path: Path,
) -> None:
    # 30 healthy minutes at 10 % (36,000 canary requests), then 20 % errors.  Judged on the
    # whole step only, the new errors are diluted (about 150 s to roll back); the marks
    # taken every 5 minutes judge what it did since a recent one.
    h = Harness(parse_config(config_text(tmp_path, ring="weight: 10", max_blind="1h")))
    assert await h.run(1800, canary_errors=0.01) == []
    onset = h.clock.now
    events = await h.run(120, canary_errors=0.20)
    (event,) = events
    took = event.time - onset
    assert event.kind == "rollback" and event.label == "error_rate_increase"
    assert took <= 40, took
    print(f"\n20 % errors after 30 healthy minutes: rolled back after {took:.0f}s")


async def test_the_fast_path_leaves_trouble_both_rings_share_to_the_judge(
    tmp_path: Path,
) -> None:
    # A shared incident: both rings answer 60 % errors for 30 s.  Above the fast path's
    # hard limit, but the baseline errs as much over the same window: not the version's.
    fast = "fast_rollback: {max_error_rate: 50, min_requests: 10, window: 1s}"
    h = Harness(parse_config(config_text(tmp_path, ring="weight: 10", analysis=fast)))
    for _ in range(300):
        h.clock.now += 0.1
        h.traffic("stable", 18, 0.60)
        h.traffic("canary", 2, 0.60)
        assert await h.controller.check_fast("api") == []
    assert h.phase() is Phase.STEADY
    # The same canary alone at 100 % errors is still caught at once.
    for _ in range(20):
        h.clock.now += 0.1
        h.traffic("stable", 18, 0.01)
        h.feed("canary", 2, errors=2)
        if await h.controller.check_fast("api"):
            break
    assert h.phase() is Phase.ROLLED_BACK
