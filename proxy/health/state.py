"""A pool's server health, decided without I/O or a clock (``now`` is passed in).

Two sources take a server out of its pool's rotation:

- **Active checks** (``health:``): ``unhealthy_threshold`` failed checks in a row mark it
  unhealthy, ``healthy_threshold`` passed checks in a row healthy again (HAProxy's
  ``fall``/``rise``).  A server starts healthy.
- **Passive outlier ejection** (``outlier:``): ``consecutive_failures`` failed attempts of
  real traffic in a row eject it for ``base_ejection x n``, n the number of ejections in a
  row, capped at ``max_ejection`` (Envoy's outlier detection: "the ejection time is equal
  to base_ejection_time multiplied by the number of times the host has been ejected in a
  row").  n comes down by one for every ``base_ejection`` spent back in without a new
  ejection, as Envoy's multiplier decays.  At most ``max_ejection_percent`` of the pool's
  servers, rounded down, are ejected at once: a one-server pool is never ejected (its
  failures stay 502s, the ring's own errors), a two-server pool at 50 % loses at most one.

The caller (``proxy.health.monitor``) applies what these return: it flips the server's
``up`` flag that ``UpstreamPool.pick`` reads, arms the readmission timer, publishes the
events.  A ``Transition`` says what changed and whether it is one host's fault (the
pool's other servers healthy) or the pool's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy.config.health import HealthCheck, Outlier

EJECTED, READMITTED, UNHEALTHY, HEALTHY = "ejected", "readmitted", "unhealthy", "healthy"


@dataclass(frozen=True, slots=True)
class Transition:
    """A server went out of its pool's rotation, or came back."""

    kind: str  # ejected | readmitted | unhealthy | healthy
    pool: str
    server: str
    detail: str
    duration: float | None = None  # an ejection's length
    available: int = 0  # the pool's servers in rotation after the change
    servers: int = 0

    @property
    def one_host(self) -> bool:
        """The server went out while every other server of its pool is in rotation: one
        host's fault, not the version's."""
        return (self.kind in (EJECTED, UNHEALTHY) and self.servers > 1
                and self.available == self.servers - 1)

    def text(self) -> str:
        where = f"{self.pool}: {self.server}"
        scope = (f"; one host: the pool's {self.available} other server"
                 f"{'s are' if self.available != 1 else ' is'} healthy" if self.one_host
                 else f"; {self.available} of {self.servers} servers in rotation")
        return f"{where} {self.kind}: {self.detail}{scope}"


class ServerState:
    """One server's health: its active check streak and passive failure count."""

    __slots__ = (
        "check_failures", "check_ok", "check_successes", "ejected", "ejected_until",
        "ejections", "ejections_total", "failures", "index", "last_check", "last_failure",
        "readmitted_at", "url",
    )

    def __init__(self, url: str, index: int) -> None:
        self.url = url
        self.index = index
        self.failures = 0  # failed attempts in a row (passive)
        self.last_failure = ""  # the kind of the last failed attempt
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0  # the multiplier: ejections in a row (decays while back in)
        self.ejections_total = 0
        self.readmitted_at = 0.0
        self.check_ok = True  # healthy by the active checks (starts healthy)
        self.check_successes = 0
        self.check_failures = 0
        self.last_check = ""  # what the last check saw ("200", "timeout", ...)

    @property
    def available(self) -> bool:
        return self.check_ok and not self.ejected

    @property
    def state(self) -> str:
        """healthy | ejected | unhealthy (an unhealthy server may be ejected too)."""
        if not self.check_ok:
            return UNHEALTHY
        return EJECTED if self.ejected else HEALTHY

    def __repr__(self) -> str:
        return f"<ServerState {self.url} {self.state} failures={self.failures}>"


class PoolHealthState:
    """Every server of one pool; the methods return what changed (or None)."""

    def __init__(self, pool: str, urls: list[str], outlier: Outlier | None,
                 check: HealthCheck | None) -> None:
        self.pool = pool
        self.outlier = outlier
        self.check = check
        self.servers = [ServerState(url, i) for i, url in enumerate(urls)]
        pct = outlier.max_ejection_percent if outlier is not None else 0
        # Rounded down: never more than the share, so a one-server pool is never ejected.
        self.max_ejected = math.floor(len(urls) * pct / 100 + 1e-9)

    # -- passive

    def failure(self, index: int, kind: str, now: float) -> Transition | None:
        """A real attempt on the server failed (connect, reset, timeout, a 5xx if on_5xx)."""
        server = self.servers[index]
        server.failures += 1
        server.last_failure = kind
        outlier = self.outlier
        if outlier is None or server.ejected or server.failures < outlier.consecutive_failures:
            return None
        if self.ejected_count() >= self.max_ejected:
            return None  # the cap: this server's failures stay visible as errors
        if server.ejections and server.readmitted_at:
            # Time back in without an ejection pays the multiplier down.
            calm = int((now - server.readmitted_at) / outlier.base_ejection)
            server.ejections = max(0, server.ejections - calm)
        server.ejections += 1
        server.ejections_total += 1
        duration = min(outlier.base_ejection * server.ejections, outlier.max_ejection)
        server.ejected = True
        server.ejected_until = now + duration
        detail = (f"ejected for {duration:g}s after {server.failures} failures in a row "
                  f"(last: {kind}; ejection {server.ejections} in a row)")
        server.failures = 0
        return self._transition(EJECTED, server, detail, duration)

    def success(self, index: int) -> None:
        self.servers[index].failures = 0

    def readmit(self, index: int, now: float) -> Transition | None:
        """The server's ejection time is over: back in rotation (if its checks allow)."""
        server = self.servers[index]
        if not server.ejected:
            return None
        server.ejected = False
        server.readmitted_at = now
        server.failures = 0
        return self._transition(READMITTED, server, "ejection time over")

    # -- active

    def checked(self, index: int, ok: bool, seen: str) -> Transition | None:
        """An active check's result (``seen``: the status, or what went wrong)."""
        check = self.check
        server = self.servers[index]
        server.last_check = seen
        if check is None:
            return None
        if ok:
            server.check_successes += 1
            server.check_failures = 0
            if not server.check_ok and server.check_successes >= check.healthy_threshold:
                server.check_ok = True
                return self._transition(HEALTHY, server, f"{server.check_successes} checks "
                                        f"passed in a row ({check.path}: {seen})")
        else:
            server.check_failures += 1
            server.check_successes = 0
            if server.check_ok and server.check_failures >= check.unhealthy_threshold:
                server.check_ok = False
                return self._transition(UNHEALTHY, server, f"{server.check_failures} checks "
                                        f"failed in a row ({check.path}: {seen})")
        return None

    # -- reading

    def ejected_count(self) -> int:
        return sum(1 for s in self.servers if s.ejected)

    def available_count(self) -> int:
        return sum(1 for s in self.servers if s.available)

    def _transition(self, kind: str, server: ServerState, detail: str,
                    duration: float | None = None) -> Transition:
        return Transition(kind, self.pool, server.url, detail, duration,
                          self.available_count(), len(self.servers))

    def __repr__(self) -> str:
        return (f"<PoolHealthState {self.pool} available={self.available_count()}/"
                f"{len(self.servers)}>")
