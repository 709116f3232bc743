"""Trusted proxies: the client's address behind a load balancer.  Pure: no I/O.

When the TCP peer is in ``trusted_proxies``, the client address is read from
``X-Forwarded-For`` (or, when a request has none, from ``Forwarded``, RFC 7239) the way
NGINX's ``real_ip_recursive on`` does: from the right, trusted addresses are skipped and
the first untrusted one is the client.  ``trusted_hops`` N (Envoy's
``xff_num_trusted_hops``) instead takes the N-th entry from the right, trusted or not.
An entry that is not an address ends the walk: the client is then the last address
accepted (the entry right of it, or the peer).  A peer outside the networks is the client
and the headers are ignored for decisions.

The data plane checks the peer once per connection (``trusts``) and calls ``client`` per
request only for trusted peers: with ``trusted_proxies`` empty nothing is done.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.config.reader import Ctx, Section, kind
from proxy.config.source import join

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(raw: str) -> Address | None:
    """An address from a forwarding header's entry: ``1.2.3.4``, ``1.2.3.4:80``,
    ``2001:db8::1``, ``[2001:db8::1]:80`` (quotes stripped); None when it is none."""
    text = raw.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def forwarded_for(value: str) -> list[str]:
    """The ``for=`` values of a ``Forwarded`` header, left to right (an element without
    one counts as an unknown entry)."""
    entries: list[str] = []
    for element in value.split(","):
        found = ""
        for pair in element.split(";"):
            key, _, val = pair.partition("=")
            if key.strip().lower() == "for":
                found = val.strip().strip('"')
                break
        entries.append(found)
    return entries


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    networks: tuple[Network, ...] = ()
    hops: int = 0  # 0: skip trusted entries from the right; N: the N-th entry from the right

    def trusts(self, address: str) -> bool:
        parsed = parse_address(address)
        return parsed is not None and self._trusted(parsed)

    def _trusted(self, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def client(self, peer: str, x_forwarded_for: bytes | None, forwarded: bytes | None) -> str:
        """The client of a request from the trusted ``peer`` (the caller checked it)."""
        if x_forwarded_for:
            entries = x_forwarded_for.decode("latin-1").split(",")
        elif forwarded:
            entries = forwarded_for(forwarded.decode("latin-1"))
        else:
            return peer
        client = peer
        if self.hops:
            for raw in reversed(entries[-self.hops:]):
                address = parse_address(raw)
                if address is None:
                    break
                client = str(address)
            return client
        for raw in reversed(entries):
            address = parse_address(raw)
            if address is None:
                break
            client = str(address)
            if not self._trusted(address):
                break
        return client


NO_PROXIES = TrustedProxies()


def read_trusted_proxies(ctx: Ctx, top: Section) -> TrustedProxies:
    """``trusted_proxies: [CIDR, ...]`` and ``trusted_hops: N`` (top level)."""
    networks: list[Network] = []
    raw = top.raw("trusted_proxies", [])
    if not isinstance(raw, list):
        ctx.err("trusted_proxies", f"expected a list of networks, got {kind(raw)}")
        raw = []
    for i, item in enumerate(raw):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            ctx.err(join("trusted_proxies", i), f"{item!r} is not a network, e.g. 10.0.0.0/8")
    hops = top.integer("trusted_hops", NO_PROXIES.hops, 0, 64)
    if hops and not networks:
        ctx.err("trusted_hops", "trusted_hops needs trusted_proxies (the peers it applies to)")
    return TrustedProxies(tuple(networks), hops)
