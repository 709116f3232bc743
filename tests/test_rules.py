"""Attribute rules, one table per operator, edge cases included.  Pure: no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config.reader import Ctx
from proxy.config.rules import Op, parse_version, read_rule
from proxy.errors import ConfigError
from proxy.routing.assign import StaticRequest
from proxy.routing.predicates import TESTS, compile_rule


def rule(spec: dict[str, Any]):
    ctx = Ctx({}, [])
    parsed = read_rule(ctx, spec, "r")
    if ctx.issues:
        raise ConfigError(ctx.issues)
    assert parsed is not None
    return compile_rule(parsed)


def req(**kw: Any) -> StaticRequest:
    headers = kw.pop("headers", {})
    return StaticRequest.build(headers.items(), **kw)


H = "header:X-V"


def hv(value: str | None) -> StaticRequest:
    return req(headers={} if value is None else {"X-V": value})


CASES: list[tuple[str, dict[str, Any], str | None, bool]] = [
    # equals
    ("equals", {"attr": H, "equals": "a"}, "a", True),
    ("equals", {"attr": H, "equals": "a"}, "A", False),
    ("equals", {"attr": H, "equals": "a", "ignore_case": True}, "A", True),
    ("equals", {"attr": H, "equals": "a"}, None, False),  # missing
    ("equals", {"attr": H, "equals": ""}, "", True),  # empty value equals empty
    ("equals", {"attr": H, "equals": 7}, "7", True),  # numbers compare as written
    # in / not_in
    ("in", {"attr": H, "in": ["a", "b"]}, "b", True),
    ("in", {"attr": H, "in": ["a", "b"]}, "c", False),
    ("in", {"attr": H, "in": ["a", "b"]}, None, False),
    ("in", {"attr": H, "in": ["A"], "ignore_case": True}, "a", True),
    ("in", {"attr": H, "in": "a"}, "a", True),  # a single value is a list of one
    ("not_in", {"attr": H, "not_in": ["a", "b"]}, "c", True),
    ("not_in", {"attr": H, "not_in": ["a", "b"]}, "a", False),
    ("not_in", {"attr": H, "not_in": ["a"]}, None, False),  # missing is not "not in"
    ("not_in", {"attr": H, "not_in": ["a"]}, "", True),
    ("not_in", {"attr": H, "not_in": ["A"], "ignore_case": True}, "a", False),
    # prefix / suffix / contains
    ("prefix", {"attr": H, "prefix": "ab"}, "abc", True),
    ("prefix", {"attr": H, "prefix": "ab"}, "xab", False),
    ("prefix", {"attr": H, "prefix": "AB", "ignore_case": True}, "abc", True),
    ("prefix", {"attr": H, "prefix": ""}, "", True),
    ("prefix", {"attr": H, "prefix": "a"}, None, False),
    ("suffix", {"attr": H, "suffix": "bc"}, "abc", True),
    ("suffix", {"attr": H, "suffix": "bc"}, "bca", False),
    ("suffix", {"attr": H, "suffix": "BC", "ignore_case": True}, "abc", True),
    ("suffix", {"attr": H, "suffix": "c"}, None, False),
    ("contains", {"attr": H, "contains": "b"}, "abc", True),
    ("contains", {"attr": H, "contains": "x"}, "abc", False),
    ("contains", {"attr": H, "contains": "B", "ignore_case": True}, "abc", True),
    ("contains", {"attr": H, "contains": "b"}, None, False),
    # regex (unanchored search; anchor with ^ $)
    ("regex", {"attr": H, "regex": r"^beta-\d+$"}, "beta-12", True),
    ("regex", {"attr": H, "regex": r"^beta-\d+$"}, "beta-12x", False),
    ("regex", {"attr": H, "regex": r"\d"}, "a1b", True),
    ("regex", {"attr": H, "regex": "^BETA", "ignore_case": True}, "beta", True),
    ("regex", {"attr": H, "regex": "^$"}, "", True),
    ("regex", {"attr": H, "regex": "."}, None, False),
    # exists
    ("exists", {"attr": H, "exists": True}, "", True),  # an empty header still exists
    ("exists", {"attr": H, "exists": True}, None, False),
    ("exists", {"attr": H, "exists": False}, None, True),
    ("exists", {"attr": H, "exists": False}, "x", False),
    # cidr on a header value
    ("cidr", {"attr": H, "cidr": ["10.0.0.0/8"]}, "10.1.2.3", True),
    ("cidr", {"attr": H, "cidr": ["10.0.0.0/8"]}, "11.1.2.3", False),
    ("cidr", {"attr": H, "cidr": ["10.0.0.0/8"]}, "not-an-ip", False),
    ("cidr", {"attr": H, "cidr": ["10.0.0.0/8"]}, "", False),
    ("cidr", {"attr": H, "cidr": ["10.0.0.0/8"]}, None, False),
    ("cidr", {"attr": H, "cidr": ["fd00::/8"]}, "fd12::1", True),
    ("cidr", {"attr": H, "cidr": ["10.0.0.0/8"]}, "::ffff:10.0.0.1", True),  # v4-mapped
    # versions
    ("version_gte", {"attr": H, "version_gte": "7.10"}, "7.10.0", True),
    ("version_gte", {"attr": H, "version_gte": "7.10"}, "7.9.99", False),
    ("version_gte", {"attr": H, "version_gte": "7.10"}, "7.10.2", True),
    ("version_gte", {"attr": H, "version_gte": "7.10"}, "v7.11", True),
    ("version_gte", {"attr": H, "version_gte": "7.10"}, "7.10-beta", False),  # malformed
    ("version_gte", {"attr": H, "version_gte": "7.10"}, "", False),
    ("version_gte", {"attr": H, "version_gte": "7.10"}, "7..10", False),
    ("version_gte", {"attr": H, "version_gte": "7.10"}, None, False),
    ("version_gt", {"attr": H, "version_gt": "7.10"}, "7.10.0", False),
    ("version_gt", {"attr": H, "version_gt": "7.10"}, "7.10.1", True),
    ("version_lt", {"attr": H, "version_lt": "7.10.2"}, "7.10.1", True),
    ("version_lt", {"attr": H, "version_lt": "7.10.2"}, "7.10.2", False),
    ("version_lt", {"attr": H, "version_lt": "7.10.2"}, "7.2.10", True),  # numeric, not text
    ("version_lte", {"attr": H, "version_lte": "7.10.2"}, "7.10.2", True),
    ("version_lte", {"attr": H, "version_lte": "7.10.2"}, "7.10.3", False),
    ("version_eq", {"attr": H, "version_eq": "7.10"}, "7.10.0.0", True),
    ("version_eq", {"attr": H, "version_eq": "7.10"}, "7.1", False),
]


@pytest.mark.parametrize(
    ("op", "spec", "value", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_operator_on_a_header(op: str, spec: dict[str, Any], value: str | None,
                              expected: bool) -> None:
    assert rule(spec)(hv(value)) is expected


def test_every_operator_has_cases_and_a_builder() -> None:
    assert {c[0] for c in CASES} == set(Op)
    assert set(TESTS) == set(Op) - {Op.EXISTS}  # exists is about presence, not a value


def test_unknown_operators_list_the_known_ones_in_order() -> None:
    with pytest.raises(ConfigError) as info:
        rule({"attr": H, "equal": "a"})
    known = ("equals, prefix, suffix, contains, in, not_in, regex, exists, cidr, version_eq, "
             "version_gt, version_gte, version_lt, version_lte")
    assert f"r.equal: unknown rule operator (known: {known})" in str(info.value)


@pytest.mark.parametrize(
    ("spec", "described"),
    [
        ({"attr": H, "equals": "a", "ignore_case": True}, "header:x-v equals 'a' (any case)"),
        ({"attr": H, "in": ["a", 7]}, "header:x-v in ['a', '7']"),
        ({"attr": "ip", "cidr": "10.0.0.0/8"}, "ip cidr ['10.0.0.0/8']"),
        ({"attr": "query:b", "exists": False}, "query:b exists false"),
        ({"attr": "path", "version_gte": "v7.10"}, "path version_gte 'v7.10'"),
    ],
)
def test_a_rule_describes_itself_as_written(spec: dict[str, Any], described: str) -> None:
    ctx = Ctx({}, [])
    parsed = read_rule(ctx, spec, "r")
    assert parsed is not None and not ctx.issues
    assert parsed.describe() == described


@pytest.mark.parametrize(
    ("spec", "request_kw", "expected"),
    [
        ({"attr": "ip", "cidr": ["10.0.0.0/8", "fd00::/8"]}, {"remote": "10.9.9.9"}, True),
        ({"attr": "ip", "cidr": ["10.0.0.0/8", "fd00::/8"]}, {"remote": "fd00::1"}, True),
        ({"attr": "ip", "cidr": ["10.0.0.0/8", "fd00::/8"]}, {"remote": "::1"}, False),
        ({"attr": "ip", "cidr": ["::1/128"]}, {"remote": "::1"}, True),  # IPv6 client
        ({"attr": "ip", "cidr": ["10.0.0.0/8"]}, {"remote": None}, False),
        ({"attr": "ip", "equals": "::1"}, {"remote": "::1"}, True),
        ({"attr": "cookie:plan", "in": ["pro", "team"]}, {"cookies": {"plan": "team"}}, True),
        ({"attr": "cookie:plan", "in": ["pro"]}, {"cookies": {"Plan": "pro"}}, False),
        ({"attr": "query:beta", "exists": True}, {"query": {"beta": ""}}, True),
        ({"attr": "path", "prefix": "/v2/"}, {"path": "/v2/items"}, True),
        ({"attr": "method", "in": ["POST", "PUT"]}, {"method": "PUT"}, True),
        ({"attr": "method", "equals": "get", "ignore_case": True}, {"method": "GET"}, True),
        ({"attr": "header:X-App", "equals": "1"}, {"headers": {"x-app": "1"}}, True),
    ],
)
def test_sources(spec: dict[str, Any], request_kw: dict[str, Any], expected: bool) -> None:
    assert rule(spec)(req(**request_kw)) is expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"attr": H, "regex": "(unclosed"}, "is not a valid regular expression"),
        ({"attr": H, "version_gte": "seven"}, "is not a version"),
        ({"attr": H, "cidr": ["10.0.0.0/33"]}, "is not a network"),
        ({"attr": H, "in": []}, "expected a string or a list of strings"),
        ({"attr": H, "in": [["a"]]}, "expected a string or a list of strings"),
        ({"attr": H, "version_gte": "1", "ignore_case": True}, "ignore_case does not apply"),
        ({"attr": H, "exists": "yes"}, "expected true or false"),
    ],
)
def test_invalid_rules_are_config_errors_with_their_path(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        rule(spec)
    assert str(info.value).startswith("r.")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("7.10.2", (7, 10, 2)), ("v7.10", (7, 10)), ("7.10.0", (7, 10)), ("0", (0,)),
     ("7.10.2-rc1", None), ("", None), ("7.", None), ("x", None), (" 1.2 ", (1, 2))],
)
def test_parse_version(text: str, parsed: tuple[int, ...] | None) -> None:
    assert parse_version(text) == parsed


def test_a_rules_repr_is_stable_for_the_state_files_fingerprints() -> None:
    # Ring fingerprints saved in the state file hash repr(rule): a change here would start
    # every rollout with rules over at the next upgrade.  This is the text from before Op.
    ctx = Ctx({}, [])
    parsed = read_rule(ctx, {"attr": "header:X-Beta", "in": ["a", 7], "ignore_case": True}, "r")
    assert repr(parsed) == ("Rule(attr=<Attr.HEADER: 'header'>, name='x-beta', op='in', "
                            "value=('a', '7'), ignore_case=True)")
