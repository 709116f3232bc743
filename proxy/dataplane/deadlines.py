"""Ring timeouts: the deadlines of all requests that share one timeout, on a single timer."""

from __future__ import annotations

import asyncio

IDLE, ARMED, OVER = 0, 1, 2  # where a request's deadline stands


class Waiter:
    """A request as a deadline sees it: ``task`` is what to cancel, ``timer`` where the
    deadline stands (``IDLE``, ``ARMED``, ``OVER``), ``expired`` whether it fired."""

    __slots__ = ("expired", "task", "timer")

    def __init__(self) -> None:
        self.task: asyncio.Task[object] | None = None
        self.timer = IDLE
        self.expired = False


class Deadlines:
    """The ring timeouts of all requests that share one timeout value, on a single timer.

    ``asyncio.timeout()`` per request costs a Timeout object, a timer handle scheduled and
    cancelled in the event loop, and its enter/exit: several microseconds, for a deadline
    that almost never fires.  Here a request's deadline is one dict insertion and one
    removal.  All entries have the same timeout, so insertion order is deadline order: the
    one timer is armed for the oldest entry; when it fires, finished requests are long gone
    from the dict, expired ones are cancelled (as ``asyncio.timeout`` does: the task is
    cancelled and the handler turns that CancelledError into a timeout), and the timer is
    re-armed for the oldest request still waiting.  With steady traffic it fires about once
    per ``timeout``.
    """

    __slots__ = ("_handle", "_loop", "_pending", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self.timeout = timeout
        self._pending: dict[Waiter, float] = {}  # insertion order is deadline order
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, waiter: Waiter) -> None:
        """Start the deadline now (no-op once it is over: a late end of an upload)."""
        if waiter.timer != IDLE:
            return
        waiter.timer = ARMED
        when = self._loop.time() + self.timeout
        self._pending[waiter] = when
        if self._handle is None:
            self._handle = self._loop.call_at(when, self._fire)

    def disarm(self, waiter: Waiter) -> None:
        """The wait is over (answer, error or cancellation): the deadline no longer applies."""
        waiter.timer = OVER
        self._pending.pop(waiter, None)

    def _fire(self) -> None:
        self._handle = None
        now = self._loop.time()
        pending = self._pending
        while pending:
            waiter = next(iter(pending))
            when = pending[waiter]
            if when > now:
                self._handle = self._loop.call_at(when, self._fire)
                return
            del pending[waiter]
            waiter.timer = OVER
            waiter.expired = True
            if waiter.task is not None:
                waiter.task.cancel()

    def __repr__(self) -> str:
        return f"<Deadlines {self.timeout:g}s pending={len(self._pending)}>"
