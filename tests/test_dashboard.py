"""The Grafana dashboard's structure, checked against what the metrics module exports.

Whether its queries answer is proven against a real Prometheus in
test_prometheus_sockets.py; this file needs nothing installed.
"""

from __future__ import annotations

import json
import re
import textwrap
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.metrics import Metrics
from proxy.rollout.judge import Check, Finding, Outcome, Verdict
from proxy.rollout.state import Phase
from proxy.runtime import Runtime
from tests.conftest import ROOT
from tests.test_prometheus_sockets import expressions

DASHBOARD = ROOT / "config" / "grafana" / "ringproxy-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
SCOPE = 'job="$job", namespace=~"$namespace", instance=~"$instance"'
PANELS = (
    "Requests/s per ring",
    "Error rate per ring",
    "Latency p50 / p95 / p99 per ring",
    "Ring weights",
    "Rollbacks and config reloads",
    "In-flight requests per ring",
    "Upstream errors by kind",
    "Ring phase timeline",
    "Canary vs baseline",
    "Analysis: evidence toward a rollback per check",
    "Analysis: last verdict per check",
    "Requests with no route",
    "Replicas: version and config revision",
)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def exported_names() -> set[str]:
    runtime = Runtime(parse_config(textwrap.dedent("""
        listen: 127.0.0.1:0
        pools: {a: {servers: ["http://127.0.0.1:1"]}}
        routes: [{name: api, rings: [{name: main, pool: a}]}]
    """)))
    metrics = Metrics(process_metrics=False)
    metrics.attach(runtime)
    metrics.config_loaded("r1")
    metrics.rollback("api", "main", "test")
    ring = runtime.rings["api"][0]
    ring.phase = Phase.PROGRESSING
    ring.verdict = Verdict(Outcome.UNDECIDED, (Check(
        "p95", Finding.UNDECIDED, None, 0.0, 1.0, 0.5, 1.0, 0.05, "p95: waiting"),))
    body, _ = metrics.exposition()
    return {line.split("{")[0].split(" ")[0]
            for line in body.decode().splitlines() if line and not line.startswith("#")}


def test_an_import_input_and_job_instance_namespace_route_ring_variables(
    dashboard: dict[str, Any],
) -> None:
    # Grafana's import asks for DS_PROMETHEUS and writes the chosen uid over every
    # ${DS_PROMETHEUS}; provisioned as a file, the variable of that name resolves it.
    assert dashboard["__inputs"] == [{
        "name": "DS_PROMETHEUS", "label": "Prometheus", "description": "",
        "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["DS_PROMETHEUS", "job", "namespace", "instance", "route", "ring"]
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("job", "namespace", "instance", "route", "ring"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE
        assert var["query"] == var["definition"]  # the plain string form every Grafana reads
    # One job (an environment) at a time: never summed with another.
    assert not variables["job"]["multi"] and not variables["job"]["includeAll"]
    # "All" is ".*", which also matches a series without the label (no namespace).
    for name in ("namespace", "instance", "route", "ring"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    for name in ("instance", "route", "ring"):
        assert variables[name]["multi"]
    assert variables["job"]["definition"] == "label_values(ringproxy_build_info, job)"
    assert variables["namespace"]["definition"] == \
        'label_values(ringproxy_build_info{job="$job"}, namespace)'
    assert variables["instance"]["definition"] == \
        'label_values(ringproxy_build_info{job="$job", namespace=~"$namespace"}, instance)'
    assert variables["route"]["definition"] == \
        f"label_values(ringproxy_requests_total{{{SCOPE}}}, route)"
    assert variables["ring"]["definition"] == \
        f'label_values(ringproxy_requests_total{{{SCOPE}, route=~"$route"}}, ring)'


def test_the_phase_timeline_maps_every_phase_to_its_name(dashboard: dict[str, Any]) -> None:
    panel = next(p for p in dashboard["panels"] if p["title"] == "Ring phase timeline")
    (expr,) = [t["expr"] for t in panel["targets"]]
    # Each phase series times its own number; the value mapping names the number.
    numbers = dict(re.findall(r'phase="(\w+)"\} \* (\d+)', expr))
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    names = {n: m["text"] for n, m in mapping["options"].items()}
    assert {names[n]: p for p, n in numbers.items()} == {p: p for p in numbers}
    assert set(numbers) == {p.value for p in Phase}


def test_rollbacks_and_rollouts_are_annotations(dashboard: dict[str, Any]) -> None:
    annotations = {a["name"]: a for a in dashboard["annotations"]["list"]}
    assert {"Rollbacks", "Rollout phases", "Rollout steps"} <= set(annotations)
    for name in ("Rollbacks", "Rollout phases", "Rollout steps"):
        a = annotations[name]
        assert a["datasource"] == DATASOURCE and a["enable"], name
        assert SCOPE in a["expr"] and 'route=~"$route", ring=~"$ring"' in a["expr"], name
    assert "ringproxy_rollbacks_total" in annotations["Rollbacks"]["expr"]
    assert "{{reason}}" in annotations["Rollbacks"]["textFormat"]


def test_every_panel_and_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    titles = [p["title"] for p in dashboard["panels"]]
    assert set(PANELS) <= set(titles)


def test_queries_use_only_exported_metrics_and_filter_by_route_and_ring(
    dashboard: dict[str, Any],
) -> None:
    exported = exported_names()
    for title, expr in expressions(dashboard, annotations=True):
        for name in re.findall(r"\bringproxy_\w+", expr):
            assert name in exported, f"{title}: {name} is not exported"
        # Every selector is scoped to the chosen job, namespace and instance(s).
        assert expr.count("ringproxy_") == expr.count(SCOPE), expr
        if re.search(r"ringproxy_(requests|request_duration|upstream|inflight|ring_|rollbacks)",
                     expr):
            assert expr.count('route=~"$route"') == expr.count('ring=~"$ring"') >= 1, expr
        # `x or vector(0)` adds the 0 even next to labelled series; `or on() vector(0)` only
        # when x is empty.
        assert not re.search(r"\bor\s+vector", expr), expr
        if title.startswith("annotation:"):
            continue  # an annotation's range is its own (1m, its step)
        assert "$__rate_interval" in expr or ("rate(" not in expr and "increase(" not in expr)
