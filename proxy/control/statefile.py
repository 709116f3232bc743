"""Durable rollout state and the audit trail.

The state file holds every ring's phase, weight, step and failure count.  It is written on
every change as a whole new file: write a temporary file, fsync it, rename it over the old
one, fsync the directory, so a crash (even ``kill -9`` or a power cut) leaves either the
old or the new state, never a torn one.  A state file that exists but cannot be read is an
error at start, never a silent reset: a reset could put users back on a rolled-back ring.

The audit file gets one JSON line per event, appended and fsynced.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from proxy.errors import StateError
from proxy.rollout.state import Event, RingState

FORMAT = 1


def load_state(path: Path) -> dict[str, dict[str, RingState]]:
    """``{route: {ring: state}}``; empty when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StateError(f"{path}: cannot read the state file: {exc.strerror}") from exc
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def set_aside(path: Path) -> Path:
    """Move an unusable state file out of the way (kept for a post-mortem)."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    os.replace(path, aside)
    return aside


def append_audit(path: Path, events: list[Event]) -> None:
    if not events:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(e.as_dict(), sort_keys=True) + "\n" for e in events)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def read_audit(path: Path, limit: int = 1000) -> list[dict[str, object]]:
    """The last ``limit`` events of the audit file (for the in-memory history at start)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines[-limit:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash mid-write is skipped, the rest kept
    return out
