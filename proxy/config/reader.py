"""Reading a loaded YAML tree with issues collected, not raised.

``Section`` wraps one mapping: typed getters record an issue (with path and line) and
return a default instead of raising, so one pass reports every problem in the file;
``close()`` reports keys nobody asked for, with a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, TypeVar

from proxy.config.source import Expanded, join
from proxy.config.values import format_size, parse_duration, parse_size
from proxy.errors import ConfigIssue

T = TypeVar("T")
D = TypeVar("D", int, int | None)  # an integer's default: a number, or None for "no limit"


# A variable's value this long or longer is never quoted in any message (a shorter one,
# "8080" or "true", only not in a message about its own path or a path around it).
SCRUB_ANYWHERE = 6


class Ctx:
    """Where issues are collected.  ``err`` never quotes a value that came from the
    environment: a message about a path whose value holds a ``${VAR}`` (or about a path
    around it) says "the value from ${VAR}" instead of the value, whichever reader wrote
    it (secrets come from the environment; a message goes to ``ringproxy check``, a
    refused reload's 422, the process log and the Rings API)."""

    def __init__(
        self, lines: dict[str, int], issues: list[ConfigIssue], env_paths: set[str] | None = None,
        env_refs: dict[str, list[tuple[str, bool]]] | None = None,
        expanded: Expanded | None = None,
    ) -> None:
        self.lines = lines
        self.issues = issues
        self.env_paths = env_paths or set()
        # The ${VAR}s written at each path (name, has a default): credentials check these.
        self.env_refs = env_refs or {}
        self.expanded = expanded if expanded is not None else Expanded()

    def line(self, path: str) -> int | None:
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""

    def err(self, path: str, message: str) -> None:
        self.issues.append(ConfigIssue(path, self.scrub(path, message), self.line(path)))

    def scrub(self, path: str, message: str) -> str:
        """``message`` with every value from the environment it could quote replaced by
        where it came from ("the value from ${VAR}")."""
        expanded = self.expanded
        if not expanded.variables:
            return message
        for at, value in sorted(expanded.values.items(), key=lambda kv: -len(kv[1])):
            bare = value.strip()
            if bare and _related(at, path) and bare in message:
                names = ", ".join(dict.fromkeys(f"${{{n}}}" for n, _ in self.env_refs[at]))
                message = _replace(message, value, f"the value from {names}")
        for name, value in sorted(expanded.variables.items(), key=lambda kv: -len(kv[1])):
            if len(value.strip()) >= SCRUB_ANYWHERE and value.strip() in message:
                message = _replace(message, value, f"${{{name}}}")
        return message


def _replace(message: str, value: str, shown: str) -> str:
    """``value`` (quoted as repr, stripped or bare, as a whole word) replaced by ``shown``."""
    bare = value.strip()
    message = message.replace(repr(value), shown).replace(repr(bare), shown)
    return re.sub(r"(?<![A-Za-z0-9_])" + re.escape(bare) + r"(?![A-Za-z0-9_])",
                  lambda _: shown, message)


def _related(at: str, path: str) -> bool:
    """Whether ``at`` is ``path``, inside it or around it (a message about one may quote
    the other's value)."""
    if at == path or not path or not at:
        return True
    return any(a.startswith(b) and a[len(b)] in ".[" for a, b in ((at, path), (path, at))
               if len(a) > len(b))


MISSING: Any = object()


def kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )


class Section:
    """A mapping being read: typed getters that record issues, and unknown-key checks."""

    def __init__(self, ctx: Ctx, value: object, path: str) -> None:
        self.ctx, self.path, self.seen = ctx, path, set[str]()
        self.ok = isinstance(value, dict)
        self.data: dict[str, Any] = value if isinstance(value, dict) else {}
        if not self.ok:
            ctx.err(path, f"expected a mapping, got {kind(value)}")

    def sub(self, key: str) -> str:
        return join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is MISSING and self.ok:
                self.ctx.err(self.sub(key), "is required")
            return None if default is MISSING else default
        return self.data[key]

    def parsed(self, key: str, parse: Callable[[object], T], default: T) -> T:
        if key not in self.data:
            self.seen.add(key)
            return default
        try:
            return parse(self.raw(key))
        except ValueError as exc:
            self.ctx.err(self.sub(key), str(exc))
            return default

    def text(self, key: str, default: Any = MISSING) -> str:
        value = self.raw(key, default)
        if key in self.data and not isinstance(value, str):
            self.ctx.err(self.sub(key), f"expected a string, got {kind(value)}")
            return "" if default is MISSING else default
        return "" if value is None else value

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.ctx.err(self.sub(key), f"expected true or false, got {value!r}")
            return default
        return value

    def integer(self, key: str, default: D, lo: int, hi: int) -> int | D:
        value = self.raw(key, default)
        if key not in self.data:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.ctx.err(self.sub(key), f"expected a whole number, got {value!r}")
            return default
        if not lo <= value <= hi:
            self.ctx.err(self.sub(key), f"{value} is outside {lo}..{hi}")
            return default
        return value

    def duration(self, key: str, default: float, minimum: float = 0.001) -> float:
        value = self.parsed(key, parse_duration, default)
        if value < minimum:
            self.ctx.err(self.sub(key), f"{self.data.get(key)!r} is below the minimum {minimum}s")
            return default
        return value

    def size(self, key: str, default: D, lo: int, hi: int) -> int | D:
        """Bytes (``parse_size``) within ``lo..hi``; the message shows the bounds as sizes."""
        if key not in self.data:
            self.seen.add(key)
            return default
        value = self.parsed(key, parse_size, None)
        if value is None:
            return default
        if not lo <= value <= hi:
            shown = self.data[key]
            self.ctx.err(self.sub(key), f"{shown!r} is outside {format_size(lo)}.."
                         f"{format_size(hi)}")
            return default
        return value

    def items(self, key: str) -> list[Any]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            self.ctx.err(self.sub(key), f"expected a list, got {kind(value)}")
            return []
        return value

    def close(self) -> None:
        for key in self.data:
            # Top-level ``x-`` keys are extension fields, ignored (as docker-compose's): a
            # place for anchors that merge keys (``<<: *defaults``) use elsewhere.
            if not self.path and key.startswith("x-"):
                continue
            if key not in self.seen:
                hint = difflib.get_close_matches(key, sorted(self.seen), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                known = ", ".join(sorted(self.seen))
                self.ctx.err(self.sub(key), f"unknown key (known keys: {known}){extra}")
