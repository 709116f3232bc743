"""Logs on real sockets: the access log's fields, X-Request-Id, and the process log of a
real ``ringproxy run`` in both formats, fed by clients and admin callers who try to forge
lines (a rollback ``reason`` with a newline, a path with ``%0a``)."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
from pathlib import Path

import aiohttp
import pytest

from proxy.server import Proxy
from tests.conftest import ProxyFactory, Upstream, headers_of, raw_exchange

ADMIN = re.compile(rb"admin listening on (http://[0-9.:]+)")
TOKEN = "logs-test-token-0123456789"
FORGED = "broken canary\n2026-01-01 00:00:00,000 INFO ringproxy: all good\x1b[0m"


def config(tmp_path: Path, upstream: str, extra: str = "") -> str:
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: true, path: "{tmp_path / 'access.log'}"}}
        shutdown_grace: 1s
        pools:
          app: {{servers: ["{upstream}"]}}
        routes:
          - name: api
            match: {{host: h}}
            rings:
              - name: main
                pool: app
    """) + textwrap.dedent(extra)


async def access_lines(tmp_path: Path, n: int) -> list[dict[str, object]]:
    path = tmp_path / "access.log"
    async with asyncio.timeout(5):
        while True:
            await asyncio.sleep(0.1)  # written every 200 ms
            text = path.read_text() if path.exists() else ""
            if text.count("\n") >= n:
                return [json.loads(line) for line in text.splitlines()]


