"""Run the proxy: listeners, signal handling, graceful shutdown.

``Proxy`` owns the live pieces (runtime, handler, the aiohttp servers) so tests and the
demo can start it inside their own event loop and learn the bound ports; ``run`` is the
blocking entry point the CLI uses (uvloop, SIGTERM/SIGINT -> graceful stop -> exit 0).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.config import Config
from proxy.handler import ProxyHandler
from proxy.metrics import Metrics
from proxy.runtime import Runtime
from proxy.values import Listen

log = logging.getLogger("ringproxy")


def _url(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = addr[0], addr[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Proxy:
    """The proxy and its admin listener, startable and stoppable inside a running loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime = Runtime(config)
        # Its own registry per Proxy: tests run several in one process.
        self.metrics = Metrics()
        self.metrics.attach(self.runtime)
        self.metrics.config_loaded(config.revision)
        self.access_log = AccessLog(config.access_log.path) if config.access_log.enabled else None
        self.handler = ProxyHandler(self.runtime, self.access_log)
        self._runners: list[web.BaseRunner] = []
        self.url = ""
        self.admin_url = ""

    async def start(self) -> None:
        await self.runtime.start()
        try:
            server = web.Server(self.handler, handler_cancellation=True, access_log=None)
            runner = web.ServerRunner(server, shutdown_timeout=self.config.shutdown_grace)
            self.url = await self._listen(runner, self.config.listen)
            admin = web.AppRunner(_admin_app(self), access_log=None, shutdown_timeout=1.0)
            self.admin_url = await self._listen(admin, self.config.admin.listen)
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, runner: web.BaseRunner, listen: Listen) -> str:
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from exc
        return _url(runner.addresses[0])

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_grace), close."""
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.runtime.close()
        if self.access_log is not None:
            self.access_log.close()

    def __repr__(self) -> str:
        return f"<Proxy {self.url or 'not started'} revision={self.config.revision}>"


def _admin_app(proxy: Proxy) -> web.Application:
    # The admin API proper (token auth, rollout actions) lives in its own issue; health
    # probes and /metrics are unauthenticated on purpose so load balancers, kubelets and
    # Prometheus can use them (the admin listener is loopback unless configured otherwise).
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready = all(p.session is not None for p in proxy.runtime.pools.values())
        return web.json_response(
            {"ready": ready, "revision": proxy.config.revision}, status=200 if ready else 503
        )

    async def metrics(request: web.Request) -> web.Response:
        # Rendered on the loop thread, where the recorders are written: a consistent
        # snapshot, and a few ms at most for hundreds of rings.
        body, content_type = proxy.metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(
    config: Config,
    on_ready: Callable[[Proxy], Awaitable[None] | None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    proxy = Proxy(config)
    await proxy.start()
    log.info("proxy listening on %s (config %s, revision %s)",
             proxy.url, config.source, config.revision)
    log.info("admin listening on %s", proxy.admin_url)
    try:
        if on_ready is not None:
            result = on_ready(proxy)
            if result is not None:
                await result
        await stop.wait()
        log.info("shutting down: waiting up to %gs for in-flight requests",
                 config.shutdown_grace)
        # A second signal stops waiting.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _cancel_current(asyncio.current_task()))
    finally:
        await proxy.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")


def _cancel_current(task: asyncio.Task[None] | None) -> Callable[[], None]:
    def cancel() -> None:
        if task is not None:
            task.cancel()

    return cancel


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` on uvloop (falling back to asyncio where uvloop is not available)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        asyncio.run(main())  # type: ignore[arg-type]
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())  # type: ignore[arg-type]
