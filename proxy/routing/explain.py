"""Explain an assignment: which ring a described request gets on a route, and why.  Pure.

One answer for ``ringproxy explain`` (a route compiled from the config file, at its
configured weights) and ``GET /api/explain`` (the live routing table): the decision, the
bucket ranges when a bucket decided, and a note when the request had no stickiness key.
"""

from __future__ import annotations

from proxy.routing.assign import CompiledRoute, Reason, assign
from proxy.routing.predicates import RequestView


def explain(compiled: CompiledRoute, request: RequestView) -> dict[str, object]:
    """The decision for ``request`` as JSON-ready data (``route`` first, then the decision).

    No anonymous id is made (``assign`` gets no ``make_id``): a keyless request on a route
    that would set one is told so in ``note`` instead of being given a random answer.
    """
    route = compiled.route
    decision = assign(compiled, request)
    out: dict[str, object] = {"route": route.name, **decision.as_dict()}
    if decision.bucket is not None:
        out["ranges"] = {r.ring: [r.lo, r.hi] for r in compiled.ranges}
    sticky = route.sticky
    no_key = decision.reason is Reason.DEFAULT and decision.key_source is None
    if no_key and sticky is not None and compiled.ranges:
        keys = ", ".join(map(str, sticky.key))
        if sticky.anonymous is not None:
            out["note"] = (f"no stickiness key ({keys}); the proxy would set cookie "
                           f"{sticky.anonymous.name!r} to a new random id and assign by its "
                           "bucket")
        else:
            out["note"] = f"no stickiness key ({keys}): the default ring"
    return out
