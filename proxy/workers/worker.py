"""A worker process: the data plane alone, told what to serve by its supervisor.

Started by ``proxy.workers.supervisor`` as ``python -m proxy.workers.worker FD INDEX
LEVEL FORMAT`` with one end of a socketpair as file descriptor FD and its listening
sockets (made by the supervisor, SO_REUSEPORT: the kernel spreads new connections over
the workers) as further inherited descriptors, and serves them with its own runtime (routing table,
upstream pools and their health checks, access log).  It runs no analysis, keeps no state
file and has no admin listener: the supervisor does, on what the workers report.

The conversation (``proxy.workers.channel``), supervisor -> worker:

* ``start`` (the config's text, source and revision; its sockets' descriptors; the
  number of workers, which share the rings' limits): the worker builds its runtime and
  answers ``built`` (or ``failed``);
* ``go`` (every route's ring states): it puts them into its table, starts reading the
  messages that follow, starts its pools, listens, and answers ``ready``: a rolled-back
  ring is never served, not even once;
* ``states`` (one route's ring states, after every change the rollout makes);
* ``config`` (a reload: text, revision and all states): built in a task (messages keep
  being read: ``states`` that come meanwhile go into the serving table and, before the
  swap, into the new one), states in, swapped; answered ``applied`` or ``failed``;
* ``flush``: answered by a ``report`` at once, also during a reload (a scrape is exact);
* ``stop``: stop accepting, let in-flight requests finish (``shutdown_grace``), send the
  last report, exit.

Worker -> supervisor: a ``report`` every ``REPORT_EVERY`` seconds (what was recorded
since the last one: ``proxy.workers.deltas``; in-flight counts; pool health; retries) and
``server`` events (a server of a pool ejected or readmitted by this worker's outlier
detection).  The end of the channel (the supervisor exited, even by ``kill -9``) stops the
worker the way ``stop`` does: no orphan keeps serving an old config.  SIGTERM, SIGINT and
SIGHUP are ignored (a terminal, an init or ``kill -TERM -PGID`` reach the whole process
group: the supervisor decides, and drains first).  Its process log is the supervisor's
format (``--log-format`` or the config's ``log_format``, switched at reloads), each record
tagged with the worker's index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

from proxy import processlog
from proxy.config import Config, parse_config
from proxy.config.changes import reload_plan
from proxy.config.rollout import WINDOW_HORIZON
from proxy.control.controller import apply_states
from proxy.health.state import Transition
from proxy.metrics import Metrics
from proxy.rollout.state import RingState
from proxy.runtime import Runtime
from proxy.server import Proxy, run
from proxy.workers.channel import Channel, ChannelClosed, Message
from proxy.workers.deltas import DeltaWindow, take

log = logging.getLogger("ringproxy.worker")

REPORT_EVERY = 0.25  # seconds between reports to the supervisor

RouteStates = Mapping[str, Mapping[str, Any]]  # route -> ring -> RingState.as_dict()


class WorkerError(Exception):
    """What the supervisor sent cannot be served (the worker says so and the supervisor
    restarts it with the current config)."""


def install(runtime: Runtime, states: Mapping[str, RouteStates]) -> None:
    """Put ``states`` into ``runtime``'s table: every route of its config must have a
    state for each of its rings, or nothing is served from it (WorkerError)."""
    parsed: dict[str, dict[str, RingState]] = {}
    for route in runtime.config.routes:
        saved = states.get(route.name)
        names = {ring.name for ring in route.rings}
        if saved is None or set(saved) != names:
            raise WorkerError(f"route {route.name}: the supervisor's states do not match "
                              f"its rings ({sorted(names)})")
        parsed[route.name] = {ring: RingState.from_dict(s) for ring, s in saved.items()}
    for name, route_states in parsed.items():
        apply_states(runtime, name, route_states)


def _put(runtime: Runtime, route: str, states: RouteStates) -> bool:
    """Put one route's ``states`` into ``runtime``'s table if its rings are the ones the
    states name (else False: not this config's route)."""
    compiled = runtime.table.routes.get(route)
    if compiled is None or {r.name for r in compiled.route.rings} != set(states):
        return False
    apply_states(runtime, route, {k: RingState.from_dict(v) for k, v in states.items()})
    return True


def parse(message: Message) -> Config:
    """The config a ``start`` or ``config`` message carries, checked against its revision."""
    text = message["text"]
    config = parse_config(text, source=message["source"], raw=text.encode(), fast=False)
    if config.revision != message["revision"]:
        raise WorkerError(f"the config's revision is {config.revision}, expected "
                          f"{message['revision']}")
    return config


class Worker(Proxy):
    """The data plane of one worker process (a ``Proxy`` without its control plane)."""

    def __init__(self, config: Config, index: int, channel: Channel,
                 sockets: dict[str, list[socket.socket]], share: int) -> None:
        super().__init__(config, watch=False, share=share)
        self.reloader = None  # the supervisor reloads, and sends the result
        self._watch = False
        self.index = index
        self.channel = channel
        self.sockets = sockets
        self.states: dict[str, RouteStates] = {}
        # ``states`` received since a reload's ``config`` came (one dict per reload not yet
        # swapped in): put into its runtime before the swap.
        self._pending: list[dict[str, RouteStates]] = []
        self._reloading = asyncio.Lock()  # one reload at a time, in the order sent
        self._reloads: set[asyncio.Task[None]] = set()
        self._ejections: dict[int, int] = {}  # id(server state) -> ejections reported
        self._stopping = asyncio.Event()
        self.listening: asyncio.Task[None] | None = None

    def _make_fleet(self) -> None:
        return None  # the supervisor is the host's member of the fleet (state.backend: redis)

    def _make_metrics(self) -> Metrics:
        return Metrics(window_horizon=WINDOW_HORIZON, process_metrics=False,
                       window_factory=DeltaWindow)

    async def start(self) -> None:
        """Serve with the states from ``go`` already in the table."""
        install(self.runtime, self.states)
        await self.runtime.start()
        try:
            await self._listen_clients()
        except BaseException:
            await self.stop()
            raise

    def _server_changed(self, pool: str, change: Transition) -> None:
        # Passive ejections are this worker's own (its traffic): the supervisor records
        # them as events.  Active checks run in the supervisor too, which sees those.
        if change.kind in ("ejected", "readmitted"):
            rings = [[r.route, r.name] for rings in self.runtime.rings.values() for r in rings
                     if r.pool.config.name == pool]
            self.channel.send({"type": "server", "change": dataclasses.asdict(change),
                               "rings": rings})

    async def reconfigure(self, config: Config, states: Mapping[str, RouteStates],
                          newer: dict[str, RouteStates] | None = None) -> None:
        """A reload: the new runtime is built, gets the states, then is swapped in.

        The supervisor's messages keep being read meanwhile: a ``states`` that comes during
        the build (a rollback, a promotion) goes into the serving table at once and is
        kept in ``newer`` (from when the ``config`` came), to go into the new table after
        ``states`` and before the swap (no await in between): neither table serves an
        outdated weight for longer than a message."""
        newer = {} if newer is None else newer
        plan = reload_plan(self.config, config)
        runtime, access_log = await self._prepare(config, plan)
        try:
            install(runtime, states)
            for route, route_states in newer.items():
                _put(runtime, route, route_states)
            self.metrics.attach(runtime)
            runtime.take_over()
        except BaseException:
            self.metrics.attach(self.runtime)
            await self._discard(runtime, access_log)
            raise
        self.states = {**states, **newer}
        self._swap(config, runtime, access_log, plan)

    # ------------------------------------------------------------------ reports

    def report(self, ident: int | None = None) -> Message:
        """What was recorded since the last report (counters then start again at zero)."""
        rings = [d for rec in self.metrics.recorders().values() if (d := take(rec))]
        inflight = [[r.route, r.name, r.inflight] for rings_ in self.runtime.rings.values()
                    for r in rings_ if r.inflight]
        pools: dict[str, dict[str, Any]] = {}
        ejections: dict[int, int] = {}
        for name, pool in self.runtime.pools.items():
            ejected: dict[str, int] = {}
            unavailable = []
            for server in pool.health.state.servers:
                total = server.ejections_total
                before = self._ejections.get(id(server), 0)
                ejections[id(server)] = total
                if total > before:
                    ejected[server.url] = total - before
                if not server.available:
                    unavailable.append(server.url)
            retried = dict(pool.retried)
            pool.retried.clear()  # read by nothing else in a worker: counted once, there
            if ejected or unavailable or retried or pool.health.down:
                pools[name] = {"ejected": ejected, "unavailable": unavailable,
                               "retried": retried, "down": pool.health.down}
        self._ejections = ejections
        unrouted, self.runtime.unrouted.value = self.runtime.unrouted.value, 0
        return {"type": "report", "id": ident, "revision": self.config.revision,
                "rings": rings, "inflight": inflight, "pools": pools, "unrouted": unrouted}

    async def _reporting(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self.channel.send(self.report())

    # ------------------------------------------------------------------ messages

    async def _listening(self) -> None:
        """Act on the supervisor's messages until the channel ends."""
        while True:
            try:
                message = await self.channel.receive()
            except ChannelClosed:
                if not self._stopping.is_set():
                    log.warning("the supervisor is gone (channel closed): stopping")
                self._stopping.set()
                return
            kind = message["type"]
            if kind == "flush":
                self.channel.send(self.report(message.get("id")))
            elif kind == "states":
                self._states(message["route"], message["states"])
            elif kind == "config" and not self._stopping.is_set():
                # Built in a task: flushes and states keep being acted on meanwhile; the
                # states that come from now on are kept for its table.
                newer: dict[str, RouteStates] = {}
                self._pending.append(newer)
                task = asyncio.ensure_future(self._config(message, newer))
                self._reloads.add(task)
                task.add_done_callback(self._reloads.discard)
            elif kind == "stop":
                self._stopping.set()

    def _states(self, route: str, states: RouteStates) -> None:
        if _put(self.runtime, route, states):
            self.states[route] = states
        for newer in self._pending:  # reloads building: their tables get them too
            newer[route] = states

    async def _config(self, message: Message, newer: dict[str, RouteStates]) -> None:
        ident = message.get("id")
        try:
            async with self._reloading:
                config = await asyncio.to_thread(parse, message)
                await self.reconfigure(config, message["states"], newer)
        except Exception as exc:
            log.exception("cannot serve revision %s", message.get("revision"))
            self.channel.send({"type": "failed", "id": ident, "error": f"{exc}"})
            return
        finally:
            self._pending.remove(newer)
        self.channel.send({"type": "applied", "id": ident, "revision": config.revision})

    def listen_to_supervisor(self) -> None:
        """Start acting on the supervisor's messages (from ``go`` on, before listening)."""
        self.listening = asyncio.ensure_future(self._listening())

    async def serve(self) -> None:
        """Report until told to stop (or orphaned), then stop gracefully."""
        reporting = asyncio.ensure_future(self._reporting())
        try:
            await self._stopping.wait()
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)
            await self.stop()  # in-flight requests finish (shutdown_grace)
            self.channel.send(self.report())  # the last of what they recorded
            await self.channel.drain()
        finally:
            await self.close_channel()

    async def close_channel(self) -> None:
        tasks = [*self._reloads, *([self.listening] if self.listening else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.channel.close()


async def _main(fd: int, index: int) -> int:
    channel = await Channel.open(socket.socket(fileno=fd))
    worker: Worker | None = None
    try:
        start = await channel.receive()
        config = await asyncio.to_thread(parse, start)
        sockets = {scheme: [socket.socket(fileno=int(n)) for n in fds]
                   for scheme, fds in start["sockets"].items()}
        worker = Worker(config, index, channel, sockets, int(start["workers"]))
        channel.send({"type": "built"})
        go = await channel.receive()
        worker.states = dict(go["states"])
        # States sent after ``go`` go in while the listeners open (start installs the
        # ones of ``go`` before its first await).
        worker.listen_to_supervisor()
        await worker.start()
    except ChannelClosed:
        if worker is not None:
            await worker.close_channel()
        return 1
    except Exception as exc:
        log.error("cannot start: %s", exc)
        channel.send({"type": "failed", "error": f"{exc}"})
        await channel.drain()
        if worker is not None:
            await worker.close_channel()
        channel.close()
        return 1
    channel.send({"type": "ready", "pid": os.getpid()})
    log.debug("serving on %s (pid %d)", worker.url, os.getpid())
    gc.freeze()  # the config and tables live as long as the process: out of collections
    await worker.serve()
    return 0


class _Tagged(logging.Filter):
    """Every record of a worker says which: ``worker`` (a field of ``log_format: json``)
    and, for text lines, `` [worker N]`` after the logger's name."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = self.index
            if not isinstance(_HANDLER.formatter if _HANDLER else None,
                              processlog.JsonFormatter):
                record.name = f"{record.name} [worker {self.index}]"
        return True


_HANDLER: logging.Handler | None = None


def main(argv: list[str] | None = None) -> int:
    global _HANDLER
    fd, index, level, fmt = (argv if argv is not None else sys.argv[1:])[:4]
    # The supervisor's process log: its format (--log-format, else the config's
    # ``log_format``, switched at reloads as in one process), each line tagged.
    processlog.setup(level, None if fmt == "-" else fmt)
    _HANDLER = logging.getLogger().handlers[-1]
    _HANDLER.addFilter(_Tagged(int(index)))
    # The supervisor decides when to stop (a stop message, or the end of the channel):
    # SIGTERM, SIGINT and SIGHUP sent to the whole process group (a terminal, dumb-init,
    # systemd's KillMode=control-group, kill -TERM -PGID) are not for the workers.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    code = 1

    async def entry() -> None:
        nonlocal code
        code = await _main(int(fd), int(index))

    run(entry)
    return code


if __name__ == "__main__":
    sys.exit(main())
