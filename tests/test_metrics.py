"""The metrics layer without sockets: classification, attach/re-attach, exposition."""

from __future__ import annotations

import importlib.metadata
import platform
import textwrap

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import parse_config
from proxy.config.analysis import Criteria, LatencyLimit
from proxy.metrics import CODE_CLASSES, ERROR_KINDS, Metrics, RingRecorder
from proxy.rollout.evidence import Tally
from proxy.rollout.judge import Outcome, judge
from proxy.rollout.machine import Phase
from proxy.rollout.window import RingWindow
from proxy.runtime import Runtime

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: Metrics, accept: str = "") -> Samples:
    body, content_type = metrics.exposition(accept)
    assert content_type.startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def config(rings: str, routes_extra: str = "", metrics: str = "") -> str:
    return textwrap.dedent(
        """
        listen: 127.0.0.1:0
        admin: {listen: 127.0.0.1:0}
        pools:
          a: {servers: ["http://127.0.0.1:1"]}
          b: {servers: ["http://127.0.0.1:2"]}
        routes:
          - name: api
            rings:
        """
    ) + textwrap.indent(textwrap.dedent(rings), "      ") + routes_extra + metrics


RINGS = """\
- {name: beta, pool: b, rules: [{attr: "header:X-Beta", exists: true}]}
- {name: main, pool: a}
"""
WEB = """
  - name: web
    match: {host: web.test}
    rings:
      - {name: main, pool: a}
"""


def recorder() -> RingRecorder:
    return RingRecorder("api", "main", "a", RingWindow(60))


# --------------------------------------------------------------------------- classification

J, N = True, False  # judged (recorded into the tally and the window) or not


@pytest.mark.parametrize(
    ("status", "error", "code_class", "kind", "judged", "failed"),
    [
        (200, "", "2xx", None, J, False),
        (101, "", "1xx", None, J, False),
        (302, "", "3xx", None, J, False),
        (404, "", "4xx", None, J, False),
        (429, "", "4xx", None, J, False),  # not an error unless the route says so
        (500, "", "5xx", None, J, True),
        (503, "", "5xx", None, J, True),  # the upstream's own 503
        (599, "", "5xx", None, J, True),
        (799, "", "5xx", None, J, True),  # non-standard, accepted by aiohttp's parser
        (502, "connect", "error", "connect", J, True),
        (504, "connect", "error", "connect", J, True),  # connect timeout
        (504, "timeout", "error", "timeout", J, True),
        (502, "reset", "error", "reset", J, True),
        (502, "bad_response", "error", "bad_response", J, True),
        (0, "timeout", "error", "timeout", J, True),
        # After the upstream's headers went out: the client saw that status line, and the
        # upstream still failed to give a whole answer.
        (200, "reset", "2xx", "reset", J, True),
        (206, "timeout", "2xx", "timeout", J, True),
        (404, "bad_response", "4xx", "bad_response", J, True),
        # The proxy's own 503 for a full max_concurrency: refused, never judged.
        (503, "overload", "refused", "overload", N, False),
        # The client went away, or the proxy refused its request: never judged.
        (0, "client_closed", "client_closed", None, N, False),
        (200, "client_closed", "2xx", None, N, False),
        (500, "client_closed", "5xx", None, N, False),
        (400, "bad_request", "4xx", None, N, False),
        (0, "", "error", None, J, True),  # nothing sent and no reason
    ],
)
def test_each_outcome_is_counted_once_in_one_class(
    status: int, error: str, code_class: str, kind: str | None, judged: bool, failed: bool
) -> None:
    rec = recorder()
    rec.record(status, error, 0.003, 10, 20, now=5.0)
    assert rec.requests == [int(c == code_class) for c in CODE_CLASSES]
    assert rec.upstream_errors == [int(k == kind) for k in ERROR_KINDS]
    assert (rec.sent, rec.received) == (10, 20)
    summary = rec.window.summary(5.0, 1)
    assert (summary.requests, summary.errors) == (int(judged), int(failed))
    evidence = rec.tally.evidence()
    assert (evidence.requests, evidence.errors) == (int(judged), int(failed))
    timed = status != 101
    assert sum(rec.buckets) == int(timed)  # Prometheus: every finished request but a 101
    assert rec.duration_sum == (0.003 if timed else 0.0)
    assert summary.observed == evidence.timed == int(timed and judged)


