"""Ring assignment: which ring of a route a request belongs to, and why.

Pure and deterministic: no asyncio, no I/O, no clock.  Everything that can be is worked
out once per config (``compile_route``); ``assign`` then only evaluates precompiled
predicates.  The decision is a value that travels upstream (``X-Ring``), into the access
log and into ``explain``.

Order, first hit wins: attribute rules ring by ring, then the default (last) ring.
(Overrides and sticky bucket percentages come with the assignment issue; they slot in
here without changing any caller.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from proxy.config import Attr, Ring, Route, Rule


class RequestView(Protocol):
    """What assignment may look at.  aiohttp's request satisfies it; so does a test's dict."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, str]: ...  # case-insensitive
    @property
    def cookies(self) -> Mapping[str, str]: ...
    @property
    def query(self) -> Mapping[str, str]: ...
    @property
    def remote(self) -> str | None: ...


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
    detail: str  # the rule group that matched, or the bucket
    revision: str

    def as_dict(self) -> dict[str, object]:
        return {
            "ring": self.ring,
            "reason": self.reason.value,
            "detail": self.detail,
            "revision": self.revision,
        }


Predicate = Callable[[RequestView], bool]


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    route: Route
    rules: tuple[tuple[Predicate, Decision], ...]  # (group predicate, decision) in ring order
    default: Decision


def compile_route(route: Route, revision: str) -> CompiledRoute:
    rules = []
    for index, ring in enumerate(route.rings):
        for group in ring.rules:
            detail = " and ".join(r.describe() for r in group)
            decision = Decision(ring.name, index, Reason.RULE, detail, revision)
            rules.append((_group(group), decision))
    last = len(route.rings) - 1
    default = Decision(route.rings[last].name, last, Reason.DEFAULT, "", revision)
    return CompiledRoute(route, tuple(rules), default)


def assign(compiled: CompiledRoute, request: RequestView) -> Decision:
    for predicate, decision in compiled.rules:
        if predicate(request):
            return decision
    return compiled.default


def ring_of(compiled: CompiledRoute, decision: Decision) -> Ring:
    return compiled.route.rings[decision.index]


# --------------------------------------------------------------------------- predicates


def _group(rules: tuple[Rule, ...]) -> Predicate:
    predicates = tuple(_rule(r) for r in rules)
    if len(predicates) == 1:
        return predicates[0]
    return lambda request: all(p(request) for p in predicates)


def _getter(rule: Rule) -> Callable[[RequestView], str | None]:
    name = rule.name
    if rule.attr is Attr.HEADER:
        return lambda request: request.headers.get(name)
    if rule.attr is Attr.COOKIE:
        return lambda request: request.cookies.get(name)
    if rule.attr is Attr.QUERY:
        return lambda request: request.query.get(name)
    if rule.attr is Attr.IP:
        return lambda request: request.remote
    if rule.attr is Attr.PATH:
        return lambda request: request.path
    return lambda request: request.method


def _rule(rule: Rule) -> Predicate:
    get = _getter(rule)
    if rule.op == "exists":
        return lambda request: get(request) is not None
    if rule.op == "equals":
        expected = rule.value or ""
        if rule.ignore_case:
            folded = expected.casefold()

            def equals_folded(request: RequestView) -> bool:
                got = get(request)
                return got is not None and got.casefold() == folded

            return equals_folded
        return lambda request: get(request) == expected
    raise ValueError(f"unsupported rule operator {rule.op!r}")  # config validation prevents it
