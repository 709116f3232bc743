#!/usr/bin/env python3
"""Compare ringproxy against direct upstream and NGINX, and price its access log and metrics.

Everything runs on 127.0.0.1 in one go: an NGINX upstream answering a fixed
200, then for each target a fresh proxy process, a 2 s ``wrk`` warm-up and a
measured ``wrk --latency`` run.  CPU time per request of the proxy process
(tree) is read from ``/proc/PID/stat`` around the measured run.  ringproxy runs as
``ringproxy run --config FILE`` (a subprocess), so the bench measures whatever data
plane the tree has.

Targets (default: all but minimal-aiohttp; ringproxy-before only with --before-cmd):

    direct               wrk -> upstream
    nginx                wrk -> NGINX (keep-alive upstream) -> upstream
    minimal-aiohttp      wrk -> loadtests/minimal_aiohttp_proxy.py -> upstream
    ringproxy            two rings, sticky assignment (X-User-Id), metrics on, access log off
    ringproxy-accesslog  the same with the access log on (to /dev/null)
    ringproxy-nometrics  the same with metrics off (access log off)
    ringproxy-before     the ringproxy config run by --before-cmd (another build)
    ringproxy-health     ringproxy with active health checks (1 s) and outlier detection on
    ringproxy-nohealth   ringproxy with both off (--only ringproxy-nohealth,ringproxy-health)
    ringproxy-workers1   ringproxy with ``workers: 1`` (one process, as ringproxy)
    ringproxy-workers2   ringproxy with ``workers: 2``: a supervisor and two worker
                         processes (--only ringproxy-workers1,ringproxy-workers2); CPU is
                         the whole process tree's

    .venv/bin/python loadtests/bench.py [--duration 10] [--connections 50]
        [--threads 1] [--only T,T] [--rounds 1] [--before-cmd CMD] [--pin]
        [--json results.json]

Requires ``nginx`` and ``wrk`` on PATH (Debian: ``apt-get install nginx-light wrk``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

TARGETS = (
    "direct",
    "nginx",
    "minimal-aiohttp",
    "ringproxy",
    "ringproxy-accesslog",
    "ringproxy-nometrics",
    "ringproxy-before",
    "ringproxy-health",
    "ringproxy-nohealth",
    "ringproxy-workers1",
    "ringproxy-workers2",
)
DEFAULT_TARGETS = (
    "direct",
    "nginx",
    "ringproxy",
    "ringproxy-accesslog",
    "ringproxy-nometrics",
    "ringproxy-before",  # dropped unless --before-cmd is given
)
# ringproxy variants: (access log on, metrics on)
RINGPROXY_VARIANTS = {
    "ringproxy": (False, True),
    "ringproxy-accesslog": (True, True),
    "ringproxy-nometrics": (False, False),
    "ringproxy-before": (False, True),
    "ringproxy-health": (False, True),
    "ringproxy-nohealth": (False, True),
    "ringproxy-workers1": (False, True),
    "ringproxy-workers2": (False, True),
}
# Worker processes per ringproxy variant (issue 14); the others run the default, 1.
WORKERS = {"ringproxy-workers1": 1, "ringproxy-workers2": 2}
# Upstream health per ringproxy variant: each pool's health:/outlier: (issue 15).
HEALTH_POOL = {
    "ringproxy-health": "\n    health: {path: /, interval: 1s, timeout: 500ms}"
                        "\n    outlier: {consecutive_failures: 5}",
    "ringproxy-nohealth": "\n    outlier: off",
}
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
EXPECTED_BODY = b"hello from upstream\n"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
WARMUP_S = 2
# Every request carries a sticky key, so assignment hashes it into a bucket (the common
# case: a user id from the application), for every target alike.
USER_HEADER = "X-User-Id: bench-user-4242"


class StartupError(RuntimeError):
    """A server process did not come up (message includes its output)."""


# --------------------------------------------------------------------------- /proc helpers


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ``(comm)`` field; index 0 is field 3 (state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (scans /proc, so no CONFIG_PROC_CHILDREN needed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def cpu_seconds(pids: list[int]) -> tuple[float, float, bool]:
    """Summed (utime, stime) in seconds over ``pids``; the flag is False if any pid vanished."""
    utime = stime = 0
    complete = True
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            complete = False
            continue
        utime += int(fields[11])  # field 14
        stime += int(fields[12])  # field 15
    return utime / CLK_TCK, stime / CLK_TCK, complete


def preemptions(pids: list[int]) -> int:
    """Involuntary context switches, summed over every thread of ``pids`` (each a
    preemption: the scheduler took the CPU away, usually for a task the process's own
    write woke; each costs system time and cache refills)."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            for line in status.splitlines():
                if line.startswith("nonvoluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies over all cores from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(parts[:8])  # user nice system idle iowait irq softirq steal
    return total - parts[3] - parts[4], total


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_to(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that runs the child on ``cpus`` (None: wherever the kernel likes)."""
    if not cpus:
        return None
    chosen = set(cpus)

    def pin() -> None:
        os.sched_setaffinity(0, chosen)

    return pin


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


class Server:
    """A child process listening on 127.0.0.1:port, output captured to files."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        port: int,
        cwd: Path | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.cwd = cwd
        self.cpus = cpus
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.cwd,
                preexec_fn=pin_to(self.cpus),
            )
        self._wait_ready()

    def output(self, limit: int = 4000) -> str:
        chunks = []
        for label, path in (("stderr", self.stderr_path), ("stdout", self.stdout_path)):
            try:
                text = path.read_text(errors="replace").strip()
            except FileNotFoundError:
                continue
            if text:
                chunks.append(f"--- {self.name} {label} ---\n{text[-limit:]}")
        return "\n".join(chunks) or f"--- {self.name}: no output ---"

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise StartupError(
                    f"{self.name} exited with code {rc} before accepting connections\n"
                    f"command: {shlex.join(self.argv)}\n{self.output()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise StartupError(
            f"{self.name} did not accept connections on 127.0.0.1:{self.port} "
            f"within {READY_TIMEOUT_S:.0f}s\ncommand: {shlex.join(self.argv)}\n{self.output()}"
        )

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        kids = descendants(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
        # Children that outlived their parent (e.g. nginx workers after a SIGKILL).
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for kid in kids:
            if _alive(kid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)


# --------------------------------------------------------------------------- configs


def nginx_conf(workdir: Path, http_body: str) -> str:
    temps = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temps}
    default_type text/plain;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{http_body}
}}
"""


def start_nginx(
    name: str, root: Path, port: int, http_body: str, cpus: set[int] | None = None
) -> Server:
    workdir = root / name
    workdir.mkdir(mode=0o755, exist_ok=True)  # a later round reuses it
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, http_body))
    argv = ["nginx", "-e", str(workdir / "error.log"), "-p", f"{workdir}/", "-c", str(conf)]
    server = Server(name, argv, workdir, port, cpus=cpus)
    try:
        server.start()
    except StartupError as exc:
        raise StartupError(
            f"{exc}\n--- {name} error.log ---\n{_tail(workdir / 'error.log')}"
        ) from None
    return server


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return "(none)"


def upstream_body(port: int) -> str:
    return f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            return 200 "hello from upstream\\n";
        }}
    }}"""


