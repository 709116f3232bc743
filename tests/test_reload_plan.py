"""Which config changes a reload applies live: one table, each key changed alone.  Pure."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap
from pathlib import Path

import pytest

from proxy.config import Config, ListenTLS, parse_config
from proxy.config.changes import KEYS, NOT_KEYS, Applies, reload_plan
from tests.test_limits_config import self_signed

ENV = {"TOKEN_A": "a" * 20, "TOKEN_B": "b" * 20}
ENV["FLEET_REDIS_URL"] = "redis://:secret-pw@127.0.0.1:6379/0"  # (state.backend)

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
    limits:
      head_timeout: 10s
      body_timeout: 30s
      keepalive_timeout: 75s
      max_request_line: 8KiB
      max_head_size: 32KiB
      max_headers: 100
      max_connections: 1000
      request_buffer: 64KiB
      underscores_in_headers: false
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
    "drain_delay": (
        ("shutdown_grace: 30s", "shutdown_grace: 30s\ndrain_delay: 1s"), Applies.RESTART,
        "config reload: drain_delay changed from 5s to 1s; it takes effect at the next restart",
    ),
    "workers": (
        ("shutdown_grace: 30s", "shutdown_grace: 30s\nworkers: 2"), Applies.RESTART,
        "config reload: workers changed from 1 to 2; it takes effect at the next restart",
    ),
    # (trusted_hops is part of it: read when a connection is accepted)
    "trusted_proxies": (
        ("shutdown_grace: 30s", "shutdown_grace: 30s\ntrusted_proxies: [10.0.0.0/8]"),
        Applies.LIVE, LIVE.format(key="trusted_proxies"),
    ),
    "admin.hosts": (
        ("tokens: [{env: TOKEN_A, role: admin}]",
         "tokens: [{env: TOKEN_A, role: admin}]\n  hosts: [ops.internal]"), Applies.LIVE,
        LIVE.format(key="admin.hosts"),
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
    "state.backend": (
        ("audit: audit.jsonl}", "audit: audit.jsonl, backend: redis, "
         "url: '${FLEET_REDIS_URL}'}"), Applies.RESTART,
        "config reload: state.backend changed from 'file' to "
        "\"redis redis://127.0.0.1:6379/0 (prefix 'ringproxy:', lease 3s)\"; "
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
    "limits.head_timeout": (
        ("head_timeout: 10s", "head_timeout: 5s"), Applies.LIVE,
        LIVE.format(key="limits.head_timeout"),
    ),
    "limits.body_timeout": (
        ("body_timeout: 30s", "body_timeout: 1m"), Applies.LIVE,
        LIVE.format(key="limits.body_timeout"),
    ),
    "limits.keepalive_timeout": (
        ("keepalive_timeout: 75s", "keepalive_timeout: 5s"), Applies.LIVE,
        LIVE.format(key="limits.keepalive_timeout"),
    ),
    "limits.max_request_line": (
        ("max_request_line: 8KiB", "max_request_line: 4KiB"), Applies.LIVE,
        LIVE.format(key="limits.max_request_line"),
    ),
    "limits.max_head_size": (
        ("max_head_size: 32KiB", "max_head_size: 64KiB"), Applies.LIVE,
        LIVE.format(key="limits.max_head_size"),
    ),
    "limits.max_headers": (
        ("max_headers: 100", "max_headers: 50"), Applies.LIVE,
        LIVE.format(key="limits.max_headers"),
    ),
    "limits.max_connections": (
        ("max_connections: 1000", "max_connections: 2000"), Applies.RESTART,
        "config reload: limits.max_connections changed from 1000 to 2000; "
        "it takes effect at the next restart",
    ),
    "limits.request_buffer": (
        ("request_buffer: 64KiB", "request_buffer: 0"), Applies.LIVE,
        LIVE.format(key="limits.request_buffer"),
    ),
    "limits.underscores_in_headers": (
        ("underscores_in_headers: false", "underscores_in_headers: true"), Applies.LIVE,
        LIVE.format(key="limits.underscores_in_headers"),
    ),
    "limits.tunnel_idle_timeout": (
        ("underscores_in_headers: false",
         "underscores_in_headers: false\n  tunnel_idle_timeout: 10m"), Applies.LIVE,
        LIVE.format(key="limits.tunnel_idle_timeout"),
    ),
    "log_format": (
        ("shutdown_grace: 30s", "shutdown_grace: 30s\nlog_format: json"), Applies.LIVE,
        LIVE.format(key="log_format"),
    ),
    "request_id": (
        ("shutdown_grace: 30s", "shutdown_grace: 30s\nrequest_id: {trust_incoming: false}"),
        Applies.LIVE, LIVE.format(key="request_id"),
    ),
}

# listen_tls reads real certificate files: BASE plus this section, run from a directory
# that holds a.crt/a.key and copies of them (relative paths keep the messages fixed).
TLS = "listen_tls: {listen: 127.0.0.1:8443, cert: a.crt, key: a.key}\n"
TLS_TABLE: dict[str, tuple[tuple[str, str], str]] = {
    "listen_tls.listen": (
        ("127.0.0.1:8443", "127.0.0.1:8444"),
        "config reload: listen_tls.listen changed from 127.0.0.1:8443 to 127.0.0.1:8444; "
        "it takes effect at the next restart",
    ),
    "listen_tls.cert": (
        ("cert: a.crt", "cert: copy.crt"),
        "config reload: listen_tls.cert changed from 'a.crt' to 'copy.crt'; "
        "it takes effect at the next restart",
    ),
    "listen_tls.key": (
        ("key: a.key", "key: copy.key"),
        "config reload: listen_tls.key changed from 'a.key' to 'copy.key'; "
        "it takes effect at the next restart",
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


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(directory, "a")
    shutil.copy(cert, directory / "copy.crt")
    shutil.copy(key, directory / "copy.key")
    return directory


@pytest.mark.parametrize("key", list(TLS_TABLE))
def test_each_listen_tls_key_changed_alone_waits_for_a_restart(
    key: str, tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tls_dir)
    (before, after), message = TLS_TABLE[key]
    assert TLS.count(before) == 1, before
    plan = reload_plan(parse(BASE + TLS), parse(BASE + TLS.replace(before, after)))
    (change,) = plan.changes
    assert (change.key, change.applies, change.message) == (key, Applies.RESTART, message)


def test_turning_tls_on_waits_for_a_restart(tls_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tls_dir)
    plan = reload_plan(parse(BASE), parse(BASE + TLS))
    assert [c.message for c in plan.restart] == [
        "config reload: listen_tls.listen changed from none to 127.0.0.1:8443; "
        "it takes effect at the next restart",
        "config reload: listen_tls.cert changed from none to 'a.crt'; "
        "it takes effect at the next restart",
        "config reload: listen_tls.key changed from none to 'a.key'; "
        "it takes effect at the next restart",
    ]
    assert plan.live == ()


def test_the_table_covers_every_key_the_plan_knows() -> None:
    assert set(TABLE) | set(TLS_TABLE) == {k.path for k in KEYS}


# Sections that are None unless the file has them: their class, to list the fields.
OPTIONAL_SECTIONS: dict[str, type] = {"listen_tls": ListenTLS}


def test_every_field_of_the_model_is_a_key() -> None:
    # A field added to Config (or to one of its sections) must say how it reloads.
    paths = {k.path for k in KEYS}
    for top in dataclasses.fields(Config):
        if top.name in NOT_KEYS or top.name in paths:
            continue
        section = OPTIONAL_SECTIONS.get(top.name) or getattr(Config(), top.name)
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
