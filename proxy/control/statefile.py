"""Durable rollout state and the audit trail.

The state file holds every ring's phase, weight, step and failure count.  It is written on
every change as a whole new file: write a temporary file, fsync it, rename it over the old
one, fsync the directory, so a crash (even ``kill -9`` or a power cut) leaves either the
old or the new state, never a torn one.  A state file that exists but cannot be read is an
error at start, never a silent reset: a reset could put users back on a rolled-back ring.

The audit file gets one JSON line per event, appended and fsynced.  Either file that is
not UTF-8 or not what ringproxy writes is a ``StateError`` with one line saying where;
``ringproxy run --fresh-state`` sets it aside (``set_aside``) and starts without it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from proxy.errors import StateError
from proxy.rollout.state import Event, RingState

FORMAT = 1


def load_state(path: Path) -> dict[str, dict[str, RingState]]:
    """``{route: {ring: state}}``; empty when the file does not exist."""
    text = _read_text(path, "state file")
    if text is None:
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"expected a JSON object with format {FORMAT}")
        routes = data.get("routes")
        if not isinstance(routes, dict):
            raise ValueError("'routes' is not an object")
        return {route: _route_states(route, rings) for route, rings in routes.items()}
    except ValueError as exc:
        raise StateError(f"{path}: the state file is corrupt ({exc})") from exc


def _read_text(path: Path, what: str) -> str | None:
    """The file's text; None when it does not exist; StateError (one line) when it cannot
    be read or is not UTF-8 (a file of another format, or one a disk error damaged)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateError(f"{path}: the {what} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason})") from exc


def _route_states(route: str, rings: object) -> dict[str, RingState]:
    if not isinstance(rings, dict):
        raise ValueError(f"routes.{route}: expected an object of rings, got {rings!r}")
    states = {}
    for ring, state in rings.items():
        if not isinstance(state, dict):
            raise ValueError(f"routes.{route}.{ring}: expected an object, got {state!r}")
        try:
            states[ring] = RingState.from_dict(state)
        except ValueError as exc:
            raise ValueError(f"routes.{route}.{ring}.{exc}") from None
    return states


def save_state(path: Path, states: Mapping[str, Mapping[str, RingState]]) -> None:
    data = {
        "format": FORMAT,
        "saved_at": time.time(),
        "routes": {route: {ring: s.as_dict() for ring, s in rings.items()}
                   for route, rings in states.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file of its own per save: saves of one process may overlap (a worker
    # thread's and the event loop's), and two writers on one temporary name interleave
    # into a corrupt file that the rename then makes the state.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def set_aside(path: Path) -> Path:
    """Move an unusable state or audit file out of the way (kept for a post-mortem) as
    ``NAME.corrupt-UNIXTIME`` (``-2``, ``-3``... when that name is taken: nothing is
    overwritten)."""
    base = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    aside, n = base, 1
    while aside.exists():
        n += 1
        aside = base.with_name(f"{base.name}-{n}")
    os.replace(path, aside)
    return aside


def append_audit(path: Path, events: list[Event]) -> None:
    """Append one line per event, so every line of the file stays one whole event.

    A last line without its newline is looked at first: one that is a whole JSON object
    (an editor or another tool left the newline off; ``read_audit`` keeps it) gets its
    newline; one that is not (torn by a crash mid-write: its event was never complete, and
    ``read_audit`` skips it) is cut off."""
    if not events:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(e.as_dict(), sort_keys=True) + "\n" for e in events)
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end > 0:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                start = _last_line_start(f, end)
                f.seek(start)
                if _is_object(f.read(end - start)):
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(start)
        f.write(lines.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _is_object(line: bytes) -> bool:
    """``line`` is one JSON object (what ``read_audit`` keeps of a last line)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # not UTF-8 (UnicodeDecodeError is one) or not JSON
        return False


def _last_line_start(f: BinaryIO, end: int) -> int:
    """The offset just after the file's last newline (0 if it has none)."""
    block = 4096
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        pos = start
    return 0


def read_audit(path: Path, limit: int = 1000) -> list[dict[str, object]]:
    """The last ``limit`` events of the audit file (for the in-memory history at start).

    A last line without its newline, torn by a crash mid-write, is skipped; any other of
    those lines that is not a JSON object, or a file that is not UTF-8, is a ``StateError``
    naming the line: the file is not an audit trail ringproxy wrote (it is never silently
    dropped).
    """
    text = _read_text(path, "audit file")
    if text is None:
        return []
    lines = text.split("\n")
    torn = lines.pop()  # "" after the last newline; else a line cut mid-write
    out: list[dict[str, object]] = []
    first = max(0, len(lines) - limit)  # older lines are neither read nor checked
    for number, line in enumerate(lines[first:], first + 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise StateError(f"{path}:{number}: the audit file is corrupt (not JSON: "
                             f"{exc})") from None
        if not isinstance(event, dict):
            raise StateError(f"{path}:{number}: the audit file is corrupt (expected a JSON "
                             f"object per line, got {type(event).__name__})")
        out.append(event)
    if torn.strip():
        try:
            event = json.loads(torn)
        except ValueError:
            event = None  # torn by a crash mid-write: skipped, the rest kept
        if isinstance(event, dict):
            out.append(event)
            out = out[-limit:]
    return out
