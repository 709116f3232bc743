#!/usr/bin/env python3
"""Instructions per request of ringproxy's data plane, counted by callgrind.

CPU-time benchmarks (``bench.py``) need a quiet machine; an instruction count does not:
it is the same on a loaded machine, so a change to the request path can be priced to a
few hundred instructions anywhere.  (Instructions are not time: cache misses and system
calls are not in them; ``bench.py`` stays the measure of the issue's goal.)

For each variant (access log off, then on; metrics on, as ``bench.py``'s ``ringproxy``
and ``ringproxy-accesslog``) the script:

1. starts an NGINX upstream (``return 200``, as ``bench.py``) and ringproxy with
   ``bench.py``'s two-ring sticky config, the proxy under
   ``valgrind --tool=callgrind`` (uvloop's and httptools' C code is counted too);
2. sends ``--warmup`` requests (lazy imports, caches, the pool's connections), then has
   callgrind dump and zero its counters (``callgrind_control --dump``);
3. sends ``--requests`` keep-alive requests: ``--connections`` connections, each round one
   request on every connection, then every response read (so the proxy sees a few
   requests per loop iteration, as under load, but always the same sequence);
4. dumps again: that dump's total over the requests is the figure.  The window also holds
   the proxy's own background timers for its few seconds (under a percent).

Every request is ``GET /`` with ``Host`` and ``X-User-Id: bench-user-4242`` (as wrk's in
``bench.py``) and the response must be the upstream's 200 with its body.

    .venv/bin/python loadtests/instructions.py [--requests 2000] [--connections 8]
        [--only off,on] [--annotate N] [--keep DIR]

``--annotate N`` prints callgrind_annotate's top N functions (inclusive) of each
variant's window; ``--keep DIR`` leaves the callgrind files there for
``callgrind_annotate --inclusive=yes FILE``.  Requires ``valgrind`` (Debian:
``apt-get install valgrind``) and ``nginx``.  A run takes a minute or two (Python under
callgrind is ~50x slower).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the sibling script: upstream, config, process helpers)

READY_TIMEOUT_S = 180.0  # the proxy's start-up under callgrind
DUMP_TIMEOUT_S = 60.0
VARIANTS = {"off": False, "on": True}  # access log


def request_bytes(port: int) -> bytes:
    return (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{bench.USER_HEADER}\r\n\r\n"
            .encode("latin-1"))


class Client:
    """A blocking keep-alive HTTP/1.1 client for responses with a Content-Length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buf) < length:
            self._read()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the proxy closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def drive(port: int, clients: list[Client], count: int) -> None:
    """``count`` requests over ``clients``, round by round; each must be the upstream's."""
    req = request_bytes(port)
    sent = 0
    while sent < count:
        batch = clients[: min(len(clients), count - sent)]
        for client in batch:
            client.send(req)
        for client in batch:
            status, body = client.response()
            if status != 200 or body != bench.EXPECTED_BODY:
                raise RuntimeError(f"unexpected response: {status} {body[:80]!r}")
        sent += len(batch)


def total_instructions(path: Path) -> int:
    """The event count of one callgrind output file (its ``totals:`` or ``summary:``)."""
    text = path.read_text(errors="replace")
    for key in ("totals:", "summary:"):
        match = re.search(rf"^{key}\s+(\d+)", text, re.MULTILINE)
        if match:
            return int(match.group(1))
    raise RuntimeError(f"no totals in {path}")


def dump(pid: int, outdir: Path, prefix: str) -> Path:
    """Have callgrind dump (and zero) its counters; the new file's path."""
    before = set(outdir.glob(f"{prefix}*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True,
                   stdout=subprocess.DEVNULL, timeout=DUMP_TIMEOUT_S)
    deadline = time.monotonic() + DUMP_TIMEOUT_S
    while time.monotonic() < deadline:
        new = [p for p in set(outdir.glob(f"{prefix}*")) - before if not p.name.endswith(".0")]
        if new:
            time.sleep(0.5)  # the file is written whole, but give it a moment
            return sorted(new)[-1]
        time.sleep(0.1)
    raise RuntimeError("callgrind did not dump")


def run_variant(name: str, access_log: bool, upstream_port: int, root: Path,
                args: argparse.Namespace) -> tuple[int, Path]:
    workdir = root / f"ringproxy-{name}"
    workdir.mkdir()
    port = bench.free_port()
    config = workdir / "ringproxy.yaml"
    config.write_text(bench.ringproxy_yaml(port, upstream_port, workdir, access_log, True))
    prefix = "callgrind.out"
    outdir = workdir / "cg"
    outdir.mkdir()
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={outdir / prefix}",
            "--dump-instr=no", "--compress-strings=no", "--compress-pos=no",
            sys.executable, "-m", "proxy", "run", "--config", str(config)]
    server = bench.Server(f"ringproxy-{name}", argv, workdir, port, cwd=bench.REPO)
    old_timeout = bench.READY_TIMEOUT_S
    bench.READY_TIMEOUT_S = READY_TIMEOUT_S
    try:
        print(f"[instructions] access log {name}: starting under callgrind", file=sys.stderr,
              flush=True)
        server.start()
        assert server.proc is not None
        pid = server.proc.pid
        clients = [Client(port) for _ in range(args.connections)]
        try:
            drive(port, clients, args.warmup)
            dump(pid, outdir, prefix)
            start = time.monotonic()
            drive(port, clients, args.requests)
            elapsed = time.monotonic() - start
            window = dump(pid, outdir, prefix)
        finally:
            for client in clients:
                client.close()
        print(f"[instructions] access log {name}: {args.requests} requests in {elapsed:.1f} s "
              "under callgrind", file=sys.stderr, flush=True)
        return total_instructions(window), window
    finally:
        bench.READY_TIMEOUT_S = old_timeout
        server.stop()


def annotate(path: Path, top: int) -> str:
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(path)],
                         capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if "file:function" in line:
            return "\n".join(lines[i: i + 2 + top])
    return "\n".join(lines[: top + 20])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--only", default="off,on", help="access log variants: off,on")
    parser.add_argument("--annotate", type=int, default=0, metavar="N")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if shutil.which(tool) is None:
            print(f"instructions.py: {tool} is not on PATH", file=sys.stderr)
            return 2
    variants = [v.strip() for v in args.only.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            print(f"instructions.py: --only takes off,on (not {v!r})", file=sys.stderr)
            return 2
    results: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="ringproxy-instr-") as tmp:
        root = Path(tmp)
        upstream_port = bench.free_port()
        upstream = bench.start_nginx("upstream", root, upstream_port,
                                     bench.upstream_body(upstream_port))
        try:
            for v in variants:
                total, window = run_variant(v, VARIANTS[v], upstream_port, root, args)
                results[v] = total
                if args.keep is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(window, args.keep / f"callgrind.accesslog-{v}.out")
                if args.annotate:
                    print(f"--- access log {v}: top {args.annotate} (inclusive) ---")
                    print(annotate(window, args.annotate))
        finally:
            upstream.stop()
    print(f"{'access log':<12}{'requests':>10}{'instructions':>16}{'instr/request':>16}")
    for v, total in results.items():
        print(f"{v:<12}{args.requests:>10}{total:>16,}{total / args.requests:>16,.0f}")
    if "on" in results and "off" in results:
        extra = (results["on"] - results["off"]) / args.requests
        print(f"access log: {extra:+,.0f} instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
