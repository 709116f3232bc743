"""The control loop driven directly: a real Controller, Metrics, Runtime and state file, an
injected clock, synthetic traffic fed to the rings' recorders.  No sockets, no sleeping: a
whole rollout runs in milliseconds."""

from __future__ import annotations

import asyncio
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
from proxy.rollout.machine import Phase, RingState, Trigger
from proxy.runtime import Runtime


def config_text(tmp_path: Path, ring: str = "weight: 50", extra_ring: str = "",
                analysis: str = "") -> str:
    return textwrap.dedent(f"""
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        pools:
          stable: {{servers: ["http://127.0.0.1:9"]}}
          canary: {{servers: ["http://127.0.0.1:10"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis:
              interval: 10s
              window: 60s
              min_requests: 20
              max_error_rate: 5
              failure_limit: 2
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

    def feed(self, ring: str, requests: int, errors: int = 0, latency: float = 0.010) -> None:
        """``requests`` finished on ``ring`` at the clock's now, the first ``errors`` 500s."""
        (ring_rt,) = [r for r in self.runtime.rings["api"] if r.name == ring]
        assert ring_rt.recorder is not None
        for i in range(requests):
            status = 500 if i < errors else 200
            ring_rt.recorder.record(status, "", latency, 0, 0, self.clock.now)

    def reload(self, config: Config) -> Runtime:
        self.runtime = Runtime(config, self.runtime)
        self.metrics.attach(self.runtime)
        self.controller.configure(self.runtime)
        return self.runtime


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
    h.feed("stable", 100)
    h.feed("canary", 100, errors=50)
    round_ = asyncio.ensure_future(h.controller.evaluate("api"))
    assert await asyncio.to_thread(slow.started.wait, 5)
    # new thresholds: the verdict was judged under the old ones
    h.reload(parse_config(config_text(tmp_path).replace("max_error_rate: 5",
                                                        "max_error_rate: 60")))
    slow.release.set()
    assert await round_ == []
    assert h.controller.states["api"]["canary"].failures == 0  # the failing verdict dropped
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


async def rounds(h: Harness, count: int, canary_errors: int = 0, step: float = 10.0) -> list:
    """``count`` analysis rounds ``step`` seconds apart, 100 requests per ring before each."""
    events = []
    for _ in range(count):
        h.clock.now += step
        h.feed("stable", 100)
        h.feed("canary", 100, errors=canary_errors)
        events += await h.controller.evaluate("api")
    return events


async def test_failing_rounds_roll_back_counted_audited_and_served(tmp_path: Path) -> None:
    h = Harness(parse_config(config_text(tmp_path)))
    assert await rounds(h, 1, canary_errors=30) == []  # one failing verdict of two
    assert h.controller.states["api"]["canary"].failures == 1
    (event,) = await rounds(h, 1, canary_errors=30)
    assert (event.ring, event.kind, event.label, event.to_weight) == (
        "canary", "rollback", "error_rate", 0)
    assert event.time == h.clock.now and "2 failing verdicts in a row" in event.reason
    canary, stable = h.runtime.rings["api"]
    assert (canary.weight, stable.weight, canary.phase) == (0.0, 100.0, Phase.ROLLED_BACK)
    body, _ = h.metrics.exposition()
    assert (b'ringproxy_rollbacks_total{reason="error_rate",ring="canary",route="api"} 1.0'
            in body)
    assert (tmp_path / "audit.jsonl").read_text().count('"kind": "rollback"') == 1
    assert load_state(tmp_path / "state.json") == h.controller.states
    # a rolled-back ring is no longer judged, and stays down
    assert await rounds(h, 3, canary_errors=30) == []
    assert "canary" not in h.controller.verdicts["api"]


async def test_a_healthy_canary_advances_after_each_min_step_duration(tmp_path: Path) -> None:
    ring = "progression: {steps: [10, 20, 50], min_step_duration: 30s}"
    h = Harness(parse_config(config_text(tmp_path, ring=ring)))
    start = h.clock.now
    events = await rounds(h, 8)
    assert [(e.kind, e.to_weight, e.time - start) for e in events] == [
        ("advance", 2000, 30.0), ("advance", 5000, 60.0)]
    assert h.controller.states["api"]["canary"].phase is Phase.COMPLETED
    assert h.runtime.rings["api"][0].weight == 50.0


async def test_too_little_traffic_holds(tmp_path: Path) -> None:
    ring = "progression: {steps: [10, 50], min_step_duration: 10s}"
    h = Harness(parse_config(config_text(tmp_path, ring=ring)))
    for _ in range(5):
        h.clock.now += 10
        h.feed("stable", 3)
        h.feed("canary", 3, errors=3)  # awful, but 15 requests in the window are too few
        assert await h.controller.evaluate("api") == []
    assert h.controller.verdicts["api"]["canary"].outcome.value == "no_data"


async def test_an_approval_step_waits_for_approve_and_still_rolls_back(tmp_path: Path) -> None:
    ring = "progression: {steps: [10, {weight: 50, approval: required}], min_step_duration: 20s}"
    h = Harness(parse_config(config_text(tmp_path, ring=ring)))
    events = await rounds(h, 5)
    assert [(e.kind, e.to_weight) for e in events] == [("awaiting_approval", 1000)]
    (approved,) = await h.controller.act("api", "canary", Trigger.APPROVE, actor="alice")
    assert (approved.kind, approved.to_weight, approved.actor) == ("advance", 5000, "alice")
    assert h.controller.states["api"]["canary"].phase is Phase.COMPLETED

    again = Harness(parse_config(config_text(tmp_path / "b", ring=ring)))
    await rounds(again, 3)
    assert again.controller.states["api"]["canary"].phase is Phase.AWAITING_APPROVAL
    events = await rounds(again, 2, canary_errors=40)
    assert [e.kind for e in events] == ["rollback"]


async def test_the_fast_path_rolls_back_without_an_analysis_round(tmp_path: Path) -> None:
    fast = "fast_rollback: {max_error_rate: 50, min_requests: 10, window: 5s}"
    h = Harness(parse_config(config_text(tmp_path, analysis=fast)))
    h.feed("canary", 9, errors=9)
    assert await h.controller.check_fast("api") == []  # too few requests
    h.feed("canary", 1, errors=1)
    (event,) = await h.controller.check_fast("api")
    assert event.label == "fast_error_rate" and event.reason.startswith("fast rollback: ")
    assert h.controller.states["api"]["canary"].phase is Phase.ROLLED_BACK
    assert await h.controller.check_fast("api") == []  # rolled back: not checked again


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
