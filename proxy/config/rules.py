"""Attribute rules: what a rule may say and how it is validated.

A rule is ``{attr: ATTR, OP: VALUE}`` (plus ``ignore_case: true`` for string operators).
Validation happens once, at config load (regexes compiled, networks and versions parsed);
``proxy.routing.predicates`` turns a rule into a predicate over a request.  Pure: no I/O.

Every operator is false when the attribute is missing, except ``exists: false``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import StrEnum

from proxy.config.reader import Ctx, Section, kind
from proxy.config.values import TOKEN_RE


class Attr(StrEnum):
    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"
    IP = "ip"
    PATH = "path"
    METHOD = "method"


NAMED_ATTRS = (Attr.HEADER, Attr.COOKIE, Attr.QUERY)


class Op(StrEnum):
    """A rule's operator; the order is the one messages list them in."""

    EQUALS = "equals"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    IN = "in"
    NOT_IN = "not_in"
    REGEX = "regex"
    EXISTS = "exists"
    CIDR = "cidr"
    VERSION_EQ = "version_eq"
    VERSION_GT = "version_gt"
    VERSION_GTE = "version_gte"
    VERSION_LT = "version_lt"
    VERSION_LTE = "version_lte"


STRING_OPS = frozenset({Op.EQUALS, Op.PREFIX, Op.SUFFIX, Op.CONTAINS})
LIST_OPS = frozenset({Op.IN, Op.NOT_IN})
VERSION_OPS = frozenset({Op.VERSION_EQ, Op.VERSION_GT, Op.VERSION_GTE, Op.VERSION_LT,
                         Op.VERSION_LTE})
_CASE_OPS = STRING_OPS | LIST_OPS | {Op.REGEX}
_KNOWN = ", ".join(Op)
_VERSION_RE = re.compile(r"^[vV]?(\d+(?:\.\d+)*)$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# What a rule's value is compiled into at load, one kind per family of operators: the
# predicate builders in ``proxy.routing.predicates`` take it from here, never re-parse.
@dataclass(frozen=True, slots=True)
class Text:
    """equals, prefix, suffix, contains: the text, case-folded when ignore_case."""

    text: str


@dataclass(frozen=True, slots=True)
class Choices:
    """in, not_in: the set of texts, case-folded when ignore_case."""

    texts: frozenset[str]


@dataclass(frozen=True, slots=True)
class Pattern:
    """regex: compiled, with re.IGNORECASE when ignore_case."""

    regex: re.Pattern[str]


@dataclass(frozen=True, slots=True)
class Networks:
    """cidr: the parsed networks."""

    networks: tuple[Network, ...]


@dataclass(frozen=True, slots=True)
class Version:
    """version_*: the version as numbers, trailing zeros dropped."""

    parts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Presence:
    """exists: whether the attribute must be present (True) or absent (False)."""

    present: bool


Operand = Text | Choices | Pattern | Networks | Version | Presence
RuleValue = str | tuple[str, ...] | bool  # as written: a text, a list of texts, or a flag


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated condition, e.g. ``header:x-beta equals '1'``."""

    attr: Attr
    name: str  # header (lower-cased) / cookie / query name; "" for ip, path, method
    op: Op
    value: RuleValue
    # Compiled at load; left out of equality (the value already says the same).
    operand: Operand = field(compare=False, repr=False)
    ignore_case: bool = False

    def __repr__(self) -> str:
        # Ring fingerprints in the state file hash this text (proxy.rollout.plan): it stays
        # what it was when ``op`` was a plain string, or an upgrade would restart rollouts.
        return (f"Rule(attr={self.attr!r}, name={self.name!r}, op={str(self.op)!r}, "
                f"value={self.value!r}, ignore_case={self.ignore_case!r})")

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
    ops = [Op(k) for k in sec.data if k in _OP_NAMES]
    for k in sec.data:
        if k not in _OP_NAMES and k not in ("attr", "ignore_case"):
            ctx.err(sec.sub(k), f"unknown rule operator (known: {_KNOWN})")
            sec.seen.add(k)
    if len(ops) != 1:
        only_known = all(k in ("attr", "ignore_case") for k in sec.data)
        if len(ops) > 1 or only_known:
            ctx.err(path, f"a rule needs exactly one operator ({_KNOWN}), got {len(ops)}")
        return None
    op = ops[0]
    ignore_case = sec.flag("ignore_case", False)
    if ignore_case and op not in _CASE_OPS:
        ctx.err(sec.sub("ignore_case"), f"ignore_case does not apply to {op}")
    read = _read_value(ctx, sec, op, ignore_case)
    sec.close()
    if read is None:
        return None
    value, operand = read
    return Rule(attr, name, op, value, operand, ignore_case)


_OP_NAMES = frozenset(Op)


def _scalar(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)


def _read_value(
    ctx: Ctx, sec: Section, op: Op, ignore_case: bool
) -> tuple[RuleValue, Operand] | None:
    raw = sec.raw(op)
    where = sec.sub(op)
    if op is Op.EXISTS:
        if not isinstance(raw, bool):
            ctx.err(where, f"expected true or false, got {raw!r}")
            return None
        return raw, Presence(raw)
    if op in LIST_OPS or op is Op.CIDR:
        return _read_list(ctx, where, raw, op, ignore_case)
    text = _scalar(raw)
    if text is None:
        ctx.err(where, f"expected a string, got {kind(raw)}")
        return None
    if op is Op.REGEX:
        try:
            return text, Pattern(re.compile(text, re.IGNORECASE if ignore_case else 0))
        except re.error as exc:
            ctx.err(where, f"{text!r} is not a valid regular expression: {exc}")
            return None
    if op in VERSION_OPS:
        version = parse_version(text)
        if version is None:
            ctx.err(where, f"{text!r} is not a version; expected numbers and dots, e.g. 7.10.2")
            return None
        return text, Version(version)
    return text, Text(text.casefold() if ignore_case else text)


def _read_list(
    ctx: Ctx, where: str, raw: object, op: Op, ignore_case: bool
) -> tuple[RuleValue, Operand] | None:
    items = raw if isinstance(raw, list) else [raw]
    values = [_scalar(v) for v in items]
    if not items or any(v is None for v in values):
        ctx.err(where, f"expected a string or a list of strings, got {kind(raw)}")
        return None
    texts = tuple(v for v in values if v is not None)
    if op is Op.CIDR:
        networks = []
        for text in texts:
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                ctx.err(where, f"{text!r} is not a network; expected e.g. 10.0.0.0/8")
        return texts, Networks(tuple(networks))
    return texts, Choices(frozenset(t.casefold() for t in texts) if ignore_case
                          else frozenset(texts))