def test_the_routes_error_statuses_decide_what_is_an_error() -> None:
    rec = RingRecorder("api", "main", "a", RingWindow(60), frozenset({404, 429, 503}))
    for status in (200, 404, 429, 500, 503, 799):
        rec.record(status, "", 0.003, 0, 0, now=5.0)
    evidence = rec.tally.evidence()
    assert (evidence.requests, evidence.errors) == (6, 4)  # 404, 429, 503 and the 799


def test_a_recorder_kept_by_a_reload_takes_the_new_error_statuses() -> None:
    text = config(RINGS)
    metrics = Metrics(process_metrics=False)
    metrics.attach(Runtime(parse_config(text)))
    tally = metrics.tally("api", "main")
    with_404 = text.replace("  - name: api\n", "  - name: api\n    analysis: "
                            "{error_statuses: [5xx, 404]}\n")
    runtime = Runtime(parse_config(with_404))
    metrics.attach(runtime)
    recorder = runtime.rings["api"][1].recorder
    assert isinstance(recorder, RingRecorder) and metrics.tally("api", "main") is tally
    recorder.record(404, "", 0.01, 0, 0, 1.0)
    assert (tally.requests, tally.errors) == (1, 1)
    with pytest.raises(KeyError, match="no metrics for ring api/nope"):
        metrics.tally("api", "nope")


@pytest.mark.parametrize("status", [500, 200, 0])
def test_a_defect_of_the_proxy_is_counted_but_never_judged(status: int) -> None:
    # The handler's 500 (or, after the upstream's headers went out, the upstream's status).
    rec = recorder()
    rec.record(status, "internal", 0.003, 10, 20, now=5.0)
    assert rec.requests == [int(c == "internal") for c in CODE_CLASSES]
    assert rec.upstream_errors == [0] * len(ERROR_KINDS)
    assert (rec.sent, rec.received) == (10, 20)
    assert sum(rec.buckets) == 0 and rec.duration_sum == 0
    summary = rec.window.summary(5.0, 1)
    assert (summary.requests, summary.errors, summary.observed) == (0, 0, 0)
    assert rec.tally.evidence().requests == 0


def test_durations_fill_inclusive_buckets() -> None:
    rec = recorder()
    for d in (0.0005, 0.001, 0.0011, 10.0, 10.5):
        rec.record(200, "", d, 0, 0, 1.0)
    assert rec.buckets[0] == 2 and rec.buckets[1] == 1
    assert rec.buckets[-2] == 1 and rec.buckets[-1] == 1
    assert repr(rec) == "<RingRecorder api/main pool=a requests=5>"


# --------------------------------------------------------------------------- attach


def test_attach_gives_every_ring_a_recorder_and_exports_zeroed_series() -> None:
    runtime = Runtime(parse_config(config(RINGS, WEB)))
    metrics = Metrics(process_metrics=False)
    metrics.attach(runtime)
    assert all(r.recorder is not None for rings in runtime.rings.values() for r in rings)
    s = scrape(metrics)
    for route, ring, pool in (("api", "beta", "b"), ("api", "main", "a"), ("web", "main", "a")):
        for cls in CODE_CLASSES:
            labels = {"route": route, "ring": ring, "pool": pool, "code_class": cls}
            assert value(s, "ringproxy_requests_total", **labels) == 0
        for kind in ERROR_KINDS:
            labels = {"route": route, "ring": ring, "pool": pool, "kind": kind}
            assert value(s, "ringproxy_upstream_errors_total", **labels) == 0
        for direction in ("sent", "received"):
            labels = {"route": route, "ring": ring, "direction": direction}
            assert value(s, "ringproxy_upstream_bytes_total", **labels) == 0
        labels = {"route": route, "ring": ring, "pool": pool}
        assert value(s, "ringproxy_request_duration_seconds_count", **labels) == 0
        assert value(s, "ringproxy_inflight_requests", route=route, ring=ring) == 0
    # Weights are what the runtime knows: the default ring owns what is left, a ring
    # with only rules has no weight and no series.
    assert value(s, "ringproxy_ring_weight_percent", route="api", ring="main") == 100
    assert value(s, "ringproxy_ring_weight_percent", route="api", ring="beta") is None
    assert value(s, "ringproxy_config_last_reload_success") == 1
    assert value(s, "ringproxy_config_reloads_total", result="success") == 0
    assert value(s, "ringproxy_config_reloads_total", result="failure") == 0
    assert not [k for k in s if k[0].startswith("ringproxy_rollbacks")]
    assert not [k for k in s if k[0].startswith("process_")]


