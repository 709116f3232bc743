"""A real ``redis-server`` for the fleet tests: started on a free port in a temporary
directory, stopped (and restartable on the same data) by the test.

Tests using it skip only when ``redis-server`` is not installed (CI installs Debian's
package: ``.ci/run``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; ``stop`` and ``start`` again keep its data when
    ``durable`` (append-only file, fsync always)."""

    def __init__(self, directory: Path, durable: bool = False) -> None:
        self.directory, self.durable = directory, durable
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert SERVER is not None
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
                       if self.durable else ["--appendonly", "no", "--save", ""])
        self.proc = subprocess.Popen(
            [SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), *persistence, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not answer PING on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command over a plain socket (the tests' own look, not the code's client)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            parts.append(f"${len(a.encode())}\r\n{a}\r\n".encode())
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"".join(parts))
            time.sleep(0.05)
            return s.recv(1 << 20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if SERVER is None:
        pytest.skip("redis-server is not installed (CI installs it: .ci/run)")
    server = RedisServer(tmp_path / "redis", durable=True)
    server.directory.mkdir()
    server.start()
    yield server
    server.stop()
