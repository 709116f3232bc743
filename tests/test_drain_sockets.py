"""SIGTERM drains: /readyz answers 503 for drain_delay while the listener still serves;
then the listener closes and an in-flight request finishes within shutdown_grace."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import aiohttp

from tests.conftest import Upstream, until_refused, write_config

ADMIN = re.compile(rb"admin listening on (http://\S+)")
DRAIN = 3.0  # drain_delay, seconds


async def test_sigterm_drains_then_stops_accepting_then_finishes_in_flight(
    spawn, stable: Upstream, tmp_path: Path
) -> None:
    path = write_config(tmp_path, stable.url, "access_log: {enabled: false}\n")
    path.write_text(path.read_text().replace("drain_delay: 0s", f"drain_delay: {DRAIN:g}s"))
    proc = await spawn("run", "--config", str(path))
    await proc.wait_listening()
    admin = (await proc.wait_listening(ADMIN)).group(1).decode()
    # /app answers after DRAIN + 1.5 s: sent during the drain, it is still in flight when
    # the listener closes at the drain's end.
    stable.delay = DRAIN + 1.5
    async with aiohttp.ClientSession() as client:
        async with client.get(admin + "/readyz") as r:
            assert r.status == 200 and (await r.json())["draining"] is False
        proc.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        async with asyncio.timeout(5):  # the signal is handled at once: /readyz says 503
            while True:
                async with client.get(admin + "/readyz") as r:
                    if r.status == 503:
                        assert (await r.json())["draining"] is True
                        break
                    assert r.status == 200
                await asyncio.sleep(0.02)
        # still serving, new connections included
        async with aiohttp.ClientSession() as fresh, fresh.get(proc.url + "/echo") as r:
            assert r.status == 200
        slow = asyncio.ensure_future(client.get(proc.url + "/app"))
        async with asyncio.timeout(5):
            while stable.app_hits < 1:  # noqa: ASYNC110 - a poll
                await asyncio.sleep(0.02)
        # The drain ends: the listener closes, not before drain_delay has passed.
        await until_refused(proc.url, DRAIN + 5)
        elapsed = time.monotonic() - sent
        assert elapsed >= 0.9 * DRAIN, f"the listener closed {elapsed:.2f}s after SIGTERM"
        assert not slow.done(), "the listener closed only after the in-flight request"
        async with await slow as r:  # the in-flight request finishes
            assert r.status == 200 and await r.text() == "stable"
    code, _, err = await proc.finish(None)
    assert code == 0, err
    assert f"draining: /readyz answers 503 for {DRAIN:g}s" in err
