"""Rule predicates: a validated rule compiled into a test over a request.

Compiled once per config; per request a predicate reads one attribute and tests it.
Pure: no I/O.  Every operator is false when the attribute is missing, except
``exists: false``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping
from typing import Protocol

from proxy.config.rules import VERSION_OPS, Attr, Network, Rule, parse_version


class RequestView(Protocol):
    """What assignment may look at.  aiohttp's request satisfies it, so does StaticRequest."""

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


_VERSION_COMPARE: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    "version_eq": lambda a, b: a == b,
    "version_gt": lambda a, b: a > b,
    "version_gte": lambda a, b: a >= b,
    "version_lt": lambda a, b: a < b,
    "version_lte": lambda a, b: a <= b,
}

Predicate = Callable[[RequestView], bool]
Getter = Callable[[RequestView], str | None]


def getter(attr: Attr, name: str) -> Getter:
    if attr is Attr.HEADER:
        return lambda request: request.headers.get(name)
    if attr is Attr.COOKIE:
        return lambda request: request.cookies.get(name)
    if attr is Attr.QUERY:
        return lambda request: request.query.get(name)
    if attr is Attr.IP:
        return lambda request: request.remote
    if attr is Attr.PATH:
        return lambda request: request.path
    return lambda request: request.method


@functools.lru_cache(maxsize=8192)  # clients repeat; parsing an address costs ~1 µs
def _client_ip(text: str) -> tuple[int, int] | None:
    """An address as (version, integer), IPv4-mapped IPv6 as IPv4; None if not an address."""
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return ip.version, int(ip)


def network_test(networks: tuple[Network, ...]) -> Callable[[str], bool]:
    """A membership test over integer (version, network, mask) triples."""
    triples = tuple((n.version, int(n.network_address), int(n.netmask)) for n in networks)

    def contains(value: str) -> bool:
        ip = _client_ip(value)
        if ip is None:
            return False
        version, number = ip
        return any(v == version and number & mask == net for v, net, mask in triples)

    return contains


def _test(rule: Rule) -> Callable[[str], bool]:
    """The check on a present value."""
    op, want = rule.op, rule.compiled
    fold = rule.ignore_case
    if op == "equals":
        return (lambda v: v.casefold() == want) if fold else (lambda v: v == want)
    if op == "prefix":
        return (lambda v: v.casefold().startswith(want)) if fold else (lambda v: v.startswith(want))
    if op == "suffix":
        return (lambda v: v.casefold().endswith(want)) if fold else (lambda v: v.endswith(want))
    if op == "contains":
        return (lambda v: want in v.casefold()) if fold else (lambda v: want in v)
    if op == "in":
        return (lambda v: v.casefold() in want) if fold else (lambda v: v in want)
    if op == "not_in":
        return (lambda v: v.casefold() not in want) if fold else (lambda v: v not in want)
    if op == "regex":
        search = want.search
        return lambda v: search(v) is not None
    if op == "cidr":
        return network_test(want)
    if op in VERSION_OPS:
        compare: Callable[[tuple[int, ...], tuple[int, ...]], bool] = _VERSION_COMPARE[op]

        def version(v: str) -> bool:
            got = parse_version(v)
            return got is not None and compare(got, want)

        return version
    raise ValueError(f"unsupported rule operator {op!r}")  # validation prevents it


def compile_rule(rule: Rule) -> Predicate:
    get = getter(rule.attr, rule.name)
    if rule.op == "exists":
        if rule.value:
            return lambda request: get(request) is not None
        return lambda request: get(request) is None
    test = _test(rule)

    def predicate(request: RequestView) -> bool:
        value = get(request)
        return value is not None and test(value)

    return predicate


def compile_group(rules: tuple[Rule, ...]) -> Predicate:
    predicates = tuple(compile_rule(r) for r in rules)
    if len(predicates) == 1:
        return predicates[0]
    return lambda request: all(p(request) for p in predicates)
