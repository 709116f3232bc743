"""Bodies stream: 200 MiB each way through a real proxy process keeps its memory flat."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path

import aiohttp

from tests.conftest import Upstream, write_config

SIZE = 200 * 1024 * 1024
LIMIT = 64 * 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


async def _watch_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _status_kib(pid, "VmRSS"))
        await asyncio.sleep(0.02)


async def test_200mib_upload_and_download_hold_rss_growth_under_64mib(
    spawn, stable: Upstream, tmp_path: Path
) -> None:
    proxy = await spawn(
        "run", "--config", str(write_config(tmp_path, stable.url, "access_log: {enabled: false}\n"))
    )
    await proxy.wait_listening()
    pid = proxy.proc.pid
    chunk = bytes(range(256)) * 256  # 64 KiB, generated: nothing is read from disk
    expected = hashlib.sha256()
    for _ in range(SIZE // len(chunk)):
        expected.update(chunk)

    async def body():
        for _ in range(SIZE // len(chunk)):
            yield chunk

    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/warm-up") as r:  # pools and buffers exist now
            assert r.status == 200
        baseline = _status_kib(pid, "VmRSS")
        peak = [baseline]
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_rss(pid, peak, stop))
        try:
            async with client.post(proxy.url + "/sink", data=body()) as r:
                assert r.status == 200
                assert await r.json() == {"received": SIZE, "sha256": expected.hexdigest()}
            got = hashlib.sha256()
            received = 0
            async with client.get(proxy.url + f"/bytes/{SIZE}") as r:
                assert r.status == 200
                async for part in r.content.iter_chunked(1 << 20):
                    got.update(part)
                    received += len(part)
            assert received == SIZE
            assert got.hexdigest() == expected.hexdigest()
        finally:
            stop.set()
            await watcher
    peak[0] = max(peak[0], _status_kib(pid, "VmHWM"))
    growth = peak[0] - baseline
    assert growth < LIMIT, f"proxy RSS grew by {growth / 2**20:.1f} MiB"
    code, _, err = await proxy.finish(signal.SIGTERM)
    assert code == 0, err
