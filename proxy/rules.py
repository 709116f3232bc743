"""Attribute rules: what a rule may say, how it is validated, and how it is compiled.

A rule is ``{attr: ATTR, OP: VALUE}`` (plus ``ignore_case: true`` for string operators).
Validation happens once, at config load (regexes compiled, networks and versions parsed);
``compile_rule`` turns a rule into a predicate over a request view.  Pure: no I/O.

Every operator is false when the attribute is missing, except ``exists: false``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from proxy.reader import Ctx, Section, kind
from proxy.values import TOKEN_RE


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


class Attr(StrEnum):
    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"
    IP = "ip"
    PATH = "path"
    METHOD = "method"


NAMED_ATTRS = (Attr.HEADER, Attr.COOKIE, Attr.QUERY)
STRING_OPS = ("equals", "prefix", "suffix", "contains")
LIST_OPS = ("in", "not_in")
VERSION_OPS = ("version_eq", "version_gt", "version_gte", "version_lt", "version_lte")
OPS = (*STRING_OPS, *LIST_OPS, "regex", "exists", "cidr", *VERSION_OPS)
_CASE_OPS = (*STRING_OPS, *LIST_OPS, "regex")
_VERSION_RE = re.compile(r"^[vV]?(\d+(?:\.\d+)*)$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated condition, e.g. ``header:x-beta equals '1'``."""

    attr: Attr
    name: str  # header (lower-cased) / cookie / query name; "" for ip, path, method
    op: str
    value: Any = None  # str | tuple[str, ...] | bool, as written
    ignore_case: bool = False
    # Precompiled at load: a regex, networks, or a version tuple.
    compiled: Any = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> str:
        return f"{self.attr.value}:{self.name}" if self.name else self.attr.value

    def describe(self) -> str:
        value = self.value
        if isinstance(value, tuple):
            shown = "[" + ", ".join(repr(v) for v in value) + "]"
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        else:
            shown = repr(value)
        case = " (any case)" if self.ignore_case else ""
        return f"{self.source} {self.op} {shown}{case}"


def parse_version(text: str) -> tuple[int, ...] | None:
    """``"7.10.2"`` / ``"v7.10"`` -> ``(7, 10, 2)`` / ``(7, 10)``; anything else -> None."""
    m = _VERSION_RE.match(text.strip())
    if m is None:
        return None
    parts = [int(p) for p in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:  # 7.10 == 7.10.0
        parts.pop()
    return tuple(parts)


def parse_attr(text: str) -> tuple[Attr, str]:
    """``"header:X-Beta"`` -> (HEADER, "x-beta"); raises ValueError with what was expected."""
    kind_s, _, name = text.partition(":")
    try:
        attr = Attr(kind_s)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an attribute; expected header:NAME, cookie:NAME, query:NAME, "
            "ip, path or method"
        ) from None
    if attr in NAMED_ATTRS and not name:
        raise ValueError(f"{text!r} needs a name, e.g. {attr.value}:X-Beta")
    if attr not in NAMED_ATTRS and name:
        raise ValueError(f"{text!r}: {attr.value} takes no name")
    if attr is Attr.HEADER:
        if not TOKEN_RE.match(name):
            raise ValueError(f"{name!r} is not a valid header name")
        name = name.lower()
    return attr, name


def read_rule(ctx: Ctx, data: object, path: str) -> Rule | None:
    sec = Section(ctx, data, path)
    if not sec.ok:
        return None
    attr_s = sec.text("attr")
    try:
        attr, name = parse_attr(attr_s)
    except ValueError as exc:
        if attr_s:
            ctx.err(sec.sub("attr"), str(exc))
        attr, name = Attr.HEADER, ""
    ops = [k for k in sec.data if k in OPS]
    for k in sec.data:
        if k not in OPS and k not in ("attr", "ignore_case"):
            ctx.err(sec.sub(k), f"unknown rule operator (known: {', '.join(OPS)})")
            sec.seen.add(k)
    if len(ops) != 1:
        only_known = all(k in ("attr", "ignore_case") for k in sec.data)
        if len(ops) > 1 or only_known:
            ctx.err(path, f"a rule needs exactly one operator ({', '.join(OPS)}), got {len(ops)}")
        return None
    op = ops[0]
    ignore_case = sec.flag("ignore_case", False)
    if ignore_case and op not in _CASE_OPS:
        ctx.err(sec.sub("ignore_case"), f"ignore_case does not apply to {op}")
    value, compiled = _read_value(ctx, sec, op, attr, ignore_case)
    sec.close()
    if value is None:
        return None
    return Rule(attr, name, op, value, ignore_case, compiled)


def _scalar(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)


def _read_value(
    ctx: Ctx, sec: Section, op: str, attr: Attr, ignore_case: bool
) -> tuple[Any, Any]:
    raw = sec.raw(op)
    where = sec.sub(op)
    if op == "exists":
        if not isinstance(raw, bool):
            ctx.err(where, f"expected true or false, got {raw!r}")
            return None, None
        return raw, None
    if op in LIST_OPS or op == "cidr":
        items = raw if isinstance(raw, list) else [raw]
        values = [_scalar(v) for v in items]
        if not items or any(v is None for v in values):
            ctx.err(where, f"expected a string or a list of strings, got {kind(raw)}")
            return None, None
        texts = tuple(v for v in values if v is not None)
        if op == "cidr":
            networks = []
            for text in texts:
                try:
                    networks.append(ipaddress.ip_network(text, strict=False))
                except ValueError:
                    ctx.err(where, f"{text!r} is not a network; expected e.g. 10.0.0.0/8")
            return texts, tuple(networks)
        folded = frozenset(t.casefold() for t in texts) if ignore_case else frozenset(texts)
        return texts, folded
    scalar = _scalar(raw)
    if scalar is None:
        ctx.err(where, f"expected a string, got {kind(raw)}")
        return None, None
    text = scalar
    if op == "regex":
        try:
            return text, re.compile(text, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            ctx.err(where, f"{text!r} is not a valid regular expression: {exc}")
            return None, None
    if op in VERSION_OPS:
        version = parse_version(text)
        if version is None:
            ctx.err(where, f"{text!r} is not a version; expected numbers and dots, e.g. 7.10.2")
            return None, None
        return text, version
    return text, text.casefold() if ignore_case else text


# --------------------------------------------------------------------------- compiling

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
