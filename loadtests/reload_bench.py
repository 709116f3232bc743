"""How long a reload takes, and what reloads do to request latency.

1. In process: parse + validate + build the runtime for a config of ROUTES x RINGS
   (default 200 x 5), alternating two versions (median and max of N reloads).
2. Under load: ringproxy (``run --no-watch``) in front of an NGINX upstream, wrk for
   DURATION seconds without reloads, then DURATION seconds while the config is rewritten
   and SIGHUP sent every INTERVAL seconds; p50/p99 and errors of both runs side by side.

    apt-get install nginx-light wrk
    .venv/bin/python loadtests/reload_bench.py [--routes 200] [--rings 5] [--duration 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

from proxy.config import load_config
from proxy.runtime import Runtime


def big_config(port: int, upstream_port: int, routes: int, rings: int, version: int) -> str:
    lines = [
        f"listen: 127.0.0.1:{port}",
        "admin: {listen: 127.0.0.1:0}",
        "access_log: {enabled: false}",
        "pools:",
        f"  a: {{servers: [http://127.0.0.1:{upstream_port}]}}",
        f"  b: {{servers: [http://127.0.0.1:{upstream_port}]}}",
        "routes:",
    ]
    for r in range(routes):
        lines += [
            f"  - name: r{r}",
            f"    match: {{host: r{r}.example.com, path_prefix: /v{version}}}",
            '    sticky: {key: ["header:X-User-Id", "cookie:uid"]}',
            "    rings:",
        ]
        for k in range(rings - 1):
            lines.append(
                f"      - {{name: k{k}, pool: {'ab'[k % 2]}, weight: {1 + version + k}, "
                f'rules: [{{attr: "header:X-K{k}", regex: "^v[0-9]+$"}}]}}'
            )
        lines.append("      - {name: default, pool: a}")
    # the route wrk's requests hit (any host), its ring moving between pools
    lines += ["  - name: bench", "    rings:", f"      - {{name: main, pool: {'ab'[version]}}}"]
    return "\n".join(lines) + "\n"


def in_process(routes: int, rings: int, reloads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"v{v}.yaml" for v in (0, 1)]
        for v, path in enumerate(paths):
            path.write_text(big_config(8080, 9000, routes, rings, v))
        runtime = Runtime(load_config(paths[0]))
        parse, build = [], []
        for i in range(reloads):
            t0 = time.perf_counter()
            config = load_config(paths[(i + 1) % 2])
            t1 = time.perf_counter()
            runtime = Runtime(config, runtime)
            t2 = time.perf_counter()
            parse.append(t1 - t0)
            build.append(t2 - t1)
        total = [p + b for p, b in zip(parse, build, strict=True)]
        return {
            "size_kib": paths[0].stat().st_size / 1024,
            "parse_ms": statistics.median(parse) * 1000,
            "build_ms": statistics.median(build) * 1000,
            "total_ms": statistics.median(total) * 1000,
            "max_ms": max(total) * 1000,
        }


def under_load(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        upstream_port, port = bench.free_port(), bench.free_port()
        upstream = bench.start_nginx("upstream", root, upstream_port,
                                     bench.upstream_body(upstream_port))
        path = root / "ringproxy.yaml"
        texts = [big_config(port, upstream_port, args.routes, args.rings, v) for v in (0, 1)]
        path.write_text(texts[0])
        proxy = bench.Server("ringproxy", [*bench.ringproxy_argv(None), "run", "--config",
                                           str(path), "--no-watch"], root, port)
        try:
            proxy.start()
            bench.run_wrk(port, 2, args.connections, 1, latency=False)  # warm-up
            quiet = bench.run_wrk(port, args.duration, args.connections, 1, latency=True)
            stop = threading.Event()
            done = [0]

            def reload_loop() -> None:
                while not stop.wait(args.interval):
                    done[0] += 1
                    path.write_text(texts[done[0] % 2])
                    assert proxy.proc is not None
                    os.kill(proxy.proc.pid, signal.SIGHUP)

            thread = threading.Thread(target=reload_loop, daemon=True)
            thread.start()
            try:
                busy = bench.run_wrk(port, args.duration, args.connections, 1, latency=True)
            finally:
                stop.set()
                thread.join()
            time.sleep(0.5)
            log = proxy.stderr_path.read_text()
        finally:
            proxy.stop()
            upstream.stop()
    applied = log.count("config reloaded (signal)")
    print(f"\nunder load ({args.duration}s each, {args.connections} connections):")
    print(f"  {'':18} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in (("no reloads", quiet), (f"{applied} reloads", busy)):
        errors = sum(r.socket_errors.values()) + r.non_2xx_3xx
        p50, p99 = r.percentiles_ms.get("p50", 0.0), r.percentiles_ms.get("p99", 0.0)
        print(f"  {name:18} {r.rps:9,.0f} {p50:8.2f} {p99:8.2f} {errors:7}")
    quiet_p99 = quiet.percentiles_ms.get("p99")
    if quiet_p99:
        print(f"  p99 ratio (reloads / none): {busy.percentiles_ms['p99'] / quiet_p99:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=200)
    parser.add_argument("--rings", type=int, default=5)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between reloads")
    parser.add_argument("--skip-load", action="store_true", help="only the in-process timing")
    args = parser.parse_args()
    timing = in_process(args.routes, args.rings, args.reloads)
    print(f"config: {args.routes} routes x {args.rings} rings ({timing['size_kib']:.0f} KiB); "
          f"median of {args.reloads} reloads:")
    print(f"  parse+validate {timing['parse_ms']:.1f} ms, build runtime {timing['build_ms']:.1f} "
          f"ms, total {timing['total_ms']:.1f} ms (max {timing['max_ms']:.1f} ms)")
    if not args.skip_load:
        under_load(args)
    asyncio.set_event_loop_policy(None)


if __name__ == "__main__":
    main()
