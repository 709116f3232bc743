"""HTTPS upstreams over real sockets: the pool speaks TLS to an ``https://`` server with
SNI and certificate verification against the system's trust store (here made to hold a
test CA through ``SSL_CERT_FILE``, which OpenSSL's default paths read), reuses the TLS
connection, and treats a certificate it cannot verify as a connect failure (502)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ProxyFactory
from tests.test_limits_config import self_signed


class TLSUpstream:
    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.url = ""
        self.seen: list[tuple[str, str, int]] = []  # (path, X-Forwarded-Proto, connection id)
        self._runner: web.AppRunner | None = None

    async def any(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.path, request.headers.get("X-Forwarded-Proto", ""),
                          id(request.transport)))
        return web.Response(text=f"tls {request.path} {len(body)}")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.any)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[tuple[TLSUpstream, Path]]:
    cert, key = self_signed(tmp_path / "up", "upstream")
    upstream = TLSUpstream(cert, key)
    await upstream.start()
    yield upstream, cert
    await upstream.stop()


def config(upstream: str) -> str:
    return (
        "listen: 127.0.0.1:0\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "access_log: {enabled: false}\n"
        "pools:\n"
        f"  secure: {{servers: [\"{upstream}\"]}}\n"
        "routes:\n"
        "  - name: api\n"
        "    rings: [{name: main, pool: secure}]\n"
    )


async def test_an_https_upstream_is_reached_verified_and_its_connection_reused(
    make_proxy: ProxyFactory, tls_upstream: tuple[TLSUpstream, Path],
    client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, cert = tls_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when the pool makes its context
    proxy = await make_proxy(config(upstream.url))
    for path in ("/one", "/two"):
        async with client.get(proxy.url + path) as r:
            assert r.status == 200
            assert await r.text() == f"tls {path} 0"
    async with client.post(proxy.url + "/three", data=b"x" * 100_000) as r:
        assert r.status == 200 and await r.text() == "tls /three 100000"
    assert [(p, proto) for p, proto, _ in upstream.seen] == [
        ("/one", "http"), ("/two", "http"), ("/three", "http")]
    assert len({conn for _, _, conn in upstream.seen}) == 1  # one pooled TLS connection


async def test_an_upstream_certificate_that_does_not_verify_is_a_502_judged_as_a_connect_failure(
    make_proxy: ProxyFactory, tls_upstream: tuple[TLSUpstream, Path],
    client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    upstream, _ = tls_upstream
    other, _ = self_signed(tmp_path / "other", "other")  # trusted, but not the upstream's
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    proxy = await make_proxy(config(upstream.url))
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 502
        assert "ringproxy:" in await r.text()
    assert upstream.seen == []
    tally = proxy.metrics.tally("api", "main")
    assert (tally.requests, tally.errors) == (1, 1)  # the upstream's failure, judged
