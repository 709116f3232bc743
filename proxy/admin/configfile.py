"""The Rings API's writes to the config file: checked, atomic, reloaded, audited.

A change goes, under one lock (writes are serialised):

1. read the file; its revision (the hash a reload gives it) is what ``If-Match`` is held
   against, so a stale one is 412 and two writers never overwrite each other;
2. edit it (``proxy.config.edit``: comments, order and formatting kept) and validate the
   result with the loader a reload uses: a result that fails writes nothing (422, the
   loader's messages);
3. read the file once more (changed meanwhile by someone else: 412, theirs wins), write
   it atomically (a temporary file beside it, fsync, rename over it, fsync the
   directory), then reload through the proxy's ``Reloader``; should applying it fail, the
   old bytes go back the same way and the answer is 422;
4. record an audit event (actor, the file's diff, both revisions): the controller's history
   (``GET /api/events``) and the audit file.

Writes are off (409, "change the file in Git") when ``admin.config_writes`` is false, or
when it is unset and the file cannot be written (a ConfigMap).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin.context import Proxy
from proxy.admin.resources import ConfigEvent
from proxy.config import parse_config
from proxy.config.edit import Document, file_diff, read_back, revision
from proxy.errors import ApiError, ConfigError

if TYPE_CHECKING:
    from proxy.reload import Reloader

log = logging.getLogger("ringproxy.admin")

WRITE_LOCK_KEY = web.AppKey("config_write_lock", asyncio.Lock)

GIT_ADVICE = "change the file in Git (or wherever it is kept) and let the proxy reload it"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The file as read now: its text and revision."""

    path: Path
    text: str
    revision: str


@dataclass(frozen=True, slots=True)
class Change:
    """What an edit did, for the answer and the audit trail."""

    action: str  # create | update | delete
    route: str  # "" for a pool
    ring: str  # "" for a pool
    pool: str  # "" for a ring
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Written:
    previous: str  # the file's revision before
    revision: str  # the revision serving now
    event: ConfigEvent | None  # None: the change left the file as it was


def _reloader(proxy: Proxy) -> Reloader:
    if proxy.reloader is None:
        raise ApiError(409, "this proxy was not started from a config file; there is no file "
                            "to change")
    return proxy.reloader


def config_path(proxy: Proxy) -> Path:
    # A symlinked file is written where it really is (the link stays a link).
    return Path(os.path.realpath(_reloader(proxy).path))


def read_only_reason(proxy: Proxy, path: Path) -> str | None:
    """Why the API may not write the file now (None: it may)."""
    setting = proxy.config.admin.config_writes
    if setting is False:
        return (f"the config is read-only here (admin.config_writes: false): {GIT_ADVICE}")
    writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)
    if not writable:
        if setting is None:
            return (f"the config file {path} is not writable (a ConfigMap or a read-only "
                    f"mount), so the API does not change it: {GIT_ADVICE}")
        return (f"admin.config_writes is true but {path} (or its directory) is not writable "
                "by this process")
    return None


def _read(path: Path) -> Snapshot:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ApiError(409, f"cannot read the config file {path}: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(422, f"the config file {path} is not UTF-8 text") from exc
    return Snapshot(path, text, revision(data))


async def snapshot(proxy: Proxy) -> Snapshot:
    return await asyncio.to_thread(_read, config_path(proxy))


def etag(rev: str) -> str:
    return f'"{rev}"'


def matches(if_match: str | None, rev: str) -> bool:
    """RFC 9110 If-Match: ``*``, or a list of (strong or weak) entity tags."""
    if if_match is None or if_match.strip() == "*":
        return True
    tags = [t.strip().removeprefix("W/").strip('"') for t in if_match.split(",")]
    return rev in tags


def write_atomically(path: Path, text: str) -> None:
    """Temporary file beside ``path``, fsync, rename over it, fsync the directory."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _validate(text: str, source: str) -> None:
    """What a reload would say about ``text``: 422 with the loader's messages."""
    try:
        parse_config(text, source=source, fast=False)
    except ConfigError as exc:
        lines = [i.format(source) for i in exc.issues]
        more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        raise ApiError(422, f"the change was not written: the result is not a valid "
                            f"config: {lines[0]}{more}") from exc


def _audit(path: Path, event: ConfigEvent) -> None:
    """One JSON line appended to the audit file, in one write (the controller appends
    too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(event, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


async def change(
    proxy: Proxy, lock: asyncio.Lock, actor: str, if_match: str | None,
    what: Change, edit: Callable[[Document], object],
) -> Written:
    """Apply ``edit`` to the file, validate, write, reload, audit (module docstring)."""
    reloader = _reloader(proxy)
    path = config_path(proxy)
    reason = read_only_reason(proxy, path)
    if reason is not None:
        raise ApiError(409, reason)
    async with lock:
        before = await asyncio.to_thread(_read, path)
        if not matches(if_match, before.revision):
            raise ApiError(412, f"the config file changed since (its revision is "
                                f"{before.revision}, If-Match says {if_match}): read it "
                                "again and retry")
        after = await asyncio.to_thread(_edited, before, what, edit, str(reloader.path))
        if after == before.text:  # e.g. a PUT of what is there: nothing to write
            return Written(before.revision, reloader.current.revision, None)
        # Someone else (an editor, a GitOps sync) may have written meanwhile: their change
        # wins, this one is 412 (the window left is the rename's own).
        now = await asyncio.to_thread(_read, path)
        if now.revision != before.revision:
            raise ApiError(412, f"the config file changed while this change was made (now "
                                f"{now.revision}): read it again and retry")
        await asyncio.to_thread(write_atomically, path, after)
        result = await reloader.reload(f"api:{actor}")
        if not result.ok:
            await asyncio.to_thread(write_atomically, path, before.text)
            await reloader.reload(f"api:{actor} (undo)")
            raise ApiError(422, f"the change was undone: {'; '.join(result.errors)}")
        event = _event(what, actor, before, after, result.revision, path)
        proxy.controller.history.append(dict(event))
        await asyncio.to_thread(_audit, proxy.controller.audit_path, event)
    log.info("admin: %s %s %s (revision %s -> %s)", actor, what.action,
             f"pool {what.pool}" if what.pool else f"ring {what.route}/{what.ring}",
             before.revision, result.revision)
    return Written(before.revision, result.revision, event)


def _edited(before: Snapshot, what: Change, edit: Callable[[Document], object],
            source: str) -> str:
    document = Document(before.text)
    document.check_round_trip()
    edit(document)
    after = document.dump()
    if after == before.text:
        return after
    if what.action != "delete":
        meant = document.pool(what.pool) if what.pool else document.ring(what.route, what.ring)
        read = read_back(after, None if what.pool else what.route, what.pool or what.ring)
        if read != meant:
            raise ApiError(422, f"the change was not written: the file would read back as "
                                f"{read!r}, not {meant!r}")
    _validate(after, source)
    return after


def _event(what: Change, actor: str, before: Snapshot, after: str, rev: str,
           path: Path) -> ConfigEvent:
    return {
        "time": time.time(),
        "kind": "config_change",
        "action": what.action,
        "route": what.route,
        "ring": what.ring,
        "pool": what.pool,
        "actor": actor,
        "reason": what.reason,
        "from_revision": before.revision,
        "revision": rev,
        "diff": file_diff(before.text, after, path.name),
        # the fields every event has (this one moves no weight and no phase)
        "from_weight": None, "to_weight": None, "from_phase": None, "phase": None,
        "numbers": {},
    }
