"""The reloader on its own: polling, settling a burst, a file that goes and comes back,
a ConfigMap symlink swap, and an apply that fails.  Real files, small intervals; reloads
are counted through the ``apply`` and ``on_result`` callbacks."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.config import Config, load_config
from proxy.reload import Reloader, ReloadResult

INTERVAL = 0.05
SETTLE = 0.25


def text(version: int) -> str:
    return f"""
listen: 127.0.0.1:0
pools:
  p: {{servers: ["http://127.0.0.1:9"]}}
routes:
  - name: api
    rings:
      - name: main
        pool: p
        policy: {{add_headers: {{X-Version: "{version}"}}}}
"""


def version_of(config: Config) -> str:
    return dict(config.routes[0].rings[0].policy.add_headers)["X-Version"]


class Recorder:
    """A reloader's callbacks: what was applied and what each reload reported."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.results: list[ReloadResult] = []
        self.fail_with: Exception | None = None

    async def apply(self, config: Config) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.applied.append(version_of(config))

    def on_result(self, result: ReloadResult) -> None:
        self.results.append(result)


Start = Callable[[Path], Reloader]


@pytest.fixture
async def watching() -> AsyncIterator[tuple[Recorder, Start]]:
    recorder = Recorder()
    started: list[Reloader] = []

    def start(path: Path) -> Reloader:
        reloader = Reloader(path, load_config(path), recorder.apply, recorder.on_result,
                            interval=INTERVAL, settle=SETTLE)
        reloader.start_watching()
        started.append(reloader)
        return reloader

    yield recorder, start
    for reloader in started:
        await reloader.stop()


async def until(condition: Callable[[], bool]) -> float:
    """Seconds until ``condition`` held; fails after 5 s."""
    began = time.monotonic()
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polls what the callbacks recorded
            await asyncio.sleep(0.01)
    return time.monotonic() - began


async def test_an_unchanged_file_is_never_reloaded(
    watching: tuple[Recorder, Start], tmp_path: Path
) -> None:
    recorder, start = watching
    path = tmp_path / "c.yaml"
    path.write_text(text(1))
    start(path)
    await asyncio.sleep(10 * INTERVAL + SETTLE)
    assert recorder.results == []


async def test_a_change_is_reloaded_once_after_it_settles(
    watching: tuple[Recorder, Start], tmp_path: Path
) -> None:
    recorder, start = watching
    path = tmp_path / "c.yaml"
    path.write_text(text(1))
    reloader = start(path)
    await asyncio.sleep(2 * INTERVAL)
    path.write_text(text(2))
    took = await until(lambda: bool(recorder.results))
    assert took >= SETTLE  # not before the file has been still for ``settle``
    assert took < INTERVAL + 2 * SETTLE + 1.0  # one poll, one settle, slack for a busy box
    await asyncio.sleep(4 * INTERVAL + SETTLE)
    assert recorder.applied == ["2"]
    (result,) = recorder.results
    assert (result.ok, result.changed, result.trigger) == (True, True, "file")
    assert version_of(reloader.current) == "2" and result.revision == reloader.current.revision


async def test_a_change_made_before_the_first_poll_is_seen(
    watching: tuple[Recorder, Start], tmp_path: Path
) -> None:
    recorder, start = watching
    path = tmp_path / "c.yaml"
    path.write_text(text(1))
    start(path)
    path.write_text(text(2) + "\n")  # before the watcher has looked even once
    await until(lambda: bool(recorder.applied))
    assert recorder.applied == ["2"]


async def test_a_burst_of_writes_becomes_one_reload_of_the_last(
    watching: tuple[Recorder, Start], tmp_path: Path
) -> None:
    recorder, start = watching
    path = tmp_path / "c.yaml"
    path.write_text(text(1))
    start(path)
    await asyncio.sleep(2 * INTERVAL)
    burst_started = time.monotonic()
    for version in range(2, 9):  # an editor saving repeatedly: gaps well inside ``settle``
        path.write_text(text(version) + "#" * version)
        await asyncio.sleep(SETTLE / 8)
    burst = time.monotonic() - burst_started
    assert burst < 7 * SETTLE / 2, "the machine is too slow for this test's timing"
    await until(lambda: bool(recorder.results))
    await asyncio.sleep(4 * INTERVAL + 2 * SETTLE)
    assert recorder.applied == ["8"]
    assert len(recorder.results) == 1


async def test_a_file_that_disappears_keeps_the_config_until_it_comes_back(
    watching: tuple[Recorder, Start], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder, start = watching
    path = tmp_path / "c.yaml"
    path.write_text(text(1))
    reloader = start(path)
    serving = reloader.current
    path.unlink()
    await until(lambda: any("disappeared" in m for m in caplog.messages))
    await asyncio.sleep(4 * INTERVAL + SETTLE)
    assert recorder.results == []  # no reload tried, no failure counted
    assert reloader.current is serving
    path.write_text(text(1))  # back as it was: read again, nothing to apply
    await until(lambda: bool(recorder.results))
    assert [(r.ok, r.changed) for r in recorder.results] == [(True, False)]
    path.unlink()
    await asyncio.sleep(2 * INTERVAL + 2 * SETTLE)
    path.write_text(text(3))  # back with something new: applied
    await until(lambda: bool(recorder.applied))
    assert recorder.applied == ["3"]
    assert [(r.ok, r.changed) for r in recorder.results] == [(True, False), (True, True)]


async def test_a_configmap_symlink_swap_is_one_reload(
    watching: tuple[Recorder, Start], tmp_path: Path
) -> None:
    # The Kubernetes layout: config.yaml -> ..data/config.yaml, ..data -> ..v1; an update
    # writes ..v2 and renames a new ..data link over the old one.  The file's own path,
    # size and (often) mtime need not change: the resolved path does.
    recorder, start = watching
    mount = tmp_path / "configmap"
    for version in (1, 2):
        (mount / f"..v{version}").mkdir(parents=True)
        (mount / f"..v{version}" / "config.yaml").write_text(text(version))
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/config.yaml", mount / "config.yaml")
    start(mount / "config.yaml")
    await asyncio.sleep(2 * INTERVAL)
    os.symlink("..v2", mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    await until(lambda: bool(recorder.results))
    await asyncio.sleep(4 * INTERVAL + SETTLE)
    assert recorder.applied == ["2"]
    assert len(recorder.results) == 1


async def test_an_apply_that_fails_is_a_failed_reload_and_the_watcher_goes_on(
    watching: tuple[Recorder, Start], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder, start = watching
    path = tmp_path / "c.yaml"
    path.write_text(text(1))
    reloader = start(path)
    serving = reloader.current
    recorder.fail_with = OSError(28, "No space left on device")
    path.write_text(text(2))
    await until(lambda: bool(recorder.results))
    (failed,) = recorder.results
    assert (failed.ok, failed.changed, failed.revision) == (False, False, serving.revision)
    assert failed.errors == (
        f"{path}: revision {load_config(path).revision} is valid but applying it failed: "
        "OSError: [Errno 28] No space left on device",
    )
    assert reloader.current is serving
    (record,) = [r for r in caplog.records if r.name == "ringproxy.reload"
                 and r.levelno == logging.ERROR]
    assert record.exc_info is not None and record.exc_info[1] is recorder.fail_with
    # The same file again, once apply works: it is still new to the reloader.
    recorder.fail_with = None
    result = await reloader.reload("api")
    assert (result.ok, result.changed) == (True, True)
    assert recorder.applied == ["2"]
    path.write_text(text(3))  # and the watcher is still watching
    await until(lambda: len(recorder.applied) == 2)
    assert recorder.applied == ["2", "3"]
