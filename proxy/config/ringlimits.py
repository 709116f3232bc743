"""A ring's limits beyond concurrency: ``policy.rate_limit`` and ``policy.max_body``.

``rate_limit: {requests_per_second, burst}`` is a token bucket per ring per process
(``proxy.dataplane.ratelimit``): with N processes (``workers``) or N hosts the ring takes
up to N times the rate.  ``burst`` (default: the rate rounded up, at least 1) is how many
requests may come at once after a quiet spell.  Over it the proxy answers 429 with
``Retry-After`` itself: the proxy's own refusal, never an error of the ring's version.

``max_body`` is the ring's request body limit (``1MiB``, ``65536``); the route's
``max_body`` still holds, so the smaller of the two applies.  Both are read in the route's
``policy`` too, as defaults for its rings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from proxy.config.limits import MAX_BODY_RANGE, read_max_body
from proxy.config.reader import Ctx, Section

MAX_RATE = 10_000_000.0  # requests per second: above this a limit limits nothing
MAX_BURST = 10_000_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_second: float
    burst: int  # tokens the bucket holds: requests that may come at once


def read_rate_limit(ctx: Ctx, sec: Section, base: RateLimit | None) -> RateLimit | None:
    """``rate_limit`` of a policy section; ``base`` (the route's) when absent."""
    if not sec.has("rate_limit"):
        sec.seen.add("rate_limit")
        return base
    data = sec.raw("rate_limit")
    path = sec.sub("rate_limit")
    rsec = Section(ctx, data, path)
    rate = rsec.raw("requests_per_second")
    burst = rsec.integer("burst", None, 1, MAX_BURST)
    rsec.close()
    if not rsec.ok or rate is None:
        return base
    if isinstance(rate, bool) or not isinstance(rate, int | float) or \
            not 0 < rate <= MAX_RATE or math.isnan(rate):
        ctx.err(rsec.sub("requests_per_second"), f"{rate!r} is not a rate; expected a number "
                f"above 0 and at most {MAX_RATE:g} (e.g. 200, or 0.5 for one request "
                "every 2 s)")
        return base
    return RateLimit(float(rate), burst if burst is not None else max(1, math.ceil(rate)))


def read_policy_max_body(ctx: Ctx, sec: Section, base: int | None) -> int | None:
    """A policy's ``max_body`` (as the route's: a size, never 0); ``base`` when absent."""
    if not sec.has("max_body"):
        sec.seen.add("max_body")
        return base
    limit = read_max_body(ctx, sec)
    return base if limit is None else limit


def ring_max_body(route_limit: int | None, ring_limit: int | None) -> int | None:
    """The limit that holds: the smaller of the route's and the ring's (None: none)."""
    if route_limit is None:
        return ring_limit
    return route_limit if ring_limit is None else min(route_limit, ring_limit)


__all__ = ["MAX_BODY_RANGE", "RateLimit", "read_policy_max_body", "read_rate_limit",
           "ring_max_body"]
