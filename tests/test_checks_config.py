"""External checks, pure: their config (URLs, placeholders, bounds, health checks, gates),
how a result joins a verdict, and ``ringproxy check`` parsing PromQL with promtool."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.checks.results import Result, Status, advance, join
from proxy.config import load_config, parse_config
from proxy.config.checks import OnFail, fill, placeholders, shown_url
from proxy.config.schema import config_schema
from proxy.errors import ConfigError
from proxy.rollout.judge import Finding, Outcome, Verdict
from tests.conftest import ROOT, cli

BASE = textwrap.dedent("""
    pools:
      p: {servers: ["http://127.0.0.1:9"]}
      q: {servers: ["http://127.0.0.1:10"]}
    routes:
      - name: api
        sticky: {key: "header:X-User"}
        analysis:
          checks:
            - name: conversion
              prometheus:
                url: "http://127.0.0.1:9090"
                query: 'sum(rate(orders{ring="{ring}", route="{route}", pool="{pool}"}[5m]))'
              min: 0.5
              on_fail: rollback
              interval: 15s
            - name: smoke
              webhook: {url: "https://ci.example.com/smoke", headers: {Authorization: "${T}"}}
              on_fail: hold
          pre_advance: {url: "http://127.0.0.1:9/gate", timeout: 3s}
          post_rollback: "http://127.0.0.1:9/after"
        rings:
          - name: canary
            pool: p
            weight: 5
            health_checks:
              - {name: db, path: /health/db, interval: 5s, timeout: 1s, threshold: 2}
          - name: stable
            pool: q
