"""Per-step criteria, pure: a step's absolute limits judged by the anytime-valid judge, its
own min_duration counted from the saved step start, its checks, and the pre_advance gate
in the state machine."""

from __future__ import annotations

import textwrap
from dataclasses import replace

import pytest

from proxy.config import parse_config
from proxy.config.analysis import AbsoluteLatency, Criteria
from proxy.config.rollout import Step
from proxy.errors import ConfigError
from proxy.rollout.evidence import Evidence, Tally
from proxy.rollout.judge import Finding, Outcome, Verdict, judge
from proxy.rollout.machine import initial_state, on_verdicts, restore, waiting_for_gate
from proxy.rollout.plan import RoutePlan, build_plan, fingerprint
from proxy.rollout.sequential import Counts, lower_bound, upper_bound
from proxy.rollout.state import Phase, RingState
from proxy.rollout.steps import active_checks, criteria_at, min_duration, ring_criteria

CONFIG = textwrap.dedent("""
    pools:
      p: {servers: ["http://127.0.0.1:9"]}
      q: {servers: ["http://127.0.0.1:10"]}
    routes:
      - name: api
        sticky: {key: "header:X-User"}
        analysis:
          max_error_rate_increase: off
          latency: off
          min_requests: 100
          checks:
            - {name: feedback, prometheus: {url: "http://127.0.0.1:9090", query: "x"}, min: 3.5}
            - {name: tickets, prometheus: {url: "http://127.0.0.1:9090", query: "y"}, max: 5}
            - {name: always, webhook: {url: "http://127.0.0.1:9/hook"}}
          PRE_ADVANCE
        rings:
          - name: canary
            pool: p
            progression:
              min_step_duration: 5m
              steps:
                - {weight: 1, min_duration: 2h, max_error_rate: 1, max_p95: 300ms}
                - {weight: 25, min_duration: 24h, max_error_rate: 0.5, max_p95: 250ms,
                   checks: [feedback]}
                - {weight: 50, min_duration: 72h, max_error_rate: 0.3, max_p95: 200ms,
                   checks: [tickets]}
                - 100
          - name: stable
            pool: q
""")


def plan_of(pre_advance: str = "") -> RoutePlan:
    text = CONFIG.replace("PRE_ADVANCE", f"pre_advance: {pre_advance}" if pre_advance else "")
    config = parse_config(text)
    return build_plan(config, config.routes[0])


def evidence(requests: int, errors: int, slow_every: int = 0, slow: float = 0.5) -> Evidence:
    tally = Tally()
    for i in range(requests):
        late = slow_every and i % slow_every == 0
        tally.record(i < errors, slow if late else 0.1)
    return tally.evidence()


def state_at(step: int, since: float = 0.0) -> RingState:
    return RingState(Phase.PROGRESSING, [100, 2500, 5000, 10000][step], step, since)


def test_the_config_reads_each_steps_own_duration_limits_and_checks() -> None:
    plan = plan_of()
    steps = plan.ring("canary").steps
    assert [s.min_duration for s in steps] == [7200.0, 86400.0, 259200.0, None]
    assert [s.max_error_rate for s in steps] == [0.01, 0.005, 0.003, None]
    assert steps[0].max_latency == (AbsoluteLatency(0.95, 0.3),)
    assert steps[1].checks == ("feedback",)


def test_min_duration_is_the_steps_own_else_the_progressions() -> None:
    ring = plan_of().ring("canary")
    assert [min_duration(ring, state_at(i)) for i in range(4)] == [7200, 86400, 259200, 300]