def test_inflight_is_read_live_at_scrape_time() -> None:
    runtime = Runtime(parse_config(config(RINGS)))
    metrics = Metrics(process_metrics=False)
    metrics.attach(runtime)
    runtime.rings["api"][1].inflight = 7
    assert value(scrape(metrics), "ringproxy_inflight_requests", route="api", ring="main") == 7


def test_reattach_keeps_surviving_rings_and_drops_the_series_of_removed_ones() -> None:
    metrics = Metrics(process_metrics=False)
    old = Runtime(parse_config(config(RINGS, WEB)))
    metrics.attach(old)
    main = old.rings["api"][1].recorder
    beta = old.rings["api"][0].recorder
    assert main is not None and beta is not None
    main.record(200, "", 0.01, 0, 5, 1.0)
    beta.record(500, "", 0.01, 0, 5, 1.0)
    metrics.rollback("api", "beta", "error_rate")
    metrics.rollback("api", "main", "manual")

    # beta is gone; web/main moved to pool b (a new series); api/main is unchanged.
    new_rings = "- {name: main, pool: a}\n"
    web_b = WEB.replace("pool: a", "pool: b")
    new = Runtime(parse_config(config(new_rings, web_b)))
    metrics.attach(new)
    metrics.reload_succeeded(new.config.revision)
    assert new.rings["api"][0].recorder is main  # counters and window carry on
    s = scrape(metrics)
    assert value(s, "ringproxy_requests_total",
                 route="api", ring="main", pool="a", code_class="2xx") == 1
    assert not [k for k in s if ("ring", "beta") in k[1]]
    assert not [k for k in s if ("pool", "a") in k[1] and ("route", "web") in k[1]]
    assert value(s, "ringproxy_requests_total",
                 route="web", ring="main", pool="b", code_class="2xx") == 0
    assert value(s, "ringproxy_rollbacks_total",
                 route="api", ring="main", reason="manual") == 1
    assert value(s, "ringproxy_rollbacks_total",
                 route="api", ring="beta", reason="error_rate") is None
    assert value(s, "ringproxy_config_info", revision=new.config.revision) == 1
    assert value(s, "ringproxy_config_reloads_total", result="success") == 1
    assert metrics.window("api", "main", 1.0, 10).requests == 1
    message = r"no metrics for ring api/beta \(rings: api/main, web/main\)"
    with pytest.raises(KeyError, match=message):
        metrics.window("api", "beta", 1.0, 10)


def test_metrics_disabled_attaches_nothing_and_exports_no_ring_series() -> None:
    metrics = Metrics(process_metrics=False)
    on = Runtime(parse_config(config(RINGS)))
    metrics.attach(on)
    off = Runtime(parse_config(config(RINGS, metrics="metrics: {enabled: false}\n")))
    metrics.attach(off)
    assert all(r.recorder is None for rings in off.rings.values() for r in rings)
    s = scrape(metrics)
    assert not [k for k in s if "ring" in dict(k[1])]
    assert value(s, "ringproxy_config_last_reload_success") == 1


def test_reload_failure_keeps_the_revision_and_counts() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.config_loaded("abc")
    metrics.reload_failed()
    s = scrape(metrics)
    assert value(s, "ringproxy_config_info", revision="abc") == 1
    assert value(s, "ringproxy_config_last_reload_success") == 0
    assert value(s, "ringproxy_config_reloads_total", result="failure") == 1
    assert (value(s, "ringproxy_config_last_reload_success_timestamp_seconds") or 0) > 1.7e9
    assert repr(metrics) == "<Metrics rings=0 revision=abc>"


def test_phase_starved_and_evidence_come_from_what_the_runtime_rings_carry() -> None:
    # What the control loop copies onto the rings is all collect reads.
    runtime = Runtime(parse_config(config(RINGS)))
    metrics = Metrics(process_metrics=False)
    metrics.attach(runtime)
    beta, main = runtime.rings["api"]
    s = scrape(metrics)
    assert not [k for k in s if k[0] in ("ringproxy_ring_phase", "ringproxy_ring_analysis_starved",
                                         "ringproxy_ring_evidence_progress")]
    ring, base = Tally(), Tally()
    for i in range(200):
        base.record(False, 0.010)
        ring.record(i % 2 == 0, 0.010)  # half errors: far worse than the baseline
    verdict = judge(ring.evidence(), base.evidence(), Criteria(latency=(LatencyLimit(0.95, 2),)))
    assert verdict.outcome is Outcome.ROLLBACK
    beta.phase, beta.starved, beta.verdict = Phase.ROLLED_BACK, True, verdict
    main.phase, main.inflight = Phase.STEADY, 2
    s = scrape(metrics)
    assert value(s, "ringproxy_ring_phase", route="api", ring="beta", phase="rolled_back") == 1
    assert value(s, "ringproxy_ring_analysis_starved", route="api", ring="beta") == 1
    assert value(s, "ringproxy_ring_analysis_starved", route="api", ring="main") == 0
    assert value(s, "ringproxy_ring_evidence_progress", route="api", ring="beta",
                 check="error_rate_increase") == 1
    assert value(s, "ringproxy_ring_evidence_progress", route="api", ring="beta",
                 check="p95") == 0
    assert not [k for k in s if k[0] == "ringproxy_ring_evidence_progress"
                and ("ring", "main") in k[1]]
    assert value(s, "ringproxy_inflight_requests", route="api", ring="main") == 2


