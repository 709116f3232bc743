"""SIGTERM drains: /readyz answers 503 for drain_delay while the listener still serves;
then the listener closes and an in-flight request finishes within shutdown_grace."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import aiohttp

from tests.conftest import Upstream, write_config

ADMIN = re.compile(rb"admin listening on (http://\S+)")


async def test_sigterm_drains_then_stops_accepting_then_finishes_in_flight(
    spawn, stable: Upstream, tmp_path: Path
) -> None:
    path = write_config(tmp_path, stable.url, "access_log: {enabled: false}\n")
    path.write_text(path.read_text().replace("drain_delay: 0s", "drain_delay: 1s"))
    proc = await spawn("run", "--config", str(path))
    await proc.wait_listening()
    admin = (await proc.wait_listening(ADMIN)).group(1).decode()
    stable.delay = 2.0  # /app answers after 2 s: in flight when the listener closes
    async with aiohttp.ClientSession() as client:
        async with client.get(admin + "/readyz") as r:
            assert r.status == 200 and (await r.json())["draining"] is False
        proc.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        await asyncio.sleep(0.2)
        async with client.get(admin + "/readyz") as r:
            assert r.status == 503 and (await r.json())["draining"] is True
        # still serving, new connections included
        async with aiohttp.ClientSession() as fresh, fresh.get(proc.url + "/echo") as r:
            assert r.status == 200
        slow = asyncio.ensure_future(client.get(proc.url + "/app"))
        await asyncio.sleep(1.2)  # the drain is over: the listener is closed
        assert time.monotonic() - sent > 1.0
        try:
            _, writer = await asyncio.open_connection(*proc.url[7:].rsplit(":", 1))
        except ConnectionRefusedError:
            pass
        else:  # pragma: no cover - the listener should be gone
            writer.close()
            raise AssertionError("the listener still accepts after drain_delay")
        async with await slow as r:  # the in-flight request finishes
            assert r.status == 200 and await r.text() == "stable"
    code, _, err = await proc.finish(None)
    assert code == 0, err
    assert "draining: /readyz answers 503 for 1s" in err