def test_a_step_tightens_the_routes_limits_and_never_loosens_them() -> None:
    route = Criteria(max_error_rate=0.004, max_latency=(AbsoluteLatency(0.99, 1.0),
                                                        AbsoluteLatency(0.95, 0.2)))
    step = Step(2500, max_error_rate=0.01, max_latency=(AbsoluteLatency(0.95, 0.3),
                                                        AbsoluteLatency(0.5, 0.1)))
    tight = criteria_at(route, step)
    assert tight.max_error_rate == 0.004  # the route's is stricter
    assert tight.max_latency == (AbsoluteLatency(0.5, 0.1), AbsoluteLatency(0.95, 0.2),
                                 AbsoluteLatency(0.99, 1.0))
    assert criteria_at(Criteria(), step).max_error_rate == 0.01
    assert criteria_at(route, Step(100)) is route
    assert criteria_at(route, None) is route


def test_step_limits_are_judged_anytime_valid_within_only_when_the_bound_is_inside() -> None:
    plan = plan_of()
    analysis, ring = plan.analysis, plan.ring("canary")
    assert analysis is not None
    c = ring_criteria(analysis, ring, state_at(0))  # max_error_rate 1 %, max_p95 300 ms
    assert c.max_error_rate == 0.01 and c.max_latency == (AbsoluteLatency(0.95, 0.3),)

    healthy = judge(evidence(20_000, 40), Evidence(), c)  # 0.2 % errors, all at 100 ms
    assert healthy.outcome is Outcome.HEALTHY
    rate = next(ch for ch in healthy.checks if ch.name == "error_rate")
    assert rate.finding is Finding.WITHIN and rate.upper <= 0.01
    # The bound is the confidence sequence's, at the check's share of alpha.
    assert rate.upper == pytest.approx(upper_bound(Counts(40, 20_000), rate.alpha))

    few = judge(evidence(150, 0), Evidence(), c)  # no errors yet, but too few to be sure
    few_rate = next(ch for ch in few.checks if ch.name == "error_rate")
    assert few.outcome is Outcome.UNDECIDED and few_rate.finding is Finding.UNDECIDED
    assert few_rate.upper > 0.01

    broken = judge(evidence(2_000, 100), Evidence(), c)  # 5 % errors: a clear breach
    assert broken.outcome is Outcome.ROLLBACK and broken.broken == ("error_rate",)
    worse = next(ch for ch in broken.checks if ch.name == "error_rate")
    assert worse.lower == pytest.approx(lower_bound(Counts(100, 2_000), worse.alpha))
    assert worse.lower > 0.01

    # The same 0.4 % errors pass step 0 (1 %) and fail step 2 (0.3 %) once sure.
    ev = evidence(200_000, 800)
    assert judge(ev, Evidence(), c).outcome is Outcome.HEALTHY
    strict = ring_criteria(analysis, ring, state_at(2))
    assert judge(ev, Evidence(), replace(strict, max_latency=())).outcome is Outcome.ROLLBACK

    slow = judge(evidence(4_000, 0, slow_every=10), Evidence(), c)  # 10 % at 500 ms
    assert slow.outcome is Outcome.ROLLBACK and slow.broken == ("max_p95",)


def test_a_check_named_by_steps_applies_only_there_and_an_unnamed_one_everywhere() -> None:
    plan = plan_of()
    analysis, ring = plan.analysis, plan.ring("canary")
    assert analysis is not None
    names = [[c.name for c in active_checks(analysis, ring, state_at(i))] for i in range(4)]
    assert names == [["always"], ["feedback", "always"], ["tickets", "always"], ["always"]]


def healthy() -> Verdict:
    return Verdict(Outcome.HEALTHY, (), 500, 5000)


def test_a_step_advances_after_its_own_min_duration_counted_from_the_saved_start() -> None:
    plan = plan_of()
    start = 1_000_000.0
    states = {r.name: initial_state(r, start) for r in plan.rings}
    assert states["canary"].step == 0 and states["canary"].step_since == start
    verdicts = {"canary": healthy()}
    held, events = on_verdicts(plan, states, verdicts, start + 7199)
    assert events == [] and held["canary"].step == 0
    # A restart restores the saved state as it was: its step start is kept ...
    again = restore(plan, held, start + 7200.5)
    assert again["canary"].step_since == start
    # ... so the 2 h are counted from the step's start, not from the restart.
    moved, events = on_verdicts(plan, again, verdicts, start + 7201)
    assert [e.kind for e in events] == ["advance"] and moved["canary"].step == 1
    assert "healthy after 7201s" in events[0].reason
    assert moved["canary"].step_since == start + 7201


