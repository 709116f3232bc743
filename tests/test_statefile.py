"""Damaged state and audit files, read through real files (``proxy.control.statefile``),
and the restore of entries that cannot be matched to their ring (``rollout.machine``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from proxy.config import parse_config
from proxy.control.statefile import append_audit, load_state, read_audit, save_state, set_aside
from proxy.errors import StateError
from proxy.rollout.machine import restore, unmatched
from proxy.rollout.plan import RoutePlan, build_plan
from proxy.rollout.state import Event, Phase, RingState

CONFIG = """
pools:
  v1: {servers: [http://127.0.0.1:9001]}
  v2: {servers: [http://127.0.0.1:9002]}
routes:
  - name: api
    sticky: {key: ["header:X-User-Id"]}
    rings:
      - {name: canary, pool: v2, weight: 10}
      - {name: stable, pool: v1}
"""


def test_a_state_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b'{"format": 1, "routes": {"\xff\xfe": {}}}')
    with pytest.raises(StateError) as info:
        load_state(path)
    message = str(info.value)
    assert message == f"{path}: the state file is not UTF-8 text (byte 26: invalid start byte)"
    assert "\n" not in message


@pytest.mark.parametrize("text", ["{", "[]", '{"format": 2}', '{"format": 1, "routes": 3}'])
def test_a_state_file_that_is_not_ringproxy_json_is_corrupt(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(StateError, match=r"the state file is corrupt \(") as info:
        load_state(path)
    assert "\n" not in str(info.value)


def test_an_audit_file_that_is_not_utf8_or_has_a_bad_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"kind": "rollback"}\n\xff\n')
    with pytest.raises(StateError, match="the audit file is not UTF-8 text"):
        read_audit(path)
    path.write_text('{"kind": "rollback"}\nnot json\n{"kind": "advance"}\n')
    with pytest.raises(StateError, match=r"audit.jsonl:2: the audit file is corrupt \(not JSON"):
        read_audit(path)
    path.write_text('{"kind": "rollback"}\n[1, 2]\n')
    with pytest.raises(StateError, match=r":2: the audit file is corrupt \(expected a JSON obj"):
        read_audit(path)


def test_a_last_line_torn_by_a_crash_is_skipped_and_replaced_by_the_next_event(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"kind": "rollback"}\n{"kind": "adv')
    assert read_audit(path) == [{"kind": "rollback"}]
    event = Event(1.0, "api", "canary", "pause", 100, 100, "progressing", "paused", "x")
    append_audit(path, [event])
    events = read_audit(path)
    assert [e["kind"] for e in events] == ["rollback", "pause"]


def test_a_whole_last_event_without_its_newline_is_kept_when_the_next_is_appended(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"kind": "rollback"}\n{"kind": "promote"}')  # newline left off
    assert [e["kind"] for e in read_audit(path)] == ["rollback", "promote"]
    event = Event(1.0, "api", "canary", "pause", 100, 100, "progressing", "paused", "x")
    append_audit(path, [event])
    assert [e["kind"] for e in read_audit(path)] == ["rollback", "promote", "pause"]
    assert path.read_text().count("\n") == 3
    # A last line that is JSON but not an object is not an event: cut off as torn.
    path.write_text('{"kind": "rollback"}\n[1, 2]')
    append_audit(path, [event])
    assert [e["kind"] for e in read_audit(path)] == ["rollback", "pause"]


def test_set_aside_never_overwrites_an_earlier_copy(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    kept = []
    for text in ("one", "two"):
        path.write_text(text)
        kept.append(set_aside(path))
    assert not path.exists()
    assert [p.read_text() for p in kept] == ["one", "two"]
    assert kept[0] != kept[1]


def _plan() -> RoutePlan:
    config = parse_config(CONFIG)
    return build_plan(config, config.routes[0])


def test_a_rolled_back_entry_without_fingerprint_stays_rolled_back_and_is_named() -> None:
    plan = _plan()
    saved = {"canary": RingState(Phase.ROLLED_BACK, 0, None, 5.0, fingerprint="")}
    states = restore(plan, saved, 100.0)
    canary = states["canary"]
    assert canary.phase is Phase.ROLLED_BACK and canary.weight == 0
    # Now bound to the ring's config: the next start matches it.
    assert canary.fingerprint == plan.rings[0].fingerprint
    assert unmatched(plan, saved) == ["canary"]
    assert unmatched(plan, {"canary": canary}) == []


def test_entries_that_match_or_whose_config_changed_are_restored_as_before() -> None:
    plan = _plan()
    fingerprint = plan.rings[0].fingerprint
    back = RingState(Phase.ROLLED_BACK, 0, None, 5.0, fingerprint=fingerprint)
    assert restore(plan, {"canary": back}, 100.0)["canary"] == back
    # A different fingerprint: the ring's config changed, its rollout starts over.
    other = RingState(Phase.ROLLED_BACK, 0, None, 5.0, fingerprint="0123")
    assert restore(plan, {"canary": other}, 100.0)["canary"].phase is Phase.STEADY
    assert unmatched(plan, {"canary": other}) == []
    # One without a fingerprint that was not rolled back starts over, as after a config
    # change: no version comes back to users it was taken from.
    steady = RingState(Phase.STEADY, 500, None, 5.0, fingerprint="")
    assert restore(plan, {"canary": steady}, 100.0)["canary"].weight == 1000
    assert unmatched(plan, {"canary": steady}) == []


def test_a_saved_entry_roundtrips_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"format": 1, "routes": {"api": {"canary": {
        "phase": "rolled_back", "weight": 0}}}}))
    assert load_state(path)["api"]["canary"].fingerprint == ""


def test_overlapping_saves_of_one_process_never_leave_a_corrupt_file(tmp_path: Path) -> None:
    """A process saves from a worker thread and from the event loop, sometimes at once:
    each save writes a temporary file of its own, so whichever rename lands last, the file
    is one whole snapshot (two writers on one temporary name left a longer snapshot's tail
    after a shorter one: a state file that stopped the next start)."""
    path = tmp_path / "state.json"
    small = {"api": {"main": RingState(Phase.STEADY, None)}}
    large = {"api": {f"ring{i}": RingState(Phase.PROGRESSING, 100 * i, 1, 5.0, fingerprint="f" * 12)
                     for i in range(40)}}
    start = threading.Barrier(4)

    def saver(states: dict[str, dict[str, RingState]]) -> None:
        start.wait()
        for _ in range(150):
            save_state(path, states)
            load_state(path)  # raises StateError on a corrupt file

    threads = [threading.Thread(target=saver, args=(s,)) for s in (small, large) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load_state(path) in (small, large)
    assert not list(tmp_path.glob(".*.tmp"))
