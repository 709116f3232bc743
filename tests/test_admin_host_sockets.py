"""DNS rebinding: without tokens, the admin API answers loopback names and admin.hosts only."""

from __future__ import annotations

import textwrap

import aiohttp
import pytest

from proxy.admin.auth import FOREIGN_HOST, READ, authorize, host_allowed
from proxy.config import parse_config
from proxy.server import Proxy
from tests.conftest import ProxyFactory

TOKEN = "h" * 32


@pytest.mark.parametrize(("host", "allowed"), [
    ("", True),  # no Host: not a browser
    ("localhost", True), ("LOCALHOST:9901", True), ("localhost.", True),
    ("app.localhost:9901", True), ("127.0.0.1:9901", True), ("127.8.9.10", True),
    ("[::1]:9901", True), ("::1", True),
    ("ops.internal:9901", True),  # in admin.hosts
    ("evil.example", False), ("evil.example:9901", False), ("localhost.evil.example", False),
    ("10.0.0.1:9901", False), ("[2001:db8::1]:9901", False), ("0.0.0.0:9901", False),
])
def test_host_allowed(host: str, allowed: bool) -> None:
    assert host_allowed(host, frozenset({"ops.internal"})) is allowed


def test_a_foreign_host_is_refused_only_without_tokens() -> None:
    assert authorize(READ, (), "", is_loopback=True, method="GET",
                     host_allowed=False) == FOREIGN_HOST


def config(tokens: bool) -> str:
    admin = ("{listen: 127.0.0.1:0, tokens: [{env: ADMIN_HOST_TOKEN, role: viewer}]}"
             if tokens else "{listen: 127.0.0.1:0, hosts: [ringproxy.ops.internal]}")
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {admin}
        access_log: {{enabled: false}}
        pools: {{app: {{servers: ["http://127.0.0.1:1"]}}}}
        routes: [{{name: api, rings: [{{name: main, pool: app}}]}}]
        """)


async def _status(client: aiohttp.ClientSession, url: str, host: str,
                  token: str | None = None) -> int:
    headers = {"Host": host}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with client.get(url, headers=headers) as r:
        return r.status


async def test_without_tokens_a_rebound_name_is_refused(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(config(tokens=False))
    api = proxy.admin_url + "/api/routes"
    port = proxy.admin_url.rsplit(":", 1)[1]
    assert await _status(client, api, f"127.0.0.1:{port}") == 200
    assert await _status(client, api, f"localhost:{port}") == 200
    assert await _status(client, api, f"ringproxy.ops.internal:{port}") == 200
    async with client.get(api, headers={"Host": f"evil.example:{port}"}) as r:
        assert r.status == 403
        assert "DNS rebinding" in (await r.json())["error"]
    # probes, metrics and the static page stay public (the kubelet sends the pod's IP)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert await _status(client, proxy.admin_url + path, "10.1.2.3:9901") in (200, 503)


async def test_with_tokens_the_host_is_not_checked(client: aiohttp.ClientSession) -> None:
    proxy = Proxy(parse_config(config(tokens=True), environ={"ADMIN_HOST_TOKEN": TOKEN}))
    await proxy.start()
    try:
        api = proxy.admin_url + "/api/routes"
        assert await _status(client, api, "ringproxy.example.com", TOKEN) == 200
        assert await _status(client, api, "ringproxy.example.com") == 401
    finally:
        await proxy.stop()
