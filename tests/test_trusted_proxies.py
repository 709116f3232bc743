"""trusted_proxies: the client address from X-Forwarded-For/Forwarded, as a pure function."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.config import parse_config
from proxy.config.proxies import TrustedProxies, forwarded_for, parse_address
from proxy.errors import ConfigError

LB = TrustedProxies((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")))


@pytest.mark.parametrize(("raw", "expected"), [
    ("203.0.113.9", "203.0.113.9"),
    (" 203.0.113.9 ", "203.0.113.9"),
    ("203.0.113.9:4711", "203.0.113.9"),
    ("2001:db8::1", "2001:db8::1"),
    ('"[2001:db8::1]:4711"', "2001:db8::1"),
    ("unknown", None),
    ("_hidden", None),
    ("", None),
])
def test_parse_address(raw: str, expected: str | None) -> None:
    parsed = parse_address(raw)
    assert (None if parsed is None else str(parsed)) == expected


def test_forwarded_for_values() -> None:
    value = 'for=192.0.2.60;proto=http;by=203.0.113.43, proto=https, For="[2001:db8::1]:80"'
    assert forwarded_for(value) == ["192.0.2.60", "", "[2001:db8::1]:80"]


def test_trusts_the_networks_only() -> None:
    assert LB.trusts("10.1.2.3") and LB.trusts("fd00::5") and LB.trusts("::ffff:10.0.0.1")
    assert not LB.trusts("203.0.113.9") and not LB.trusts("") and not LB.trusts("junk")


@pytest.mark.parametrize(("xff", "client"), [
    (b"203.0.113.9", "203.0.113.9"),
    # the right-most untrusted entry: what the client wrote on the left is not believed
    (b"198.51.100.1, 203.0.113.9", "203.0.113.9"),
    (b"198.51.100.1, 203.0.113.9, 10.0.0.7", "203.0.113.9"),
    (b"203.0.113.9,10.0.0.7, fd00::1", "203.0.113.9"),
    # every entry trusted: the left-most
    (b"10.0.0.8, 10.0.0.7", "10.0.0.8"),
    # garbage ends the walk at the last address accepted
    (b"203.0.113.9, garbage, 10.0.0.7", "10.0.0.7"),
    (b"garbage", "10.0.0.1"),
    (b"203.0.113.9:5555", "203.0.113.9"),
])
def test_x_forwarded_for_right_most_untrusted(xff: bytes, client: str) -> None:
    assert LB.client("10.0.0.1", xff, None) == client


def test_no_header_leaves_the_peer() -> None:
    assert LB.client("10.0.0.1", None, None) == "10.0.0.1"
    assert LB.client("10.0.0.1", b"", None) == "10.0.0.1"


def test_forwarded_when_there_is_no_x_forwarded_for() -> None:
    forwarded = b'for=198.51.100.1, for="[2001:db8::7]:443";proto=https, for=10.0.0.3'
    assert LB.client("10.0.0.1", None, forwarded) == "2001:db8::7"
    # X-Forwarded-For wins when both came
    assert LB.client("10.0.0.1", b"203.0.113.9", forwarded) == "203.0.113.9"
    assert LB.client("10.0.0.1", None, b"for=unknown") == "10.0.0.1"


@pytest.mark.parametrize(("hops", "client"), [
    (1, "10.0.0.7"),  # the entry the peer appended, trusted or not
    (2, "203.0.113.9"),
    (3, "198.51.100.1"),
    (9, "198.51.100.1"),  # fewer entries than hops: the left-most
])
def test_hops_count_from_the_right(hops: int, client: str) -> None:
    proxies = TrustedProxies(LB.networks, hops)
    assert proxies.client("10.0.0.1", b"198.51.100.1, 203.0.113.9, 10.0.0.7", None) == client


BASE = """
pools: {app: {servers: ["http://127.0.0.1:1"]}}
routes: [{name: api, rings: [{name: main, pool: app}]}]
"""


def test_config_keys_and_defaults() -> None:
    config = parse_config(BASE)
    assert config.trusted_proxies == TrustedProxies() and not config.trusted_proxies.networks
    config = parse_config("trusted_proxies: [10.0.0.0/8, 'fd00::/8', 192.0.2.1]\n"
                          "trusted_hops: 2\n" + BASE)
    assert [str(n) for n in config.trusted_proxies.networks] == [
        "10.0.0.0/8", "fd00::/8", "192.0.2.1/32"]
    assert config.trusted_proxies.hops == 2


@pytest.mark.parametrize(("text", "message"), [
    ("trusted_proxies: 10.0.0.0/8\n", "trusted_proxies: expected a list of networks"),
    ("trusted_proxies: [10.0.0.0/8, nope]\n", "trusted_proxies[1]: 'nope' is not a network"),
    ("trusted_hops: 1\n", "trusted_hops needs trusted_proxies"),
    ("trusted_proxies: [10.0.0.0/8]\ntrusted_hops: -1\n", "trusted_hops"),
])
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text + BASE)
    assert message in str(info.value)
