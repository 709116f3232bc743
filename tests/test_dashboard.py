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
from proxy.runtime import Runtime
from tests.conftest import ROOT
from tests.test_prometheus_sockets import expressions

DASHBOARD = ROOT / "config" / "grafana" / "ringproxy-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PANELS = (
    "Requests/s per ring",
    "Error rate per ring",
    "Latency p50 / p95 / p99 per ring",
    "Ring weights",
    "Rollbacks and config reloads",
    "In-flight requests per ring",
    "Upstream errors by kind",
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
    body, _ = metrics.exposition()
    return {line.split("{")[0].split(" ")[0]
            for line in body.decode().splitlines() if line and not line.startswith("#")}


def test_datasource_route_and_ring_are_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("route", "ring"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*"
        assert var["query"] == var["definition"]  # the plain string form every Grafana reads
    assert variables["route"]["definition"] == "label_values(ringproxy_requests_total, route)"
    assert variables["ring"]["definition"] == \
        'label_values(ringproxy_requests_total{route=~"$route"}, ring)'


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
    for title, expr in expressions(dashboard):
        for name in re.findall(r"\bringproxy_\w+", expr):
            assert name in exported, f"{title}: {name} is not exported"
        if re.search(r"ringproxy_(requests|request_duration|upstream|inflight|ring_|rollbacks)",
                     expr):
            assert expr.count('route=~"$route"') == expr.count('ring=~"$ring"') >= 1, expr
        # `x or vector(0)` adds the 0 even next to labelled series; `or on() vector(0)` only
        # when x is empty.
        assert not re.search(r"\bor\s+vector", expr), expr
        assert "$__rate_interval" in expr or ("rate(" not in expr and "increase(" not in expr)
