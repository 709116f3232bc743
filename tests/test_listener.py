"""The listener: descriptor limit, connection cap, gate, certificate reloads, real TLS sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import shutil
import ssl
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import cast

import pytest
import uvloop

from proxy.config import Limits, ListenTLS
from proxy.config.values import Listen
from proxy.dataplane.listener import (
    MIN_RESERVE,
    CertificateWatcher,
    ConnectionGate,
    connection_cap,
    listen,
)
from proxy.errors import ConfigError
from tests.test_limits_config import self_signed

LOOPBACK = Listen("127.0.0.1", 0)

# --- the descriptor limit (in a subprocess: the test process keeps its own) -----------------

RAISE = textwrap.dedent("""
    import logging, resource, sys
    from proxy.dataplane.listener import raise_nofile_limit
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    soft, hard = map(int, sys.argv[1:])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))
""")


def run_raise(soft: int, hard: int) -> list[str]:
    done = subprocess.run([sys.executable, "-c", RAISE, str(soft), str(hard)],
                          capture_output=True, text=True, timeout=60, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    return done.stdout.splitlines()


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    hard = min(512, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    assert run_raise(100, hard) == [
        f"INFO raised the open files limit (RLIMIT_NOFILE) from 100 to {hard}",
        f"({hard}, {hard}) ({hard}, {hard})",
    ]


def test_a_soft_limit_already_at_the_hard_one_is_left_quietly() -> None:
    assert run_raise(300, 300) == ["(300, 300) (300, 300)"]


def test_raising_leaves_this_process_alone() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    run_raise(100, min(512, before[1]))
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


# --- the connection cap ---------------------------------------------------------------------

@pytest.mark.parametrize(("soft", "cap"), [
    (1024, 768), (1_048_576, 786_432), (20_000, 15_000),
    (256, 192), (100, 100 - MIN_RESERVE), (MIN_RESERVE + 1, 1),
    (resource.RLIM_INFINITY, 786_432),  # counted as 2**20
])
def test_the_derived_cap_keeps_a_quarter_and_at_least_64_descriptors(soft: int, cap: int) -> None:
    assert connection_cap(Limits(), soft) == cap


def test_a_limit_too_low_to_serve_anyone_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"limits: the open files limit \(RLIMIT_NOFILE\) is "
                       r"64: too low to serve clients \(64 are kept for the proxy itself\)"):
        connection_cap(Limits(), MIN_RESERVE)


def test_a_configured_cap_is_taken_if_it_leaves_the_reserve() -> None:
    assert connection_cap(Limits(max_connections=500), 1024) == 500
    assert connection_cap(Limits(max_connections=960), 1024) == 960  # all but 64
    with pytest.raises(ConfigError) as info:
        connection_cap(Limits(max_connections=961), 1024)
    assert str(info.value) == (
        "limits.max_connections: 961 client connections leave too few file descriptors for "
        "upstream connections, the admin listener and files: the open files limit "
        "(RLIMIT_NOFILE) is 1024, so at most 960; raise the limit (ulimit -n, LimitNOFILE= "
        "in systemd) or lower max_connections")


# --- the gate -------------------------------------------------------------------------------

def test_the_gate_admits_up_to_its_cap_and_counts_refusals() -> None:
    gate = ConnectionGate(2)
    assert [gate.admit(), gate.admit(), gate.admit(), gate.admit()] == [True, True, False, False]
    assert (gate.open, gate.refused) == (2, 2)
    assert repr(gate) == "<ConnectionGate open=2/2 refused=2>"
    gate.release()
    assert gate.admit() and (gate.open, gate.refused) == (2, 2)
    for _ in range(5):  # more releases than admits never open room beyond the cap
        gate.release()
    assert gate.open == 0
    assert [gate.admit(), gate.admit(), gate.admit()] == [True, True, False]


def test_a_gate_that_admits_nobody_is_refused() -> None:
    with pytest.raises(ValueError, match="a connection cap of 0 admits nobody"):
        ConnectionGate(0)


# --- TLS ------------------------------------------------------------------------------------

class Hello(asyncio.Protocol):
    """Writes b"hello" and closes: enough to see a handshake through."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(b"hello")
        writer.close()


def der_of(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # self-signed; the test compares the certificate
    return context


async def handshake(server: asyncio.Server, context: ssl.SSLContext | None = None) -> bytes:
    """Connect with TLS, read to the end; the DER certificate the server presented."""
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context or client_context(), server_hostname="localhost"), 10)
    try:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert await asyncio.wait_for(reader.read(), 10) == b"hello"
    finally:
        await close(writer)
    return bytes(peer)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):  # the server closed first
        await asyncio.wait_for(writer.wait_closed(), 10)


def replace_file(source: Path, target: Path) -> None:
    """As a rotation does it: a new file renamed over the old (a new inode)."""
    shutil.copy(source, target.with_suffix(".new"))
    os.replace(target.with_suffix(".new"), target)


@pytest.fixture
def live(tmp_path: Path) -> ListenTLS:
    """The files the listener serves, first a copy of pair "a"."""
    cert, key = self_signed(tmp_path / "a", "a", cn="a.example")
    shutil.copy(cert, tmp_path / "live.crt")
    shutil.copy(key, tmp_path / "live.key")
    return ListenTLS(LOOPBACK, str(tmp_path / "live.crt"), str(tmp_path / "live.key"))


