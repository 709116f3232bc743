"""The YAML loader (merge keys, bounded aliases, syntax errors with line and column) and
composite durations."""

from __future__ import annotations

import time

import pytest
import yaml

from proxy.config import parse_config
from proxy.config.source import load_yaml, unset_variable
from proxy.config.values import parse_duration
from proxy.errors import ConfigError

MERGED = """
defaults: &defaults {timeout: 5s, idle_timeout: 30s}
other: &other {timeout: 9s, max_concurrency: 3}
a:
  <<: *defaults
  timeout: 1s
b:
  <<: [*other, *defaults]
"""


def test_merge_keys_merge_as_yaml_1_1_says() -> None:
    data = load_yaml(MERGED, {}).data
    assert data["a"] == yaml.safe_load(MERGED)["a"]
    assert data["a"] == {"timeout": "1s", "idle_timeout": "30s"}
    # "keys in mapping nodes earlier in the sequence override keys specified in later
    # mapping nodes" (yaml.org/type/merge; PyYAML lets the later win here)
    assert data["b"] == {"timeout": "9s", "max_concurrency": 3, "idle_timeout": "30s"}


def test_a_merge_key_in_a_config_and_an_error_inside_the_merged_block() -> None:
    text = """
x-policy: &policy {timeout: 5s}
pools: {p: {servers: ["http://127.0.0.1:9"]}}
routes:
  - name: api
    policy: {<<: *policy, idle_timeout: 30s}
    rings: [{name: s, pool: p}]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    # the extension key is unknown; the merged policy itself is read
    assert [i.path for i in info.value.issues] == ["x-policy"]
    with pytest.raises(ConfigError) as bad:
        parse_config(text.replace("x-policy: &policy {timeout: 5s}",
                                  "x-policy: &policy {timeout: 5}"))
    issue = next(i for i in bad.value.issues if i.path == "routes[0].policy.timeout")
    assert issue.line == 2  # where the merged value is written
    with pytest.raises(ConfigError) as wrong:
        parse_config("pools: {<<: [1]}\n")
    assert "a merge key (<<) takes a mapping" in str(wrong.value)


def test_nested_aliases_are_refused_fast_where_they_would_expand_without_bound() -> None:
    text = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n"
        for i in range(8))
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert time.perf_counter() - started < 0.5
    assert "aliases expand the document to over 50000 values" in str(info.value)
    # a few reuses of a block stay fine
    assert load_yaml("a: &a [1, 2]\nb: [*a, *a, *a]\n", {}).issues == []


def test_a_syntax_error_names_its_line_and_column() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("listen: 127.0.0.1:8080\nadmin:\n  listen: a: b\n", source="f.yaml")
    # (libyaml ends the message "in this context", PyYAML's parser "here")
    assert str(info.value).startswith("f.yaml:3: YAML syntax error at column 12: "
                                      "mapping values are not allowed ")


def test_an_unset_variable_is_recognised_from_its_issue() -> None:
    loaded = load_yaml("a: ${NOPE_NOT_SET}\nb: ${NOPE_2:-x}\n", {})
    assert [unset_variable(i) for i in loaded.issues] == ["NOPE_NOT_SET"]
    assert loaded.issues[0].path == "a" and loaded.issues[0].line == 1


@pytest.mark.parametrize(("text", "seconds"), [
    ("1m30s", 90.0), ("1h30m", 5400.0), ("2d12h", 216000.0), ("1s500ms", 1.5),
    ("250ms", 0.25), ("1.5s", 1.5),
])
def test_composite_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30s1m", "1m1m", "10", "1m 30s", "m", "1m30"])
def test_durations_that_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)
