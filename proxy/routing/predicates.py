"""Rule predicates: a validated rule compiled into a test over a request.

Compiled once per config; per request a predicate reads one attribute and tests it.
Pure: no I/O.  Every operator is false when the attribute is missing, except
``exists: false``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from proxy.config.rules import (
    Attr,
    Choices,
    Network,
    Networks,
    Op,
    Pattern,
    Presence,
    Rule,
    Text,
    Version,
    parse_version,
)


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


Predicate = Callable[[RequestView], bool]
Getter = Callable[[RequestView], str | None]


def getter(attr: Attr, name: str) -> Getter:
    if attr is Attr.HEADER:
        return _header_getter(name)
    if attr is Attr.COOKIE:
        return lambda request: request.cookies.get(name)
    if attr is Attr.QUERY:
        return lambda request: request.query.get(name)
    if attr is Attr.IP:
        return lambda request: request.remote
    if attr is Attr.PATH:
        return lambda request: request.path
    return lambda request: request.method


def _header_getter(name: str) -> Getter:
    """A header's first value.  The data plane's ``Request`` keeps its headers by
    lower-cased bytes name (``by_name``): looked up there directly with the key made once,
    here, instead of through ``request.headers`` (two calls and an encode per request);
    any other view (aiohttp's request, a test's) goes through ``headers``."""
    try:
        key = name.lower().encode("latin-1")
    except UnicodeEncodeError:
        return lambda request: request.headers.get(name)

    def header(request: RequestView) -> str | None:
        try:
            by_name: dict[bytes, bytes] = request.by_name  # type: ignore[attr-defined]
        except AttributeError:
            return request.headers.get(name)
        value = by_name.get(key)
        return None if value is None else value.decode("latin-1")

    return header


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


# Builders of the check on a present value, one per operator but ``exists`` (which is
# about presence itself).  Each takes its operand out of the rule once; the closure it
# returns is what runs per request, so it reads only captured locals.
Test = Callable[[str], bool]
K = TypeVar("K", Text, Choices, Pattern, Networks, Version)


def _operand(rule: Rule, kind: type[K]) -> K:
    operand = rule.operand
    if not isinstance(operand, kind):  # validation pairs each operator with its operand
        raise TypeError(f"rule {rule.describe()}: operand {operand!r}, expected {kind.__name__}")
    return operand


def _equals(rule: Rule) -> Test:
    want = _operand(rule, Text).text
    return (lambda v: v.casefold() == want) if rule.ignore_case else (lambda v: v == want)


def _prefix(rule: Rule) -> Test:
    want = _operand(rule, Text).text
    if rule.ignore_case:
        return lambda v: v.casefold().startswith(want)
    return lambda v: v.startswith(want)


def _suffix(rule: Rule) -> Test:
    want = _operand(rule, Text).text
    if rule.ignore_case:
        return lambda v: v.casefold().endswith(want)
    return lambda v: v.endswith(want)


def _contains(rule: Rule) -> Test:
    want = _operand(rule, Text).text
    return (lambda v: want in v.casefold()) if rule.ignore_case else (lambda v: want in v)


def _in(rule: Rule) -> Test:
    want = _operand(rule, Choices).texts
    return (lambda v: v.casefold() in want) if rule.ignore_case else (lambda v: v in want)


def _not_in(rule: Rule) -> Test:
    want = _operand(rule, Choices).texts
    if rule.ignore_case:
        return lambda v: v.casefold() not in want
    return lambda v: v not in want


def _regex(rule: Rule) -> Test:
    search = _operand(rule, Pattern).regex.search
    return lambda v: search(v) is not None


def _cidr(rule: Rule) -> Test:
    return network_test(_operand(rule, Networks).networks)


Compare = Callable[[tuple[int, ...], tuple[int, ...]], bool]


def _version(compare: Compare) -> Callable[[Rule], Test]:
    def build(rule: Rule) -> Test:
        want = _operand(rule, Version).parts

        def version(v: str) -> bool:
            got = parse_version(v)
            return got is not None and compare(got, want)

        return version

    return build


TESTS: dict[Op, Callable[[Rule], Test]] = {
    Op.EQUALS: _equals,
    Op.PREFIX: _prefix,
    Op.SUFFIX: _suffix,
    Op.CONTAINS: _contains,
    Op.IN: _in,
    Op.NOT_IN: _not_in,
    Op.REGEX: _regex,
    Op.CIDR: _cidr,
    Op.VERSION_EQ: _version(lambda a, b: a == b),
    Op.VERSION_GT: _version(lambda a, b: a > b),
    Op.VERSION_GTE: _version(lambda a, b: a >= b),
    Op.VERSION_LT: _version(lambda a, b: a < b),
    Op.VERSION_LTE: _version(lambda a, b: a <= b),
}


def compile_rule(rule: Rule) -> Predicate:
    get = getter(rule.attr, rule.name)
    if isinstance(rule.operand, Presence):  # exists: true / false
        if rule.operand.present:
            return lambda request: get(request) is not None
        return lambda request: get(request) is None
    test = TESTS[rule.op](rule)

    def predicate(request: RequestView) -> bool:
        value = get(request)
        return value is not None and test(value)

    return predicate


def compile_group(rules: tuple[Rule, ...]) -> Predicate:
    predicates = tuple(compile_rule(r) for r in rules)
    if len(predicates) == 1:
        return predicates[0]
    return lambda request: all(p(request) for p in predicates)
