"""The rollout state machine and its state file: pure logic and real files, no sockets."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from proxy.config.analysis import Analysis
from proxy.config.rollout import Progression, Step
from proxy.control.statefile import append_audit, load_state, read_audit, save_state
from proxy.errors import RolloutConflict, StateError
from proxy.rollout.judge import Check, Finding, Outcome, Verdict
from proxy.rollout.machine import (
    ANALYSIS_TRIGGERS,
    EFFECTS,
    TRANSITIONS,
    Phase,
    RingPlan,
    RingState,
    RoutePlan,
    Trigger,
    act,
    initial_state,
    on_verdicts,
    restore,
    target,
)

HEALTHY = Verdict(Outcome.HEALTHY, requests=500, baseline_requests=5000)
UNDECIDED = Verdict(Outcome.UNDECIDED, requests=3, note="3 of the 100 requests a step needs")
WORSE = Check("error_rate", Finding.WORSE, 0.2, 0.12, 0.3, 0.05, 1e-5, 0.01,
              "error rate 20.00% (20/100), surely 12.00% to 30.00%, limit 5.00%",
              {"errors": 20, "requests": 100})
ROLLBACK = Verdict(Outcome.ROLLBACK, (WORSE,), 100, 1000)
MAX_BLIND = 600.0


def plan(approval_at: int | None = None, previous: bool = False) -> RoutePlan:
    steps = tuple(Step(w, i == approval_at) for i, w in enumerate((100, 500, 2500, 5000)))
    return RoutePlan(
        route="api",
        rings=(
            RingPlan("canary", "v2", 100, Progression(steps, 60), fingerprint="c1"),
            RingPlan("qa", "v2", None, pinned=True, fingerprint="q1"),
            RingPlan("beta", "v2", 1000, fingerprint="b1"),
            RingPlan("other", "v3", 500, fingerprint="o1"),
            RingPlan("stable", "v1", None, fingerprint="s1"),
        ),
        baseline="stable",
        analysis=Analysis(interval=1, max_blind=MAX_BLIND, rollback_to_previous=previous),
    )


def fresh(p: RoutePlan, now: float = 0.0) -> dict[str, RingState]:
    return {r.name: initial_state(r, now) for r in p.rings}


def run(p: RoutePlan, states, verdicts: list[tuple[float, Verdict]], ring: str = "canary"):
    events = []
    for now, verdict in verdicts:
        states, new = on_verdicts(p, states, {ring: verdict}, now)
        events += new
    return states, events


def test_initial_states() -> None:
    states = fresh(plan())
    assert (states["canary"].phase, states["canary"].weight, states["canary"].step) == (
        Phase.PROGRESSING, 100, 0)
    assert (states["beta"].phase, states["beta"].weight) == (Phase.STEADY, 1000)
    assert (states["qa"].phase, states["qa"].weight) == (Phase.STEADY, None)


def test_a_rollback_verdict_rolls_back_at_once_the_ring_and_its_pools_unpinned_rings() -> None:
    p = plan()
    states, events = run(p, fresh(p), [(1, ROLLBACK)])
    assert [(e.ring, e.kind, e.from_weight, e.to_weight) for e in events] == [
        ("canary", "rollback", 100, 0), ("beta", "rollback", 1000, 0)]
    assert events[0].reason == WORSE.detail
    assert events[0].label == "error_rate"
    assert events[0].numbers["error_rate"] == {
        "finding": "worse", "estimate": 0.2, "lower": 0.12, "upper": 0.3, "limit": 0.05,
        "p_value": 1e-5, "errors": 20, "requests": 100}
    assert states["canary"].phase is Phase.ROLLED_BACK and not states["canary"].enabled
    assert states["qa"].phase is Phase.STEADY  # pinned keeps its pool
    assert states["other"].phase is Phase.STEADY  # another pool
    assert states["stable"].phase is Phase.STEADY  # the baseline never rolls back
    # a rolled-back ring gets no more verdicts and stays down
    states, events = run(p, states, [(4, ROLLBACK), (5, HEALTHY), (5000, UNDECIDED)])
    assert events == [] and states["canary"].phase is Phase.ROLLED_BACK


def test_undecided_never_advances_nor_rolls_back() -> None:
    p = plan()
    states, events = run(p, fresh(p), [(1, UNDECIDED), (100, UNDECIDED), (599, UNDECIDED)])
    assert events == [] and states == fresh(p)
    # healthy, but not yet min_step_duration (60 s) into the step: nothing either
    states, events = run(p, fresh(p), [(59, HEALTHY)])
    assert events == [] and states == fresh(p)
    states, events = run(p, states, [(60, HEALTHY)])
    assert [(e.kind, e.to_weight) for e in events] == [("advance", 500)]
    assert events[0].label == "progression"
    assert events[0].reason == ("healthy after 60s at 1%: within every tolerance over 500 "
                                "requests")


def test_a_ring_undecided_for_max_blind_starves_once_per_step_and_does_not_advance() -> None:
    p = plan()
    states, events = run(p, fresh(p), [(599, UNDECIDED), (600, UNDECIDED)])
    assert [(e.ring, e.kind, e.from_phase, e.phase, e.from_weight, e.to_weight)
            for e in events] == [("canary", "analysis_starved", "progressing", "progressing",
                                  100, 100)]
    assert events[0].reason == ("undecided 600s into the step at 1% (max_blind 600s): "
                                "3 of the 100 requests a step needs")
    assert events[0].label == "analysis_starved" and events[0].numbers["requests"] == 3
    starved = states["canary"]
    assert starved.starved and starved.step == 0 and starved.phase is Phase.PROGRESSING
    # once per step: more blind rounds say nothing more
    states, events = run(p, states, [(700, UNDECIDED), (3000, UNDECIDED)])
    assert events == [] and states["canary"] == starved
    # evidence of health still advances it, and the new step clears the flag
    states, events = run(p, states, [(3001, HEALTHY)])
    assert [e.kind for e in events] == ["advance"] and not states["canary"].starved
    states, events = run(p, states, [(3001 + 599, UNDECIDED), (3001 + 600, UNDECIDED)])
    assert [e.kind for e in events] == ["analysis_starved"]
    # a pause keeps the flag, the resume (a new start for the step) clears it
    states, _ = act(p, states, "canary", Trigger.PAUSE, 3700)
    assert states["canary"].starved
    states, _ = act(p, states, "canary", Trigger.RESUME, 3800)
    assert not states["canary"].starved and states["canary"].step_since == 3800
    # a steady ring starves too (it is exposed and the analysis cannot tell)
    states, events = run(p, fresh(p), [(600, UNDECIDED)], ring="beta")
    assert [(e.ring, e.kind) for e in events] == [("beta", "analysis_starved")]


def test_progression_through_every_step_to_completed() -> None:
    p = plan()
    states, events = run(p, fresh(p), [(t, HEALTHY) for t in range(0, 400, 10)])
    assert [(e.kind, e.to_weight) for e in events] == [
        ("advance", 500), ("advance", 2500), ("advance", 5000)]
    assert [e.time for e in events] == [60, 120, 180]  # min_step_duration after each step
    assert states["canary"].phase is Phase.COMPLETED and states["canary"].weight == 5000


def test_approval_step_waits_and_still_rolls_back() -> None:
    p = plan(approval_at=2)
    states, events = run(p, fresh(p), [(t, HEALTHY) for t in range(0, 300, 10)])
    assert [(e.kind, e.to_weight) for e in events] == [
        ("advance", 500), ("awaiting_approval", 500)]
    assert states["canary"].phase is Phase.AWAITING_APPROVAL
    states, events = run(p, states, [(300, ROLLBACK)])
    assert [e.kind for e in events if e.ring == "canary"] == ["rollback"]


def test_approve_moves_to_the_step() -> None:
    p = plan(approval_at=2)
    states, _ = run(p, fresh(p), [(t, HEALTHY) for t in range(0, 300, 10)])
    with pytest.raises(RolloutConflict, match="cannot approve ring 'beta': it is steady"):
        act(p, states, "beta", Trigger.APPROVE, 300)
    states, events = act(p, states, "canary", Trigger.APPROVE, 300, actor="alice")
    assert [(e.kind, e.to_weight, e.actor) for e in events] == [("advance", 2500, "alice")]
    assert states["canary"].phase is Phase.PROGRESSING


def test_rollback_to_previous_step() -> None:
    p = plan(previous=True)
    states, _ = run(p, fresh(p), [(0, HEALTHY), (60, HEALTHY), (120, HEALTHY)])
    assert states["canary"].weight == 2500
    states, events = run(p, states, [(121, ROLLBACK)])
    canary = next(e for e in events if e.ring == "canary")
    assert (canary.from_weight, canary.to_weight) == (2500, 500)
    assert states["canary"].phase is Phase.ROLLED_BACK and states["canary"].step == 1


@pytest.mark.parametrize(
    ("setup", "trigger", "phase_after", "weight_after"),
    [
        ([], Trigger.PROMOTE, Phase.PROGRESSING, 500),
        ([], Trigger.PAUSE, Phase.PAUSED, 100),
        ([Trigger.PAUSE], Trigger.RESUME, Phase.PROGRESSING, 100),
        ([Trigger.PAUSE], Trigger.PROMOTE, Phase.PROGRESSING, 500),
        ([], Trigger.ROLLBACK, Phase.ROLLED_BACK, 0),
        ([Trigger.ROLLBACK], Trigger.RESUME, Phase.PROGRESSING, 100),
    ],
)
def test_operator_actions(setup, trigger, phase_after, weight_after) -> None:
    p = plan()
    states = fresh(p)
    for t in setup:
        states, _ = act(p, states, "canary", t, 1)
    states, events = act(p, states, "canary", trigger, 2, reason="because")
    assert (states["canary"].phase, states["canary"].weight) == (phase_after, weight_after)
    assert events and events[-1].reason == "because" and events[-1].actor == "operator"


def test_manual_rollback_affects_only_that_ring() -> None:
    p = plan()
    states, events = act(p, fresh(p), "canary", Trigger.ROLLBACK, 1)
    assert [e.ring for e in events] == ["canary"]
    assert states["beta"].phase is Phase.STEADY


@pytest.mark.parametrize(
    ("ring", "trigger", "weight", "message"),
    [
        ("canary", Trigger.RESUME, None, "cannot resume ring 'canary': it is progressing"),
        ("canary", Trigger.APPROVE, None, "cannot approve"),
        ("beta", Trigger.PROMOTE, None, "cannot promote ring 'beta': it is steady"),
        ("stable", Trigger.ROLLBACK, None, "is the baseline"),
        ("nope", Trigger.PAUSE, None, "has no ring 'nope'"),
        ("beta", Trigger.SET_WEIGHT, 9800, "add up to 104 %, above 100 %"),
        ("beta", Trigger.SET_WEIGHT, 10_001, "is not a percentage"),
        ("qa", Trigger.SET_WEIGHT, 100, "has rules only"),
    ],
)
def test_conflicts(ring, trigger, weight, message) -> None:
    p = plan()
    with pytest.raises(RolloutConflict, match=message):
        act(p, fresh(p), ring, trigger, 1, weight=weight)


def test_set_weight_pauses_the_ring() -> None:
    p = plan()
    states, _events = act(p, fresh(p), "canary", Trigger.SET_WEIGHT, 5, weight=1234)
    assert (states["canary"].weight, states["canary"].phase) == (1234, Phase.PAUSED)
    states, _ = act(p, states, "canary", Trigger.RESUME, 6)
    assert states["canary"].phase is Phase.PROGRESSING


def test_analysis_triggers_are_not_operator_actions() -> None:
    p = plan()
    with pytest.raises(ValueError, match="comes from analysis"):
        act(p, fresh(p), "canary", Trigger.FAILED, 1)


R, P, A = Phase.ROLLED_BACK, Phase.PAUSED, Phase.AWAITING_APPROVAL
G, C, S = Phase.PROGRESSING, Phase.COMPLETED, Phase.STEADY
# Where each trigger takes the canary (at its second step; the third needs approval) from
# each phase; None: refused (a 409 for an operator, nothing at all for analysis).  Written
# out by hand, independently of the table it checks.
EXPECTED: dict[Phase, dict[Trigger, Phase | None]] = {
    #            FAILED STEP_DUE STARVED PROMOTE APPROVE PAUSE RESUME ROLLBACK SET_WEIGHT
    S: dict(zip(Trigger, (R, None, S, None, None, P, None, R, P), strict=True)),
    G: dict(zip(Trigger, (R, A, G, G, None, P, None, R, P), strict=True)),
    A: dict(zip(Trigger, (R, None, A, G, G, P, None, R, P), strict=True)),
    P: dict(zip(Trigger, (R, None, P, G, None, None, G, R, P), strict=True)),
    C: dict(zip(Trigger, (R, None, C, None, None, P, None, R, P), strict=True)),
    R: dict(zip(Trigger, (None, None, None, None, None, None, G, None, P), strict=True)),
}


def in_phase(p: RoutePlan, phase: Phase) -> dict[str, RingState]:
    states = fresh(p)
    states["canary"] = RingState(phase, 0 if phase is R else 500, 1, 0.0,
                                 resume_to=G if phase is P else None, fingerprint="c1")
    return states


def fire(p: RoutePlan, states: dict[str, RingState], trigger: Trigger):
    """The trigger through the public entry point that produces it."""
    if trigger is Trigger.FAILED:
        return on_verdicts(p, states, {"canary": ROLLBACK}, 1000)
    if trigger is Trigger.STEP_DUE:
        return on_verdicts(p, states, {"canary": HEALTHY}, 1000)  # 1000 s into a 60 s step
    if trigger is Trigger.STARVED:
        return on_verdicts(p, states, {"canary": UNDECIDED}, 1000)  # past max_blind
    weight = 1000 if trigger is Trigger.SET_WEIGHT else None
    return act(p, states, "canary", trigger, 1000, weight=weight)


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("trigger", list(Trigger))
def test_every_phase_and_trigger_does_what_the_table_says(phase: Phase, trigger: Trigger) -> None:
    p = plan(approval_at=2)
    states = in_phase(p, phase)
    expected = EXPECTED[phase][trigger]
    assert ((phase, trigger) in TRANSITIONS) is (expected is not None)
    weight = 1000 if trigger is Trigger.SET_WEIGHT else None
    if expected is None:
        with pytest.raises(RolloutConflict, match=f"it is {phase.value}"):
            target(p, states, "canary", trigger, weight)
        if trigger in ANALYSIS_TRIGGERS:
            new, events = fire(p, states, trigger)
            assert new["canary"] == states["canary"] and events == []
        else:
            verb = trigger.value.replace("_", " ")
            with pytest.raises(RolloutConflict,
                               match=f"cannot {verb} ring 'canary': it is {phase.value}"):
                fire(p, states, trigger)
        return
    assert target(p, states, "canary", trigger, weight) is expected
    new, events = fire(p, states, trigger)
    assert new["canary"].phase is expected
    (event,) = [e for e in events if e.ring == "canary"]
    assert (event.from_phase, event.phase) == (phase.value, expected.value)


def test_the_table_has_a_rule_for_every_trigger_and_an_effect_for_each() -> None:
    assert list(Trigger) == [Trigger.FAILED, Trigger.STEP_DUE, Trigger.STARVED, Trigger.PROMOTE,
                             Trigger.APPROVE, Trigger.PAUSE, Trigger.RESUME, Trigger.ROLLBACK,
                             Trigger.SET_WEIGHT]
    assert {t for _, t in TRANSITIONS} == set(Trigger) == set(EFFECTS)
    assert {(ph, t) for ph, row in EXPECTED.items() for t, to in row.items() if to} == set(
        TRANSITIONS)


@pytest.mark.parametrize(
    ("ring", "phase", "trigger", "message"),
    [
        ("stable", Phase.STEADY, Trigger.ROLLBACK, "'stable' is the baseline; it cannot be "
                                                    "rolled back"),
        ("stable", Phase.STEADY, Trigger.PAUSE, "'stable' is the baseline; it cannot be paused"),
        ("beta", Phase.PAUSED, Trigger.PROMOTE, "'beta' has no progression steps to promote"),
        ("qa", Phase.PAUSED, Trigger.SET_WEIGHT, "'qa' has rules only, no weight to set"),
    ],
)
def test_a_guard_that_does_not_hold_is_a_conflict_in_a_phase_the_table_allows(
    ring: str, phase: Phase, trigger: Trigger, message: str
) -> None:
    p = plan()
    states = fresh(p)
    states[ring] = replace(states[ring], phase=phase, resume_to=Phase.STEADY)
    assert (phase, trigger) in TRANSITIONS
    with pytest.raises(RolloutConflict, match=message):
        act(p, states, ring, trigger, 1, weight=100)


def test_a_route_without_analysis_ignores_verdicts() -> None:
    p = replace(plan(), analysis=None)
    states = fresh(p)
    assert on_verdicts(p, states, {"canary": ROLLBACK}, 1) == (states, [])
    assert on_verdicts(p, states, {"canary": UNDECIDED}, 10_000) == (states, [])
    assert not p.rollback_to_previous


def test_restore_keeps_state_unless_the_ring_changed() -> None:
    p = plan()
    states, _ = act(p, fresh(p), "canary", Trigger.ROLLBACK, 1)
    kept = restore(p, states, 2)
    assert kept["canary"].phase is Phase.ROLLED_BACK
    changed = replace(p, rings=tuple(
        replace(r, fingerprint="c2") if r.name == "canary" else r for r in p.rings))
    reset = restore(changed, states, 3)
    assert reset["canary"].phase is Phase.PROGRESSING and reset["canary"].weight == 100


def test_state_file_round_trip_and_atomic_replace(tmp_path) -> None:
    p = plan()
    states, _events = act(p, fresh(p), "canary", Trigger.ROLLBACK, 1)
    path = tmp_path / "state" / "rp.json"
    save_state(path, {"api": states})
    assert load_state(path) == {"api": states}
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed away
    save_state(path, {"api": fresh(p)})
    assert load_state(path)["api"]["canary"].phase is Phase.PROGRESSING
    assert load_state(tmp_path / "missing.json") == {}


def test_a_starved_state_round_trips_and_an_earlier_versions_file_loads(tmp_path) -> None:
    p = plan()
    states, _ = run(p, fresh(p), [(600, UNDECIDED)])
    path = tmp_path / "rp.json"
    save_state(path, {"api": states})
    assert load_state(path)["api"]["canary"].starved
    assert '"failures"' not in path.read_text()
    # a file written before the sequential judge: it counted failing verdicts
    old = {"format": 1, "routes": {"api": {"canary": {
        "phase": "progressing", "weight": 500, "step": 1, "step_since": 12.5, "failures": 2,
        "resume_to": None, "fingerprint": "c1"}}}}
    path.write_text(json.dumps(old))
    assert load_state(path)["api"]["canary"] == RingState(Phase.PROGRESSING, 500, 1, 12.5,
                                                         fingerprint="c1")


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 99, "routes": {}}',
                                     '{"format": 1, "routes": {"api": {"c": {"phase": "x"}}}}'])
def test_a_corrupt_state_file_is_an_error(tmp_path, content: str) -> None:
    path = tmp_path / "rp.json"
    path.write_text(content)
    with pytest.raises(StateError, match="corrupt"):
        load_state(path)


@pytest.mark.parametrize(
    ("ring", "message"),
    [
        ({"phase": "steady", "weight": 12.5}, "routes.api.c.weight: expected a whole number"),
        ({"phase": "steady", "failures": "2"}, "routes.api.c.failures: expected a whole number"),
        ({"phase": "steady", "starved": 1}, "routes.api.c.starved: expected true or false"),
        ({"phase": "steady", "step_since": None}, "routes.api.c.step_since: expected a number"),
        ({"phase": "steady", "resume_to": "later"}, "routes.api.c.resume_to: 'later' is not one"),
        ({"phase": "steady", "fingerprint": 7}, "routes.api.c.fingerprint: expected a string"),
        ({"weight": 1}, "routes.api.c.phase: None is not one of steady, progressing"),
        ("steady", "routes.api.c: expected an object, got 'steady'"),
    ],
)
def test_a_state_of_the_wrong_type_names_its_field(tmp_path, ring: object, message: str) -> None:
    path = tmp_path / "rp.json"
    path.write_text(json.dumps({"format": 1, "routes": {"api": {"c": ring}}}))
    with pytest.raises(StateError, match=f"the state file is corrupt \\({message}"):
        load_state(path)


def test_audit_file_appends_one_line_per_event(tmp_path) -> None:
    p = plan()
    _, events = run(p, fresh(p), [(1, ROLLBACK)])
    path = tmp_path / "audit.jsonl"
    append_audit(path, events)
    append_audit(path, [])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["ring"], x["kind"], x["from_weight"], x["to_weight"]) for x in lines] == [
        ("canary", "rollback", 1.0, 0.0), ("beta", "rollback", 10.0, 0.0)]
    with path.open("a") as f:
        f.write('{"torn": ')  # a crash mid-write
    assert len(read_audit(path)) == 2
    assert "ringproxy api/canary rollback 1% -> 0% (rolled_back)" in events[0].text
