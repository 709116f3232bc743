"""Timeouts of the data plane: all entries that share one timeout value, on a single timer.

``loop.call_later`` per request (or per read) costs a timer handle scheduled and cancelled
in the event loop: several microseconds, for a deadline that almost never fires.  Here a
deadline is one dict insertion and one removal.  All entries of a ``Deadlines`` have the
same timeout, so insertion order is deadline order (a restart moves the entry to the end):
the one timer is armed for the oldest entry; when it fires, finished entries are long gone
from the dict, expired ones get their callback, and the timer is re-armed for the oldest
entry still waiting.  With steady traffic it fires about once per ``timeout``.

Used for ring timeouts, idle timeouts of response bodies, an upstream that stops reading
a request body (the ring's idle timeout while its write buffer is full), the client
connections' head, body and keep-alive timeouts, and the pool's idle keep-alive
connections.  (A WebSocket tunnel's idle timeout is its own ``call_at``: tunnels are few
and long-lived, and it is re-armed from the time of the last byte.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable

log = logging.getLogger("ringproxy.dataplane")


class Deadlines:
    """Deadlines of ``timeout`` seconds; ``arm(key, callback)`` (re)starts one for ``key``."""

    __slots__ = ("_handle", "_loop", "_pending", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self.timeout = timeout
        # key -> (when, callback); insertion order is deadline order.
        self._pending: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, key: Hashable, callback: Callable[[], None]) -> None:
        """Start (or restart) ``key``'s deadline now; ``callback`` runs when it passes (and
        may arm its key again: a wait that starts over)."""
        pending = self._pending
        if key in pending:
            del pending[key]  # to the end: the order stays the deadline order
        when = self._loop.time() + self.timeout
        pending[key] = (when, callback)
        if self._handle is None:
            self._handle = self._loop.call_at(when, self._fire)

    def disarm(self, key: Hashable) -> None:
        """The wait is over: the deadline no longer applies (no-op if not armed)."""
        self._pending.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def _fire(self) -> None:
        now = self._loop.time()
        pending = self._pending
        # At most the entries there now: one a callback re-arms (a wait that starts again)
        # goes to the end, for the timer armed below, not for this round.  While the
        # callbacks run, ``_handle`` is still the spent handle, so ``arm`` schedules none.
        left = len(pending)
        while left and pending:
            left -= 1
            key = next(iter(pending))
            when, callback = pending[key]
            if when > now:
                break
            del pending[key]
            try:
                callback()
            except Exception:  # one entry's defect must not stop the others' deadlines
                log.exception("a deadline's callback failed")
        if pending:
            self._handle = self._loop.call_at(next(iter(pending.values()))[0], self._fire)
        else:
            self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pending.clear()

    def __repr__(self) -> str:
        return f"<Deadlines {self.timeout:g}s pending={len(self._pending)}>"


class Timers:
    """One ``Deadlines`` per timeout value in use (a handful), made on first use."""

    __slots__ = ("_by_timeout", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._by_timeout: dict[float, Deadlines] = {}

    def __call__(self, timeout: float) -> Deadlines:
        deadlines = self._by_timeout.get(timeout)
        if deadlines is None:
            deadlines = self._by_timeout[timeout] = Deadlines(self._loop, timeout)
        return deadlines

    def pending(self) -> int:
        return sum(len(d) for d in self._by_timeout.values())

    def close(self) -> None:
        for deadlines in self._by_timeout.values():
            deadlines.close()

    def __repr__(self) -> str:
        return f"<Timers {sorted(self._by_timeout)}>"
