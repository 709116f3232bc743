"""The live objects built from one Config: routing table, upstream pools, ring counters.

A Runtime is what the request handler reads through a single reference; building a new
one and swapping that reference is how a config change takes effect.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from proxy.config import Config, Ring, Route
from proxy.config.credentials import tls_stamp
from proxy.config.ringlimits import ring_max_body
from proxy.dataplane.ratelimit import TokenBucket
from proxy.dataplane.upstream import HeadLimits, UpstreamPool
from proxy.rollout.judge import Verdict
from proxy.rollout.state import Phase
from proxy.routing.table import RoutingTable


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

    def attempt(self, status: int, error: str, duration: float, now: float) -> None: ...


class RingRuntime:
    """A ring's policy in the form the request path wants, and its in-flight count."""

    __slots__ = (
        "bucket",
        "extra_headers",
        "head_lines",
        "idle_timeout",
        "inflight",
        "limit",
        "max_body",
        "name",
        "phase",
        "pool",
        "reason_header",
        "recorder",
        "replaced",
        "ring",
        "route",
        "settings",
        "starved",
        "strip_headers",
        "table",
        "timeout",
        "verdict",
    )

    def __init__(
        self, route: Route, ring: Ring, pool: UpstreamPool, table: RoutingTable,
        share: int = 1,
    ) -> None:
        self.route = route.name
        self.ring = ring
        # What, besides the ring itself, shapes this object; a reload that changes none of
        # it keeps the object (and its in-flight count and recorder).
        self.settings = (route.decision, route.override, route.rings[-1] is ring, route.max_body)
        self.name = ring.name
        self.pool = pool
        self.inflight = 0
        # Set by the metrics layer: an object with
        # record(status, error, duration_s, bytes_in, bytes_out, now) -> None, called once
        # per finished request on this ring.  None records nothing.
        self.recorder: Recorder | None = None
        # ``share``: how many worker processes enforce the ring's limits side by side
        # (``workers: N``); each takes its part of the host's limit, rounded up.
        cap = ring.policy.max_concurrency
        self.limit = math.ceil(cap / share) if cap is not None else None
        # Request body bytes (the route's and the ring's policy's, the smaller); more -> 413.
        self.max_body = ring_max_body(route.max_body, ring.policy.max_body)
        # policy.rate_limit: this process's token bucket (starts full); None: no limit.
        # With N workers each has 1/N of the rate and of the burst (rounded up).
        rate = ring.policy.rate_limit
        self.bucket = (TokenBucket(rate.requests_per_second / share,
                                   math.ceil(rate.burst / share), time.monotonic())
                       if rate is not None else None)
        self.timeout = ring.policy.timeout
        self.extra_headers = ring.policy.add_headers
        self.reason_header = route.decision.reason_upstream
        # The control loop's copies, for metrics: the rollout phase (None until it runs),
        # whether its analysis is starved, and its last verdict (None: not judged yet).
        self.phase: Phase | None = None
        self.starved = False
        self.verdict: Verdict | None = None
        # The override secret is for the proxy alone: never forwarded upstream.
        override = route.override
        self.strip_headers: tuple[str, ...] = (
            (override.secret_header,) if override and override.secret_header else ()
        )
        # The upstream head's fixed lines for this ring (X-Ring, then the added headers),
        # and the lower-cased names of client headers they replace or that are stripped.
        # The pool's credentials (auth) come last: built here, once per config, and the
        # client's headers of the same names are dropped (a client cannot inject one).
        credentials = [(c.header, c.value.reveal()) for c in pool.config.auth]
        self.head_lines = b"X-Ring: " + ring.name.encode() + b"\r\n" + b"".join(
            k.encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n"
            for k, v in (*self.extra_headers, *credentials)
        )
        self.replaced = frozenset(
            [k.lower().encode("latin-1") for k, _ in self.extra_headers]
            + [name.lower().encode("latin-1") for name in self.strip_headers]
            + [k.lower().encode("latin-1") for k, _ in credentials]
        )
        # Where ``weight`` is read from: the table this ring is served from.
        self.table = table
        self.idle_timeout = ring.policy.idle_timeout  # longest silence in a body

    @property
    def weight(self) -> float | None:
        """The ring's share of sticky buckets now, in percent; None for a rules-only ring.

        Read off the live bucket layout (which the rollout loop replaces), never copied.
        """
        share = self.table.routes[self.route].share_of(self.name)
        return None if share is None else share / 100

    def __repr__(self) -> str:
        limit = self.limit if self.limit is not None else "-"
        return (f"<Ring {self.route}/{self.name} pool={self.pool.config.name} "
                f"inflight={self.inflight}/{limit}>")


