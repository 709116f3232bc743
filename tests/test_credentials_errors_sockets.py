"""A config error about a value from the environment never shows the value, on every
surface of a running ``ringproxy`` process: ``ringproxy check --format json``, a reload
refused through the admin API (its 422), a Rings API write refused (its 422) and the
process log.  The mistake reproduced: keys swapped (``{header: "Bearer ${VAR}", value:
...}``) and a secret where a flag goes (``shared: "${VAR}"``)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Upstream, cli
from tests.test_credentials_sockets import _drain

SECRET = "s3cr3t-prod-value-4f1e9a"
ADMIN = "errs-admin-token-0123456789abcdef"


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ER_PROD_TOK", SECRET)
    monkeypatch.setenv("ER_PROD_HDR", "X-Api-Key")
    monkeypatch.setenv("ER_ADMIN", ADMIN)


def config(stable: Upstream, tmp_path: Path, auth: str) -> str:
    return textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        admin:
          listen: 127.0.0.1:0
          tokens: [{{env: ER_ADMIN, role: admin}}]
        access_log: {{enabled: false}}
        shutdown_grace: 2s
        drain_delay: 0s
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        pools:
          prod:
            environment: production
            servers: ["{stable.url}"]
            auth: {auth}
        routes:
          - name: api
            rings: [{{name: main, pool: prod}}]
        """)


GOOD = '{header: Authorization, value: "Bearer ${ER_PROD_TOK}"}'
SWAPPED = '{header: "Bearer ${ER_PROD_TOK}", value: "${ER_PROD_HDR}", shared: "${ER_PROD_TOK}"}'


@pytest.mark.timeout(90)
async def test_no_config_error_shows_a_value_from_the_environment(
    secrets: None, spawn: Any, stable: Upstream, tmp_path: Path,
) -> None:
    path = tmp_path / "ringproxy.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(config(stable, tmp_path, SWAPPED))
    path.write_text(config(stable, tmp_path, GOOD))
    shown: dict[str, str] = {}

    checked = await asyncio.to_thread(cli, "check", "--format", "json", str(bad))
    assert checked.returncode == 1, checked.stderr
    shown["check --format json"] = checked.stdout + checked.stderr
    assert "pools.prod.auth.header" in checked.stdout
    assert "the value from ${ER_PROD_TOK} is not a valid header name" in checked.stdout

    # Credentials over plain http:// are warned about (check, and the process log below).
    good = await asyncio.to_thread(cli, "check", str(path))
    assert good.returncode == 0, good.stderr
    plain = "pool prod sends its credentials (Authorization) over plain http://"
    assert plain in good.stderr

    running = await spawn("--log-level", "debug", "run", "--config", str(path))
    await running.wait_listening()
    m = await running.wait_listening(re.compile(rb"admin listening on (http://\S+)"))
    admin = m.group(1).decode()
    err: list[bytes] = [running.stderr]
    drain = asyncio.ensure_future(_drain(running.proc.stderr, err))
    auth = {"Authorization": f"Bearer {ADMIN}"}
    try:
        async with aiohttp.ClientSession() as http:
            path.write_text(bad.read_text())
            async with http.post(admin + "/api/reload", headers=auth) as r:
                shown["refused reload"] = await r.text()
                assert r.status == 422, shown["refused reload"]
            assert "got the value from ${ER_PROD_TOK}" in shown["refused reload"]
            path.write_text(config(stable, tmp_path, GOOD))
            async with http.patch(admin + "/api/pools/prod", headers=auth, json={
                    "auth": {"header": "Bearer ${ER_PROD_TOK}",
                             "value": "${ER_PROD_HDR}"}}) as r:
                shown["PATCH /api/pools/prod"] = await r.text()
                assert r.status in (400, 422), shown["PATCH /api/pools/prod"]
            assert "the value from ${ER_PROD_TOK}" in shown["PATCH /api/pools/prod"]
    finally:
        running.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                await running.proc.wait()
                await drain
    shown["process log"] = b"".join(err).decode()
    assert "is not a valid header name" in shown["process log"]
    assert plain in shown["process log"]
    for where, text in shown.items():
        assert SECRET not in text and "s3cr3t" not in text, (where, text)
