"""The process log (standard error): text lines or one JSON object per line.

``setup(level, fmt)`` installs one handler on the root logger (the CLI calls it first);
``use_config_format(fmt)`` switches its format when a config is served or reloaded,
unless ``--log-format`` chose one on the command line.  Without ``setup`` (tests, an
embedding program) nothing here touches logging.

Both formats are safe against forged lines: what a client or an admin caller sends (a
path, a rollback ``reason``, a header's value) may reach a message, so

- ``text`` escapes control characters of the message (CR, LF, ESC, ...: ``\\n``, ``\\x1b``):
  a record is one line; a traceback's lines follow it, each indented by two spaces,
  so a line starting in the first column always begins a record;
- ``json`` writes one object per line (JSON escapes every control character):
  ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``, then the
  record's own fields (``extra=``) and ``exception`` (the traceback, as one string) when
  there is one.  The first four are always there; a field named like them is dropped.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

TEXT = "text"
JSON = "json"
FORMATS = (TEXT, JSON)

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line: control characters as backslash escapes (a backslash itself
    stays as it is, so escaping is for reading, not reversible)."""
    return _CONTROL.sub(_escape_one, text) if _CONTROL.search(text) else text


def iso_time(ts: float) -> str:
    t = time.gmtime(ts)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:"
            f"{t.tm_sec:02d}.{int(ts % 1 * 1000):03d}Z")


class TextFormatter(logging.Formatter):
    """``2026-01-02 03:04:05,678 INFO ringproxy: message``, the message on one line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        values = dict(vars(record))  # (the record itself is left as it is, for other handlers)
        values["message"] = escape(record.message)
        return str(self._fmt) % values

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        first, sep, rest = line.partition("\n")
        if not sep:
            return line
        # A traceback (or stack): each of its lines indented, so none starts a record.
        return first + "\n" + "\n".join("  " + escape(part) for part in rest.split("\n"))


# What every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
_CORE = ("time", "level", "logger", "message")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, separators=(",", ":"), default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == JSON:
        return JsonFormatter()
    if fmt == TEXT:
        return TextFormatter()
    raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}")


class _Handler(logging.StreamHandler[TextIO]):
    """The handler ``setup`` installs (so that ``use_config_format`` finds only its own)."""


_forced = False  # --log-format given: the config's log_format does not change it


def setup(level: str | int, fmt: str | None = None, stream: TextIO | None = None) -> None:
    """The process log at ``level`` on standard error, in ``fmt`` (``None``: text until a
    config says otherwise; a format given here wins over the config's)."""
    global _forced
    _forced = fmt is not None
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt or TEXT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def forced_format() -> str | None:
    """The format ``--log-format`` chose (``None``: the config's ``log_format`` rules):
    what a worker process of ``workers: N`` is started with."""
    if not _forced:
        return None
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Handler):
            return JSON if isinstance(handler.formatter, JsonFormatter) else TEXT
    return None


def use_config_format(fmt: str) -> None:
    """The config's ``log_format`` (at start and at every reload): applied to the handler
    ``setup`` installed, unless the command line chose a format."""
    if _forced:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _Handler):
            current = handler.formatter
            wanted = JsonFormatter if fmt == JSON else TextFormatter
            if type(current) is not wanted:
                handler.setFormatter(formatter(fmt))