class Count:
    """A plain counter the data plane adds to (no lock: one event loop thread)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def __repr__(self) -> str:
        return f"<Count {self.value}>"


class Runtime:
    """Live objects for ``config``.  Given the ``previous`` runtime (a reload), pools whose
    settings did not change and rings whose settings did not change are carried over, so
    their connections, in-flight counts and recorders survive; ``retired`` lists the old
    pools the new config no longer uses (close them once their requests finish)."""

    def __init__(self, config: Config, previous: Runtime | None = None,
                 share: int = 1) -> None:
        self.config = config
        # The worker processes this one's ring limits are shared with (a reload keeps it).
        self.share: int = previous.share if previous is not None else share
        self.table = RoutingTable(config)
        # Requests that matched no route (answered 404), counted across reloads.
        self.unrouted: Count = previous.unrouted if previous is not None else Count()
        old_pools = previous.pools if previous is not None else {}
        self.pools: dict[str, UpstreamPool] = {}
        # Upstream response heads are held to the client heads' limits.
        head_limits = HeadLimits(config.limits.max_head_size, config.limits.max_headers)
        # A pool is reused only with the same settings and the same TLS files (a renewed
        # certificate at the same path gets a new pool, whose context loads it).
        old_stamps = previous.tls_stamps if previous is not None else {}
        self.tls_stamps: dict[str, tuple[tuple[str, int, int], ...]] = {
            pool.name: tls_stamp(pool.tls) for pool in config.pools}
        for pool in config.pools:
            old = old_pools.get(pool.name)
            reuse = (old is not None and old.config == pool
                     and old_stamps.get(pool.name) == self.tls_stamps[pool.name])
            self.pools[pool.name] = old if reuse and old is not None else (
                UpstreamPool(pool, head_limits)
            )
        self.retired = [p for name, p in old_pools.items() if self.pools.get(name) is not p]
        old_rings = {
            (r.route, r.name): r
            for rings in (previous.rings.values() if previous is not None else ())
            for r in rings
        }
        self.rings: dict[str, tuple[RingRuntime, ...]] = {}
        for route in config.routes:
            built = []
            for ring in route.rings:
                live = self.pools[ring.pool]
                fresh = RingRuntime(route, ring, live, self.table, self.share)
                old_ring = old_rings.get((route.name, ring.name))
                keep = (
                    old_ring is not None
                    and old_ring.ring == ring
                    and old_ring.pool is live
                    and old_ring.settings == fresh.settings
                )
                built.append(old_ring if keep and old_ring is not None else fresh)
            self.rings[route.name] = tuple(built)

    def take_over(self) -> None:
        """Rings carried over from the previous runtime read this one's table from now on.

        Call at the swap (the control loop does, once it has put the live weights in this
        table): until then they belong to the runtime that is still serving, and read its.
        """
        for rings in self.rings.values():
            for ring in rings:
                ring.table = self.table

    async def start(self) -> None:
        """Start the pools that are not running yet (carried-over ones already are)."""
        for pool in self.pools.values():
            if not pool.started:
                await pool.start()

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    def __repr__(self) -> str:
        return f"<Runtime revision={self.config.revision} pools={sorted(self.pools)}>"
