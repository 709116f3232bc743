"""``ringproxy demo``: the proxy in front of two demo upstreams, all on loopback.

The two upstream apps ("stable" and "canary") answer every path with a small JSON body
that says which version answered and which ring the proxy put the request in.
"""

from __future__ import annotations

import dataclasses
import sys
from importlib import resources

from aiohttp import web

from proxy.config import Config, parse_config
from proxy.config.values import Listen, parse_upstream
from proxy.routing.assign import bucket_of
from proxy.server import Proxy, serve


def demo_config() -> Config:
    text = resources.files("proxy.demo").joinpath("demo.yaml").read_text(encoding="utf-8")
    return parse_config(text, source="config/demo.yaml (embedded)")


def upstream_app(version: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "version": version,
                "ring": request.headers.get("X-Ring"),
                "method": request.method,
                "path": request.path_qs,
                "request_id": request.headers.get("X-Request-Id"),
            },
            headers={"X-Upstream-Version": version},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def _start_upstream(version: str, listen: Listen) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(upstream_app(version), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"demo upstream {version!r} cannot listen on {listen}: "
                      f"{exc.strerror} (try `ringproxy demo --ephemeral`)") from exc
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def run_demo(ephemeral: bool = False) -> None:
    config = demo_config()
    runners: list[web.AppRunner] = []
    try:
        pools = []
        for pool in config.pools:
            addr = pool.servers[0]
            listen = Listen(addr.host, 0 if ephemeral else addr.port)
            runner, url = await _start_upstream(pool.name, listen)
            runners.append(runner)
            pools.append(dataclasses.replace(pool, servers=(parse_upstream(url),)))
        listen, admin = config.listen, config.admin
        if ephemeral:
            listen = Listen("127.0.0.1", 0)
            admin = dataclasses.replace(config.admin, listen=Listen("127.0.0.1", 0))
        config = dataclasses.replace(config, pools=tuple(pools), listen=listen, admin=admin)
        await serve(config, on_ready=_banner)
    finally:
        for runner in runners:
            await runner.cleanup()


def _users(proxy: Proxy) -> tuple[str, str]:
    """Two demo user ids: the first lands in the canary ring, the second in stable."""
    compiled = proxy.runtime.table.routes["api"]
    lo, hi = compiled.range_of("canary") or (0, 0)
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
    in_canary = [n for n in names if lo <= bucket_of(compiled.salt, n) < hi]
    elsewhere = [n for n in names if n not in in_canary]
    return (in_canary or ["alice"])[0], (elsewhere or ["bob"])[0]


def _banner(proxy: Proxy) -> None:
    url = proxy.url
    canary_user, stable_user = _users(proxy)
    lines = [
        "",
        "ringproxy demo is running. Upstreams:",
        *(f"  {p.config.name:7} {p.servers[0].upstream.url}" for p in proxy.runtime.pools.values()),
        f"Proxy: {url}    Admin: {proxy.admin_url}/healthz",
        "",
        "Try these (the JSON says which version answered and which ring you were put in):",
        f"  curl -s -H 'X-User-Id: {canary_user}' {url}/hello   "
        "# in the 20 % canary share -> ring canary",
        f"  curl -s -H 'X-User-Id: {stable_user}' {url}/hello   "
        "# everyone else           -> ring stable",
        f"  curl -s -H 'X-Beta: true' {url}/hello       "
        "# a beta tester           -> ring beta (canary)",
        "Ask why: ringproxy explain --config config/demo.yaml --route api "
        f"--header X-User-Id={canary_user}",
        "",
        "Press Ctrl-C to stop.",
        "",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
