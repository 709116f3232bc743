"""Ring assignment: which ring of a route a request belongs to, and why.

Pure and deterministic: no asyncio, no I/O, no clock (randomness for anonymous ids is
passed in).  Everything that can be is worked out once per config in ``compile_route``;
``assign`` then evaluates precompiled predicates and one hash.

For a request on a route, first hit wins:

1. override: a header/cookie naming a ring, honoured only with a matching secret or from
   an allowed network, and never to a rolled-back ring unless the config allows it;
2. attribute rules, ring by ring in order (any group matches, all rules of a group hold);
3. sticky buckets: ``bucket = mmh3(f"{salt}:{key}") % 10000``; percentage rings own
   consecutive bucket ranges in ring order, the earliest ring first;
4. the default (last) ring.

Bucket layout: ring ranges are laid out from bucket 0 in ring order, each as long as its
weight; the default (last) ring owns no range and takes the rest (``share_of``).  The
compiled route's layout is the one live truth of who owns how much: the rollout loop
replaces it, and everything else (metrics, the admin API) reads shares off it.

Raising a ring's weight only moves users toward earlier rings; lowering it releases that
ring's most recently added users (the top of its range).  Rings *after* it shift down by
the same amount: their shares stay exact, and the same number of their users move one ring
later (see README, "Bucket layout").
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

import mmh3

from proxy.config import Route
from proxy.config.assignment import KeySource, Override
from proxy.config.rules import Attr
from proxy.routing.predicates import (
    Predicate,
    RequestView,
    compile_group,
    getter,
    network_test,
)

BUCKETS = 10_000


class Reason(StrEnum):
    OVERRIDE = "override"
    RULE = "rule"
    BUCKET = "bucket"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Decision:
    ring: str
    index: int  # position of the ring in its route
    reason: Reason
    detail: str  # the rule group that matched, the bucket range, or the override source
    revision: str
    bucket: int | None = None
    key_source: str | None = None  # where the stickiness key came from
    new_id: str | None = None  # a generated anonymous id the response must set as a cookie

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "ring": self.ring,
            "reason": self.reason.value,
            "detail": self.detail,
            "bucket": self.bucket,
            "key_source": self.key_source,
            "revision": self.revision,
        }
        if self.new_id is not None:
            out["new_id"] = self.new_id
        return out


def bucket_of(salt: str, key: str) -> int:
    """A key's bucket (0..BUCKETS-1).  ``assign`` computes it inline: keep the two alike."""
    return mmh3.hash(f"{salt}:{key}", signed=False) % BUCKETS


@dataclass(frozen=True, slots=True)
class _Range:
    lo: int
    hi: int  # exclusive
    index: int
    ring: str


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    route: Route
    revision: str
    rules: tuple[tuple[Predicate, Decision], ...]  # (group predicate, decision) in ring order
    default: Decision
    weights: tuple[int | None, ...]  # basis points per ring (None: not a percentage ring)
    ranges: tuple[_Range, ...]
    key_getters: tuple[tuple[Callable[[RequestView], str | None], str], ...]
    salt: str
    anonymous: bool
    # Rolled-back rings: their rules are off and the override refuses them.
    blocked: frozenset[str] = frozenset()
    ring_index: dict[str, int] = field(default_factory=dict)
    override_ip: Callable[[str], bool] | None = None
    all_rules: tuple[tuple[Predicate, Decision], ...] = ()  # including rolled-back rings'.
    # Decisions are values: one per (bucket, key source), made once.  At most 10,000 per
    # source; a new CompiledRoute (new weights or config) starts an empty cache.
    _by_bucket: dict[tuple[int, str], Decision] = field(default_factory=dict, repr=False)

    def with_weights(
        self, weights: Iterable[int | None], blocked: Iterable[str] = ()
    ) -> CompiledRoute:
        """The same route with live weights (basis points, one per ring; the default ring's
        is not read: it takes the rest) and rolled-back rings."""
        weights = tuple(weights)
        if len(weights) != len(self.route.rings):
            raise ValueError(f"{len(weights)} weights for {len(self.route.rings)} rings")
        blocked = frozenset(blocked)
        rules = tuple((p, d) for p, d in self.all_rules if d.ring not in blocked)
        return replace(self, weights=weights, ranges=_layout(self.route, weights),
                       blocked=blocked, rules=rules, _by_bucket={})

    def range_of(self, ring: str) -> tuple[int, int] | None:
        for r in self.ranges:
            if r.ring == ring:
                return (r.lo, r.hi)
        return None

    def share_of(self, ring: str) -> int | None:
        """Buckets ``ring`` owns now; None for a ring with rules only (no weight)."""
        index = self.ring_index[ring]
        if index == len(self.route.rings) - 1:
            # The default ring takes the rest: every bucket no percentage ring owns.
            return BUCKETS - sum(r.hi - r.lo for r in self.ranges)
        if self.weights[index] is None:
            return None
        span = self.range_of(ring)
        return 0 if span is None else span[1] - span[0]


def _layout(route: Route, weights: tuple[int | None, ...]) -> tuple[_Range, ...]:
    ranges = []
    start = 0
    # The default (last) ring gets no range: whatever no range covers is its.
    pairs = zip(route.rings[:-1], weights[:-1], strict=True)
    for index, (ring, weight) in enumerate(pairs):
        if weight is None or weight <= 0:
            continue
        end = min(BUCKETS, start + weight)
        ranges.append(_Range(start, end, index, ring.name))
        start = end
    return tuple(ranges)


