"""Hot reload: watch the config file, validate, build the new runtime, swap one reference.

Triggers: a change of the file on disk, SIGHUP, or a call to ``Reloader.reload()`` (what
the admin API's ``POST /api/reload`` calls).  Reloads are serialised.  A file that fails
validation changes nothing: the last good config keeps serving, each error is logged on
its own line, and the failure is counted.  So does a valid file whose ``apply`` fails
(a new access log that cannot be opened, say): logged with its traceback, counted.

The watcher polls ``os.stat`` of the path (following symlinks) plus its resolved real path
every ``interval``; that sees in-place writes, atomic renames over the file, and the
Kubernetes ConfigMap way (a directory whose ``..data`` symlink is swapped), without a
platform-specific notifier.  A change is acted on once the file has stopped changing for
``settle`` seconds, so an editor's burst of writes becomes one reload.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.tasks import cancel_and_wait

log = logging.getLogger("ringproxy.reload")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    changed: bool  # False when the file's content (revision) was already serving
    revision: str  # the revision serving after this reload
    trigger: str
    seconds: float
    errors: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "changed": self.changed,
            "revision": self.revision,
            "trigger": self.trigger,
            "seconds": round(self.seconds, 4),
            "errors": list(self.errors),
        }


def _fingerprint(path: Path) -> tuple[object, ...] | None:
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError:
        return None
    return (real, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class Reloader:
    """Reloads ``path`` into a running proxy through ``apply(config)``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        current: Config,
        apply: Callable[[Config], Awaitable[None]],
        on_result: Callable[[ReloadResult], None] | None = None,
        interval: float = 0.5,
        settle: float = 0.2,
    ) -> None:
        self.path = Path(path)
        self.current = current
        self._apply = apply
        self._on_result = on_result
        self.interval = interval
        self.settle = settle
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # What the file looked like when ``current`` was loaded (about now): a change made
        # before the watcher's first poll is still seen.
        self._seen = _fingerprint(self.path)

    async def reload(self, trigger: str = "api") -> ReloadResult:
        async with self._lock:
            # Building a config allocates ~100k objects for a big file, enough to trigger
            # full (generation 2) collections that stop every thread for 100-200 ms while
            # they scan the heap.  Nothing a reload makes is cyclic garbage, so the cyclic
            # collector can wait until it is done (reference counting still frees).
            collecting = gc.isenabled()
            gc.disable()
            try:
                return await self._reload(trigger)
            finally:
                if collecting:
                    gc.enable()

    async def _reload(self, trigger: str) -> ReloadResult:
        started = time.monotonic()
        try:
            # Reading and parsing a big file takes milliseconds: off the event loop.
            config = await asyncio.to_thread(load_config, self.path, None, False)
        except ConfigError as exc:
            errors = tuple(i.format(exc.source) for i in exc.issues)
            for line in errors:
                log.error("config reload rejected: %s", line)
            log.error("config reload (%s) failed with %d error(s); still serving "
                      "revision %s", trigger, len(errors), self.current.revision)
            return self._done(False, False, trigger, started, errors)
        if config.revision == self.current.revision:
            return self._done(True, False, trigger, started)
        try:
            await self._apply(config)
        except Exception as exc:  # whatever apply met, the running config keeps serving
            log.exception("config reload (%s): applying revision %s failed; still serving "
                          "revision %s", trigger, config.revision, self.current.revision)
            error = (f"{self.path}: revision {config.revision} is valid but applying it "
                     f"failed: {type(exc).__name__}: {exc}")
            return self._done(False, False, trigger, started, (error,))
        old, self.current = self.current.revision, config
        log.info("config reloaded (%s): revision %s -> %s in %.1f ms", trigger, old,
                 config.revision, (time.monotonic() - started) * 1000)
        return self._done(True, True, trigger, started)

    def _done(
        self, ok: bool, changed: bool, trigger: str, started: float,
        errors: tuple[str, ...] = (),
    ) -> ReloadResult:
        result = ReloadResult(ok, changed, self.current.revision, trigger,
                              time.monotonic() - started, errors)
        if self._on_result is not None:
            self._on_result(result)
        return result

    def start_watching(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _watch(self) -> None:
        seen = self._seen
        while True:
            await asyncio.sleep(self.interval)
            now = _fingerprint(self.path)
            if now == seen:
                continue
            # Coalesce a burst: wait until the file stops changing.
            while True:
                await asyncio.sleep(self.settle)
                settled = _fingerprint(self.path)
                if settled == now:
                    break
                now = settled
            seen = self._seen = now
            if now is None:
                log.warning("config file %s disappeared; still serving revision %s",
                            self.path, self.current.revision)
                continue
            try:
                await self.reload("file")
            except Exception:  # never let the watcher die: the next change retries
                log.exception("config reload failed unexpectedly")

    def __repr__(self) -> str:
        return f"<Reloader {self.path} revision={self.current.revision}>"
