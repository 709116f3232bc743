"""The supervisor of ``workers: N`` (N > 1): the control plane of a host's worker processes.

It is a ``Proxy`` without client listeners.  It loads the config and the state files,
runs the rollout's controller (the judge, the state and audit files, webhooks), the admin
listener (API, ``/metrics``, the status page) and the config reloads; its ``Metrics`` are
the host's: every worker's reports (``proxy.workers.deltas``) are added into its
recorders, so the judge reads the evidence of all the traffic and a scrape shows the
totals.  It makes the client sockets (``bind_shared``: the port checked free first, so a
second instance fails at start; then one listening SO_REUSEPORT socket per worker and
address, port 0 becoming one port for all), and starts N worker processes
(``proxy.workers.worker``), each serving its own sockets (``pass_fds``).  The sockets stay
open here for the slot's lifetime: a restarted worker gets the same ones.

* Decisions: every change the controller applies to a route is sent to every worker
  (``Controller.on_apply``); a reload is validated here, then its text and all the ring
  states go to every worker, which builds, installs the states and swaps (reading the
  states sent meanwhile); a worker that fails to, or not within ``APPLY_TIMEOUT``, is
  stopped gracefully and restarted.  A (re)started worker gets the config and states
  before it listens.
* Exact reads: a ``/metrics`` scrape and every admin read first ask each worker for a
  report (``FLUSH_TIMEOUT``); one that does not answer in time is skipped and counted
  (``ringproxy_worker_reports_missed_total``).
* Lifecycle: SIGTERM drains as one process does (``/readyz`` 503 for ``drain_delay``
  while the workers serve), then every worker stops accepting and finishes its in-flight
  requests (``shutdown_grace``).  A worker that exits is restarted after a backoff (0.1 s
  doubling to 10 s; back to 0.1 s after it served 30 s), logged and counted, never while
  draining or stopping.  Workers ignore SIGTERM, SIGINT and SIGHUP (sent to the process
  group, they are the supervisor's to act on) and exit when the supervisor's end of their
  channel closes, so none is orphaned.
  ``/readyz`` is 503 until every worker is ready (``"workers"`` in its body).

Limits: the rings' ``max_concurrency`` and ``rate_limit`` are shared out (each worker
enforces 1/N, rounded up: ``Runtime(share=N)``); each worker has its own connection cap
(``limits.max_connections`` is per process)
and its own upstream connections and passive outlier detection; active health checks run
in the supervisor (for ``/readyz``, the status page and events) and in every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy import processlog
from proxy.config import Config
from proxy.dataplane.listener import bind_shared
from proxy.health.state import Transition
from proxy.metrics import worker_families
from proxy.runtime import Runtime
from proxy.server import Proxy, _url
from proxy.workers.channel import Channel, ChannelClosed, ChannelGarbage, Message
from proxy.workers.deltas import add

log = logging.getLogger("ringproxy.supervisor")

START_TIMEOUT = 30.0  # seconds a worker has to build its runtime and listen
APPLY_TIMEOUT = 30.0  # seconds a worker has to apply a reload (then it is stopped)
FLUSH_TIMEOUT = 0.5  # seconds a scrape waits for the workers' reports
STOP_EXTRA = 5.0  # seconds past shutdown_grace before a stopping worker is killed
HUNG_AFTER = 5.0  # seconds without a message (reports come every 0.25 s): hung, killed
WATCH_EVERY = 0.5  # seconds between looks at the workers' last messages
FLUSH_BUFFER_LIMIT = 256 << 10  # bytes waiting for a worker: no flush asked of it then
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.1, 10.0, 30.0


class WorkerFailed(OSError):
    """A worker could not start or apply what it was sent (an OSError: the CLI prints
    it as one line and exits 1)."""


def source_text(config: Config) -> str:
    """The text of ``config``'s file, checked against its revision (what workers parse)."""
    if not config.source or not Path(config.source).is_file():
        raise WorkerFailed("workers: N > 1 needs a config file (ringproxy run --config)")
    raw = Path(config.source).read_bytes()
    if hashlib.sha256(raw).hexdigest()[:12] != config.revision:
        raise WorkerFailed(f"{config.source} changed while it was being loaded; the next "
                           "reload reads it again")
    return raw.decode("utf-8")


