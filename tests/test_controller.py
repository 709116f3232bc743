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
    shown = h.controller.status()["api"]
    assert isinstance(shown, dict) and set(shown) == {"beta", "canary", "stable"}
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