""")
ENV = {"T": "Bearer s3cret-value"}


def issues_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ=ENV)
    return {i.path: i.message for i in info.value.issues}


def test_a_full_checks_config_reads() -> None:
    config = parse_config(BASE, environ=ENV)
    analysis = config.routes[0].analysis
    assert analysis is not None
    conv, smoke = analysis.checks
    assert conv.kind == "prometheus" and conv.min == 0.5 and conv.interval == 15
    assert conv.bound_text == ">= 0.5"
    assert smoke.kind == "webhook" and smoke.on_fail is OnFail.HOLD
    assert smoke.webhook is not None
    assert smoke.webhook.headers == (("Authorization", "Bearer s3cret-value"),)
    assert analysis.pre_advance is not None and analysis.pre_advance.timeout == 3
    assert analysis.post_rollback is not None
    (db,) = config.routes[0].rings[0].health_checks
    assert (db.name, db.path, db.threshold, db.on_fail) == ("db", "/health/db", 2,
                                                            OnFail.ROLLBACK)


def test_placeholders_are_filled_per_ring_and_promql_braces_are_left_alone() -> None:
    query = 'sum(rate(x{ring="{ring}", job=~"a|b"}[5m])) / on() y{pool="{pool}"}'
    assert placeholders(query) == ["ring", "pool"]
    assert fill(query, "canary", "api", "p") == \
        'sum(rate(x{ring="canary", job=~"a|b"}[5m])) / on() y{pool="p"}'


@pytest.mark.parametrize(("old", "new", "path", "words"), [
    ('url: "http://127.0.0.1:9090"', 'url: "127.0.0.1:9090"',
     "routes[0].analysis.checks[0].prometheus.url", "is not an http(s) URL"),
    ('url: "http://127.0.0.1:9090"', 'url: "ftp://prom:9090"',
     "routes[0].analysis.checks[0].prometheus.url", "is not an http(s) URL"),
    ('url: "http://127.0.0.1:9090"', 'url: "http://u:pw@prom:9090"',
     "routes[0].analysis.checks[0].prometheus.url", "credentials in the URL"),
    ('pool="{pool}"', 'pool="{pol}"',
     "routes[0].analysis.checks[0].prometheus.query", "unknown placeholder {pol}"),
    ("min: 0.5", "min: high", "routes[0].analysis.checks[0].min", "expected a number"),
    ("min: 0.5", "max: 1\n          min: 2", "routes[0].analysis.checks[0].min",
     "is above max"),
    ("min: 0.5", "", "routes[0].analysis.checks[0]", "needs max: NUMBER"),
    ("on_fail: rollback", "on_fail: ignore", "routes[0].analysis.checks[0].on_fail",
     "not one of: rollback, hold"),
    ("name: smoke", "name: conversion", "routes[0].analysis.checks[1].name",
     "duplicate check name"),
    ("name: smoke", "name: p95", "routes[0].analysis.checks[1].name",
     "one of the judge's own checks"),
    ('webhook: {url: "https://ci.example.com/smoke"',
     'webhook: {url: "https://ci.example.com/smoke", query: x',
     "routes[0].analysis.checks[1].webhook.query", "unknown key"),
    ("on_fail: hold", "on_fail: hold\n          max: 3",
     "routes[0].analysis.checks[1].max", "passes on 2xx"),
    ('pre_advance: {url: "http://127.0.0.1:9/gate"', 'pre_advance: {url: "gate"',
     "routes[0].analysis.pre_advance.url", "is not an http(s) URL"),
    ("path: /health/db", "path: health/db", "routes[0].rings[0].health_checks[0].path",
     "is not a request path"),
    ("timeout: 1s, threshold: 2", "timeout: 9s, threshold: 2",
     "routes[0].rings[0].health_checks[0].timeout", "longer than the interval"),
])
def test_bad_check_definitions_are_named_with_what_to_write(
    old: str, new: str, path: str, words: str
) -> None:
    assert old in BASE
    found = issues_of(BASE.replace(old, new, 1))
    assert path in found and words in found[path], found


def test_both_or_neither_of_prometheus_and_webhook_is_an_error() -> None:
    text = BASE.replace("webhook: {url", "prometheus: {url: 'http://x:1', query: up}\n"
                        "          webhook: {url")
    assert "exactly one of" in issues_of(text)["routes[0].analysis.checks[1]"]


def test_health_checks_need_an_analysed_ring_that_is_not_the_baseline() -> None:
    on_baseline = BASE.replace("        pool: q\n", "        pool: q\n        health_checks: "
                               "[{name: db, path: /h}]\n")
    assert "is the baseline" in issues_of(on_baseline)["routes[0].rings[1].health_checks"]
    no_analysis = textwrap.dedent("""
        pools: {p: {servers: ["http://127.0.0.1:9"]}}
        routes:
          - name: api
            rings:
              - {name: a, pool: p, rules: [{attr: "header:X", exists: true}],
                 health_checks: [{name: db, path: /h}]}
              - {name: b, pool: p}
    """)
    assert "need the route's analysis" in issues_of(no_analysis)["routes[0].rings[0].health_checks"]


def result(status: Status, on_fail: OnFail = OnFail.ROLLBACK, failures: int = 0,
           threshold: int = 1) -> Result:
    return Result("conversion", "prometheus", status, 0.2, ">= 0.5", 0.5, on_fail,
                  "0.2 (bound >= 0.5)", 1.0, failures, threshold)


def test_results_join_the_verdict_fail_rolls_back_hold_and_no_data_hold() -> None:
    healthy = Verdict(Outcome.HEALTHY, (), 500, 5000)
    assert join(healthy, []) is healthy
    assert join(healthy, [result(Status.PASS)]).outcome is Outcome.HEALTHY
    failed = join(healthy, [result(Status.FAIL, failures=1)])
    assert failed.outcome is Outcome.ROLLBACK and failed.broken == ("conversion",)
    assert "conversion" in failed.reason and "0.2 (bound >= 0.5)" in failed.reason
    assert failed.numbers["conversion"]["status"] == "fail"  # type: ignore[index]
    for held in (result(Status.FAIL, OnFail.HOLD, failures=3),
                 result(Status.FAIL, failures=1, threshold=2),
                 result(Status.NO_DATA), result(Status.PENDING)):
        verdict = join(healthy, [held])
        assert verdict.outcome is Outcome.UNDECIDED, held
        assert verdict.checks[-1].finding is Finding.UNDECIDED
    # A judge's rollback stays a rollback whatever the external checks say.
    rollback = Verdict(Outcome.ROLLBACK, (), 500, 5000)
    assert join(rollback, [result(Status.PASS)]).outcome is Outcome.ROLLBACK
    # No data never rolls back, however long it lasts.
    undecided = Verdict(Outcome.UNDECIDED, (), 5, 50)
    assert join(undecided, [result(Status.NO_DATA)]).outcome is Outcome.UNDECIDED


def test_failures_in_a_row_are_counted_and_reset_by_anything_else() -> None:
    first = advance(None, result(Status.FAIL))
    second = advance(first, result(Status.FAIL))
    assert (first.failures, second.failures) == (1, 2)
    assert advance(second, result(Status.NO_DATA)).failures == 0
    assert advance(advance(second, result(Status.PASS)), result(Status.FAIL)).failures == 1


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (.ci/run installs it)")
def test_ringproxy_check_parses_the_promql_with_promtool(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(BASE.replace("${T}", "Bearer x"))
    done = cli("check", str(good))
    assert done.returncode == 0, done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("${T}", "Bearer x").replace("[5m]))'", "[5m])'"))
    done = cli("check", str(bad))
    assert done.returncode == 1
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "query:" in text)
    assert f"{bad}:{line}: routes[0].analysis.checks[0].prometheus.query: PromQL does not " \
        "parse (promtool)" in done.stderr, done.stderr
    assert "unclosed left parenthesis" in done.stderr


def test_the_playbook_passes_ringproxy_check_and_the_schema() -> None:
    """config/rings-playbook.yaml: the seed's rings 0-3 (its PromQL parsed by promtool
    where installed, as in CI)."""
    done = cli("check", "config/rings-playbook.yaml")
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    document = yaml.safe_load((ROOT / "config/rings-playbook.yaml").read_text())
    jsonschema.validate(document, config_schema())
    config = load_config(ROOT / "config/rings-playbook.yaml")
    (release, _) = config.routes[0].rings
    assert release.progression is not None
    steps = release.progression.steps
    assert [(s.weight, s.min_duration, s.max_error_rate) for s in steps] == [
        (100, 7200, 0.01), (1000, 86400, 0.005), (5000, 259200, 0.003), (10000, None, None)]
    assert [s.checks for s in steps] == [(), ("feedback",), ("tickets",), ()]
    assert [h.path for h in release.health_checks] == ["/health/db"]


@pytest.mark.parametrize(("url", "shown"), [
    ("https://hooks.slack.com/services/T000/B000/XXXXsecret", "https://hooks.slack.com"),
    ("http://127.0.0.1:9090/gate?token=abc", "http://127.0.0.1:9090"),
    ("https://[::1]:8443/x", "https://[::1]:8443"),
    ("http://prom:notaport/x", ""),
    ("", ""),
])
def test_a_urls_view_is_its_origin_only(url: str, shown: str) -> None:
    assert shown_url(url) == shown


def test_a_bad_url_is_never_quoted_in_its_error() -> None:
    text = BASE.replace('url: "http://127.0.0.1:9090"',
                        'url: "ftp://prom:9090/q?token=s3cr3t"')
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={"T": "t"})
    assert "prometheus.url: is not an http(s) URL (scheme 'ftp'" in str(info.value)
    assert "s3cr3t" not in str(info.value)
