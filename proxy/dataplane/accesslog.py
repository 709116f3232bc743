"""The access log: one JSON object per line, per request.

Lines are buffered and written in batches (every 200 ms, or at 256 lines), so the request
path never waits on a write of its own.  The write itself is a plain blocking write to a
file or standard output; a stalled pipe on stdout therefore stalls the flush, as with
NGINX's buffered access log.  ``path: "-"`` is standard output.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import IO

# One field's value: the access log writes flat objects of JSON scalars.
Field = str | int | float | None

_FLUSH_EVERY = 0.2
_FLUSH_LINES = 256


def _iso(ts: float) -> str:
    t = time.gmtime(ts)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:"
            f"{t.tm_sec:02d}.{int(ts % 1 * 1000):03d}Z")


class AccessLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: IO[str] = (
            sys.stdout if path == "-" else open(path, "a", encoding="utf-8")  # noqa: SIM115
        )
        self._buffer: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode

    def log(self, fields: dict[str, Field]) -> None:
        """Queue one line; ``fields["time"]`` is set here (put it first to print it first)."""
        fields["time"] = _iso(time.time())
        self._buffer.append(self._dumps(fields) + "\n")
        if len(self._buffer) >= _FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            data, self._buffer = "".join(self._buffer), []
            try:
                self._stream.write(data)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not take requests down with it

    def close(self) -> None:
        self.flush()
        if self._stream is not sys.stdout:
            self._stream.close()

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} buffered={len(self._buffer)}>"
