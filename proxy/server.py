"""Run the proxy: listeners, signal handling, graceful shutdown.

``Proxy`` owns the live pieces (runtime, the data plane, its listeners, the admin
listener) so tests and the demo can start it inside their own event loop and learn the
bound ports; ``run`` is the blocking entry point the CLI uses (uvloop, SIGTERM/SIGINT ->
graceful stop -> exit 0).

The data plane's listeners (``listen`` and, when configured, ``listen_tls``) serve
``ClientConnection`` Protocols sharing one ``DataPlane``; the process raises its soft
``RLIMIT_NOFILE`` at start and admits at most ``connection_cap`` client connections.  The
admin listener is aiohttp's.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path

from aiohttp import web

from proxy import compiled, processlog
from proxy.admin.api import admin_app
from proxy.config import Config
from proxy.config.changes import Applies, ReloadPlan, reload_plan
from proxy.config.rollout import WINDOW_HORIZON
from proxy.config.values import Listen
from proxy.control.controller import Checkpoint, Controller
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.client import DataPlane
from proxy.dataplane.listener import (
    CertificateWatcher,
    ConnectionGate,
    connection_cap,
    listen,
    raise_nofile_limit,
    serve_socket,
)
from proxy.dataplane.upstream import UpstreamPool
from proxy.fleet.member import Member, fleet_member
from proxy.health.state import Transition
from proxy.metrics import Metrics
from proxy.reload import Reloader, ReloadResult
from proxy.runtime import Runtime

log = logging.getLogger("ringproxy")


def _url(addr: tuple[str, int] | tuple[str, int, int, int], scheme: str = "http") -> str:
    host, port = addr[0], addr[1]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


_CERT_CHECK_EVERY = 1.0  # seconds between looks at the TLS certificate files


class Proxy:
    """The proxy and its admin listener, startable and stoppable inside a running loop."""

    def __init__(self, config: Config, watch: bool = False, fresh_state: bool = False,
                 share: int = 1) -> None:
        """``share``: the number of worker processes enforcing the rings' limits side by
        side (a worker of ``workers: N``; see ``RingRuntime``)."""
        self.config = config
        self.runtime = Runtime(config, share=share)
        # Its own registry per Proxy: tests run several in one process.
        self.metrics = self._make_metrics()
        self.metrics.attach(self.runtime)
        self.metrics.config_loaded(config.revision)
        self.controller = Controller(config, self.metrics)
        # state.backend: redis: one rollout shared with the other members (proxy.fleet).
        self.fleet = self._make_fleet()
        self._watch_health(self.runtime)
        self._fresh_state = fresh_state
        self.access_log = AccessLog(config.access_log.path) if config.access_log.enabled else None
        processlog.use_config_format(config.log_format)
        self.plane: DataPlane | None = None  # made at start, inside the event loop
        self.gate: ConnectionGate | None = None
        self.certificates: CertificateWatcher | None = None
        self._listeners: list[asyncio.Server] = []
        self._runners: list[web.BaseRunner] = []
        self._draining: set[asyncio.Task[None]] = set()
        self._cert_task: asyncio.Task[None] | None = None
        self.draining = False  # SIGTERM came: /readyz answers 503 while the listener serves
        self.url = ""
        self.tls_url = ""
        self.admin_url = ""
        # The client listeners' sockets, when made elsewhere: a worker process serves the
        # listening sockets its supervisor made for it ("http", "https": one per address).
        self.sockets: dict[str, list[socket.socket]] | None = None
        # Reloads need a file to read again: the embedded demo config has none.
        self.reloader: Reloader | None = None
        if config.source and Path(config.source).is_file():
            self.reloader = Reloader(config.source, config, self.apply, self._reloaded)
        self._watch = watch and self.reloader is not None
        # Set by ``serve``: objects alive once started (config, tables, modules) are moved
        # out of the cyclic collector's scans, so a full collection stays short.
        self.freeze_gc = False

    def _make_metrics(self) -> Metrics:
        return Metrics(window_horizon=WINDOW_HORIZON)

    def _make_fleet(self) -> Member | None:
        return fleet_member(self.config.state, self.controller, self.metrics)

    async def apply(self, config: Config) -> None:
        """Serve ``config`` from now on: build, start, then swap one reference.

        What changes live and what waits for a restart is ``reload_plan``'s decision; each
        key that waits is logged as a warning.  Requests in flight finish on the runtime
        they started with; pools the new config no longer uses are closed once their last
        request is done.  If anything fails, the running config is left as it was (what
        was built for the new one is closed) and the error is raised.
        """
        plan = reload_plan(self.config, config)
        runtime, access_log = await self._prepare(config, plan)
        checkpoint: Checkpoint | None = None
        try:
            if plan.changed("webhooks"):
                await self.controller.set_webhooks(config.webhooks)
            self.metrics.attach(runtime)
            # Live weights and rollbacks, before the swap; carried-over rings read the new
            # table from here on, so nothing below awaits until the swap is done.
            checkpoint = self.controller.checkpoint()
            self.controller.configure(runtime)
        except BaseException:
            # Hand the running runtime back what the new one took (the rollout states as they
            # were, not re-derived), then let go of the new.
            if checkpoint is not None:
                self.controller.back_to(checkpoint)
            self.metrics.attach(self.runtime)
            await self.controller.set_webhooks(self.config.webhooks)  # no-op if unchanged
            await self._discard(runtime, access_log)
            raise
        self._swap(config, runtime, access_log, plan)

    def _swap(self, config: Config, runtime: Runtime, access_log: AccessLog | None,
              plan: ReloadPlan) -> None:
        """Serve ``runtime`` from the next request on (its states are in its table)."""
        if plan.changed("access_log"):
            old_log, self.access_log = self.access_log, access_log
            if self.plane is not None:
                self.plane.access_log = access_log
            if old_log is not None:
                old_log.close()
        if self.plane is not None:
            self.plane.runtime = runtime  # the swap: the next request sees the new config
        self.runtime, self.config = runtime, config
        if plan.changed("log_format"):
            processlog.use_config_format(config.log_format)
        self._watch_health(runtime)
        for change in plan.changes:
            log.log(logging.INFO if change.applies is Applies.LIVE else logging.WARNING,
                    "%s", change.message)
        if self.freeze_gc:
            gc.freeze()  # the new config is long-lived: keep it out of collections
        for pool in runtime.retired:
            task = asyncio.ensure_future(_drain(pool))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _prepare(self, config: Config, plan: ReloadPlan) -> tuple[Runtime, AccessLog | None]:
        """What ``config`` needs that can fail (new pools started, a new access log opened),
        done before anything the running config uses is touched."""
        # Building tables for hundreds of routes takes tens of ms of pure computation: in a
        # worker thread (it only reads the current runtime; reloads are serialised).
        runtime = await asyncio.to_thread(Runtime, config, self.runtime)
        access_log = self.access_log
        try:
            await runtime.start()
            if plan.changed("access_log"):
                enabled = config.access_log.enabled
                access_log = AccessLog(config.access_log.path) if enabled else None
        except BaseException:
            await self._discard(runtime, access_log)
            raise
        return runtime, access_log

    async def _discard(self, runtime: Runtime, access_log: AccessLog | None) -> None:
        """Close what a failed apply built: its new pools and access log, not the running ones."""
        if access_log is not None and access_log is not self.access_log:
            access_log.close()
        running = set(map(id, self.runtime.pools.values()))
        for pool in runtime.pools.values():
            if id(pool) not in running:
                await pool.close()

    def _watch_health(self, runtime: Runtime) -> None:
        """Servers of ``runtime``'s pools going out of rotation or back become events of
        the rings using them (the rings of the runtime serving when it happens)."""
        for name, pool in runtime.pools.items():
            pool.health.listener = functools.partial(self._server_changed, name)

    def _server_changed(self, pool: str, change: Transition) -> None:
        rings = [(r.route, r.name) for rings in self.runtime.rings.values() for r in rings
                 if r.pool.config.name == pool]
        self.controller.server_changed(change, rings)

    def _reloaded(self, result: ReloadResult) -> None:
        if result.ok:
            self.metrics.reload_succeeded(result.revision)
        else:
            self.metrics.reload_failed()

    async def start(self) -> None:
        # Rollout state before anything listens: a rolled-back ring stays rolled back.
        self.controller.load(fresh=self._fresh_state)
        self.controller.configure(self.runtime)
        if self.fleet is not None:
            await self.fleet.start()  # the fleet's agreed states before anything listens
        await self.runtime.start()
        try:
            await self._listen_clients()
            admin = web.AppRunner(self._admin_app(), access_log=None, shutdown_timeout=1.0)
            self.admin_url = await self._listen(admin, self.config.admin.listen)
        except BaseException:
            await self.stop()
            raise
        if self._watch and self.reloader is not None:
            self.reloader.start_watching()
        self.controller.start()

    def _admin_app(self) -> web.Application:
        return admin_app(self)

    async def _listen_clients(self) -> None:
        """The data plane's listeners, behind one connection gate for the process."""
        config = self.config
        soft, _ = raise_nofile_limit()
        self.gate = ConnectionGate(connection_cap(config.limits, soft))
        plane = self.plane = DataPlane(self.runtime, self.access_log, self.gate)
        loop = asyncio.get_running_loop()
        given = self.sockets
        if given is not None:
            for sock in given.get("http", []):
                self._listeners.append(await serve_socket(
                    loop, lambda: plane.protocol("http"), sock, None))
        else:
            self._listeners.append(await listen(
                loop, lambda: plane.protocol("http"), config.listen, None))
        self.url = _url(self._listeners[0].sockets[0].getsockname())
        if config.listen_tls is not None:
            watcher = self.certificates = CertificateWatcher(config.listen_tls)
            head = config.limits.head_timeout
            if given is not None:
                tls = [await serve_socket(loop, lambda: plane.protocol("https"), sock,
                                          watcher.context, handshake_timeout=head)
                       for sock in given.get("https", [])]
            else:
                tls = [await listen(loop, lambda: plane.protocol("https"),
                                    config.listen_tls.listen, watcher.context,
                                    handshake_timeout=head)]
            self._listeners.extend(tls)
            self.tls_url = _url(tls[0].sockets[0].getsockname(), "https")
            self._cert_task = asyncio.ensure_future(self._watch_certificates(watcher))

    async def _watch_certificates(self, watcher: CertificateWatcher) -> None:
        while True:
            await asyncio.sleep(_CERT_CHECK_EVERY)
            watcher.check()

    async def _listen(self, runner: web.BaseRunner, listen: Listen) -> str:
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from exc
        return _url(runner.addresses[0])

    async def drain(self) -> None:
        """Say not ready (/readyz 503) for ``drain_delay`` while still serving, so load
        balancers and Kubernetes endpoints stop sending here before the listener closes."""
        self.draining = True
        delay = self.config.drain_delay
        if delay > 0:
            log.info("draining: /readyz answers 503 for %gs; still serving", delay)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to shutdown_grace), close."""
        if self.reloader is not None:
            await self.reloader.stop()
        await self.controller.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        if self._cert_task is not None:
            self._cert_task.cancel()
            await asyncio.gather(self._cert_task, return_exceptions=True)
            self._cert_task = None
        await self._stop_clients()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)
        await self.runtime.close()
        if self.access_log is not None:
            self.access_log.close()

    async def _stop_clients(self) -> None:
        """Stop accepting; idle connections close now; in-flight exchanges and tunnels
        get up to ``shutdown_grace`` to finish; what is left is then closed."""
        for server in self._listeners:
            server.close()
        self._listeners.clear()
        plane = self.plane
        if plane is None:
            return
        plane.close_idle()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        while plane.connections and loop.time() < deadline:  # noqa: ASYNC110 - a poll
            await asyncio.sleep(0.02)
        plane.abort_all()
        await asyncio.sleep(0)  # let the transports report their end
        plane.timers.close()

    def __repr__(self) -> str:
        return f"<Proxy {self.url or 'not started'} revision={self.config.revision}>"


async def _drain(pool: UpstreamPool) -> None:
    try:
        while any(server.inflight for server in pool.servers):  # noqa: ASYNC110 - a poll is simplest
            await asyncio.sleep(0.05)
    finally:
        await pool.close()
        log.info("closed pool %s (no longer in the config)", pool.config.name)


async def serve(
    config: Config,
    on_ready: Callable[[Proxy], Awaitable[None] | None] | None = None,
    watch: bool = True,
    fresh_state: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.  SIGHUP reloads.

    SIGTERM (Kubernetes, Docker) first drains: /readyz answers 503 for ``drain_delay``
    while the listener still serves; SIGINT (Ctrl-C) stops without that pause.  With
    ``workers: N`` (N > 1) this process is the supervisor of N worker processes that
    serve the clients (``proxy.workers``); the signals work the same."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []  # the stopping signal: SIGTERM drains first, SIGINT does not

    def stopping(sig: int) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping, sig)
    proxy: Proxy
    if config.workers > 1:
        from proxy.workers.supervisor import Supervisor

        proxy = Supervisor(config, watch=watch, fresh_state=fresh_state)
    else:
        proxy = Proxy(config, watch=watch, fresh_state=fresh_state)
    proxy.freeze_gc = True
    reloader = proxy.reloader
    if reloader is not None:
        loop.add_signal_handler(
            signal.SIGHUP, lambda: _background(reloader.reload("signal"))
        )
    await proxy.start()
    gc.freeze()
    if reloader is not None:
        log.info("reload: %s; SIGHUP reloads", "watching the config file" if watch
                 else "not watching the file (--no-watch)")
    log.info("proxy listening on %s (config %s, revision %s; %s)",
             proxy.url, config.source, config.revision, compiled.describe())
    for source in compiled.stale():
        log.warning("%s changed after its compiled extension was built: the old code runs "
                    "(run `pip install -e .` again)", source)
    log.info("admin listening on %s", proxy.admin_url)
    try:
        if on_ready is not None:
            result = on_ready(proxy)
            if result is not None:
                await result
        await stop.wait()
        # A second signal stops waiting (the drain, then the in-flight requests).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _cancel_current(asyncio.current_task()))
        if received[0] == signal.SIGTERM:
            await proxy.drain()
        log.info("shutting down: waiting up to %gs for in-flight requests",
                 config.shutdown_grace)
    finally:
        await proxy.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")


_BACKGROUND: set[asyncio.Task[object]] = set()


def _background(coro: Awaitable[object]) -> None:
    task: asyncio.Task[object] = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _cancel_current(task: asyncio.Task[None] | None) -> Callable[[], None]:
    def cancel() -> None:
        if task is not None:
            task.cancel()

    return cancel


def run(main: Callable[[], Coroutine[object, object, None]]) -> None:
    """Run ``main`` on uvloop (falling back to asyncio where uvloop is not available)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        asyncio.run(main())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