async def get(proxy: Proxy, headers: dict[str, str], path: str = "/echo"
              ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(skip_auto_headers=("User-Agent",)) as session, \
            session.get(proxy.url + path, headers={"Host": "h", **headers}) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def test_a_sane_request_id_is_kept_and_any_other_replaced(
    make_proxy: ProxyFactory, stable: Upstream, tmp_path: Path
) -> None:
    proxy = await make_proxy(config(tmp_path, stable.url))
    sent = ["0f8fad5b-d9cb-469f-a165-70867728950e", "has space", "x" * 129, "<script>", ""]
    for rid in sent:
        status, headers, _ = await get(proxy, {"X-Request-Id": rid} if rid else {})
        assert status == 200
        upstream = headers_of(stable.requests[-1])["x-request-id"]
        assert headers["x-request-id"] == upstream
        if rid == sent[0]:
            assert upstream == rid
        else:
            assert re.fullmatch(r"[0-9a-f]{32}", upstream), upstream
    logged = [line["request_id"] for line in await access_lines(tmp_path, len(sent))]
    assert logged == [headers_of(r)["x-request-id"] for r in stable.requests]


async def test_request_id_trust_incoming_false_and_a_shorter_max_length(
    make_proxy: ProxyFactory, stable: Upstream, tmp_path: Path
) -> None:
    distrust = await make_proxy(config(tmp_path, stable.url,
                                       "request_id: {trust_incoming: false}\n"))
    _, headers, _ = await get(distrust, {"X-Request-Id": "abc"})
    assert headers["x-request-id"] != "abc" and len(headers["x-request-id"]) == 32
    (tmp_path / "b").mkdir()
    short = await make_proxy(config(tmp_path / "b", stable.url,
                                    "request_id: {max_length: 8}\n"))
    _, kept, _ = await get(short, {"X-Request-Id": "12345678"})
    _, replaced, _ = await get(short, {"X-Request-Id": "123456789"})
    assert kept["x-request-id"] == "12345678" and replaced["x-request-id"] != "123456789"


async def test_access_log_protocol_user_agent_and_upstream_ms(
    make_proxy: ProxyFactory, stable: Upstream, tmp_path: Path
) -> None:
    proxy = await make_proxy(config(tmp_path, stable.url))
    await get(proxy, {"User-Agent": 'Mozilla/5.0 "quoted"\tx'})
    raw = await raw_exchange(proxy.url, b"GET /slow HTTP/1.0\r\nHost: h\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    await raw_exchange(proxy.url, b"GET /x%0a{\"forged\":1} HTTP/1.1\r\nHost: nowhere\r\n"
                       b"User-Agent: ua\xff\r\nConnection: close\r\n\r\n")
    one, two, three = await access_lines(tmp_path, 3)
    assert one["protocol"] == "HTTP/1.1" and one["user_agent"] == 'Mozilla/5.0 "quoted"\tx'
    assert isinstance(one["upstream_ms"], float) and one["upstream_ms"] >= 0
    assert isinstance(one["duration_ms"], float) and one["duration_ms"] >= one["upstream_ms"]
    assert two["protocol"] == "HTTP/1.0" and two["user_agent"] is None
    slow_ms = two["upstream_ms"]
    assert isinstance(slow_ms, float) and slow_ms >= 50  # /slow answers after a while
    # No route: no upstream, no upstream_ms; what the client sent is escaped, on one line.
    assert three["status"] == 404 and three["upstream_ms"] is None
    assert three["path"] == '/x\n{"forged":1}' and three["user_agent"] == "ua\u00ff"
    text = (tmp_path / "access.log").read_text()
    assert text.count("\n") == 3 and text.isascii()


async def run_proxy(spawn, tmp_path: Path, stable: Upstream, extra: str, *args: str
                    ) -> tuple[object, str]:
    path = tmp_path / "ringproxy.yaml"
    path.write_text(textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin:
          listen: 127.0.0.1:0
          tokens: [{{env: LOGS_TEST_TOKEN, role: admin}}]
        access_log: {{enabled: false}}
        shutdown_grace: 1s
        drain_delay: 0s
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        pools:
          app: {{servers: ["{stable.url}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            rings:
              - {{name: canary, pool: app, weight: 10}}
              - {{name: stable, pool: app}}
    """) + extra)
    proxy = await spawn(*args, "run", "--config", str(path), "--no-watch")
    match = await proxy.wait_listening(ADMIN)
    return proxy, match.group(1).decode()


async def rollback(admin: str) -> None:
    async with aiohttp.ClientSession() as session, session.post(
        f"{admin}/api/routes/api/rings/canary/rollback", json={"reason": FORGED},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
    async with aiohttp.ClientSession() as session, session.post(
        f"{admin}/api/routes/api/rings/canary/pause", json={"reason": "x" * 1001},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as resp:
        assert resp.status == 400 and "at most 1000" in await resp.text()


@pytest.mark.parametrize("how", ["config", "flag"])
async def test_json_process_log_one_object_per_line_with_a_forged_reason(
    spawn, stable: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setenv("LOGS_TEST_TOKEN", TOKEN)
    if how == "config":
        proxy, admin = await run_proxy(spawn, tmp_path, stable, "log_format: json\n")
    else:
        proxy, admin = await run_proxy(spawn, tmp_path, stable, "", "--log-format", "json")
    await rollback(admin)
    code, _, err = await proxy.finish(2)  # SIGINT
    assert code == 0
    entries = [json.loads(line) for line in err.splitlines()]  # every line one object
    assert all(list(e)[:4] == ["time", "level", "logger", "message"] for e in entries)
    rolled = [e for e in entries if FORGED in e["message"]]
    assert len(rolled) == 1 and rolled[0]["level"] == "WARNING"


async def test_text_process_log_escapes_a_forged_reason(
    spawn, stable: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGS_TEST_TOKEN", TOKEN)
    proxy, admin = await run_proxy(spawn, tmp_path, stable, "")
    await rollback(admin)
    code, _, err = await proxy.finish(2)
    assert code == 0
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ringproxy")
    assert all(stamp.match(line) for line in err.splitlines()), err
    assert "all good" in err and "\x1b" not in err
    (line,) = [line for line in err.splitlines() if "all good" in line]
    assert r"broken canary\n2026-01-01 00:00:00,000 INFO ringproxy: all good\x1b[0m" in line