async def test_a_tls_handshake_presents_the_certificate_file(live: ListenTLS) -> None:
    watcher = CertificateWatcher(live)
    server = await listen(asyncio.get_running_loop(), Hello, LOOPBACK, watcher.context)
    try:
        assert await handshake(server) == der_of(Path(live.cert))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname="localhost")
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
        await close(writer)
    finally:
        server.close()
        await server.wait_closed()


async def test_tls_below_1_2_is_refused(live: ListenTLS) -> None:
    watcher = CertificateWatcher(live)
    server = await listen(asyncio.get_running_loop(), Hello, LOOPBACK, watcher.context)
    old = client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1: the point here
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await handshake(server, old)
    finally:
        server.close()
        await server.wait_closed()


async def reload_scenario(live: ListenTLS, tmp_path: Path, caplog: pytest.LogCaptureFixture
                          ) -> None:
    watcher = CertificateWatcher(live)
    server = await listen(asyncio.get_running_loop(), Hello, LOOPBACK, watcher.context)
    a_cert = der_of(Path(live.cert))
    b_cert, b_key = self_signed(tmp_path / "b", "b", cn="b.example")
    try:
        assert watcher.check() is False  # nothing changed
        assert await handshake(server) == a_cert

        # A new pair at the same paths: the next handshake presents it.
        replace_file(b_cert, Path(live.cert))
        replace_file(b_key, Path(live.key))
        assert watcher.check() is True
        assert await handshake(server) == der_of(b_cert)
        assert watcher.check() is False
        assert watcher.context is not watcher.current  # the listener's object stays

        # A certificate without its key (a rotation half done): warned once, "b" kept.
        c_cert, c_key = self_signed(tmp_path / "c", "c", cn="c.example", rsa=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "ringproxy.listener"):
            replace_file(c_cert, Path(live.cert))
            assert watcher.check() is False
            assert watcher.check() is False
        assert [r.getMessage() for r in caplog.records] == [
            f"listen_tls: the changed certificate files do not load (the private key "
            f"{live.key} does not match the certificate {live.cert}); still serving the "
            "previous certificate"]
        assert await handshake(server) == der_of(b_cert)

        # The key follows (here an RSA pair after an EC one): the new pair is served.
        replace_file(c_key, Path(live.key))
        assert watcher.check() is True
        assert await handshake(server) == der_of(c_cert)
        assert watcher.reloads == 2
        assert repr(watcher) == f"<CertificateWatcher {live.cert} reloads=2>"
    finally:
        server.close()
        await server.wait_closed()


async def test_changed_certificate_files_are_served_to_new_handshakes(
    live: ListenTLS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await reload_scenario(live, tmp_path, caplog)


def test_reloads_work_on_uvloop_too(
    live: ListenTLS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The proxy runs on uvloop, whose TLS transport is its own.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(reload_scenario(live, tmp_path, caplog))


async def test_a_file_gone_mid_rotation_keeps_the_old_pair(
    live: ListenTLS, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = CertificateWatcher(live)
    server = await listen(asyncio.get_running_loop(), Hello, LOOPBACK, watcher.context)
    before = der_of(Path(live.cert))
    saved = Path(live.cert).with_suffix(".saved")
    shutil.copy(live.cert, saved)
    try:
        with caplog.at_level(logging.WARNING, "ringproxy.listener"):
            os.unlink(live.cert)
            assert watcher.check() is False
        assert "cannot read the certificate file" in caplog.text
        assert await handshake(server) == before
        replace_file(saved, Path(live.cert))
        assert watcher.check() is True  # the same pair, loaded again: nothing lost
        assert await handshake(server) == before
    finally:
        server.close()
        await server.wait_closed()


def test_a_watcher_on_bad_files_raises_a_config_error(live: ListenTLS, tmp_path: Path) -> None:
    _, other_key = self_signed(tmp_path / "o", "o")
    bad = ListenTLS(LOOPBACK, live.cert, str(other_key))
    with pytest.raises(ConfigError) as info:
        CertificateWatcher(bad)
    assert str(info.value) == (
        f"listen_tls: the private key {other_key} does not match the certificate {live.cert}")


async def test_a_silent_tls_client_is_cut_at_the_handshake_timeout(live: ListenTLS) -> None:
    watcher = CertificateWatcher(live)
    server = await listen(asyncio.get_running_loop(), Hello, LOOPBACK, watcher.context,
                          handshake_timeout=0.3)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # no ClientHello
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert time.monotonic() - started < 5
        await close(writer)
    finally:
        server.close()
        await server.wait_closed()


# --- listen ---------------------------------------------------------------------------------

async def test_plain_listen_serves_and_a_taken_address_is_named() -> None:
    loop = asyncio.get_running_loop()
    server = await listen(loop, Hello, LOOPBACK, None, backlog=16)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b"hello"
        await close(writer)
        with pytest.raises(OSError) as info:
            await listen(loop, Hello, Listen("127.0.0.1", port), None)
        assert info.value.errno == errno.EADDRINUSE
        assert f"cannot listen for clients on 127.0.0.1:{port}: " in str(info.value)
        with pytest.raises(OSError, match=f"cannot listen for TLS clients on 127.0.0.1:{port}"):
            await listen(loop, Hello, Listen("127.0.0.1", port), client_context())
    finally:
        server.close()
        await server.wait_closed()
