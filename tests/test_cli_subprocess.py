"""The ``ringproxy`` command, run as a real subprocess, against real upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import textwrap
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Upstream, cli, until_refused, write_config


def test_check_accepts_a_good_config_and_the_shipped_ones() -> None:
    for path in ("config/demo.yaml", "config/example.yaml"):
        result = cli("check", path)
        assert result.returncode == 0, result.stderr
        assert re.match(rf"{re.escape(path)}: OK \(revision [0-9a-f]{{12}}: ", result.stdout)


def test_check_prints_every_error_with_its_path_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        listen: 127.0.0.1:8080
        pools:
          v1: {servers: [http://127.0.0.1:9001]}
        routes:
          - name: api
            rings:
              - {name: a, pool: v1}
              - {name: b, pool: v1, policy: {timeout: 10}}
              - {name: c, pool: v3}
    """))
    result = cli("check", str(bad))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert f"{bad}:9: routes[0].rings[1].policy.timeout: 10 (int) is not a duration; " \
           "expected e.g. 250ms, 30s, 5m, 1h or 7d" in lines
    assert f"{bad}:10: routes[0].rings[2].pool: unknown pool 'v3' (pools: v1)" in lines
    assert lines[-1] == f"{bad}: 2 errors"


def test_usage_errors_exit_2() -> None:
    assert cli("frobnicate").returncode == 2
    assert cli("run").returncode == 2  # --config is required
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("ringproxy ")


def test_run_with_a_bad_config_exits_1_without_serving(tmp_path: Path) -> None:
    result = cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "cannot read the file" in result.stderr


def test_run_when_the_port_is_taken_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, "http://127.0.0.1:1", listen=f"127.0.0.1:{port}")
        result = cli("run", "--config", str(config))
    assert result.returncode == 1
    assert f"cannot listen for clients on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_run_serves_then_drains_in_flight_requests_on_signal(
    spawn, stable: Upstream, tmp_path: Path, sig: int
) -> None:
    proxy = await spawn("run", "--config", str(write_config(tmp_path, stable.url)))
    await proxy.wait_listening()
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/hello") as r:
            assert r.status == 200
            assert (await r.json())["upstream"] == "stable"
        in_flight = asyncio.ensure_future(client.get(proxy.url + "/slow?s=3"))
        # Signal once the upstream has the request: it is in flight for 3 s from then.
        async with asyncio.timeout(10):
            while not [r for r in stable.requests if r["target"].startswith("/slow")]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        proxy.proc.send_signal(sig)
        # No new connections once shutdown has begun: the listener closes soon after the
        # signal, while the slow request is still in flight (not only when the process
        # exits).  A connect that still gets in sends nothing (no access log line).
        await until_refused(proxy.url, 5)
        assert not in_flight.done(), "the listener closed only after the in-flight request"
        async with await in_flight as r:
            assert r.status == 200
            assert await r.text() == "slow done"
    code, out, err = await proxy.finish(None)  # the signal was sent above
    assert code == 0, err
    assert "shutting down" in err and "stopped" in err
    log = [json.loads(line) for line in out.splitlines()]
    assert [(e["path"], e["status"]) for e in log] == [("/hello", 200), ("/slow", 200)]


async def test_demo_runs_and_its_curl_lines_land_in_different_rings(spawn) -> None:
    demo = await spawn("demo", "--ephemeral")
    await demo.wait_listening(re.compile(rb"Press Ctrl-C to stop"))
    banner = demo.stderr.decode()
    curls = [line.split("#")[0].strip() for line in banner.splitlines()
             if line.strip().startswith("curl ")]
    assert len(curls) == 3
    seen = []
    async with aiohttp.ClientSession() as client:
        for line in curls:
            argv = shlex.split(line)
            headers = dict(
                argv[i + 1].split(": ", 1) for i, a in enumerate(argv) if a == "-H"
            )
            async with client.get(argv[-1], headers=headers) as r:
                assert r.status == 200
                body = await r.json()
            seen.append((body["ring"], body["version"]))
    assert seen == [("canary", "canary"), ("stable", "stable"), ("beta", "canary")]
    code, out, err = await demo.finish(signal.SIGINT)
    assert code == 0, err
    assert len(out.splitlines()) == 3  # one access log line per request


