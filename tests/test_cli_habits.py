"""The remote commands as people type them, run as real subprocesses against a real
``ringproxy run`` on 127.0.0.1: options before or after the command, JSON errors,
``status --watch``, relative ``--since``, unknown routes, ``explain`` against the live
proxy, ``http_proxy`` ignored for loopback, and a URL that is not an admin API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.routing.assign import bucket_of
from tests.conftest import RINGPROXY

TOKEN = "habits-test-token-0123456789"


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], admin: str, url: str,
                 config: Path) -> None:
        self.proc, self.admin, self.url, self.config = proc, admin, url, config


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("habits")
    config = home / "ringproxy.yaml"
    config.write_text(textwrap.dedent("""
        listen: 127.0.0.1:0
        admin:
          listen: 127.0.0.1:0
          tokens: [{env: HABITS_TOKEN, role: admin}]
        access_log: {enabled: false}
        pools: {app: {servers: ["http://127.0.0.1:9"]}}
        routes:
          - name: api
            sticky: {key: ["header:X-User-Id"], salt: s1}
            analysis: {}
            rings:
              - name: canary
                pool: app
                progression: {steps: [50, 100], min_step_duration: 1h}
              - name: stable
                pool: app
    """))
    proc = subprocess.Popen([*RINGPROXY, "run", "--config", str(config)], cwd=home,
                            env={**os.environ, "HABITS_TOKEN": TOKEN},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 20
    while b"admin listening on" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    admin = re.search(rb"admin listening on (http://\S+)", seen)
    url = re.search(rb"proxy listening on (http://\S+)", seen)
    assert admin and url, seen.decode()
    try:
        yield Served(proc, admin.group(1).decode(), url.group(1).decode(), config)
    finally:
        proc.send_signal(signal.SIGINT)  # (SIGTERM would drain for drain_delay first)
        proc.wait(15)
        proc.stderr.close()


def rp(*args: str, env: dict[str, str] | None = None,
       timeout: float = 20) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RINGPROXY_")}
    return subprocess.run([*RINGPROXY, *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


def test_admin_token_and_json_go_before_or_after_the_command(served: Served) -> None:
    before = rp("--admin", served.admin, "--token", TOKEN, "--json", "status")
    after = rp("status", "--admin", served.admin, "--token", TOKEN, "--json")
    mixed = rp("--json", "status", "--admin", served.admin, "--token", TOKEN)
    for done in (before, after, mixed):
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["routes"][0]["name"] == "api"
    from_env = rp("status", env={"RINGPROXY_ADMIN_URL": served.admin,
                                 "RINGPROXY_ADMIN_TOKEN": TOKEN})
    assert from_env.returncode == 0 and re.search(r"^api\s+canary", from_env.stdout, re.M)


def test_errors_are_json_under_json(served: Served) -> None:
    done = rp("--json", "status", "--admin", served.admin, "--token", "wrong-token-xyz")
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"command": "status", "error": done_error(done)}
    plain = rp("status", "--admin", served.admin, "--token", "wrong-token-xyz")
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.startswith("ringproxy status: ") and "(HTTP 401)" in plain.stderr


def done_error(done: subprocess.CompletedProcess[str]) -> str:
    error = json.loads(done.stdout)["error"]
    assert isinstance(error, str) and "(HTTP 401)" in error
    return error


def test_events_since_a_duration_an_rfc3339_time_or_a_unix_time(served: Served) -> None:
    auth = ("--admin", served.admin, "--token", TOKEN)
    paused = rp("pause", "api", "canary", "--reason", "habits", *auth)
    assert paused.returncode == 0, paused.stderr
    resumed = rp("resume", "api", "canary", *auth)
    assert resumed.returncode == 0, resumed.stderr
    recent = rp("events", "--since", "10m", "--json", *auth)
    kinds = [e["kind"] for e in json.loads(recent.stdout)["events"]]
    assert kinds[-2:] == ["pause", "resume"]
    hour_ago = datetime.fromtimestamp(time.time() - 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rp("events", "--since", hour_ago, *auth).stdout.count("habits") == 1
    future = rp("events", "--since", str(time.time() + 60), *auth)
    assert future.returncode == 0 and future.stdout.strip() == "no events"
    bad = rp("events", "--since", "yesterday", *auth)
    assert bad.returncode == 2 and "is not a time" in bad.stderr
    as_json = rp("--json", "events", "--since", "yesterday", *auth)  # a usage error, as JSON
    assert as_json.returncode == 2 and "is not a time" in json.loads(as_json.stdout)["error"]


def test_events_of_an_unknown_route_is_an_error(served: Served) -> None:
    done = rp("events", "--route", "nosuch", "--admin", served.admin, "--token", TOKEN)
    assert done.returncode == 1
    assert "unknown route 'nosuch'" in done.stderr


def test_explain_without_a_file_asks_the_running_proxy(served: Served) -> None:
    auth = ("--admin", served.admin, "--token", TOKEN)
    env = {"HABITS_TOKEN": TOKEN}  # the file names it: reading the file needs it
    user = next(u for u in (f"u{i}" for i in range(40)) if bucket_of("s1", u) < 5000)
    live = rp("explain", "--route", "api", "--header", f"X-User-Id={user}", *auth)
    assert live.returncode == 0, live.stderr
    assert json.loads(live.stdout)["ring"] == "canary"
    assert rp("rollback", "api", "canary", "--reason", "habits", *auth).returncode == 0
    try:
        now = json.loads(rp("explain", "--route", "api", "--header", f"X-User-Id={user}",
                            *auth).stdout)
        assert now["ring"] == "stable"  # the live weights: the canary is rolled back
        on_file = rp("explain", "-c", str(served.config), "--route", "api", "--header",
                     f"X-User-Id={user}", env=env)
        assert json.loads(on_file.stdout)["ring"] == "canary"  # the file does not know
        # without the token's variable: refused, unless --env-optional
        assert rp("explain", "-c", str(served.config), "--route", "api").returncode == 1
        relaxed = rp("explain", "-c", str(served.config), "--route", "api", "--header",
                     f"X-User-Id={user}", "--env-optional")
        assert relaxed.returncode == 0 and json.loads(relaxed.stdout)["ring"] == "canary"
        assert "HABITS_TOKEN is not set (a warning: --env-optional)" in relaxed.stderr
        unknown = rp("explain", "--route", "nope", *auth)
        assert unknown.returncode == 1 and "unknown route" in unknown.stderr
    finally:
        assert rp("resume", "api", "canary", *auth).returncode == 0


def test_loopback_ignores_http_proxy_and_another_server_is_not_an_admin_api(
    served: Served,
) -> None:
    # a proxy from the environment that would refuse every connection
    env = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}
    done = rp("status", "--admin", served.admin, "--token", TOKEN, env=env)
    assert done.returncode == 0, done.stderr
    wrong = rp("status", "--admin", served.url, "--token", TOKEN)
    assert wrong.returncode == 1 and wrong.stdout == ""
    assert f"{served.url} is not a ringproxy admin API" in wrong.stderr


def test_status_watch_shows_the_table_again_until_ctrl_c(served: Served) -> None:
    proc = subprocess.Popen(
        [*RINGPROXY, "status", "--watch", "0.2", "--admin", served.admin, "--token", TOKEN],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    shown = ""
    deadline = time.monotonic() + 15
    while shown.count("ROUTE") < 2 and time.monotonic() < deadline:
        shown += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert shown.count("ROUTE") >= 2, shown + err
    assert proc.returncode == 0, err
    assert "(Ctrl-C to stop)" in shown