class WorkerHandle:
    """One worker slot: its process now, its channel, what it last reported."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None  # set once the worker may be sent states
        self.ready = False
        self.started = 0.0
        self.reader: asyncio.Task[None] | None = None
        self.waiters: dict[int, asyncio.Future[Message | None]] = {}
        self.inflight: dict[tuple[str, str], int] = {}
        self.unavailable: set[tuple[str, str]] = set()
        self.down: set[str] = set()
        self.requests = 0  # finished requests it reported, over all its restarts
        self.restarts = 0
        self.heard = 0.0  # monotonic time of its last message
        self.stop_by: float | None = None  # asked to stop: killed if still running then
        # Its listening sockets ("http", "https": one per address), made and held by the
        # supervisor for the slot's lifetime: a restarted worker gets the same ones, and
        # the connections queued while none accepted.
        self.sockets: dict[str, list[socket.socket]] = {}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def forget(self) -> None:
        """The process is gone: its gauges go with it; its waiters get None."""
        self.ready = False
        self.channel = None
        self.stop_by = None
        self.inflight, self.unavailable, self.down = {}, set(), set()
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


class Supervisor(Proxy):
    """Control plane for ``config.workers`` worker processes (see the module)."""

    def __init__(self, config: Config, watch: bool = False, fresh_state: bool = False) -> None:
        super().__init__(config, watch=watch, fresh_state=fresh_state)
        self.text = source_text(config)
        self.handles = [WorkerHandle(i) for i in range(config.workers)]
        self._stopping = False
        self._watchdog: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._keepers: list[asyncio.Task[None]] = []
        self._ejections: dict[tuple[str, str], int] = {}
        self.reports_missed = 0
        self.reports_unmatched = 0
        self.controller.on_apply.append(self._states_changed)
        self.metrics.upstream_view = self
        self.metrics.extra.append(lambda: worker_families(
            sum(h.ready for h in self.handles), [h.restarts for h in self.handles],
            [h.requests for h in self.handles], self.reports_missed, self.reports_unmatched))

    # ------------------------------------------------------------------ start, stop

    async def start(self) -> None:
        self.controller.load(fresh=self._fresh_state)
        self.controller.configure(self.runtime)
        if self.fleet is not None:
            # The host's member of the fleet: the agreed states before any worker starts
            # (they go to the workers with ``go``; every change after, as it is applied).
            await self.fleet.start()
        await self.runtime.start()  # active health checks: /readyz, events, status page
        try:
            await self._bind()
            spawning = [asyncio.ensure_future(self._spawn(h)) for h in self.handles]
            try:
                await asyncio.gather(*spawning)
            except BaseException:
                for task in spawning:
                    task.cancel()
                await asyncio.gather(*spawning, return_exceptions=True)
                raise
            runner = web.AppRunner(self._admin_app(), access_log=None, shutdown_timeout=1.0)
            self.admin_url = await self._listen(runner, self.config.admin.listen)
        except BaseException:
            await self.stop()
            raise
        self._keepers = [asyncio.ensure_future(self._keep(h)) for h in self.handles]
        self._watchdog = asyncio.ensure_future(self._watch_workers())
        if self._watch and self.reloader is not None:
            self.reloader.start_watching()
        self.controller.start()
        log.info("%d workers serving (pids %s)", len(self.handles),
                 ", ".join(str(h.pid) for h in self.handles))

    async def _bind(self) -> None:
        """The client listeners' sockets, one set per worker (``bind_shared``): a second
        ringproxy on the same port fails here, at start."""
        per_worker = await bind_shared(self.config.listen, len(self.handles))
        for h, socks in zip(self.handles, per_worker, strict=True):
            h.sockets["http"] = socks
        name = per_worker[0][0].getsockname()
        self.url = _url(name)
        tls = self.config.listen_tls
        if tls is not None:
            per_worker = await bind_shared(tls.listen, len(self.handles), tls=True)
            for h, socks in zip(self.handles, per_worker, strict=True):
                h.sockets["https"] = socks
            name = per_worker[0][0].getsockname()
            self.tls_url = _url(name, "https")

    def _close_sockets(self) -> None:
        for h in self.handles:
            for socks in h.sockets.values():
                for sock in socks:
                    sock.close()
            h.sockets.clear()

    async def stop(self) -> None:
        """Every worker stops accepting and finishes its requests; then this process."""
        self._stopping = True
        if self.reloader is not None:
            await self.reloader.stop()
        for task in [*self._keepers, self._watchdog]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        if self._watchdog is not None:
            await asyncio.gather(self._watchdog, return_exceptions=True)
        try:
            await self._stop_workers()
        finally:
            for h in self.handles:
                if h.process is not None and h.process.returncode is None:
                    h.process.kill()
                    await h.process.wait()
            self._close_sockets()
            await super().stop()

    async def _stop_workers(self) -> None:
        running = [h for h in self.handles
                   if h.process is not None and h.process.returncode is None]
        for h in running:
            if h.channel is not None:
                h.channel.send({"type": "stop"})
            else:  # not past its start: nothing to finish (workers ignore SIGTERM)
                h.process.kill()  # type: ignore[union-attr]
        # The workers close their listeners now; ours go too, so that the port is gone
        # once the last of them has (nobody would accept what is queued on it).
        self._close_sockets()
        limit = self.config.shutdown_grace + STOP_EXTRA
        waits = [h.process.wait() for h in running if h.process is not None]
        try:
            async with asyncio.timeout(limit):
                await asyncio.gather(*waits)
        except TimeoutError:
            log.warning("workers still running %gs after stop: killed", limit)
        readers = [h.reader for h in running if h.reader is not None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):  # their last reports
                await asyncio.gather(*readers, return_exceptions=True)

    # ------------------------------------------------------------------ one worker

    async def _spawn(self, h: WorkerHandle) -> None:
        """Start the worker of slot ``h``; back when it serves (WorkerFailed otherwise)."""
        parent, child = socket.socketpair()
        fds = [sock.fileno() for socks in h.sockets.values() for sock in socks]
        try:
            process = h.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy.workers.worker", str(child.fileno()),
                str(h.index), logging.getLevelName(logging.getLogger().getEffectiveLevel()),
                processlog.forced_format() or "-",
                pass_fds=(child.fileno(), *fds), stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        h.started = h.heard = time.monotonic()
        try:
            channel = await Channel.open(parent)
        except BaseException:
            parent.close()
            process.kill()
            await process.wait()
            raise
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._start(h, channel)
        except BaseException as exc:
            h.channel = None
            channel.close()
            if process.returncode is None:
                process.kill()
            await process.wait()
            if isinstance(exc, TimeoutError):
                raise WorkerFailed(f"worker {h.index} did not start within "
                                   f"{START_TIMEOUT:g}s") from None
            if isinstance(exc, ChannelClosed):
                raise WorkerFailed(f"worker {h.index} exited while starting (code "
                                   f"{process.returncode})") from None
            raise
        h.reader = asyncio.ensure_future(self._read(h, channel))
        log.debug("worker %d started (pid %s)", h.index, h.pid)

    async def _start(self, h: WorkerHandle, channel: Channel) -> None:
        revision = self.config.revision
        # The sockets keep their descriptor numbers in the worker (``pass_fds``).
        channel.send({"type": "start", "text": self.text, "source": self.config.source,
                      "revision": revision, "workers": len(self.handles),
                      "sockets": {scheme: [sock.fileno() for sock in socks]
                                  for scheme, socks in h.sockets.items()}})
        self._expect(await channel.receive(), "built", h)
        if self.config.revision != revision:
            raise WorkerFailed(f"worker {h.index}: the config was reloaded while it started")
        # From here on, with no await in between: the states now, then every change.
        channel.send({"type": "go", "states": self._all_states()})
        h.channel = channel
        self._expect(await channel.receive(), "ready", h)
        h.ready = True
        h.heard = time.monotonic()

    @staticmethod
    def _expect(message: Message, kind: str, h: WorkerHandle) -> None:
        if message["type"] == "failed":
            # The worker's own words: "cannot listen for clients on ...", a config error.
            raise OSError(f"worker {h.index}: {message.get('error')}")
        if message["type"] != kind:
            raise WorkerFailed(f"worker {h.index}: expected {kind!r}, got {message['type']!r}")

    def _settling(self) -> bool:
        """Draining or stopping: no worker is restarted (nor judged hung) any more."""
        return self._stopping or self.draining

    async def _keep(self, h: WorkerHandle) -> None:
        """Restart the slot's worker whenever it exits, until the supervisor drains or
        stops (a worker that exits then is not replaced: the host is going away)."""
        delay = BACKOFF_FIRST
        while True:
            process = h.process
            assert process is not None  # started by ``start`` or the loop below
            code = await process.wait()
            if h.reader is not None:
                await asyncio.gather(h.reader, return_exceptions=True)
            h.forget()
            if self._settling():
                return
            if time.monotonic() - h.started >= BACKOFF_RESET:
                delay = BACKOFF_FIRST
            log.warning("worker %d (pid %d) exited with code %s; restarting it in %gs",
                        h.index, process.pid, code, delay)
            while True:
                await asyncio.sleep(delay)
                if self._settling():
                    return
                delay = min(delay * 2, BACKOFF_MAX)
                h.restarts += 1
                try:
                    await self._spawn(h)
                    break
                except Exception as exc:
                    log.error("worker %d could not start: %s; trying again in %gs",
                              h.index, exc, delay)
            log.info("worker %d restarted (pid %s)", h.index, h.pid)

    def _kill(self, h: WorkerHandle) -> None:
        """SIGKILL the slot's worker (its keeper restarts it); it is not ready from now."""
        h.ready = False
        if h.process is not None and h.process.returncode is None:
            h.process.kill()

    def _retire(self, h: WorkerHandle) -> None:
        """Ask the slot's worker to stop gracefully (its in-flight requests finish, its last
        report comes); its keeper restarts it; killed if still running after
        ``shutdown_grace`` + ``STOP_EXTRA``."""
        if h.channel is None or h.stop_by is not None:
            return
        h.ready = False
        h.stop_by = time.monotonic() + self.config.shutdown_grace + STOP_EXTRA
        h.channel.send({"type": "stop"})

    async def _watch_workers(self) -> None:
        """Every ``WATCH_EVERY``: a ready worker silent for ``HUNG_AFTER`` (it reports every
        0.25 s: stopped by SIGSTOP, stuck in a blocking call, a loop that never yields) is
        killed and restarted; a worker asked to stop that is still running at its
        deadline is killed.  If this process itself was not scheduled for a while (a
        loaded host), the silence is counted from when it was again."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_EVERY)
            now = time.monotonic()
            if now - last > HUNG_AFTER / 2:  # we were the ones not running
                for h in self.handles:
                    h.heard = max(h.heard, now)
            last = now
            for h in self.handles:
                if h.process is None or h.process.returncode is not None:
                    continue
                if h.stop_by is not None:
                    if now > h.stop_by:
                        log.error("worker %d (pid %s) still running %gs after it was asked "
                                  "to stop: killed", h.index, h.pid,
                                  self.config.shutdown_grace + STOP_EXTRA)
                        self._kill(h)
                elif h.ready and not self._settling() and now - h.heard > HUNG_AFTER:
                    log.error("worker %d (pid %s) sent nothing for %.1fs (hung?): killing "
                              "and restarting it", h.index, h.pid, now - h.heard)
                    self._kill(h)

    async def _read(self, h: WorkerHandle, channel: Channel) -> None:
        """The worker's messages, until its channel ends.  One that cannot be acted on
        (not what a worker sends) ends the channel and the worker (it is restarted)."""
        while True:
            try:
                message = await channel.receive()
            except ChannelClosed as exc:
                if isinstance(exc, ChannelGarbage):
                    log.error("worker %d sent something that is not a message (%s): "
                              "killing and restarting it", h.index, exc)
                    self._kill(h)
                h.forget()
                channel.close()
                return
            h.heard = time.monotonic()
            kind = message["type"]
            try:
                if kind == "report":
                    self._merge(h, message)
                elif kind == "server":
                    change = Transition(**message["change"])
                    self.controller.server_changed(change, [tuple(r) for r in message["rings"]])
                waiter = h.waiters.pop(message.get("id") or 0, None)
            except Exception as exc:
                log.error("worker %d sent a %s that cannot be read (%s: %s): killing and "
                          "restarting it", h.index, kind, type(exc).__name__, exc)
                self._kill(h)
                h.forget()
                channel.close()
                return
            if waiter is not None and not waiter.done():
                waiter.set_result(message)

    # ------------------------------------------------------------------ merging

    def _merge(self, h: WorkerHandle, report: Message) -> None:
        """Add a worker's report into this process's metrics (the host's totals)."""
        recorders = self.metrics.recorders()
        for delta in report["rings"]:
            recorder = recorders.get(tuple(delta["key"]))
            if recorder is None:  # a ring that left the config in a reload
                self.reports_unmatched += 1
                continue
            add(recorder, delta)
            h.requests += sum(delta["requests"])
        h.inflight = {(route, ring): n for route, ring, n in report["inflight"]}
        for rings in self.runtime.rings.values():
            for ring in rings:
                key = (ring.route, ring.name)
                ring.inflight = sum(w.inflight.get(key, 0) for w in self.handles)
        self.runtime.unrouted.value += int(report["unrouted"])
        unavailable: set[tuple[str, str]] = set()
        down: set[str] = set()
        for name, seen in report["pools"].items():
            for url, n in seen["ejected"].items():
                self._ejections[name, url] = self._ejections.get((name, url), 0) + int(n)
            unavailable.update((name, url) for url in seen["unavailable"])
            if seen["down"]:
                down.add(name)
            pool = self.runtime.pools.get(name)
            if pool is not None:
                for reason, n in seen["retried"].items():
                    pool.retried[reason] = pool.retried.get(reason, 0) + int(n)
        h.unavailable, h.down = unavailable, down

    def available(self, pool: str, server: str) -> bool:
        """In every worker's rotation (``Metrics.upstream_view``)."""
        return not any((pool, server) in h.unavailable for h in self.handles)

    def ejections(self, pool: str, server: str) -> int:
        return self._ejections.get((pool, server), 0)

    async def flush(self) -> None:
        """Ask every ready worker for its report now; wait up to FLUSH_TIMEOUT for them.
        A worker with more than ``FLUSH_BUFFER_LIMIT`` bytes not yet read is not asked
        (counted as missed): what a hung worker is sent never grows without bound."""
        timeout = FLUSH_TIMEOUT
        waits = []
        skipped = 0
        for h in self.handles:
            if h.ready and h.channel is not None:
                if h.channel.buffered > FLUSH_BUFFER_LIMIT:
                    skipped += 1  # not reading (hung?): never queue more for it
                    continue
                ident = next(self._ids)
                waiter = h.waiters[ident] = asyncio.get_running_loop().create_future()
                h.channel.send({"type": "flush", "id": ident})
                waits.append(waiter)
        self.reports_missed += skipped
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=timeout)
        if pending:
            self.reports_missed += len(pending)
            log.warning("%d worker(s) did not report within %gs; the numbers read now miss "
                        "their last %gs", len(pending), timeout, 0.25)
        for h in self.handles:
            for ident in [i for i, w in h.waiters.items() if w in pending]:
                h.waiters.pop(ident).cancel()

    # ------------------------------------------------------------------ decisions, reloads

    def _all_states(self) -> dict[str, dict[str, dict[str, object]]]:
        return {route: {ring: state.as_dict() for ring, state in states.items()}
                for route, states in self.controller.states.items()}

    def _states_changed(self, runtime: Runtime, route: str) -> None:
        """A route's states went into a table: the serving one's go to every worker (a
        reload's new runtime is not serving yet: its states go with its config)."""
        if runtime is not self.runtime:
            return
        states = {ring: s.as_dict() for ring, s in self.controller.states[route].items()}
        message = {"type": "states", "route": route, "states": states}
        for h in self.handles:
            if h.channel is not None:
                h.channel.send(message)

    async def apply(self, config: Config) -> None:
        """Apply ``config`` here (the controller's states for it), then in every worker;
        a worker that cannot (or not within ``APPLY_TIMEOUT``) is stopped gracefully (its
        in-flight requests finish, its last report counts) and restarted with this
        config."""
        text = await asyncio.to_thread(source_text, config)
        await super().apply(config)
        self.text = text
        # No await since the swap: the states sent are the ones installed here.
        message: Message = {"type": "config", "text": text, "source": config.source,
                            "revision": config.revision, "states": self._all_states()}
        waits: dict[asyncio.Future[Message | None], WorkerHandle] = {}
        for h in self.handles:
            if h.channel is not None and h.stop_by is None:  # not one already stopping
                ident = next(self._ids)
                waiter = h.waiters[ident] = asyncio.get_running_loop().create_future()
                h.channel.send({**message, "id": ident})
                waits[waiter] = h
        if not waits:
            return
        log.info("revision %s sent to %d worker(s)", config.revision, len(waits))
        done, _ = await asyncio.wait(waits, timeout=APPLY_TIMEOUT)
        for waiter, h in waits.items():
            reply = waiter.result() if waiter in done else None
            if reply is not None and reply["type"] == "applied":
                continue
            if not waiter.done():
                waiter.cancel()
                for ident in [i for i, w in h.waiters.items() if w is waiter]:
                    del h.waiters[ident]
            error = reply.get("error") if reply is not None else f"no answer within " \
                f"{APPLY_TIMEOUT:g}s"
            log.error("worker %d could not apply revision %s (%s): stopping it gracefully "
                      "to restart it with that revision", h.index, config.revision, error)
            self._retire(h)

    # ------------------------------------------------------------------ admin

    def _admin_app(self) -> web.Application:
        app = super()._admin_app()
        app.middlewares.append(self._merged)
        return app

    @web.middleware
    async def _merged(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        """Reads see every worker's latest numbers; ``/readyz`` counts the workers."""
        if request.path == "/readyz":
            return self._readiness(await handler(request))
        if request.method in ("GET", "HEAD") and request.path not in ("/", "/healthz",
                                                                      "/favicon.ico"):
            await self.flush()
        return await handler(request)

    def _readiness(self, response: web.StreamResponse) -> web.StreamResponse:
        if not isinstance(response, web.Response) or response.text is None:
            return response
        body: dict[str, Any] = json.loads(response.text)
        ready = sum(h.ready for h in self.handles)
        down = sorted(set(body.get("pools_down", [])).union(*(h.down for h in self.handles)))
        body["pools_down"] = down
        body["workers"] = {"ready": ready, "wanted": len(self.handles)}
        body["ready"] = bool(body.get("ready")) and ready == len(self.handles) and not down
        return web.json_response(body, status=200 if body["ready"] else 503)

    def __repr__(self) -> str:
        ready = sum(h.ready for h in self.handles)
        return (f"<Supervisor {self.url or 'not started'} workers={ready}/{len(self.handles)} "
                f"revision={self.config.revision}>")