def test_pre_advance_holds_a_due_step_until_its_gate_opens_and_still_rolls_back() -> None:
    plan = plan_of(pre_advance='"http://127.0.0.1:9/gate"')
    states = {"canary": state_at(0, 0.0), "stable": RingState(Phase.STEADY, None)}
    verdicts = {"canary": healthy()}
    now = 10_000.0
    assert waiting_for_gate(plan, states, verdicts, now) == ["canary"]
    held, events = on_verdicts(plan, states, verdicts, now)
    assert events == [] and held == states
    _, events = on_verdicts(plan, states, verdicts, now,
                                gates_open={"canary"})
    assert [e.kind for e in events] == ["advance"]
    assert "pre_advance hook passed" in events[0].reason
    # Not due (too early): no gate is asked for.
    assert waiting_for_gate(plan, states, verdicts, 10.0) == []
    # Waiting for the gate never keeps a failing ring from rolling back.
    bad = {"canary": Verdict(Outcome.ROLLBACK, (), 500, 5000)}
    back, events = on_verdicts(plan, states, bad, now)
    assert back["canary"].phase is Phase.ROLLED_BACK
    # The last step has no next step: completing it needs no gate.
    last = {"canary": state_at(3, 0.0), "stable": states["stable"]}
    assert waiting_for_gate(plan, last, verdicts, now) == []


def test_a_steps_limits_and_durations_are_not_in_the_fingerprint_so_tuning_keeps_state() -> None:
    plan = plan_of()
    ring = plan.ring("canary")
    config = parse_config(CONFIG.replace("PRE_ADVANCE", "").replace("min_duration: 2h",
                                                                    "min_duration: 3h"))
    assert build_plan(config, config.routes[0]).ring("canary").fingerprint == ring.fingerprint
    # The same value as before steps had criteria (weight and approval only), so state
    # files written by earlier versions still match.
    old = [f"Step(weight={w}, approval=False)" for w in (100, 2500, 5000, 10000)]
    pool = config.pool("p")
    assert ring.fingerprint == fingerprint("p", [s.url for s in pool.servers], (), 100,
                                           old, False)
    weights = CONFIG.replace("PRE_ADVANCE", "").replace("weight: 25,", "weight: 30,")
    other = parse_config(weights)
    assert build_plan(other, other.routes[0]).ring("canary").fingerprint != ring.fingerprint


@pytest.mark.parametrize(("change", "path", "words"), [
    ("checks: [feedback]", "", ""),
    ("checks: [nosuch]", "routes[0].rings[0].progression.steps[1].checks",
     "unknown check 'nosuch'"),
    ("checks: feedback", "routes[0].rings[0].progression.steps[1].checks",
     "expected a list of check names"),
])
def test_a_step_names_only_known_checks(change: str, path: str, words: str) -> None:
    text = CONFIG.replace("PRE_ADVANCE", "").replace("checks: [feedback]", change)
    if not path:
        parse_config(text)
        return
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any(i.path == path and words in i.message for i in info.value.issues), \
        info.value.issues


def test_a_bad_step_duration_or_limit_names_its_key() -> None:
    text = CONFIG.replace("PRE_ADVANCE", "").replace("min_duration: 2h", "min_duration: 2")
    text = text.replace("max_error_rate: 0.5", "max_error_rate: 150")
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    paths = {i.path for i in info.value.issues}
    assert "routes[0].rings[0].progression.steps[0].min_duration" in paths
    assert "routes[0].rings[0].progression.steps[1].max_error_rate" in paths
