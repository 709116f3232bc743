"""The fleet's evidence merging (pure) and the ``state`` section's validation."""

from __future__ import annotations

import pytest

from proxy.config import parse_config
from proxy.errors import ConfigError
from proxy.fleet.evidence import MergedTallies, Merger, Published, Seen, decode, encode
from proxy.rollout.evidence import Evidence, Tally
from proxy.rollout.sketch import SIZE, index_of
from tests.test_config import MINIMAL

KEY = ("api", "canary", "fp1")


def evidence(requests: int, errors: int, *latencies: float) -> Evidence:
    tally = Tally()
    for i in range(requests):
        tally.record(i < errors, latencies[i] if i < len(latencies) else None)
    return tally.evidence()


def doc(boot: str, requests: int, errors: int = 0, gen: int = 1, at: float = 1.0) -> Published:
    return Published(boot, at, {KEY: (gen, evidence(requests, errors))})


def test_a_document_round_trips_with_its_latency_sketch() -> None:
    ev = evidence(5, 2, 0.010, 0.250, 0.250, 3.0)
    body = encode("boot-1", 12.5, {KEY: (3, ev), ("api", "stable", "fp2"): (4, Evidence())},
                  7, {KEY: 2})
    back = decode(body)
    assert back.boot == "boot-1" and back.at == 12.5
    assert back.rings[KEY] == (3, ev)
    assert back.rings[KEY][1].latency[index_of(0.250)] == 2
    assert back.rings["api", "stable", "fp2"] == (4, Evidence())
    assert back.seq == 7 and back.steps[KEY] == 2
    assert len(body) < 240  # sparse: only the non-zero buckets


