"""``ringproxy demo``: a canary rollout that runs by itself, all on loopback.

Two upstream apps ("stable" and "canary") answer every path with a small JSON body that
says which version answered and which ring the proxy put the request in; ``POST
/demo/break`` makes one answer 500 to most requests (``/demo/heal`` undoes it).  The demo
serves the embedded config in front of them with an admin token generated for the run and
a state directory of its own, and sends background traffic from a few hundred sticky users
(``traffic.py``) so that the judge has something to judge: the canary steps up every ~20 s,
and a broken canary is rolled back within seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import secrets
import shlex
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from proxy.config import Config, parse_config
from proxy.config.admin import AdminToken
from proxy.config.rollout import StateFiles
from proxy.config.values import Listen, parse_upstream
from proxy.demo.traffic import RATE, USERS, Traffic
from proxy.routing.assign import bucket_of
from proxy.server import Proxy, serve

TOKEN_ENV = "RINGPROXY_ADMIN_TOKEN"  # how the audit trail names the demo's token
BROKEN_ERROR_SHARE = 0.7  # of a broken version's answers, the share that are 500s


def demo_config() -> Config:
    text = resources.files("proxy.demo").joinpath("demo.yaml").read_text(encoding="utf-8")
    return parse_config(text, source="config/demo.yaml (embedded)")


class Version:
    """One demo upstream's behaviour: a few ms of work, and 500s while it is broken."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.broken = False

    def __repr__(self) -> str:
        return f"<Version {self.name} {'broken' if self.broken else 'healthy'}>"


def upstream_app(version: str | Version) -> web.Application:
    state = version if isinstance(version, Version) else Version(version)

    async def answer(request: web.Request) -> web.Response:
        await asyncio.sleep(random.uniform(0.002, 0.012))  # some work, for the latency charts
        status = 200
        if state.broken and random.random() < BROKEN_ERROR_SHARE:
            status = 500
        return web.json_response(
            {
                "version": state.name,
                "ring": request.headers.get("X-Ring"),
                "method": request.method,
                "path": request.path_qs,
                "request_id": request.headers.get("X-Request-Id"),
                **({"error": "the demo broke this version"} if status == 500 else {}),
            },
            status=status,
            headers={"X-Upstream-Version": state.name},
        )

    def control(broken: bool) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            state.broken = broken
            return web.json_response({"version": state.name, "broken": state.broken})

        return handle

    app = web.Application()
    app.router.add_post("/demo/break", control(True))
    app.router.add_post("/demo/heal", control(False))
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
    token = secrets.token_urlsafe(24)
    state_dir = tempfile.mkdtemp(prefix="ringproxy-demo-")
    runners: list[web.AppRunner] = []
    traffic: Traffic | None = None
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
        admin = dataclasses.replace(admin, tokens=(AdminToken(TOKEN_ENV, "admin", token),))
        state = StateFiles(os.path.join(state_dir, "state.json"),
                           os.path.join(state_dir, "audit.jsonl"))
        config = dataclasses.replace(config, pools=tuple(pools), listen=listen, admin=admin,
                                     state=state)

        async def ready(proxy: Proxy) -> None:
            nonlocal traffic
            traffic = Traffic(proxy.url)
            _leave_out_of_the_access_log(proxy, traffic.is_ours)
            traffic.start()
            _banner(proxy, token, ephemeral)

        await serve(config, on_ready=ready)
    finally:
        if traffic is not None:
            await traffic.stop()
        for runner in runners:
            await runner.cleanup()
        shutil.rmtree(state_dir, ignore_errors=True)


def _leave_out_of_the_access_log(proxy: Proxy, ours: Callable[[str], bool]) -> None:
    """The access log shows the requests you send; the background traffic would bury them."""
    if proxy.access_log is not None:
        proxy.access_log.skip = ours


def _users(proxy: Proxy) -> tuple[str, str]:
    """Two demo user ids: the first lands in the canary ring, the second in stable."""
    compiled = proxy.runtime.table.routes["api"]
    lo, hi = compiled.range_of("canary") or (0, 0)
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
    in_canary = [n for n in names if lo <= bucket_of(compiled.salt, n) < hi]
    elsewhere = [n for n in names if n not in in_canary]
    return (in_canary or ["alice"])[0], (elsewhere or ["bob"])[0]


def command_prefix() -> str:
    """How to call this ringproxy from the user's shell, whatever its PATH and directory:
    ``ringproxy`` when that name finds this very program, else its absolute path (a
    virtualenv that is not activated), else ``python -m proxy``."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "ringproxy" and os.path.isfile(script):
        on_path = shutil.which("ringproxy")
        if on_path and os.path.realpath(on_path) == os.path.realpath(script):
            return "ringproxy"
        return shlex.quote(os.path.abspath(script))
    return f"{shlex.quote(sys.executable)} -m proxy"


def _banner(proxy: Proxy, token: str, ephemeral: bool) -> None:
    url, admin = proxy.url, proxy.admin_url
    canary_user, stable_user = _users(proxy)
    rp = command_prefix()
    upstreams = {p.config.name: p.servers[0].upstream.url for p in proxy.runtime.pools.values()}
    canary_ring = next(r for r in proxy.config.routes[0].rings if r.name == "canary")
    steps = canary_ring.progression.steps if canary_ring.progression else ()
    step_text = " -> ".join(f"{s.weight / 100:g} %" for s in steps)
    seconds = canary_ring.progression.min_step_duration if canary_ring.progression else 0
    ctl = f"{rp} demo-ctl" + (f" --upstream {upstreams['canary']}" if ephemeral else "")
    lines = [
        "",
        "ringproxy demo is running. Upstreams:",
        *(f"  {name:7} {address}" for name, address in upstreams.items()),
        f"Proxy: {url}    Admin: {admin}/healthz",
        f"Background traffic: {USERS} sticky users, {RATE:g} requests/s "
        "(left out of the access log on stdout)",
        "",
        f"The rollout: ring canary takes {step_text} of users, one step every {seconds:g} s "
        "while the judge finds it as healthy as stable.",
        "Watch it on the status page (the token rides in the #fragment, never sent to a "
        "server):",
        f"  {admin}/#token={token}",
        "",
        "Try these (the JSON says which version answered and which ring you were put in):",
        f"  curl -s -H 'X-User-Id: {canary_user}' {url}/hello   "
        "# in the 20 % canary share -> ring canary",
        f"  curl -s -H 'X-User-Id: {stable_user}' {url}/hello   "
        "# everyone else           -> ring stable",
        f"  curl -s -H 'X-Beta: true' {url}/hello       "
        "# a beta tester           -> ring beta (canary)",
        "",
        "In another shell (the admin token was generated for this run):",
        f"  export RINGPROXY_ADMIN_URL={admin} {TOKEN_ENV}={token}",
        f"  {rp} status          # the rings, weights and the judge's verdicts "
        "(--watch to follow)",
        f"  {rp} explain --route api --header X-User-Id={canary_user}   "
        "# which ring and why, at the live weights",
        f"  {rp} events --since 10m",
        "",
        "Break the canary (it answers 500 to most requests); the judge rolls it back "
        "within seconds:",
        f"  {ctl} break canary",
        "Heal it and start its rollout again (beta went down with it: same pool):",
        f"  {ctl} heal canary && {rp} resume api canary && {rp} resume api beta",
        "",
        "Press Ctrl-C to stop.",
        "",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