@pytest.mark.skipif(not Path("/usr/bin/curl").exists(), reason="curl is not installed")
async def test_demo_curl_lines_work_verbatim_with_curl(spawn) -> None:
    demo = await spawn("demo", "--ephemeral")
    await demo.wait_listening(re.compile(rb"Press Ctrl-C to stop"))
    curls = [line.split("#")[0].strip() for line in demo.stderr.decode().splitlines()
             if line.strip().startswith("curl ")]
    rings = []
    for line in curls:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(line), stdout=asyncio.subprocess.PIPE, env={**os.environ}
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        rings.append(json.loads(out)["ring"])
    assert rings == ["canary", "stable", "beta"]
    code, _, err = await demo.finish(signal.SIGINT)
    assert code == 0, err


EXPLAIN_CONFIG = """
pools: {p: {servers: ["http://127.0.0.1:9"]}}
routes:
  - name: api
    sticky: {key: ["header:X-User-Id", "cookie:uid"], salt: s1}
    rings:
      - name: beta
        pool: p
        rules: [{attr: "ip", cidr: ["10.0.0.0/8"]}, {attr: "query:beta", equals: "1"}]
      - {name: canary, pool: p, weight: 25}
      - {name: stable, pool: p}
"""


def test_explain_prints_the_decision_as_json(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(EXPLAIN_CONFIG)
    from proxy.routing.assign import bucket_of

    user = next(f"u{i}" for i in range(100) if bucket_of("s1", f"u{i}") < 2500)
    result = cli("explain", "--config", str(path), "--route", "api",
                 "--header", f"X-User-Id={user}")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    bucket = bucket_of("s1", user)
    assert out["route"] == "api" and out["ring"] == "canary" and out["reason"] == "bucket"
    assert out["bucket"] == bucket and out["detail"] == f"bucket {bucket} in [0, 2500)"
    assert out["key_source"] == "header:x-user-id" and len(out["revision"]) == 12
    assert out["ranges"] == {"canary": [0, 2500]}
    by_cookie = json.loads(cli("explain", "-c", str(path), "--route", "api",
                               "--cookie", f"uid={user}").stdout)
    assert by_cookie["bucket"] == bucket and by_cookie["key_source"] == "cookie:uid"
    by_ip = json.loads(cli("explain", "-c", str(path), "--route", "api", "--ip", "10.2.3.4",
                           "--header", f"X-User-Id={user}").stdout)
    assert (by_ip["ring"], by_ip["reason"]) == ("beta", "rule")
    assert by_ip["detail"] == "ip cidr ['10.0.0.0/8']"
    by_query = json.loads(cli("explain", "-c", str(path), "--route", "api",
                              "--query", "beta=1").stdout)
    assert by_query["ring"] == "beta"
    nobody = json.loads(cli("explain", "-c", str(path), "--route", "api").stdout)
    assert (nobody["ring"], nobody["reason"]) == ("stable", "default")
    assert "no stickiness key" in nobody["note"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--route", "nope"], "unknown route 'nope' (routes: api)"),
        (["--route", "api", "--header", "novalue"], "'novalue' is not KEY=VALUE"),
        (["--route", "api", "--ip", "300.1.1.1"], "'300.1.1.1' is not an IP address"),
        ([], "the following arguments are required: --route"),
    ],
)
def test_explain_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(EXPLAIN_CONFIG)
    result = cli("explain", "--config", str(path), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_explain_with_an_invalid_config_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(EXPLAIN_CONFIG.replace("weight: 25", "weight: 125"))
    result = cli("explain", "--config", str(path), "--route", "api")
    assert result.returncode == 1
    assert "routes[0].rings[1].weight: 125 is outside 0..100" in result.stderr
