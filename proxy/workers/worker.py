"""A worker process: the data plane alone, told what to serve by its supervisor.

Started by ``proxy.workers.supervisor`` as ``python -m proxy.workers.worker FD INDEX
LEVEL`` with one end of a socketpair as file descriptor FD.  It binds the client
listeners on the port the supervisor reserved, with SO_REUSEPORT (the kernel spreads new
connections over the workers), and serves them with its own runtime (routing table,
upstream pools and their health checks, access log).  It runs no analysis, keeps no state
file and has no admin listener: the supervisor does, on what the workers report.

The conversation (``proxy.workers.channel``), supervisor -> worker:

* ``start`` (the config's text, source and revision; the reserved addresses): the worker
  builds its runtime and answers ``built`` (or ``failed``);
* ``go`` (every route's ring states): it puts them into its table, starts its pools,
  listens, and answers ``ready``: a rolled-back ring is never served, not even once;
* ``states`` (one route's ring states, after every change the rollout makes);
* ``config`` (a reload: text, revision and all states): built, states in, swapped;
  answered ``applied`` or ``failed``;
* ``flush``: answered by a ``report`` at once (a scrape is exact);
* ``stop``: stop accepting, let in-flight requests finish (``shutdown_grace``), send the
  last report, exit.

Worker -> supervisor: a ``report`` every ``REPORT_EVERY`` seconds (what was recorded
since the last one: ``proxy.workers.deltas``; in-flight counts; pool health; retries) and
``server`` events (a server of a pool ejected or readmitted by this worker's outlier
detection).  The end of the channel (the supervisor exited, even by ``kill -9``) stops the
worker the way ``stop`` does: no orphan keeps serving an old config.  SIGTERM also stops
it; SIGINT and SIGHUP are ignored (a terminal's Ctrl-C or hangup reaches the whole process
group: the supervisor decides).
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

from proxy.config import Config, parse_config
from proxy.config.changes import reload_plan
from proxy.config.rollout import WINDOW_HORIZON
from proxy.config.values import Listen
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
                 bind: Listen, bind_tls: Listen | None) -> None:
        super().__init__(config, watch=False)
        self.reloader = None  # the supervisor reloads, and sends the result
        self._watch = False
        self.index = index
        self.channel = channel
        self.bind, self.bind_tls, self.reuse_port = bind, bind_tls, True
        self.states: dict[str, RouteStates] = {}
        self._ejections: dict[int, int] = {}  # id(server state) -> ejections reported
        self._stopping = asyncio.Event()

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

    async def reconfigure(self, config: Config, states: Mapping[str, RouteStates]) -> None:
        """A reload: the new runtime is built, gets the states, then is swapped in."""
        plan = reload_plan(self.config, config)
        runtime, access_log = await self._prepare(config, plan)
        try:
            install(runtime, states)
            self.metrics.attach(runtime)
            runtime.take_over()
        except BaseException:
            self.metrics.attach(self.runtime)
            await self._discard(runtime, access_log)
            raise
        self.states = dict(states)
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
                await self._config(message)
            elif kind == "stop":
                self._stopping.set()

    def _states(self, route: str, states: RouteStates) -> None:
        compiled = self.runtime.table.routes.get(route)
        if compiled is None or {r.name for r in compiled.route.rings} != set(states):
            return  # not this config's route: the next ``config`` carries its states
        apply_states(self.runtime, route, {k: RingState.from_dict(v) for k, v in states.items()})
        self.states[route] = states

    async def _config(self, message: Message) -> None:
        ident = message.get("id")
        try:
            config = await asyncio.to_thread(parse, message)
            await self.reconfigure(config, message["states"])
        except Exception as exc:
            log.exception("cannot serve revision %s", message.get("revision"))
            self.channel.send({"type": "failed", "id": ident, "error": f"{exc}"})
            return
        self.channel.send({"type": "applied", "id": ident, "revision": config.revision})

    async def serve(self) -> None:
        """Report and listen until told to stop (or orphaned), then stop gracefully."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        reporting = asyncio.ensure_future(self._reporting())
        listening = asyncio.ensure_future(self._listening())
        try:
            await self._stopping.wait()
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)
            await self.stop()  # in-flight requests finish (shutdown_grace)
            self.channel.send(self.report())  # the last of what they recorded
            await self.channel.drain()
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            self.channel.close()


async def _main(fd: int, index: int) -> int:
    channel = await Channel.open(socket.socket(fileno=fd))
    try:
        start = await channel.receive()
        config = await asyncio.to_thread(parse, start)
        bind = Listen(*start["listen"])
        tls = Listen(*start["listen_tls"]) if start.get("listen_tls") else None
        worker = Worker(config, index, channel, bind, tls)
        channel.send({"type": "built"})
        go = await channel.receive()
        worker.states = dict(go["states"])
        await worker.start()
    except ChannelClosed:
        return 1
    except Exception as exc:
        log.error("cannot start: %s", exc)
        channel.send({"type": "failed", "error": f"{exc}"})
        await channel.drain()
        channel.close()
        return 1
    channel.send({"type": "ready", "pid": os.getpid()})
    log.debug("serving on %s (pid %d)", worker.url, os.getpid())
    gc.freeze()  # the config and tables live as long as the process: out of collections
    await worker.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    fd, index, level = (argv if argv is not None else sys.argv[1:])[:3]
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s %(name)s [worker {index}]: %(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    code = 1

    async def entry() -> None:
        nonlocal code
        code = await _main(int(fd), int(index))

    run(entry)
    return code


if __name__ == "__main__":
    sys.exit(main())
