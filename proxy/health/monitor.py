"""The live side of a pool's health: applies ``PoolHealthState``'s decisions.

``PoolHealth`` is made by the pool it watches, one per pool whatever the number of routes
and rings using it (so each server is checked once per ``interval``), started and closed
with it.  It sets each server's ``up`` flag, which ``UpstreamPool.pick`` reads, and
``changed(all_up)`` tells the pool whether every server is up (``pick``'s fast path).
Ejections end on a timer; active checks run as one task per server, the first at a random
point of the first interval, then every ``interval`` plus up to 10 % (never sooner).
Transitions go to ``listener`` (the controller's events) and to the log.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Sequence
from typing import Protocol, TypedDict

from proxy.config import Pool
from proxy.config.values import Upstream
from proxy.health.checker import probe
from proxy.health.state import PoolHealthState, ServerState, Transition

log = logging.getLogger("ringproxy.health")

JITTER = 0.1  # a check waits interval x (1 + up to JITTER) after the previous one began


class Member(Protocol):
    """What the monitor needs of a pool's server (``proxy.dataplane.upstream.Server``)."""

    upstream: Upstream
    up: bool
    failures: int


class ServerView(TypedDict):
    """One server as the admin API shows it."""

    url: str
    state: str  # healthy | ejected | unhealthy
    up: bool
    failures: int  # failed attempts in a row
    last_failure: str | None
    ejections: int  # since the pool started
    ejected_for: float | None  # seconds of ejection left
    last_check: str | None  # what the last active check saw (None: none yet / no checks)


class PoolHealth:
    """Health of one pool's servers; ``start()`` inside the event loop."""

    def __init__(self, config: Pool, servers: Sequence[Member],
                 changed: Callable[[bool], None] = lambda all_up: None) -> None:
        self.config = config
        self.servers = servers
        self.state = PoolHealthState(config.name, [s.upstream.url for s in servers],
                                     config.outlier, config.health)
        self._index = {id(s): i for i, s in enumerate(servers)}
        self._changed = changed
        self.listener: Callable[[Transition], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.checks = 0  # active checks sent (for tests and people)

    @property
    def down(self) -> bool:
        """No server of the pool is in rotation."""
        return not any(s.up for s in self.servers)

    def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        if self.config.health is not None:
            for i in range(len(self.servers)):
                self._tasks.append(asyncio.ensure_future(self._check_loop(i, tls)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # -- passive (called by the data plane)

    def success(self, server: Member) -> None:
        """An attempt on ``server`` got an answer (called only while it had failures)."""
        server.failures = 0
        self.state.success(self._index[id(server)])

    def failure(self, server: Member, kind: str) -> None:
        """An attempt on ``server`` failed (``kind``: connect, reset, timeout, 5xx...)."""
        i = self._index[id(server)]
        loop = self._loop
        if loop is None:
            return  # not started: nothing could readmit it (no request comes before start)
        change = self.state.failure(i, kind, loop.time())
        server.failures = self.state.servers[i].failures
        if change is not None and change.duration is not None:
            self._timers[i] = loop.call_later(change.duration, self._readmit, i)
            self._apply(change)

    def _readmit(self, i: int) -> None:
        self._timers.pop(i, None)
        loop = self._loop
        change = self.state.readmit(i, loop.time() if loop is not None else 0.0)
        self.servers[i].failures = 0
        if change is not None:
            self._apply(change)

    # -- active

    async def _check_loop(self, i: int, tls: ssl.SSLContext | None) -> None:
        check = self.config.health
        assert check is not None
        loop = asyncio.get_running_loop()
        upstream = self.servers[i].upstream
        server_name = self.config.tls.server_name if self.config.tls is not None else None
        await asyncio.sleep(random.uniform(0, check.interval))
        while True:
            began = loop.time()
            self.checks += 1
            ok, seen = await probe(upstream, check, tls, server_name)
            change = self.state.checked(i, ok, seen)
            if change is not None:
                self._apply(change)
            wait = check.interval * (1 + random.uniform(0, JITTER))
            await asyncio.sleep(max(0.0, began + wait - loop.time()))

    # -- applying a change

    def _apply(self, change: Transition) -> None:
        for member, server in zip(self.servers, self.state.servers, strict=True):
            member.up = server.available
        self._changed(all(s.available for s in self.state.servers))
        level = logging.WARNING if change.kind in ("ejected", "unhealthy") else logging.INFO
        log.log(level, "pool %s", change.text())
        if self.listener is not None:
            try:
                self.listener(change)
            except Exception:  # a listener's defect must not stop health keeping
                log.exception("health listener failed on %s", change)

    # -- reading

    def view(self) -> list[ServerView]:
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        checks = self.config.health is not None
        return [self._server_view(s, now, checks) for s in self.state.servers]

    @staticmethod
    def _server_view(s: ServerState, now: float, checks: bool) -> ServerView:
        return {
            "url": s.url,
            "state": s.state,
            "up": s.available,
            "failures": s.failures,
            "last_failure": s.last_failure or None,
            "ejections": s.ejections_total,
            "ejected_for": round(max(0.0, s.ejected_until - now), 1) if s.ejected else None,
            "last_check": s.last_check or None if checks else None,
        }

    def __repr__(self) -> str:
        return (f"<PoolHealth {self.config.name} up={self.state.available_count()}/"
                f"{len(self.servers)} checks={'on' if self.config.health else 'off'}>")
