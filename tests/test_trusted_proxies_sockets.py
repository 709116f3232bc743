"""trusted_proxies on real sockets: the proxy's peer is 127.0.0.1, trusted or not."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import aiohttp

from tests.conftest import ProxyFactory, Upstream, headers_of


def config(stable: str, canary: str, log: Path, trusted: str) -> str:
    return trusted + textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: true, path: "{log}"}}
        shutdown_grace: 1s
        pools:
          stable: {{servers: [{stable}]}}
          canary: {{servers: [{canary}]}}
        routes:
          - name: api
            override: {{header: X-Ring, cidrs: [198.51.100.0/24]}}
            rings:
              - name: beta
                pool: canary
                rules:
                  - {{attr: ip, cidr: [203.0.113.0/24]}}
              - name: main
                pool: stable
        """)


async def _get(client: aiohttp.ClientSession, url: str,
               headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    async with client.get(url + "/echo", headers=headers) as r:
        assert r.status == 200
        seen = await r.json()
        return r.headers["X-Upstream"], headers_of(seen)


def _clients(log: Path) -> list[str]:
    return [json.loads(line)["client"] for line in log.read_text().splitlines()]


async def test_a_trusted_peer_names_the_client(
    make_proxy: ProxyFactory, stable: Upstream, canary: Upstream,
    client: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    log = tmp_path / "access.log"
    proxy = await make_proxy(config(stable.url, canary.url, log,
                                    "trusted_proxies: [127.0.0.0/8]\n"))
    # the right-most untrusted entry is the client: the ip rule sees 203.0.113.9
    upstream, seen = await _get(client, proxy.url, {
        "X-Forwarded-For": "198.51.100.1, 203.0.113.9, 127.0.0.5"})
    assert upstream == "canary"
    # upstream: the incoming list with the peer appended, as always
    assert seen["x-forwarded-for"] == "198.51.100.1, 203.0.113.9, 127.0.0.5, 127.0.0.1"
    # Forwarded (no X-Forwarded-For), forwarded upstream as it came
    upstream, seen = await _get(client, proxy.url, {"Forwarded": 'for="203.0.113.7:1234"'})
    assert upstream == "canary" and seen["forwarded"] == 'for="203.0.113.7:1234"'
    # override.cidrs judge the client too: 198.51.100.1 may pick its ring
    upstream, _ = await _get(client, proxy.url, {"X-Forwarded-For": "198.51.100.1",
                                                 "X-Ring": "beta"})
    assert upstream == "canary"
    upstream, _ = await _get(client, proxy.url, {"X-Forwarded-For": "192.0.2.1",
                                                 "X-Ring": "beta"})
    assert upstream == "stable"
    upstream, _ = await _get(client, proxy.url, {})  # no header: the peer is the client
    assert upstream == "stable"
    assert proxy.access_log is not None
    proxy.access_log.flush()
    assert _clients(log) == ["203.0.113.9", "203.0.113.7", "198.51.100.1", "192.0.2.1",
                             "127.0.0.1"]


async def test_an_untrusted_peer_is_the_client(
    make_proxy: ProxyFactory, stable: Upstream, canary: Upstream,
    client: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    log = tmp_path / "access.log"
    # trusted_proxies without the peer's network, and none at all: the headers are ignored
    for trusted in ("trusted_proxies: [10.0.0.0/8]\n", ""):
        log.unlink(missing_ok=True)
        proxy = await make_proxy(config(stable.url, canary.url, log, trusted))
        upstream, seen = await _get(client, proxy.url, {"X-Forwarded-For": "203.0.113.9"})
        assert upstream == "stable"
        assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
        upstream, _ = await _get(client, proxy.url, {"Forwarded": "for=203.0.113.9"})
        assert upstream == "stable"
        upstream, _ = await _get(client, proxy.url, {"X-Forwarded-For": "198.51.100.1",
                                                     "X-Ring": "beta"})
        assert upstream == "stable"
        assert proxy.access_log is not None
        proxy.access_log.flush()
        assert _clients(log) == ["127.0.0.1"] * 3
