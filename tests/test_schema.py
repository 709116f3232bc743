"""The config's JSON Schema (``ringproxy schema``): valid JSON Schema, the shipped configs
and the Kubernetes ConfigMap's pass it, typos fail it, and every section's keys are exactly
the ones the config reader knows (asked of the reader itself, section by section)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.config import parse_config
from proxy.config.schema import config_schema
from proxy.errors import ConfigError
from tests.conftest import ROOT, cli

ENV = {"T1": "t" * 20}

# Every section the reader has, filled in (a valid config).
SAMPLE: dict[str, Any] = {
    "listen": "127.0.0.1:8080",
    "admin": {"listen": "127.0.0.1:9901", "tokens": [{"env": "T1", "role": "admin"}]},
    "access_log": {"enabled": True, "path": "-"},
    "shutdown_grace": "1m30s",
    "metrics": {"enabled": True},
    "state": {"path": "s.json", "audit": "a.jsonl"},
    "webhooks": [{"url": "http://127.0.0.1:9/hook", "timeout": "2s", "retries": 1}],
    "pools": {"p": {"servers": ["http://127.0.0.1:9"], "balance": "least_request",
                    "health": {"path": "/healthz", "interval": "2s", "expect_status": "2xx",
                               "headers": {"X-Check": "1"}},
                    "outlier": {"consecutive_failures": 3, "on_5xx": True},
                    "retries": {"attempts": 2, "on": ["reset", 503], "budget": "10%"}}},
    "routes": [{
        "name": "api",
        "match": {"host": "api.example.com", "path_prefix": "/"},
        "policy": {"timeout": "5s", "add_headers": {"X-A": "{ring}"}},
        "sticky": {"key": ["header:X-User-Id"], "salt": "s", "anonymous": {"cookie": "u"}},
        "override": {"header": "X-Ring-Override", "cidrs": ["10.0.0.0/8"]},
        "decision": {"reason_upstream": True, "response": False},
        "analysis": {"interval": "1s", "latency": {"p95": 2},
                     "fast_rollback": {"max_error_rate": 50},
                     "checks": [{"name": "conv", "max": 1, "prometheus": {
                         "url": "http://127.0.0.1:9", "query": "up{job=\"{route}\"}"}},
                                {"name": "smoke", "webhook": {"url": "http://127.0.0.1:9"}}],
                     "pre_advance": {"url": "http://127.0.0.1:9/gate"},
                     "post_rollback": "http://127.0.0.1:9/after"},
        "rollback": {"to": "zero"},
        "rings": [
            {"name": "beta", "pool": "p",
             "rules": [{"attr": "header:X-Beta", "equals": "true"},
                       {"all": [{"attr": "method", "equals": "GET"}]}]},
            {"name": "canary", "pool": "p",
             "progression": {"steps": [1, {"weight": 5, "approval": "required",
                                           "min_duration": "2h", "max_error_rate": 1,
                                           "max_p95": "300ms", "checks": ["conv"]}],
                             "min_step_duration": "20s"},
             "health_checks": [{"name": "db", "path": "/health/db", "interval": "5s"}]},
            {"name": "stable", "pool": "p", "policy": {"timeout": "9s"}},
        ],
    }],
}

# A section of the file -> where its object schema sits in the schema.
SECTIONS: list[tuple[list[str | int], list[str | int]]] = [
    ([], []),
    (["admin"], ["admin"]),
    (["admin", "tokens", 0], ["admin", "tokens", "items"]),
    (["access_log"], ["access_log"]),
    (["metrics"], ["metrics"]),
    (["state"], ["state"]),
    (["webhooks", 0], ["webhooks", "items", "anyOf", 1]),
    (["pools", "p"], ["pools", "additionalProperties"]),
    (["pools", "p", "health"], ["pools", "additionalProperties", "health", "anyOf", 0]),
    (["pools", "p", "outlier"], ["pools", "additionalProperties", "outlier", "anyOf", 0]),
    (["pools", "p", "retries"], ["pools", "additionalProperties", "retries", "anyOf", 0]),
    (["routes", 0], ["routes", "items"]),
    (["routes", 0, "match"], ["routes", "items", "match"]),
    (["routes", 0, "policy"], ["routes", "items", "policy"]),
    (["routes", 0, "sticky"], ["routes", "items", "sticky"]),
    (["routes", 0, "sticky", "anonymous"], ["routes", "items", "sticky", "anonymous", "anyOf", 1]),
    (["routes", 0, "override"], ["routes", "items", "override"]),
    (["routes", 0, "decision"], ["routes", "items", "decision"]),
    (["routes", 0, "analysis"], ["routes", "items", "analysis", "anyOf", 0]),
    (["routes", 0, "analysis", "fast_rollback"],
     ["routes", "items", "analysis", "anyOf", 0, "fast_rollback"]),
    (["routes", 0, "analysis", "checks", 0],
     ["routes", "items", "analysis", "anyOf", 0, "checks", "items"]),
    (["routes", 0, "analysis", "checks", 0, "prometheus"],
     ["routes", "items", "analysis", "anyOf", 0, "checks", "items", "prometheus"]),
    (["routes", 0, "analysis", "pre_advance"],
     ["routes", "items", "analysis", "anyOf", 0, "pre_advance", "anyOf", 1]),
    (["routes", 0, "rings", 1, "health_checks", 0],
     ["routes", "items", "rings", "items", "health_checks", "items"]),
    (["routes", 0, "rollback"], ["routes", "items", "rollback"]),
    (["routes", 0, "rings", 2], ["routes", "items", "rings", "items"]),
    (["routes", 0, "rings", 2, "policy"], ["routes", "items", "rings", "items", "policy"]),
    (["routes", 0, "rings", 1, "progression"],
     ["routes", "items", "rings", "items", "progression"]),
    (["routes", 0, "rings", 1, "progression", "steps", 1],
     ["routes", "items", "rings", "items", "progression", "steps", "items", "anyOf", 1]),
]


def schema_node(schema: dict[str, Any], where: list[str | int]) -> dict[str, Any]:
    node: Any = schema
    for step in where:
        if isinstance(step, int) or step in ("items", "anyOf", "additionalProperties"):
            node = node[step]
        else:
            node = node["properties"][step]
    assert node["type"] == "object" and node["additionalProperties"] is False
    return dict(node)


def readers_keys(where: list[str | int]) -> set[str]:
    """The keys the reader knows at ``where``, from its own unknown-key message."""
    data = copy.deepcopy(SAMPLE)
    node: Any = data
    for step in where:
        node = node[step]
    node["zz_unknown"] = 1
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(data), environ=ENV)
    path = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in where).lstrip(".")
    issue = next(i for i in info.value.issues if i.path == (f"{path}.zz_unknown" if path
                                                             else "zz_unknown"))
    known = re.search(r"known keys: ([^)]*)\)", issue.message)
    assert known, issue
    return set(known.group(1).split(", "))


def test_the_sample_is_a_valid_config_and_passes_the_schema() -> None:
    parse_config(yaml.safe_dump(SAMPLE), environ=ENV)
    jsonschema.validate(SAMPLE, config_schema())


@pytest.mark.parametrize(("where", "in_schema"), SECTIONS,
                         ids=[".".join(map(str, w)) or "top" for w, _ in SECTIONS])
def test_each_sections_keys_are_the_readers_keys(
    where: list[str | int], in_schema: list[str | int]
) -> None:
    assert set(schema_node(config_schema(), in_schema)["properties"]) == readers_keys(where)


def test_ringproxy_schema_prints_a_valid_schema_that_the_shipped_configs_pass() -> None:
    done = cli("schema")
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert schema == config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    configmap = yaml.safe_load((ROOT / "deploy/kubernetes/configmap.yaml").read_text())
    documents = {
        "config/demo.yaml": yaml.safe_load((ROOT / "config/demo.yaml").read_text()),
        "config/example.yaml": yaml.safe_load((ROOT / "config/example.yaml").read_text()),
        "deploy/kubernetes/configmap.yaml": yaml.safe_load(configmap["data"]["config.yaml"]),
    }
    for name, document in documents.items():
        errors = [f"{list(e.absolute_path)}: {e.message}"
                  for e in validator.iter_errors(document)]
        assert errors == [], name


@pytest.mark.parametrize(("change", "complaint"), [
    (lambda c: c["routes"][0]["rings"][0].update(polcy={}), "'polcy' was unexpected"),
    (lambda c: c.update(shutdown_grace="30"), "does not match"),
    (lambda c: c["pools"]["p"].update(balance="random"), "is not one of"),
    (lambda c: c["routes"][0]["analysis"].update(alpha=0.9), "is greater than"),
])
def test_typos_and_wrong_values_fail_the_schema(change: Any, complaint: str) -> None:
    config = copy.deepcopy(SAMPLE)
    change(config)
    errors = [m for e in jsonschema.Draft202012Validator(config_schema()).iter_errors(config)
              for m in (e.message, *(c.message for c in e.context or ()))]
    assert any(complaint in m for m in errors), errors


def test_the_schema_documents_defaults_from_the_model() -> None:
    schema = config_schema()
    pool = schema_node(schema, ["pools", "additionalProperties"])["properties"]
    assert pool["connect_timeout"]["default"] == "2s"
    assert pool["balance"]["default"] == "round_robin"
    assert schema["properties"]["shutdown_grace"]["default"] == "30s"
    assert schema["properties"]["listen"]["default"] == "127.0.0.1:8080"


def test_check_with_env_optional_warns_for_unset_variables_with_their_line(
    tmp_path: Path,
) -> None:
    config = tmp_path / "ci.yaml"
    config.write_text(
        "admin:\n"
        "  tokens: [{env: RP_TEST_UNSET_TOKEN, role: admin}]\n"
        "pools:\n"
        "  p: {servers: ['${RP_TEST_UNSET_UPSTREAM}']}\n"
        "routes:\n"
        "  - {name: api, rings: [{name: s, pool: p, policy: {timeout: 1m30s}}]}\n")
    strict = cli("check", str(config))
    assert strict.returncode == 1
    relaxed = cli("check", "--env-optional", str(config))
    assert relaxed.returncode == 0, relaxed.stderr
    assert relaxed.stderr.splitlines() == [
        f"{config}:2: admin.tokens[0].env: environment variable RP_TEST_UNSET_TOKEN is not "
        "set (a warning: --env-optional)",
        f"{config}:4: pools.p.servers[0]: environment variable RP_TEST_UNSET_UPSTREAM is not "
        "set (a warning: --env-optional)",
    ]
    assert relaxed.stdout.startswith(f"{config}: OK (revision ")
    assert "2 unset variables" in relaxed.stdout
    as_json = json.loads(cli("check", "--env-optional", "--format", "json", str(config)).stdout)
    assert as_json["ok"] is True and as_json["errors"] == [] and as_json["rings"] == 1
    assert [(w["line"], w["path"], w["variable"]) for w in as_json["warnings"]] == [
        (2, "admin.tokens[0].env", "RP_TEST_UNSET_TOKEN"),
        (4, "pools.p.servers[0]", "RP_TEST_UNSET_UPSTREAM")]
    # a real error still fails, and is reported with the warnings
    config.write_text(config.read_text().replace("pool: p,", "pool: q,"))
    broken = cli("--json", "check", "--env-optional", str(config))
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert report["ok"] is False and len(report["warnings"]) == 2
    assert [(e["line"], e["path"]) for e in report["errors"]] == [(6, "routes[0].rings[0].pool")]


def test_check_json_gives_a_syntax_errors_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("listen: 127.0.0.1:8080\nadmin:\n  listen: a: b\n")
    done = cli("check", "--format", "json", str(config))
    assert done.returncode == 1
    (error,) = json.loads(done.stdout)["errors"]
    assert (error["line"], error["column"], error["path"]) == (3, 12, "")
    assert error["message"].startswith("YAML syntax error at column 12: mapping values")