def test_each_check_of_the_last_verdict_is_exported_with_its_finding_and_p_value() -> None:
    runtime = Runtime(parse_config(config(RINGS)))
    metrics = Metrics(process_metrics=False)
    metrics.attach(runtime)
    beta = runtime.rings["api"][0]
    ring, base = Tally(), Tally()
    for i in range(200):
        base.record(False, 0.010)
        ring.record(i % 2 == 0, 0.010)
    verdict = judge(ring.evidence(), base.evidence(), Criteria(latency=(LatencyLimit(0.95, 2),)))
    beta.phase, beta.verdict = Phase.ROLLED_BACK, verdict
    s = scrape(metrics)
    for check in verdict.checks:
        labels = {"route": "api", "ring": "beta", "check": check.name}
        assert value(s, "ringproxy_ring_check_p_value", **labels) == check.p_value
        findings = {f: value(s, "ringproxy_ring_check_finding", **labels, finding=f)
                    for f in ("worse", "within", "undecided")}
        assert findings == {f: float(f == check.finding.value) for f in findings}
    assert value(s, "ringproxy_ring_check_finding", route="api", ring="beta",
                 check="error_rate_increase", finding="worse") == 1
    p = value(s, "ringproxy_ring_check_p_value", route="api", ring="beta",
              check="error_rate_increase")
    assert p is not None and p < 0.05
    assert not [k for k in s if k[0].startswith("ringproxy_ring_check_")
                and ("ring", "main") in k[1]]  # no verdict, no series


def test_rollbacks_are_exported_at_zero_from_the_start_for_rings_in_a_rollout() -> None:
    runtime = Runtime(parse_config(config(RINGS)))
    metrics = Metrics(process_metrics=False)
    metrics.attach(runtime)
    beta = runtime.rings["api"][0]
    assert not [k for k in scrape(metrics) if k[0] == "ringproxy_rollbacks_total"]
    beta.phase = Phase.STEADY  # the rollout loop runs it
    s = scrape(metrics)
    assert [k for k in s if k[0] == "ringproxy_rollbacks_total"] == [
        ("ringproxy_rollbacks_total",
         frozenset({"route": "api", "ring": "beta", "reason": "manual"}.items()))]
    assert value(s, "ringproxy_rollbacks_total", route="api", ring="beta", reason="manual") == 0
    metrics.rollback("api", "beta", "manual")
    metrics.rollback("api", "beta", "p95")
    s = scrape(metrics)
    assert value(s, "ringproxy_rollbacks_total", route="api", ring="beta", reason="manual") == 1
    assert value(s, "ringproxy_rollbacks_total", route="api", ring="beta", reason="p95") == 1


def test_build_info_names_the_installed_version_and_python() -> None:
    metrics = Metrics(process_metrics=False)
    s = scrape(metrics)
    assert value(s, "ringproxy_build_info", version=importlib.metadata.version("ringproxy"),
                 python=platform.python_version()) == 1
    assert value(s, "ringproxy_unrouted_requests_total") == 0


def test_openmetrics_is_served_when_asked_and_parses() -> None:
    metrics = Metrics()
    runtime = Runtime(parse_config(config(RINGS)))
    metrics.attach(runtime)
    metrics.config_loaded(runtime.config.revision)
    body, content_type = metrics.exposition(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    )
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    names = {f.name for f in openmetrics_families(body.decode())}
    assert {"ringproxy_requests", "ringproxy_request_duration_seconds", "ringproxy_config",
            "ringproxy_upstream_errors", "ringproxy_rollbacks", "ringproxy_build_info",
            "ringproxy_unrouted_requests"} <= names
    assert any(n.startswith("process_") for n in names)
