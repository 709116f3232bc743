"""TLS on the listener (``listen_tls:``) through the real proxy, on 127.0.0.1.

Self-signed certificates come from the ``openssl`` command line (the ``cryptography``
package is not a dependency).  The upstream is plain HTTP; it must see
``X-Forwarded-Proto: https``.  A certificate replaced on disk is served to new handshakes
without a restart, while a connection opened before keeps working.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from proxy.config import parse_config
from proxy.server import Proxy
from tests.conftest import ProxyFactory
from tests.test_framing_sockets import (
    OK_BODY,
    RawUpstream,
    StartUpstream,
    close_writer,
    proxy_config,
    read_response,
    upstream,
)

__all__ = ["upstream"]  # the fixture, imported to be used here

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

# The watcher looks every 1-2 s: a new certificate must be served within this.
RELOAD_WAIT = 8.0


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())


def make_pair(folder: Path, common_name: str) -> Pair:
    folder.mkdir(parents=True, exist_ok=True)
    pair = Pair(folder / "cert.pem", folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2",
         "-subj", f"/CN={common_name}",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return pair


@dataclass(frozen=True)
class Certs:
    first: Pair
    second: Pair
    live: Pair  # the files the proxy is configured with: a copy of ``first`` at start

    def client_context(self) -> ssl.SSLContext:
        """Trusts both self-signed certificates (and checks the host name)."""
        context = ssl.create_default_context()
        context.load_verify_locations(
            cadata=self.first.cert.read_text() + self.second.cert.read_text()
        )
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    first = make_pair(tmp_path / "first", "ringproxy test one")
    second = make_pair(tmp_path / "second", "ringproxy test two")
    live = Pair(tmp_path / "live" / "cert.pem", tmp_path / "live" / "key.pem")
    live.cert.parent.mkdir()
    shutil.copyfile(first.cert, live.cert)
    shutil.copyfile(first.key, live.key)
    os.chmod(live.key, 0o600)
    return Certs(first, second, live)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tls_config(upstream_url: str, certs: Certs, port: int) -> str:
    return proxy_config(
        upstream_url,
        top=f"""
listen_tls:
  listen: 127.0.0.1:{port}
  cert: {certs.live.cert}
  key: {certs.live.key}
""",
    )


async def open_tls(
    port: int, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A verified TLS connection (SNI ``localhost``) and the DER certificate it was shown."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost"),
        5.0,
    )
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object is not None
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return reader, writer, der


async def test_https_is_served_to_a_plain_upstream_with_forwarded_proto_https(
    make_proxy: ProxyFactory, upstream: StartUpstream, certs: Certs
) -> None:
    up = await upstream()
    port = free_port()
    proxy = await make_proxy(tls_config(up.url, certs, port))
    reader, writer, der = await open_tls(port, certs.client_context())
    try:
        assert der == certs.first.der()
        writer.write(b"GET /secure?x=1 HTTP/1.1\r\nHost: api.test\r\n\r\n")
        first = await read_response(reader)
        # Keep-alive works over TLS too.
        writer.write(b"POST /again HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\n\r\nabc")
        second = await read_response(reader)
    finally:
        await close_writer(writer)
    assert first.status == 200 and first.body == OK_BODY
    assert second.status == 200 and second.body == OK_BODY
    secure, again = up.requests
    assert secure.target == "/secure?x=1"
    assert secure.header("X-Forwarded-Proto") == "https"
    assert secure.header("X-Forwarded-For") == "127.0.0.1"
    assert secure.header("X-Forwarded-Host") == "api.test"
    assert again.body == b"abc"
    assert b"\x16\x03" not in up.received  # nothing of TLS reaches the upstream
    # The plain listener still serves, and says so.
    plain_reader, plain_writer = await asyncio.open_connection(
        *proxy.url.removeprefix("http://").rsplit(":", 1)
    )
    try:
        plain_writer.write(b"GET /plain HTTP/1.1\r\nHost: api.test\r\n\r\n")
        plain = await read_response(plain_reader)
    finally:
        await close_writer(plain_writer)
    assert plain.status == 200
    assert up.requests[-1].header("X-Forwarded-Proto") == "http"


async def test_plain_http_on_the_tls_port_is_not_served(
    make_proxy: ProxyFactory, upstream: StartUpstream, certs: Certs
) -> None:
    up = await upstream()
    port = free_port()
    await make_proxy(tls_config(up.url, certs, port))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        async with asyncio.timeout(5.0):
            try:
                data = await reader.read(65536)
            except ConnectionError:
                data = b""
    finally:
        await close_writer(writer)
    assert not data.startswith(b"HTTP/1.1 200")
    assert up.connections == []


async def test_a_replaced_certificate_is_served_to_new_handshakes_without_restart(
    make_proxy: ProxyFactory, upstream: StartUpstream, certs: Certs
) -> None:
    up = await upstream()
    port = free_port()
    await make_proxy(tls_config(up.url, certs, port))
    context = certs.client_context()
    old_reader, old_writer, der = await open_tls(port, context)
    try:
        assert der == certs.first.der()
        # Rotate as certbot and friends do: new files written aside, renamed over the old.
        for source, target in ((certs.second.key, certs.live.key),
                               (certs.second.cert, certs.live.cert)):
            staged = target.with_suffix(".new")
            shutil.copyfile(source, staged)
            os.replace(staged, target)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELOAD_WAIT
        while True:
            reader, writer, der = await open_tls(port, context)
            try:
                if der == certs.second.der():
                    writer.write(b"GET /new HTTP/1.1\r\nHost: api.test\r\n\r\n")
                    fresh = await read_response(reader)
                    break
            finally:
                await close_writer(writer)
            assert der == certs.first.der()
            assert loop.time() < deadline, f"still the old certificate after {RELOAD_WAIT}s"
            await asyncio.sleep(0.2)  # the watcher's poll: nothing to await from outside
        assert fresh.status == 200
        # The connection made before the rotation keeps working on its session.
        old_writer.write(b"GET /old HTTP/1.1\r\nHost: api.test\r\n\r\n")
        old = await read_response(old_reader)
        assert old.status == 200
    finally:
        await close_writer(old_writer)
    assert {r.target for r in up.requests} == {"/new", "/old"}


async def _tls_on_uvloop(certs: Certs) -> None:
    up = RawUpstream()
    await up.start()
    port = free_port()
    proxy = Proxy(parse_config(tls_config(up.url, certs, port)))
    await proxy.start()
    try:
        reader, writer, der = await open_tls(port, certs.client_context())
        try:
            assert der == certs.first.der()
            writer.write(b"GET /uv HTTP/1.1\r\nHost: api.test\r\n\r\n")
            response = await read_response(reader)
        finally:
            await close_writer(writer)
        assert response.status == 200 and response.body == OK_BODY
        assert up.requests[-1].header("X-Forwarded-Proto") == "https"
    finally:
        await proxy.stop()
        await up.stop()


def test_https_on_uvloop_the_loop_the_proxy_runs_on(certs: Certs) -> None:
    """uvloop has its own TLS transport: the CLI's loop must serve HTTPS too."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_tls_on_uvloop(certs))
