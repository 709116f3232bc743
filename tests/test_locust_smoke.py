"""The locust load test (``loadtests/locustfile.py``): a short bounded run against the real
``ringproxy demo``, and the statistics helpers it reports with (``loadtests/ringmix.py``).

locust is never imported into this process (it monkey-patches the standard library with
gevent); it runs as a subprocess.  It comes with the ``test`` extra, so a missing locust is
a failure here, not a skip.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from loadtests import ringmix
from tests.conftest import ROOT

BANNER = re.compile(rb"Proxy: (http://\S+)\s+Admin: (http://\S+)/healthz.*?#token=(\S+)", re.S)
USERS = 20


def test_locust_is_installed() -> None:
    assert importlib.util.find_spec("locust") is not None, (
        "locust is not installed: pip install -e '.[test]' (the test extra includes the "
        "load extra)")


async def _drain(stream: asyncio.StreamReader | None, lines: list[bytes]) -> None:
    assert stream is not None
    while line := await stream.readline():
        lines.append(line)


async def test_locust_smoke_against_demo(spawn, tmp_path: Path) -> None:
    demo = await spawn("demo", "--ephemeral")
    banner = await demo.wait_listening(BANNER)
    url, admin, token = (group.decode() for group in banner.groups())
    # The demo's canary steps up every 20 s while healthy (its background traffic is
    # evidence enough): held at its first step, the expectation (20 %) holds however long
    # a loaded machine takes to start locust.
    async with aiohttp.ClientSession() as session, session.post(
            f"{admin}/api/routes/api/rings/canary/pause",
            headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200, await r.text()
    # The demo's access log goes to stdout with blocking writes: keep both pipes drained.
    access: list[bytes] = []
    errors: list[bytes] = []
    drains = [asyncio.create_task(_drain(demo.proc.stdout, access)),
              asyncio.create_task(_drain(demo.proc.stderr, errors))]

    report_path = tmp_path / "ring-report.json"
    locust = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
        "-u", str(USERS), "-r", str(USERS), "-t", "5s", "--host", url, "--only-summary",
        # short visits and no think time: many identities in 5 s, so shares mean something
        "--ringproxy-visit", "1-4", "--ringproxy-think", "0-0.005",
        "--ringproxy-report", str(report_path),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        raw, _ = await asyncio.wait_for(locust.communicate(), 45)
    finally:
        if locust.returncode is None:
            locust.kill()
            await locust.wait()
    output = raw.decode(errors="replace")
    assert locust.returncode == 0, output
    assert "result: PASS" in output, output
    assert "Aggregated" in output, output  # locust's own summary is there too

    report = json.loads(report_path.read_text())
    rings = report["rings"]
    total = report["total"]
    assert report["passed"], report["failures"]
    assert report["users_in_two_rings"] == 0, report["split_examples"]
    assert report["users_not_in_predicted_ring"] == 0, report["mismatch_examples"]
    assert total["errors"] == 0 and "(none)" not in rings
    assert total["requests"] > 800, output  # 3000+ on a 2-core machine
    # Anonymous visitors got an id from the proxy and kept it; keyed users were sticky.
    assert report["users_by_kind"]["anonymous"] > 30
    assert report["users_by_kind"]["user"] > 100
    assert report["effective_users"] > 300  # so the tolerance below is at most 9.2 points
    # The weights: canary 20 % and stable the rest, over the bucket-assigned requests,
    # within the report's tolerance (4 standard errors over the effective users).
    for name, weight in (("canary", 0.20), ("stable", 0.80)):
        row = rings[name]
        assert row["expected"] == pytest.approx(weight)
        assert row["within"], row
        assert abs(row["bucket_share"] - weight) <= min(row["tolerance"], 0.10), row
        assert row["reasons"].keys() <= {"bucket", "default"}
    # Beta testers (about 5 % of the ids, sending X-Beta) went to beta by rule, and only they.
    beta = rings["beta"]
    assert beta["requests"] > 0 and beta["reasons"] == {"rule": beta["requests"]}
    assert beta["bucket_requests"] == 0
    assert 0.005 < beta["share"] < 0.10
    for row in rings.values():
        assert row["p50"] <= row["p95"] <= row["p99"]

    # The proxy's own access log agrees on where the requests went (it may also have
    # logged the few requests locust cut off when the time was up, at most one per user).
    demo.proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(demo.proc.wait(), 15)
    await asyncio.wait_for(asyncio.gather(*drains), 5)
    logged = Counter(json.loads(line)["ring"] for line in access if line.startswith(b"{"))
    for name, row in rings.items():
        assert 0 <= logged[name] - row["requests"] <= USERS, (logged, name, row["requests"])
    assert set(logged) == set(rings)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def demo() -> ringmix.Expectation:
    return ringmix.load_expectation(ringmix.DEFAULT_CONFIG)


def test_user_ids_and_beta_testers() -> None:
    assert ringmix.user_id(7, 5000) == "user-0007"
    assert ringmix.user_id(7, 100_000) == "user-00007"
    ids = [ringmix.user_id(i, 10_000) for i in range(10_000)]
    assert len(set(ids)) == 10_000
    beta = [u for u in ids if ringmix.is_beta(u, 0.05)]
    assert 400 < len(beta) < 600
    assert beta == [u for u in ids if ringmix.is_beta(u, 0.05)]  # a fixed property
    assert not any(ringmix.is_beta(u, 0.0) for u in ids)


def test_personas_and_what_they_send() -> None:
    rng = random.Random(1)
    people = [ringmix.pick_persona(rng, 5000, 0.3, 0.05) for _ in range(4000)]
    kinds = Counter(p.channel for p in people)
    assert 0.25 < kinds["anonymous"] / 4000 < 0.35
    assert kinds.keys() == {"anonymous", "header", "cookie", "both"}
    beta_header = ("X-Beta", "true")
    for p in people:
        headers = p.headers("X-User-Id", beta_header)
        cookies = p.cookies("uid")
        if p.uid is None:
            assert headers == {} and cookies == {} and not p.beta
            continue
        assert p.beta == ringmix.is_beta(p.uid, 0.05)
        assert ("X-Beta" in headers) == p.beta
        assert (headers.get("X-User-Id") == p.uid) == (p.channel in ("header", "both"))
        assert (cookies.get("uid") == p.uid) == (p.channel in ("cookie", "both"))
    # A route whose only key is a cookie: keyed users send the cookie; with no key, no ids.
    only = [ringmix.pick_persona(rng, 5000, 0.3, 0.05, ("cookie",)) for _ in range(200)]
    assert {p.channel for p in only} == {"anonymous", "cookie"}
    assert {ringmix.pick_persona(rng, 5000, 0.3, 0.05, ()).uid for _ in range(50)} == {None}


def test_parsing_arguments() -> None:
    assert ringmix.parse_range("3-30") == (3.0, 30.0)
    assert ringmix.parse_range("0.05-0.5") == (0.05, 0.5)
    assert ringmix.parse_range("5") == (5.0, 5.0)
    for bad in ("", "x", "5-3", "-1", "1-x"):
        with pytest.raises(ValueError):
            ringmix.parse_range(bad)
    assert ringmix.parse_header("X-Beta: true") == ("X-Beta", "true")
    with pytest.raises(ValueError):
        ringmix.parse_header("X-Beta")


def test_json_bodies_have_the_asked_size() -> None:
    rng = random.Random(2)
    for size in (200, 257, 600, 1024, 2999, 4096):
        body = ringmix.json_body(rng, size)
        assert len(body) == size
        doc = json.loads(body)
        assert doc["items"] and doc["client"]["app"] == "web"


def test_expectation_of_the_demo_config(demo: ringmix.Expectation) -> None:
    assert demo.route.name == "api"
    assert demo.bucket_share == {"beta": 0.0, "canary": pytest.approx(0.2),
                                 "stable": pytest.approx(0.8)}
    assert demo.pools == {"beta": "canary", "canary": "canary", "stable": "stable"}
    assert [demo.weight_label(r) for r in ("beta", "canary", "stable")] == ["rule", "20 %", "rest"]
    assert demo.user_header == "X-User-Id" and demo.user_cookie == "uid"
    assert demo.channels == ("header", "cookie", "both")
    assert demo.anonymous_cookie == "ringproxy_uid"
    # README: alice is in the canary, bob is not; the cookie is the same key as the header.
    assert demo.predict({"X-User-Id": "alice"}, {}) == ("canary", True)
    assert demo.predict({}, {"uid": "alice"}) == ("canary", True)
    assert demo.predict({}, {"ringproxy_uid": "alice"}) == ("canary", True)
    assert demo.predict({"X-User-Id": "bob"}, {}) == ("stable", True)
    assert demo.predict({"X-User-Id": "alice", "X-Beta": "TRUE"}, {}) == ("beta", False)
    with pytest.raises(ValueError, match="no route 'nope'"):
        ringmix.expectation_for(demo.config, "nope")


def test_statistics() -> None:
    assert ringmix.percentile([], 50) is None
    assert ringmix.percentile([7.0], 99) == 7.0
    values = [float(v) for v in range(100, 0, -1)]
    assert [ringmix.percentile(values, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert ringmix.effective_n([5] * 40) == pytest.approx(40)
    assert ringmix.effective_n([1000, 1, 1]) == pytest.approx(1.004, abs=1e-3)
    assert ringmix.effective_n([]) == 0
    assert ringmix.tolerance(0.2, 10_000) == 0.02  # the floor
    assert ringmix.tolerance(0.2, 100) == pytest.approx(4 * 0.04)
    assert ringmix.tolerance(0.2, 0) == float("inf")


def _simulate(demo: ringmix.Expectation, users: int, per_user: int) -> ringmix.Recorder:
    """A perfect proxy: every user in the ring the config gives its id."""
    rec = ringmix.Recorder()
    for i in range(users):
        uid = ringmix.user_id(i, users)
        ring, bucketed = demo.predict({"X-User-Id": uid}, {})
        for n in range(per_user):
            rec.record(f"user:{uid}", ring, 5.0 + n, True, reason="bucket",
                       predicted=ring, bucketed=bucketed)
    return rec


def test_report_of_a_sticky_run_passes(demo: ringmix.Expectation) -> None:
    rec = _simulate(demo, 3000, 3)
    rec.record("user:tester", "beta", 4.0, True, reason="rule", predicted="beta")
    report = ringmix.build_report(rec, demo)
    assert report.passed, report.failures
    rows = {r.ring: r for r in report.rows}
    assert rows["canary"].within and rows["stable"].within
    assert abs(rows["canary"].bucket_share - 0.2) < 0.03  # the murmur3 hash is fair
    assert rows["beta"].bucket_requests == 0 and rows["beta"].requests == 1
    assert report.total.requests == 9001 and report.users == 3001
    assert report.users_by_kind == {"user": 3001}
    assert report.effective_users == pytest.approx(3000)
    assert (report.split_users, report.mismatched_users) == (0, 0)
    text = ringmix.format_report(report)
    assert "result: PASS" in text and "in two rings: 0" in text
    assert json.loads(json.dumps(report.as_dict()))["passed"] is True


def test_report_fails_on_a_user_in_two_rings(demo: ringmix.Expectation) -> None:
    rec = _simulate(demo, 2000, 2)
    ring, _ = demo.predict({"X-User-Id": "user-0001"}, {})
    other = "canary" if ring == "stable" else "stable"
    rec.record("user:user-0001", other, 5.0, True, predicted=ring, bucketed=True)
    report = ringmix.build_report(rec, demo)
    assert not report.passed
    assert report.split_users == 1 and report.mismatched_users == 1
    assert report.split_examples[0].startswith("user:user-0001 (predicted")
    assert any("two rings" in f for f in report.failures)
    assert "result: FAIL" in ringmix.format_report(report)


def test_report_fails_on_errors_and_counts_responses_without_a_ring(
    demo: ringmix.Expectation,
) -> None:
    rec = _simulate(demo, 1000, 1)
    for _ in range(5):
        rec.record("anonymous-visit:1", None, 1.0, False)  # connection refused: no X-Ring
    report = ringmix.build_report(rec, demo, max_error_rate=0.01)
    assert report.passed  # 5 of 1005 is below 1 %
    none = next(r for r in report.rows if r.ring == ringmix.NO_RING)
    assert (none.requests, none.errors, none.error_rate) == (5, 5, 1.0)
    assert report.users == 1000  # an identity is counted once a ring answered it
    report = ringmix.build_report(rec, demo, max_error_rate=0.001)
    assert [f for f in report.failures if f.startswith("error rate 0.50%")]


def test_report_fails_when_shares_are_off(demo: ringmix.Expectation) -> None:
    rec = ringmix.Recorder()
    for i in range(2000):  # a proxy that puts half of everyone in the canary
        ring = "canary" if i % 2 else "stable"
        rec.record(f"user:u{i}", ring, 1.0, True, predicted=ring, bucketed=True)
    report = ringmix.build_report(rec, demo)
    off = {r.ring for r in report.rows if r.within is False}
    assert off == {"canary", "stable"}
    assert any(f.startswith("ring canary: 50.0%") for f in report.failures)
    assert " OFF " in ringmix.format_report(report)
    assert ringmix.build_report(ringmix.Recorder(), demo).failures == (
        "no requests were made",)


def test_report_fails_on_rings_the_config_does_not_have(demo: ringmix.Expectation) -> None:
    rec = _simulate(demo, 500, 1)
    rec.record("user:x", "blue", 1.0, True)
    report = ringmix.build_report(rec, demo)
    assert "rings not in the config answered: blue" in report.failures


def test_recorder_keeps_the_first_prediction() -> None:
    rec = ringmix.Recorder()
    rec.record("user:a", "canary", 1.0, True, predicted="canary", bucketed=True)
    rec.record("user:a", "canary", 2.0, True, predicted="stable", bucketed=False)
    tally = rec.identities["user:a"]
    assert (tally.predicted, tally.bucketed, tally.rings) == ("canary", True, {"canary": 2})
    assert rec.reasons == {}  # no X-Ring-Reason given
