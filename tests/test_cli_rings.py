"""``ringproxy rings`` and ``ringproxy pools`` as people type them, as real subprocesses
against a real ``ringproxy run`` on 127.0.0.1 whose config file they change."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RINGPROXY

TOKEN = "cli-rings-token-0123456789"
CONFIG = textwrap.dedent("""\
    # Edited by hand and by `ringproxy rings`.
    listen: 127.0.0.1:0
    admin:
      listen: 127.0.0.1:0
      tokens: [{env: CLI_RINGS_TOKEN, role: admin}]
    access_log: {enabled: false}
    pools:
      app: {servers: ["http://127.0.0.1:9"]}   # the release
    routes:
      - name: api
        sticky: {key: ["header:X-User-Id"]}
        rings:
          - name: stable   # the default
            pool: app
    """)


class Served:
    def __init__(self, admin: str, config: Path, env: dict[str, str]) -> None:
        self.admin, self.config, self.env = admin, config, env

    def rp(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*RINGPROXY, *args], capture_output=True, text=True,
                              timeout=20, env=self.env)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("cli-rings")
    config = home / "ringproxy.yaml"
    config.write_text(CONFIG)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RINGPROXY_")}
    proc = subprocess.Popen([*RINGPROXY, "run", "--config", str(config), "--no-watch"],
                            cwd=home, env={**base, "CLI_RINGS_TOKEN": TOKEN},
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
    assert admin, seen.decode()
    url = admin.group(1).decode()
    try:
        yield Served(url, config, {**base, "RINGPROXY_ADMIN_URL": url,
                                   "RINGPROXY_ADMIN_TOKEN": TOKEN})
    finally:
        proc.send_signal(signal.SIGINT)  # (SIGTERM would drain for drain_delay first)
        proc.wait(15)
        proc.stderr.close()


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_rings_and_pools_round_trip_through_the_cli(served: Served) -> None:
    out = ok(served.rp("pools", "create", "next", "--server", "http://127.0.0.1:10",
                       "--spec", "{balance: least_request}"))
    assert re.fullmatch(r"created pool next \(revision [0-9a-f]{12}\)\n", out)
    out = ok(served.rp("rings", "create", "api", "beta", "--pool", "next", "--weight", "5",
                       "--reason", "first users"))
    assert out.startswith("created ring api/beta at position 0 (revision ")
    ok(served.rp("rings", "create", "api", "qa", "--pool", "app", "--before", "beta",
                 "--spec", '{rules: [{attr: "header:X-QA", exists: true}]}'))
    table = ok(served.rp("rings", "list", "api"))
    assert [line.split()[:4] for line in table.splitlines()] == [
        ["ROUTE", "#", "RING", "POOL"], ["api", "0", "qa", "app"],
        ["api", "1", "beta", "next"], ["api", "2", "stable", "app"]]
    assert "5%" in table.splitlines()[2]
    got = json.loads(ok(served.rp("rings", "get", "api", "beta", "--json")))
    assert got["spec"] == {"name": "beta", "pool": "next", "weight": 5}
    out = ok(served.rp("rings", "update", "api", "beta", "--weight", "7.5",
                       "--if-match", got["revision"]))
    assert out.startswith(f"update ring api/beta: revision {got['revision']} -> ")
    active = json.loads(ok(served.rp("--json", "rings", "list", "api", "--pool", "next")))
    assert [r["status"]["weight"] for r in active["rings"]] == [7.5]
    pools = ok(served.rp("pools", "list"))
    assert re.search(r"^next\s+http://127.0.0.1:10\s+api/beta$", pools, re.M), pools
    events = ok(served.rp("events", "--route", "api"))
    assert re.search(r"api\s+beta\s+config create .* admin:CLI_RINGS_TOKEN\s+first users",
                     events), events
    for args in (("rings", "delete", "api", "qa"), ("rings", "delete", "api", "beta"),
                 ("pools", "delete", "next")):
        ok(served.rp(*args))
    assert served.config.read_text() == CONFIG  # comments and all


def test_a_stale_revision_and_bad_usage(served: Served) -> None:
    done = served.rp("--json", "rings", "update", "api", "stable", "--pool", "app",
                     "--if-match", "000000000000")
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["command"] == "rings" and "(HTTP 412)" in error["error"]
    done = served.rp("rings", "update", "api", "stable")
    assert done.returncode == 1 and "nothing to change" in done.stderr
    done = served.rp("rings", "create", "api", "x")
    assert done.returncode == 2 and "--pool" in done.stderr
    done = served.rp("pools", "delete", "app")  # the loader's verdict: nothing written
    assert done.returncode == 1 and "not written" in done.stderr and "(HTTP 422)" in done.stderr
    assert served.config.read_text() == CONFIG
