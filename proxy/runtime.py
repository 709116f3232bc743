"""The live objects built from one Config: routing table, upstream pools, ring counters.

A Runtime is what the request handler reads through a single reference; building a new
one and swapping that reference is how a config change takes effect.
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

from proxy.config import Config, Ring, Route
from proxy.pool import UpstreamPool
from proxy.table import RoutingTable


class Recorder(Protocol):
    def record(
        self,
        status: int,
        error: str,
        duration: float,
        bytes_in: int,
        bytes_out: int,
        now: float,
    ) -> None: ...


class RingRuntime:
    """A ring's policy in the form the request path wants, and its in-flight count."""

    __slots__ = (
        "client_timeout",
        "extra_headers",
        "inflight",
        "limit",
        "name",
        "pool",
        "reason_header",
        "recorder",
        "ring",
        "route",
        "strip_headers",
        "timeout",
        "weight",
    )

    def __init__(self, route: Route, ring: Ring, pool: UpstreamPool) -> None:
        self.route = route.name
        self.ring = ring
        self.name = ring.name
        self.pool = pool
        self.inflight = 0
        # Set by the metrics layer: an object with
        # record(status, error, duration_s, bytes_in, bytes_out, now) -> None, called once
        # per finished request on this ring.  None records nothing.
        self.recorder: Recorder | None = None
        self.limit = ring.policy.max_concurrency
        self.timeout = ring.policy.timeout
        self.extra_headers = ring.policy.add_headers
        self.reason_header = route.decision.reason_upstream
        # The override secret is for the proxy alone: never forwarded upstream.
        override = route.override
        self.strip_headers: tuple[str, ...] = (
            (override.secret_header,) if override and override.secret_header else ()
        )
        # The ring's share of sticky buckets in percent (the default ring: what is left);
        # None for a ring that only has rules.  The rollout loop changes it at run time.
        self.weight: float | None = None
        if ring.weight is not None:
            self.weight = ring.weight / 100
        elif ring is route.rings[-1]:
            self.weight = (10_000 - sum(r.weight or 0 for r in route.rings)) / 100
        self.client_timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=pool.config.connect_timeout,
            sock_read=ring.policy.idle_timeout,
        )

    def __repr__(self) -> str:
        limit = self.limit if self.limit is not None else "-"
        return (f"<Ring {self.route}/{self.name} pool={self.pool.config.name} "
                f"inflight={self.inflight}/{limit}>")


class Runtime:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.table = RoutingTable(config)
        self.pools = {p.name: UpstreamPool(p) for p in config.pools}
        self.rings: dict[str, tuple[RingRuntime, ...]] = {
            route.name: tuple(
                RingRuntime(route, ring, self.pools[ring.pool]) for ring in route.rings
            )
            for route in config.routes
        }

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.start()

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    def __repr__(self) -> str:
        return f"<Runtime revision={self.config.revision} pools={sorted(self.pools)}>"
