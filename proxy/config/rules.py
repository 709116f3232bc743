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
from typing import Any

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