def _key_getter(source: KeySource) -> Callable[[RequestView], str | None]:
    return getter(source.attr, source.name)


def compile_route(route: Route, revision: str) -> CompiledRoute:
    rules = []
    for index, ring in enumerate(route.rings):
        for group in ring.rules:
            detail = " and ".join(r.describe() for r in group)
            decision = Decision(ring.name, index, Reason.RULE, detail, revision)
            rules.append((compile_group(group), decision))
    last = len(route.rings) - 1
    default = Decision(route.rings[last].name, last, Reason.DEFAULT, "", revision)
    weights = tuple(r.weight for r in route.rings)
    sticky = route.sticky
    return CompiledRoute(
        route=route,
        revision=revision,
        rules=tuple(rules),
        all_rules=tuple(rules),
        default=default,
        weights=weights,
        ranges=_layout(route, weights),
        key_getters=tuple((_key_getter(s), str(s)) for s in sticky.key) if sticky else (),
        salt=sticky.salt if sticky else route.name,
        anonymous=bool(sticky and sticky.anonymous),
        ring_index={r.name: i for i, r in enumerate(route.rings)},
        override_ip=(network_test(route.override.cidrs)
                     if route.override and route.override.cidrs else None),
    )


def assign(
    compiled: CompiledRoute,
    request: RequestView,
    make_id: Callable[[], str] | None = None,
) -> Decision:
    """The ring for ``request``.  ``make_id`` makes an anonymous id when the route sets one."""
    override = compiled.route.override
    if override is not None:
        decision = _override(compiled, override, request)
        if decision is not None:
            return decision
    for predicate, decision in compiled.rules:
        if predicate(request):
            return decision
    if not compiled.ranges:
        return compiled.default
    key = None
    source = None
    for get, name in compiled.key_getters:
        value = get(request)
        if value:
            key, source = value, name
            break
    if key is None:
        if not (compiled.anonymous and make_id is not None):
            return compiled.default
        new_id = make_id()
        return replace(_by_bucket(compiled, bucket_of(compiled.salt, new_id), "anonymous"),
                       new_id=new_id)
    assert source is not None
    # bucket_of and _by_bucket's cache hit, inline (two calls less per request).
    bucket = mmh3.hash(f"{compiled.salt}:{key}", signed=False) % BUCKETS
    cached = compiled._by_bucket.get((bucket, source))
    if cached is not None:
        return cached
    return _by_bucket(compiled, bucket, source)


def _by_bucket(compiled: CompiledRoute, bucket: int, source: str) -> Decision:
    cached = compiled._by_bucket.get((bucket, source))
    if cached is not None:
        return cached
    decision = _bucket_decision(compiled, bucket, source)
    compiled._by_bucket[(bucket, source)] = decision
    return decision


def _bucket_decision(compiled: CompiledRoute, bucket: int, source: str) -> Decision:
    for r in compiled.ranges:
        if r.lo <= bucket < r.hi:
            return Decision(r.ring, r.index, Reason.BUCKET, f"bucket {bucket} in [{r.lo}, {r.hi})",
                            compiled.revision, bucket, source)
    d = compiled.default
    return Decision(d.ring, d.index, Reason.DEFAULT, f"bucket {bucket} in no percentage ring",
                    compiled.revision, bucket, source)


def _override(compiled: CompiledRoute, override: Override, request: RequestView) -> Decision | None:
    name = None
    source = ""
    if override.header is not None:
        name = request.headers.get(override.header)
        source = f"header:{override.header}"
    if not name and override.cookie is not None:
        name = request.cookies.get(override.cookie)
        source = f"cookie:{override.cookie}"
    if not name:
        return None
    index = compiled.ring_index.get(name)
    if index is None:
        return None  # an unknown ring name is ignored, not an error page
    if name in compiled.blocked and not override.allow_rolled_back:
        return None
    if not _override_allowed(override, compiled.override_ip, request):
        return None
    return Decision(name, index, Reason.OVERRIDE, source, compiled.revision)


def _override_allowed(
    override: Override, compiled_ip: Callable[[str], bool] | None, request: RequestView
) -> bool:
    if override.secret is not None and override.secret_header is not None:
        given = request.headers.get(override.secret_header)
        if given is not None and hmac.compare_digest(given.encode(), override.secret.encode()):
            return True
    return bool(compiled_ip and request.remote and compiled_ip(request.remote))


@dataclass(frozen=True, slots=True)
class StaticRequest:
    """A request described by values, for ``explain`` and tests."""

    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    cookies: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    remote: str | None = None
    path: str = "/"
    method: str = "GET"

    @classmethod
    def build(
        cls,
        headers: Iterable[tuple[str, str]] = (),
        *,
        cookies: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        remote: str | None = None,
        path: str = "/",
        method: str = "GET",
    ) -> StaticRequest:
        """Header names in any case; the rest as the request would carry them."""
        return cls({k.lower(): v for k, v in headers}, dict(cookies or {}), dict(query or {}),
                   remote, path, method)


__all__ = [
    "BUCKETS",
    "Attr",
    "CompiledRoute",
    "Decision",
    "Reason",
    "RequestView",
    "StaticRequest",
    "assign",
    "bucket_of",
    "compile_route",
]
