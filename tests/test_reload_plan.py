"""Which config changes a reload applies live: one table, each key changed alone.  Pure."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from proxy.config import Config, parse_config
from proxy.config.changes import KEYS, NOT_KEYS, Applies, reload_plan

ENV = {"TOKEN_A": "a" * 20, "TOKEN_B": "b" * 20}

BASE = textwrap.dedent("""
    listen: 127.0.0.1:8080
    admin:
      listen: 127.0.0.1:9901
      tokens: [{env: TOKEN_A, role: admin}]
    access_log: {enabled: true, path: "-"}
    shutdown_grace: 30s
    metrics: {enabled: true}
    state: {path: state.json, audit: audit.jsonl}
    webhooks: [{url: "http://127.0.0.1:9/hook"}]
    pools:
      a: {servers: ["http://127.0.0.1:9001"]}
      b: {servers: ["http://127.0.0.1:9002"]}
    routes:
      - name: api
        rings:
          - {name: main, pool: a}
""")

LIVE = "config reload: {key} changed; applied now"

# key -> (the edit to BASE that changes it alone, when it applies, the message)
TABLE: dict[str, tuple[tuple[str, str], Applies, str]] = {
    "listen": (
        ("listen: 127.0.0.1:8080", "listen: 127.0.0.1:8081"), Applies.RESTART,
        "config reload: listen changed from 127.0.0.1:8080 to 127.0.0.1:8081; "
        "it takes effect at the next restart",
    ),
    "admin.listen": (
        ("listen: 127.0.0.1:9901", "listen: '[::1]:9902'"), Applies.RESTART,
        "config reload: admin.listen changed from 127.0.0.1:9901 to [::1]:9902; "
        "it takes effect at the next restart",
    ),
    "admin.tokens": (
        ("{env: TOKEN_A, role: admin}", "{env: TOKEN_B, role: viewer}"), Applies.LIVE,
        LIVE.format(key="admin.tokens"),
    ),
    "admin.config_writes": (
        ("tokens: [{env: TOKEN_A, role: admin}]",
         "tokens: [{env: TOKEN_A, role: admin}]\n  config_writes: false"), Applies.LIVE,
        LIVE.format(key="admin.config_writes"),
    ),
    "access_log": (
        ('path: "-"', "path: access.log"), Applies.LIVE, LIVE.format(key="access_log"),
    ),
    "shutdown_grace": (
        ("shutdown_grace: 30s", "shutdown_grace: 250ms"), Applies.RESTART,
        "config reload: shutdown_grace changed from 30s to 0.25s; "
        "it takes effect at the next restart",
    ),
    "metrics.enabled": (
        ("metrics: {enabled: true}", "metrics: {enabled: false}"), Applies.LIVE,
        LIVE.format(key="metrics.enabled"),
    ),
    "state.path": (
        ("path: state.json", "path: /var/lib/rp/state.json"), Applies.RESTART,
        "config reload: state.path changed from 'state.json' to '/var/lib/rp/state.json'; "
        "it takes effect at the next restart",
    ),
    "state.audit": (
        ("audit: audit.jsonl", "audit: other.jsonl"), Applies.RESTART,
        "config reload: state.audit changed from 'audit.jsonl' to 'other.jsonl'; "
        "it takes effect at the next restart",
    ),
    "webhooks": (
        ("9/hook", "9/other"), Applies.LIVE, LIVE.format(key="webhooks"),
    ),
    "pools": (
        ("9002", "9003"), Applies.LIVE, LIVE.format(key="pools"),
    ),
    "routes": (
        ("{name: main, pool: a}", "{name: main, pool: b}"), Applies.LIVE,
        LIVE.format(key="routes"),
    ),
}


def parse(text: str) -> Config:
    return parse_config(text, environ=ENV)


@pytest.mark.parametrize("key", list(TABLE))
def test_each_key_changed_alone(key: str) -> None:
    (before, after), applies, message = TABLE[key]
    assert BASE.count(before) == 1, before
    plan = reload_plan(parse(BASE), parse(BASE.replace(before, after)))
    (change,) = plan.changes
    assert (change.key, change.applies, change.message) == (key, applies, message)
    assert plan.changed(key)
    assert (plan.live, plan.restart) == (
        ((change,), ()) if applies is Applies.LIVE else ((), (change,)))


def test_the_table_covers_every_key_the_plan_knows() -> None:
    assert set(TABLE) == {k.path for k in KEYS}


def test_every_field_of_the_model_is_a_key() -> None:
    # A field added to Config (or to one of its sections) must say how it reloads.
    paths = {k.path for k in KEYS}
    for top in dataclasses.fields(Config):
        if top.name in NOT_KEYS or top.name in paths:
            continue
        section = getattr(Config(), top.name)
        assert dataclasses.is_dataclass(section), f"{top.name} is not in KEYS"
        for sub in dataclasses.fields(section):
            assert f"{top.name}.{sub.name}" in paths, f"{top.name}.{sub.name} is not in KEYS"


def test_the_same_file_and_a_comment_change_nothing() -> None:
    assert reload_plan(parse(BASE), parse(BASE)).changes == ()
    commented = parse(BASE + "# a comment\n")
    assert reload_plan(parse(BASE), commented).changes == ()  # revision alone is no key


def test_several_changes_come_in_table_order() -> None:
    text = BASE.replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:8081")
    text = text.replace("9002", "9003").replace("path: state.json", "path: s2.json")
    plan = reload_plan(parse(BASE), parse(text))
    assert [c.key for c in plan.changes] == ["listen", "state.path", "pools"]
    assert [c.key for c in plan.restart] == ["listen", "state.path"]
    assert not plan.changed("routes")