@pytest.mark.parametrize(("body", "message"), [
    ("not json", "not JSON"),
    ("[]", "not a JSON object"),
    ('{"boot": 1, "at": 0, "rings": []}', r"boot \(string\)"),
    ('{"boot": "b", "at": 0, "seq": -1, "rings": []}', r"seq \(count\)"),
    ('{"boot": "b", "at": 0, "rings": [["api", "c", 1, 1, 0, {}, 5, null]]}', "wrong type"),
    ('{"boot": "b", "at": 0, "rings": [["api", "c", 1, -1, 0, {}]]}', "wrong type"),
    ('{"boot": "b", "at": 0, "rings": [["api", "c", 1, 1, 0, {"99999": 1}]]}',
     "latency bucket"),
    ('{"boot": "b", "at": 0, "rings": [["api"]]}', "a ring entry must be"),
])
def test_a_bad_document_is_refused_with_what_is_wrong(body: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode(body)


def test_the_merge_is_the_exact_sum_of_the_members() -> None:
    merger = Merger()
    a, b = evidence(10, 1, *[0.01] * 10), evidence(30, 3, *[0.5] * 30)
    merger.update({"m1": Published("x", 1, {KEY: (1, a)}),
                   "m2": Published("y", 1, {KEY: (1, b)})})
    total = merger.total(KEY)
    assert (total.requests, total.errors) == (40, 4)
    assert total.latency[index_of(0.01)] == 10 and total.latency[index_of(0.5)] == 30
    assert len(total.latency) == SIZE


def test_a_member_restarting_never_makes_the_sum_go_down() -> None:
    merger = Merger()
    merger.update({"m1": doc("boot-1", 100, 5), "m2": doc("b", 50)})
    assert merger.total(KEY).requests == 150
    merger.update({"m1": doc("boot-2", 3, 1)})  # restarted: counts from zero again
    total = merger.total(KEY)
    assert (total.requests, total.errors) == (153, 6)
    merger.update({"m1": doc("boot-2", 10, 1)})
    assert merger.total(KEY).requests == 160


def test_a_ring_whose_tally_starts_over_keeps_its_old_totals_counted() -> None:
    merger = Merger()
    merger.update({"m1": doc("b", 100, gen=1)})
    merger.update({"m1": doc("b", 120, gen=1)})
    assert merger.total(KEY).requests == 120
    merger.update({"m1": doc("b", 7, gen=2)})  # the pool changed: a new tally
    assert merger.total(KEY).requests == 127
    merger.update({"m1": Published("b", 2, {})})  # the ring left this member's config
    assert merger.total(KEY).requests == 127


def test_a_member_that_vanishes_stays_counted() -> None:
    merger = Merger()
    merger.update({"m1": doc("a", 100), "m2": doc("b", 40)})
    merger.update({"m1": doc("a", 110)})  # m2 did not publish this time
    assert merger.total(KEY).requests == 150
    merger.forget(["m2"])  # its document expired
    assert merger.total(KEY).requests == 150
    merger.update({"m2": doc("b2", 5)})  # and came back, restarted
    assert merger.total(KEY).requests == 155


def test_a_member_back_after_being_forgotten_is_counted_once() -> None:
    merger = Merger()
    merger.update({"a": doc("boot-a", 1000, 50), "b": doc("boot-b", 100, 0)})
    merger.forget(["a"])  # away for longer than STALE_AFTER
    total = merger.total(KEY)
    assert (total.requests, total.errors) == (1100, 50)  # its totals stay counted
    merger.update({"a": doc("boot-a", 1010, 50)})  # back, the same boot: 10 more served
    total = merger.total(KEY)
    assert (total.requests, total.errors) == (1110, 50)  # not 2110/100
    merger.update({"a": doc("boot-a", 1020, 51), "b": doc("boot-b", 110, 0)})
    total = merger.total(KEY)
    assert (total.requests, total.errors) == (1130, 51)
    merger.forget(["a"])  # and gone again, then back restarted: counts from zero
    merger.update({"a": doc("boot-a2", 5, 0)})
    assert merger.total(KEY).requests == 1135


def test_a_member_back_with_a_new_tally_keeps_its_old_one_counted() -> None:
    merger = Merger()
    merger.update({"a": doc("boot-a", 300, 3, gen=1)})
    merger.forget(["a"])
    merger.update({"a": doc("boot-a", 7, 0, gen=2)})  # its pool changed meanwhile
    assert merger.total(KEY).requests == 307


def test_staleness_is_the_leaders_clock_not_the_members() -> None:
    seen = Seen()
    skewed = Published("boot", -1_000_000.0, {})  # its clock is far behind
    seen.saw("m1", skewed, now=100.0)
    assert seen.stale(now=110.0) == []  # seen 10 s ago by the leader: fresh
    seen.saw("m1", Published("boot", -999_999.0, {}, seq=2), now=125.0)  # it published
    assert seen.stale(now=150.0) == []
    seen.saw("m1", Published("boot", -999_999.0, {}, seq=2), now=150.0)  # unchanged
    assert seen.stale(now=156.0) == ["m1"]  # 31 s without a change
    assert seen.stale(now=200.0) == []  # (reported once)


def test_only_the_entries_of_the_leaders_ring_config_are_merged() -> None:
    old, new = ("api", "canary", "fp-old"), ("api", "canary", "fp-new")
    merger = Merger()
    merger.update({"m1": Published("a", 1, {new: (1, evidence(40, 0))}),
                   "m2": Published("b", 1, {old: (1, evidence(60, 30))})})
    assert (merger.total(new).requests, merger.total(new).errors) == (40, 0)
    assert (merger.total(old).requests, merger.total(old).errors) == (60, 30)
    # An earlier version's document has no fingerprint: never merged with a config's.
    legacy = decode('{"boot": "c", "at": 1, "rings": [["api", "canary", 1, 9, 9, {}]]}')
    assert list(legacy.rings) == [("api", "canary", "")]


def test_merged_tallies_are_the_same_objects_across_refreshes() -> None:
    merger, merged = Merger(), MergedTallies()
    merger.update({"m1": doc("a", 10, 2)})
    merged.refresh(merger)
    tally = merged.get(KEY)
    assert (tally.requests, tally.errors) == (10, 2)
    merger.update({"m1": doc("a", 25, 2)})
    merged.refresh(merger)
    assert merged.get(KEY) is tally and tally.requests == 25
    assert merged.get(("api", "nobody", "fp1")).requests == 0


# --------------------------------------------------------------------------- config


def config(state: str) -> str:
    return MINIMAL + f"state: {state}\n"


def test_the_file_backend_is_the_default() -> None:
    assert parse_config(MINIMAL).state.backend is None


def test_a_redis_state_reads_its_url_from_the_environment_and_never_shows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_REDIS_URL", "redis://:s3cret-pass@10.0.0.5:6380/2")
    parsed = parse_config(config("{backend: redis, url: '${TEST_REDIS_URL}', "
                                 "prefix: 'shop:', lease: 2s}"))
    state = parsed.state.backend
    assert state is not None and (state.prefix, state.lease) == ("shop:", 2.0)
    assert state.url == "redis://:s3cret-pass@10.0.0.5:6380/2"
    assert state.redacted_url == "redis://10.0.0.5:6380/2"
    assert "s3cret" not in repr(state) and "s3cret" not in repr(parsed)
    assert str(state) == "redis redis://10.0.0.5:6380/2 (prefix 'shop:', lease 2s)"
    defaults = parse_config(config("{backend: redis, url: '${TEST_REDIS_URL}'}")).state
    assert defaults.backend is not None
    assert (defaults.backend.prefix, defaults.backend.lease) == ("ringproxy:", 3.0)


@pytest.mark.parametrize(("state", "message"), [
    ("{backend: redis}", "state.url: backend: redis needs a url"),
    ("{backend: redis, url: 'redis://:pw@host:6379'}", "must come from the environment"),
    ("{backend: etcd}", "state.backend: 'etcd' is not one of: file, redis"),
    ("{url: '${TEST_REDIS_URL}'}", "a url needs backend: redis"),
    ("{backend: redis, url: '${TEST_REDIS_URL}', lease: 100ms}", "below the minimum"),
    ("{backend: redis, url: '${TEST_REDIS_URL}', lease: 5m}", "longer than 60s"),
    ("{backend: redis, url: '${TEST_REDIS_URL}', prefix: ''}", "an empty prefix"),
    ("{backend: redis, url: '${TEST_BAD_URL}'}", "does not hold a Redis URL"),
])
def test_a_bad_state_section_is_refused_with_its_path(
    monkeypatch: pytest.MonkeyPatch, state: str, message: str,
) -> None:
    monkeypatch.setenv("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("TEST_BAD_URL", "http://:hunter2-secret@example.com")
    with pytest.raises(ConfigError) as caught:
        parse_config(config(state))
    text = str(caught.value)
    assert message in text, text
    assert "hunter2" not in text