def nginx_proxy_body(port: int, upstream_port: int) -> str:
    return f"""    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def ringproxy_yaml(
    port: int, upstream_port: int, workdir: Path, access_log: bool, metrics: bool,
    pool_extra: str = "", workers: int = 1,
) -> str:
    """Two rings on one route with sticky assignment: half the buckets to ``canary``.

    Both pools point at the same upstream (the figures are about the proxy).  State files
    go to ``workdir``, never the repository.
    """
    log = 'enabled: true\n  path: "/dev/null"' if access_log else 'enabled: false\n  path: "-"'
    return f"""listen: 127.0.0.1:{port}
workers: {workers}
metrics:
  enabled: {"true" if metrics else "false"}
admin:
  listen: 127.0.0.1:0
access_log:
  {log}
state:
  path: {workdir / "state.json"}
  audit: {workdir / "audit.jsonl"}
pools:
  stable:
    servers: [http://127.0.0.1:{upstream_port}]{pool_extra}
  canary:
    servers: [http://127.0.0.1:{upstream_port}]{pool_extra}
routes:
  - name: bench
    sticky:
      key: ["header:X-User-Id"]
    rings:
      - name: canary
        pool: canary
        weight: 50
      - name: stable
        pool: stable
"""


def ringproxy_argv(override: str | None) -> list[str]:
    if override:
        return shlex.split(override)
    script = Path(sys.executable).parent / "ringproxy"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "proxy"]


# --------------------------------------------------------------------------- wrk

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return round(float(value) * _UNITS_MS[unit], 4)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    latency_avg_ms: float | None
    latency_max_ms: float | None
    percentiles_ms: dict[str, float]
    socket_errors: dict[str, int]
    non_2xx_3xx: int
    raw: str


def parse_wrk(text: str) -> WrkResult:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m or not rps:
        raise ValueError(f"could not parse wrk output:\n{text}")
    lat = re.search(
        r"^\s+Latency\s+([\d.]+)(us|ms|s|m|h)\s+[\d.]+\w+\s+([\d.]+)(us|ms|s|m|h)", text, re.M
    )
    percentiles: dict[str, float] = {}
    _, _, dist = text.partition("Latency Distribution")
    for pm in re.finditer(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", dist, re.M):
        percentiles[f"p{float(pm.group(1)):g}"] = _to_ms(pm.group(2), pm.group(3))
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, errs.groups()), strict=True))
        if errs
        else {}
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(m.group(1)),
        seconds=_to_ms(m.group(2), m.group(3)) / 1e3,
        rps=float(rps.group(1)),
        latency_avg_ms=_to_ms(lat.group(1), lat.group(2)) if lat else None,
        latency_max_ms=_to_ms(lat.group(3), lat.group(4)) if lat else None,
        percentiles_ms=percentiles,
        socket_errors=socket_errors,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        raw=text,
    )


def run_wrk(
    port: int,
    duration: int,
    connections: int,
    threads: int,
    latency: bool,
    cpus: set[int] | None = None,
) -> WrkResult:
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "-H",
        USER_HEADER,
        *(["--latency"] if latency else []),
        f"http://127.0.0.1:{port}/",
    ]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=False,
        preexec_fn=pin_to(cpus),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    return parse_wrk(proc.stdout)


def check_response(port: int) -> None:
    """One plain GET through the target; raises if it is not the upstream's answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    name, value = USER_HEADER.split(": ", 1)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={name: value})
    with opener.open(request, timeout=5) as resp:
        body = resp.read()
        if resp.status != 200 or body != EXPECTED_BODY:
            raise RuntimeError(f"unexpected response: {resp.status} {body[:200]!r}")


# --------------------------------------------------------------------------- measurement


@dataclass
class TargetResult:
    target: str
    ok: bool = False
    error: str | None = None
    rps: float | None = None
    requests: int | None = None
    seconds: float | None = None
    latency_avg_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    percentiles_ms: dict[str, float] = field(default_factory=dict)
    cpu_us_per_req: float | None = None
    cpu_user_us_per_req: float | None = None
    cpu_sys_us_per_req: float | None = None
    preemptions_per_req: float | None = None
    cpu_measured: str = ""
    cpu_pids: list[int] = field(default_factory=list)
    upstream_cpu_us_per_req: float | None = None
    host_cpu_busy_pct: float | None = None
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx_3xx: int = 0
    wrk_output: str = ""


def measure(
    result: TargetResult,
    port: int,
    proxy: Server | None,
    upstream: Server,
    args: argparse.Namespace,
) -> None:
    check_response(port)
    run_wrk(port, WARMUP_S, args.connections, args.threads, latency=False, cpus=args.load_cpus)

    measured = proxy if proxy is not None else upstream
    pids = measured.pids()
    up_pids = upstream.pids()
    user0, sys0, _ = cpu_seconds(pids)
    preempted0 = preemptions(pids)
    up_user0, up_sys0, _ = cpu_seconds(up_pids)
    busy0, total0 = host_cpu()
    wrk = run_wrk(
        port, args.duration, args.connections, args.threads, latency=True, cpus=args.load_cpus
    )
    busy1, total1 = host_cpu()
    user1, sys1, complete = cpu_seconds(pids)
    preempted1 = preemptions(pids)
    up_user1, up_sys1, _ = cpu_seconds(up_pids)

    result.rps = wrk.rps
    result.requests = wrk.requests
    result.seconds = wrk.seconds
    result.latency_avg_ms = wrk.latency_avg_ms
    result.latency_max_ms = wrk.latency_max_ms
    result.percentiles_ms = wrk.percentiles_ms
    result.latency_p50_ms = wrk.percentiles_ms.get("p50")
    result.latency_p99_ms = wrk.percentiles_ms.get("p99")
    result.socket_errors = wrk.socket_errors
    result.non_2xx_3xx = wrk.non_2xx_3xx
    result.wrk_output = wrk.raw
    result.cpu_pids = pids
    result.cpu_measured = (
        "upstream nginx (master+worker)" if proxy is None else f"{proxy.name} process tree"
    )
    if not complete:
        result.cpu_measured += " (a process exited during the run: incomplete)"
    if wrk.requests:
        per_req = 1e6 / wrk.requests
        result.cpu_user_us_per_req = (user1 - user0) * per_req
        result.cpu_sys_us_per_req = (sys1 - sys0) * per_req
        result.cpu_us_per_req = result.cpu_user_us_per_req + result.cpu_sys_us_per_req
        result.preemptions_per_req = (preempted1 - preempted0) / wrk.requests
        result.upstream_cpu_us_per_req = (up_user1 + up_sys1 - up_user0 - up_sys0) * per_req
    if total1 > total0:
        result.host_cpu_busy_pct = 100.0 * (busy1 - busy0) / (total1 - total0)
    result.ok = True


def start_target(
    target: str, root: Path, upstream_port: int, args: argparse.Namespace
) -> tuple[Server | None, int]:
    if target == "direct":
        return None, upstream_port
    port = free_port()
    cpus = args.proxy_cpus
    if target == "nginx":
        body = nginx_proxy_body(port, upstream_port)
        return start_nginx("nginx-proxy", root, port, body, cpus), port
    if target == "minimal-aiohttp":
        argv = [
            sys.executable,
            str(HERE / "minimal_aiohttp_proxy.py"),
            str(port),
            f"http://127.0.0.1:{upstream_port}",
        ]
        server = Server("minimal-aiohttp", argv, root, port, cpus=cpus)
    else:
        access_log, metrics = RINGPROXY_VARIANTS[target]
        workdir = root / target
        workdir.mkdir(exist_ok=True)
        for stale in ("state.json", "audit.jsonl"):  # each run starts from the config
            (workdir / stale).unlink(missing_ok=True)
        config = workdir / "ringproxy.yaml"
        config.write_text(ringproxy_yaml(port, upstream_port, workdir, access_log, metrics,
                                         HEALTH_POOL.get(target, ""), WORKERS.get(target, 1)))
        command = args.before_cmd if target == "ringproxy-before" else args.ringproxy_cmd
        argv = [*ringproxy_argv(command), "run", "--config", str(config)]
        # Another build must not import this tree's package from the working directory.
        cwd = workdir if target == "ringproxy-before" else REPO
        server = Server(target, argv, root, port, cwd=cwd, cpus=cpus)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server, port


def run_target(target: str, root: Path, upstream: Server, args: argparse.Namespace) -> TargetResult:
    result = TargetResult(target)
    print(f"[bench] {target}: starting", file=sys.stderr, flush=True)
    proxy: Server | None = None
    try:
        proxy, port = start_target(target, root, upstream.port, args)
        print(
            f"[bench] {target}: listening on 127.0.0.1:{port}; warm-up {WARMUP_S}s, "
            f"measure {args.duration}s",
            file=sys.stderr,
            flush=True,
        )
        measure(result, port, proxy, upstream, args)
        if proxy is not None and proxy.proc is not None and proxy.proc.poll() is not None:
            result.error = f"{target} exited during the run\n{proxy.output()}"
    except (StartupError, RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
        result.ok = False
        result.error = str(exc)
        if proxy is not None:
            result.error += f"\n{proxy.output()}"
        print(f"[bench] {target}: FAILED\n{result.error}", file=sys.stderr, flush=True)
    finally:
        if proxy is not None:
            proxy.stop()
    return result


# --------------------------------------------------------------------------- report

RINGPROXY_LIKE = ("minimal-aiohttp", *RINGPROXY_VARIANTS)
GOAL_CPU_X_NGINX = 2.0  # issue 13: CPU per request and p99 within 2x NGINX's
GOAL_P99_X_NGINX = 2.0
GOAL_HEALTH_PERCENT = 3.0  # issue 15: health checks + outlier detection within 3 % CPU/request
GOAL_WORKERS_CPU_X = 1.10  # issue 14: CPU per request with workers: 2 within 10 % of 1
GOAL_FEATURE_US = 3.0  # issue 13: the access log and metrics each at most 3 us per request


def median_run(runs: list[TargetResult]) -> TargetResult:
    """The run with the median CPU per request (a failed run, if any failed)."""
    failed = [r for r in runs if not r.ok or r.cpu_us_per_req is None]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r.cpu_us_per_req or 0.0)
    return ordered[(len(ordered) - 1) // 2]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _get(results: dict[str, TargetResult], target: str, attr: str) -> float | None:
    r = results.get(target)
    value = getattr(r, attr) if r is not None and r.ok else None
    return value if isinstance(value, (int, float)) else None


def compute_ratios(results: dict[str, TargetResult]) -> dict[str, float | None]:
    """Each ringproxy-like target against NGINX (CPU per request, req/s, p99), and a few
    more: ringproxy against direct, and against the build given by --before-cmd."""
    out: dict[str, float | None] = {}
    for target in RINGPROXY_LIKE:
        if target not in results:
            continue
        for attr, key in (
            ("cpu_us_per_req", "cpu_per_req"),
            ("rps", "rps"),
            ("latency_p99_ms", "p99"),
        ):
            out[f"{target}_vs_nginx_{key}"] = ratio(
                _get(results, target, attr), _get(results, "nginx", attr)
            )
    out["ringproxy_vs_direct_rps"] = ratio(
        _get(results, "ringproxy", "rps"), _get(results, "direct", "rps")
    )
    for attr, key in (("cpu_us_per_req", "cpu_per_req"), ("rps", "rps")):
        out[f"workers2_vs_workers1_{key}"] = ratio(
            _get(results, "ringproxy-workers2", attr), _get(results, "ringproxy-workers1", attr))
    if "ringproxy-before" in results:
        out["ringproxy_vs_before_cpu_per_req"] = ratio(
            _get(results, "ringproxy", "cpu_us_per_req"),
            _get(results, "ringproxy-before", "cpu_us_per_req"),
        )
    return out


def compute_costs(results: dict[str, TargetResult]) -> dict[str, float | None]:
    """CPU us per request of the access log and of metrics (differences of two targets)."""
    cpu = {t: _get(results, t, "cpu_us_per_req") for t in RINGPROXY_VARIANTS}
    return {
        "access_log_us_per_req": difference(cpu["ringproxy-accesslog"], cpu["ringproxy"]),
        "metrics_us_per_req": difference(cpu["ringproxy"], cpu["ringproxy-nometrics"]),
        "health_us_per_req": difference(cpu["ringproxy-health"], cpu["ringproxy-nohealth"]),
        "health_cpu_percent": _percent_more(cpu["ringproxy-health"], cpu["ringproxy-nohealth"]),
    }


def _percent_more(a: float | None, b: float | None) -> float | None:
    r = ratio(a, b)
    return None if r is None else (r - 1) * 100


def paired_costs(rounds: dict[str, list[TargetResult]]) -> dict[str, list[float]]:
    """The same differences round by round (each pair ran back to back), sorted."""
    pairs = {
        "access_log_us_per_req": ("ringproxy-accesslog", "ringproxy"),
        "metrics_us_per_req": ("ringproxy", "ringproxy-nometrics"),
        "health_us_per_req": ("ringproxy-health", "ringproxy-nohealth"),
    }
    out: dict[str, list[float]] = {}
    for key, (a, b) in pairs.items():
        diffs = [
            x.cpu_us_per_req - y.cpu_us_per_req
            for x, y in zip(rounds.get(a, []), rounds.get(b, []), strict=False)
            if x.ok and y.ok and x.cpu_us_per_req is not None and y.cpu_us_per_req is not None
        ]
        if diffs:
            out[key] = sorted(diffs)
    return out


def _verdict(value: float | None, goal: float) -> str:
    if value is None:
        return ""
    return f"(goal <= {goal:g}: {'met' if value <= goal else 'NOT met'})"


def render(
    results: list[TargetResult],
    ratios: dict[str, float | None],
    costs: dict[str, float | None],
    args: argparse.Namespace,
) -> str:
    header = (
        f"{'target':<20} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>16} "
        f"{'user+sys':>11} {'preempt/req':>11} "
        f"{'CPU x nginx':>11} {'p99 x nginx':>11} {'upstr us/req':>12} {'host CPU':>8} "
        f"{'errors':>6}"
    )
    pinning = (
        f"proxy on CPU {sorted(args.proxy_cpus)}, wrk + upstream on CPU {sorted(args.load_cpus)}"
        if args.proxy_cpus
        else "no CPU pinning"
    )
    lines = [
        f"wrk: {args.duration}s, {args.connections} connections, {args.threads} thread(s), "
        f"header '{USER_HEADER}'; {os.cpu_count()} CPUs, {pinning}",
        "ringproxy: 2 rings (canary weight 50, stable), sticky on X-User-Id; "
        "-accesslog: access log to /dev/null; -nometrics: metrics.enabled false",
        "",
        header,
        "-" * len(header),
    ]
    for r in results:
        if not r.ok:
            first = (r.error or "failed").strip().splitlines()[0]
            lines.append(f"{r.target:<20} FAILED: {first[:100]}")
            continue
        errors = sum(r.socket_errors.values()) + r.non_2xx_3xx
        cpu = _fmt(r.cpu_us_per_req, ".1f") + (" (upstream)" if r.target == "direct" else "")
        host = _fmt(r.host_cpu_busy_pct, ".0f") + "%"
        cpu_x = _x(ratios.get(f"{r.target}_vs_nginx_cpu_per_req"))
        p99_x = _x(ratios.get(f"{r.target}_vs_nginx_p99"))
        if r.target not in RINGPROXY_LIKE:
            cpu_x = p99_x = ""
        split = (
            f"{r.cpu_user_us_per_req:.1f}+{r.cpu_sys_us_per_req:.1f}"
            if r.cpu_user_us_per_req is not None and r.cpu_sys_us_per_req is not None
            else "n/a"
        )
        lines.append(
            f"{r.target:<20} {_fmt(r.rps, ',.0f'):>9} {_fmt(r.latency_p50_ms, '.2f'):>7} "
            f"{_fmt(r.latency_p99_ms, '.2f'):>7} {cpu:>16} {split:>11} "
            f"{_fmt(r.preemptions_per_req, '.2f'):>11} {cpu_x:>11} {p99_x:>11} "
            f"{_fmt(r.upstream_cpu_us_per_req, '.1f'):>12} {host:>8} {errors:>6}"
        )
    lines += [
        "",
        "CPU us/req: utime+stime of the proxy process tree (nginx: master+worker) during the",
        "measured run / completed requests; for 'direct' it is the upstream nginx itself.",
        "user+sys: the same split into utime and stime. preempt/req: involuntary context",
        "switches of the measured process tree per request (preemptions: on a busy machine",
        "a process's writes wake wrk or the upstream, which may take its CPU; each costs",
        "system time and cache refills, and a slower process is preempted more often).",
        "host CPU: busy share of all cores during the run (includes wrk and the upstream).",
        "",
        "ratios (rps: higher is better; cpu/req and p99: lower is better):",
    ]
    rp_cpu = ratios.get("ringproxy_vs_nginx_cpu_per_req")
    rp_p99 = ratios.get("ringproxy_vs_nginx_p99")
    entries: list[tuple[str, float | None, str]] = [
        ("ringproxy vs nginx  cpu/req", rp_cpu, _verdict(rp_cpu, GOAL_CPU_X_NGINX)),
        ("ringproxy vs nginx  p99", rp_p99, _verdict(rp_p99, GOAL_P99_X_NGINX)),
        ("ringproxy vs nginx  rps", ratios.get("ringproxy_vs_nginx_rps"), ""),
        ("ringproxy vs direct rps", ratios.get("ringproxy_vs_direct_rps"), ""),
    ]
    if ratios.get("workers2_vs_workers1_rps") is not None:
        cpu = ratios.get("workers2_vs_workers1_cpu_per_req")
        entries += [
            ("workers: 2 vs workers: 1 cpu/req", cpu, _verdict(cpu, GOAL_WORKERS_CPU_X)),
            ("workers: 2 vs workers: 1 rps", ratios.get("workers2_vs_workers1_rps"), ""),
        ]
    if "ringproxy_vs_before_cpu_per_req" in ratios:
        entries.append(
            ("ringproxy vs ringproxy-before cpu/req",
             ratios.get("ringproxy_vs_before_cpu_per_req"), "")
        )
    for label, value, verdict in entries:
        lines.append(f"  {label:<40} {_x(value):>7} {verdict}")
    lines.append("")
    lines.append("feature costs (CPU us per request, from the table's rows):")
    for key, label in (
        ("access_log_us_per_req", "access log (ringproxy-accesslog - ringproxy)"),
        ("metrics_us_per_req", "metrics (ringproxy - ringproxy-nometrics)"),
    ):
        value = costs.get(key)
        shown = "n/a" if value is None else f"{value:+.1f}"
        lines.append(f"  {label:<48} {shown:>7} {_verdict(value, GOAL_FEATURE_US)}")
    health = costs.get("health_cpu_percent")
    if health is not None:
        lines.append(f"  {'health checks + outlier (health - nohealth)':<48} "
                     f"{health:+6.1f}% {_verdict(health, GOAL_HEALTH_PERCENT)}")
    for r in results:
        errors = sum(r.socket_errors.values()) + r.non_2xx_3xx
        if r.ok and errors:
            lines.append(
                f"\nWARNING: {r.target}: {r.non_2xx_3xx} non-2xx/3xx responses, socket errors "
                f"{r.socket_errors}; req/s counts every completed response, failed ones included."
            )
        if r.error:
            detail = r.error.strip().splitlines()
            if len(detail) > 40:
                detail = [f"... ({len(detail) - 40} earlier lines omitted)", *detail[-40:]]
            lines.append(f"\n{r.target} error:\n  " + "\n  ".join(detail))
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(proxy CPUs, wrk + upstream CPUs): the last allowed CPU for the proxy alone, the
    rest for the load; no pinning on one CPU or when not asked."""
    allowed = sorted(os.sched_getaffinity(0))
    if not pin or len(allowed) < 2:
        return None, None
    return {allowed[-1]}, set(allowed[:-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--duration", type=int, default=10, help="measured wrk run in seconds (default 10)"
    )
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of {','.join(TARGETS)} "
        f"(default: {','.join(DEFAULT_TARGETS)})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the targets this many times, interleaved, every other round in reverse "
        "order; report each one's median round by CPU per request (default 1)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    p.add_argument(
        "--ringproxy-cmd",
        help="command that starts ringproxy (default: venv 'ringproxy' script, else "
        "'python -m proxy'); 'run --config FILE' is appended",
    )
    p.add_argument(
        "--before-cmd",
        help="command that starts another ringproxy build (e.g. the last release), run as "
        "target ringproxy-before with the same config, in a temporary working directory",
    )
    p.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run each proxy alone on the last CPU, wrk and the upstream on the others "
        "(needs 2+ CPUs; default off: on 2 CPUs the upstream then shares wrk's core and "
        "NGINX's p99 grows tenfold, which flatters the p99 ratios)",
    )
    args = p.parse_args(argv)
    chosen = DEFAULT_TARGETS if args.only is None else tuple(args.only.split(","))
    only = [t.strip() for t in chosen if t.strip()]
    unknown = sorted(set(only) - set(TARGETS))
    if unknown or not only:
        p.error(f"--only: unknown target(s) {unknown}; choose from {','.join(TARGETS)}")
    if "ringproxy-before" in only and not args.before_cmd:
        if args.only is not None:
            p.error("target ringproxy-before needs --before-cmd")
        only.remove("ringproxy-before")
    args.targets = [t for t in TARGETS if t in only]
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.rounds < 1:
        p.error("--duration, --connections, --threads and --rounds must be >= 1")
    if args.connections < args.threads:
        p.error("--connections must be >= --threads (wrk requirement)")
    args.proxy_cpus, args.load_cpus = split_cpus(args.pin)
    return args


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(
                f"error: '{tool}' not found on PATH (apt-get install nginx-light wrk)",
                file=sys.stderr,
            )
            return 2
    signal.signal(signal.SIGTERM, _raise_exit)

    root = Path(tempfile.mkdtemp(prefix="ringproxy-bench-"))
    root.chmod(0o755)  # nginx workers drop to 'nobody' when started as root
    upstream: Server | None = None
    results: list[TargetResult] = []
    rounds: dict[str, list[TargetResult]] = {}
    try:
        upstream_port = free_port()
        try:
            upstream = start_nginx(
                "upstream", root, upstream_port, upstream_body(upstream_port), args.load_cpus
            )
        except StartupError as exc:
            print(f"error: upstream nginx did not start:\n{exc}", file=sys.stderr)
            return 1
        # Rounds interleave the targets, so slow drift of the machine hits all of them,
        # and every other round runs them in reverse, so no target always goes first.
        for n in range(args.rounds):
            if args.rounds > 1:
                print(f"[bench] round {n + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for target in args.targets if n % 2 == 0 else args.targets[::-1]:
                rounds.setdefault(target, []).append(run_target(target, root, upstream, args))
        results = [median_run(rounds[t]) for t in args.targets]
    finally:
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(root, ignore_errors=True)

    by_target = {r.target: r for r in results}
    ratios = compute_ratios(by_target)
    costs = compute_costs(by_target)
    print(render(results, ratios, costs, args))
    per_round = paired_costs(rounds) if args.rounds > 1 else {}
    if args.rounds > 1:
        print("\nproxy CPU us/req per round (the table shows each target's median round):")
        for target, runs in rounds.items():
            cpu = ", ".join(_fmt(r.cpu_us_per_req, ".1f") for r in runs)
            print(f"  {target:<20} {cpu}")
        for key, diffs in per_round.items():
            each = ", ".join(f"{d:+.1f}" for d in diffs)
            print(f"  {key} per round (sorted): {each}; median {statistics.median(diffs):+.1f}")
    if args.json is not None:
        payload = {
            "config": {
                "duration_s": args.duration,
                "connections": args.connections,
                "threads": args.threads,
                "warmup_s": WARMUP_S,
                "rounds": args.rounds,
                "user_header": USER_HEADER,
                "proxy_cpus": sorted(args.proxy_cpus or ()),
                "load_cpus": sorted(args.load_cpus or ()),
                "before_cmd": args.before_cmd,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "results": [asdict(r) for r in results],
            "rounds": {t: [asdict(r) for r in runs] for t, runs in rounds.items()},
            "ratios": ratios,
            "costs": costs,
            "costs_per_round": per_round,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    ok = bool(results) and all(r.ok for runs in rounds.values() for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
