"""A ringproxy process as a member of a fleet sharing one rollout through Redis.

The asyncio shell around ``store``, ``lease`` and ``evidence``, plugged into the process's
``Controller`` (its ``tally``, ``judging`` and ``shared`` hooks):

- every ``PUBLISH_EVERY`` (250 ms) it publishes its rings' cumulative tallies (one hash
  field under its member id); the leader reads every member's and judges the sum;
- every ``lease / 3`` it takes or renews the lease (``Lease``); the leader runs the whole
  analysis on the merged evidence, the others none;
- every decision (the leader's, or an operator's action on any member) is written by
  ``Store.write`` before it is applied anywhere: only if the writer decided on the newest
  states (a version check; otherwise it adopts them and an action is decided again) and,
  for the leader's judged ones, only while its lease's token is current.  So operator
  actions need no leader and no forwarding: any member writes them the same way;
- every member applies a written decision on the pub/sub announcement, or within
  ``POLL_EVERY`` (1 s) by its version check when a message was lost, saving it to its local
  state file too; the events come back to every member through the stream (its
  ``/api/events`` and local audit file show the fleet's one trail).

Nothing here runs per request: a member sends Redis about 15 commands a second
(the leader a few more), whatever its traffic.

When Redis is out of reach, the member keeps serving the last states it applied; nothing
advances (no member judges progress, no write can succeed, an operator's action is a 503)
except that each member runs the fast rollback on its own evidence and may take a failing
ring off locally (less exposure is always allowed); that rollback is written to Redis as
soon as it is back (if the ring is still exposed there) and recorded in the fleet's trail.
Until then an adopted state never re-exposes a ring this member took off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.config.rollout import RedisState, StateFiles
from proxy.control.controller import SharedUnavailable, Stale
from proxy.fleet.evidence import (
    PUBLISH_EVERY,
    STALE_AFTER,
    Key,
    MergedTallies,
    Merger,
    Published,
    decode,
    encode,
)
from proxy.fleet.lease import Lease
from proxy.fleet.store import SharedStates, Store
from proxy.rollout.evidence import Evidence, Tally
from proxy.rollout.machine import Trigger, act
from proxy.rollout.state import Event, RingState
from proxy.tasks import cancel_and_wait

if TYPE_CHECKING:
    from proxy.control.controller import Controller
    from proxy.metrics import Metrics

log = logging.getLogger("ringproxy.fleet")

POLL_EVERY = 1.0  # seconds between version checks (the fallback for a lost announcement)
TIMEOUT = 1.0  # seconds a Redis command may take before the member counts Redis down
START_WAIT = 2.0  # seconds the start waits for the fleet's states before serving its own
HISTORY = 1000  # events of the fleet's trail read at start
RESUBSCRIBE = 1.0  # seconds between the subscriber's attempts while Redis is out of reach


@dataclass(frozen=True, slots=True)
class LocalRollback:
    """A ring this member took off while Redis was out of reach, to be recorded there."""

    route: str
    ring: str
    fingerprint: str
    reason: str


class Member:
    """One process's membership: publisher, subscriber, lease, and the ``Shared`` hook."""

    def __init__(self, settings: RedisState, controller: Controller, metrics: Metrics,
                 name: str | None = None) -> None:
        self.settings = settings
        self.controller, self.metrics = controller, metrics
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.boot = uuid.uuid4().hex
        options = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT,
                   "retry": Retry(NoBackoff(), 0), "client_name": "ringproxy"}
        self.redis: Redis = Redis.from_url(settings.url, **options)  # type: ignore[arg-type]
        # Pub/sub blocks reading: its own connection, without the read timeout.
        self._listener: Redis = Redis.from_url(
            settings.url, socket_connect_timeout=TIMEOUT, socket_keepalive=True,
            retry=Retry(NoBackoff(), 0))
        self.store = Store(self.redis, settings.prefix)
        self.lease = Lease(self.store, self.id, settings.lease)
        self.up = False  # the last Redis command succeeded
        self.leader: str | None = None  # who leads, as last seen
        self.version = 0  # the shared states' version this member applied
        self.last_event = ""  # the stream id of the last event taken into the trail
        self.pending: dict[Key, LocalRollback] = {}
        self.merger = Merger()
        self.merged = MergedTallies()
        self.writes = 0  # decisions this member wrote
        self._gens: dict[Key, tuple[Tally, int]] = {}
        self._gen = 0
        self._led = 0  # the token of the last lease this member led with
        self._tasks: list[asyncio.Task[None]] = []
        controller.shared = self
        metrics.gauges.append(self.gauges)

    # ------------------------------------------------------------------ life

    async def start(self) -> None:
        """Adopt the fleet's states (up to ``START_WAIT``), then run the loops."""
        try:
            async with asyncio.timeout(START_WAIT):
                await self._sync(first=True)
            self._set_up(True)
        except (RedisError, OSError, TimeoutError) as exc:
            self._set_up(False, exc)
        self._tasks = [asyncio.ensure_future(self._tick()),
                       asyncio.ensure_future(self._listen())]

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        if self.lease.leading:
            with contextlib.suppress(RedisError, OSError):
                await self.lease.resign()
        await self.redis.aclose()
        await self._listener.aclose()

    def _set_up(self, up: bool, exc: BaseException | None = None) -> None:
        if up != self.up or not self._tasks:
            if up:
                log.info("shared state %s: reachable (member %s)",
                         self.settings.redacted_url, self.id)
            else:
                log.warning("shared state %s: OUT OF REACH (%s): serving the last applied "
                            "states; nothing advances; only local fast rollbacks",
                            self.settings.redacted_url, type(exc).__name__ if exc else "")
        self.up = up
        if not up:
            self.leader = None
            self.lease.lost()
        self._role()

    def _role(self) -> None:
        """What the controller judges, on which evidence, for this member's role now."""
        if not self.up:
            self.controller.judging = "fast"  # its own evidence: less exposure only
            self.controller.tally = self.metrics.tally
        elif self.lease.leading:
            self.controller.judging = "all"
            self.controller.tally = self._merged_tally
        else:
            self.controller.judging = "none"
            self.controller.tally = self.metrics.tally

    def _merged_tally(self, route: str, ring: str) -> Tally:
        self.metrics.tally(route, ring)  # KeyError when metrics are off: nothing judged
        return self.merged.get((route, ring))

    # ------------------------------------------------------------------ the loops

    async def _tick(self) -> None:
        """Publish every 250 ms (the leader then merges); renew the lease every
        ``lease / 3``; check the version every second; each when it is due."""
        loop = asyncio.get_running_loop()
        next_publish = next_lease = next_poll = loop.time()
        while True:
            now = loop.time()
            try:
                async with asyncio.timeout(TIMEOUT * 2):
                    if now >= next_publish:
                        next_publish = now + PUBLISH_EVERY
                        await self._publish()
                        if self.lease.leading:
                            await self._merge()
                    if now >= next_lease:
                        next_lease = now + self.lease.every
                        await self._lead()
                    if now >= next_poll:
                        next_poll = now + POLL_EVERY
                        await self._poll()
                    if self.pending:
                        await self._record_local_rollbacks()
                if not self.up:
                    self._set_up(True)
            except (RedisError, OSError, TimeoutError) as exc:
                if self.up:
                    self._set_up(False, exc)
            except Exception:  # one bad round must not stop the member
                log.exception("fleet member round failed")
            await asyncio.sleep(max(0.0, min(next_publish, next_lease, next_poll)
                                    - loop.time()))

    async def _listen(self) -> None:
        """Apply a decision as soon as it is announced (the version check is the fallback)."""
        while True:
            pubsub = self._listener.pubsub()
            try:
                await pubsub.subscribe(self.store.channel)
                await self._poll()  # what was written while not subscribed
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=5.0)
                    if message is None:
                        continue
                    try:
                        version = int(message["data"])
                    except (TypeError, ValueError):
                        continue
                    if version:  # a write: its states if newer, its events in any case
                        await self._sync_states()
            except (RedisError, OSError, TimeoutError):
                await asyncio.sleep(RESUBSCRIBE)
            except Exception:  # pragma: no cover - logged, the loop goes on
                log.exception("fleet subscriber failed")
                await asyncio.sleep(RESUBSCRIBE)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _poll(self) -> None:
        version = int(await self.redis.get(self.store.version) or 0)
        if version != self.version:
            await self._sync_states()

    async def _sync_states(self) -> None:
        async with self.controller.lock:
            await self._sync()

    # ------------------------------------------------------------------ evidence

    def _totals(self) -> dict[Key, tuple[int, Evidence]]:
        out: dict[Key, tuple[int, Evidence]] = {}
        gens: dict[Key, tuple[Tally, int]] = {}
        for route, plan in self.controller.plans.items():
            if plan.analysis is None:
                continue
            for ring in plan.rings:
                key = (route, ring.name)
                try:
                    tally = self.metrics.tally(route, ring.name)
                except KeyError:
                    continue
                held = self._gens.get(key)
                if held is None or held[0] is not tally:
                    self._gen += 1
                    held = (tally, self._gen)
                gens[key] = held
                out[key] = (held[1], tally.evidence())
        self._gens = gens
        return out

    async def _publish(self) -> None:
        body = encode(self.boot, time.time(), self._totals())
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.store.evidence, self.id, body)
            pipe.pexpire(self.store.evidence, round(STALE_AFTER * 2000))
            await pipe.execute()

    async def _merge(self) -> None:
        """The leader's read of every member's evidence, into the merged tallies."""
        raw = await self.redis.hgetall(self.store.evidence)
        published: dict[str, Published] = {}
        old: list[str] = []
        cutoff = time.time() - STALE_AFTER
        for name, body in raw.items():
            member = name.decode() if isinstance(name, bytes) else str(name)
            try:
                doc = decode(body)
            except ValueError as exc:
                log.warning("fleet evidence of member %s skipped: %s", member, exc)
                continue
            if doc.at < cutoff:
                old.append(member)  # gone: its last totals stay counted (Merger.forget)
            else:
                published[member] = doc
        self.merger.update(published)
        if old:
            self.merger.forget(old)
            await self.redis.hdel(self.store.evidence, *old)
        self.merged.refresh(self.merger)

    # ------------------------------------------------------------------ leadership

    async def _lead(self) -> None:
        was = self.lease.leading
        leading = await self.lease.renew()
        if leading and not was:
            if self.lease.token != self._led:  # a new lease: the evidence starts here
                log.warning("fleet: member %s LEADS (fencing token %d)", self.id,
                            self.lease.token)
                self._led = self.lease.token
                self.merger, self.merged = Merger(), MergedTallies()
            await self._merge()
            async with self.controller.lock:
                await self._sync()
                await self._seed()
        elif was and not leading:
            log.warning("fleet: member %s no longer leads", self.id)
        self.leader = self.id if leading else await self.store.holder()
        self._role()

    async def _seed(self) -> None:
        """Routes the shared state lacks (a new fleet, a route added): this leader's states.

        Called with the controller's lock held, right after a sync."""
        _, shared = await self.store.read()
        for route, states in self.controller.states.items():
            if route not in shared:
                written = await self.store.write(self.version, self.lease.token, route,
                                                 states, [])
                if written.ok:
                    self.version = written.version

    # ------------------------------------------------------------------ states

    async def _sync(self, first: bool = False) -> None:
        """Adopt the newest shared states and take the new events into the trail; the
        caller holds the controller's lock."""
        version, shared = await self.store.read()
        if version != self.version and shared:
            await self.controller.adopt_locked(self._keep_local(shared))
        self.version = version
        if first:
            await self._first_events()
        else:
            await self._events()

    def _keep_local(self, shared: SharedStates) -> SharedStates:
        """The shared states, except rings this member took off and has not recorded yet."""
        if not self.pending:
            return shared
        out = {route: dict(rings) for route, rings in shared.items()}
        for (route, ring), held in self.pending.items():
            mine = self.controller.states.get(route, {}).get(ring)
            theirs = out.get(route, {}).get(ring)
            if (mine is not None and theirs is not None and theirs.enabled
                    and theirs.fingerprint == held.fingerprint):
                out[route][ring] = mine
        return out

    async def _first_events(self) -> None:
        """The fleet's trail replaces the one read from the local file (the same events,
        and those of the fleet this member missed)."""
        entries = await self.store.last_events(HISTORY)
        self.last_event = entries[-1][0] if entries else "0"
        trail = [event for _, event in entries if event]
        if trail:
            self.controller.history.clear()
            self.controller.history.extend(trail)

    async def _events(self) -> None:
        if not self.last_event:
            await self._first_events()
            return
        new = await self.store.events_after(self.last_event)
        if not new:
            return
        self.last_event = new[-1][0]
        events = [event for _, event in new if event]
        self.controller.history.extend(events)
        await asyncio.to_thread(_append, self.controller.audit_path, events)

    # ------------------------------------------------------------------ the Shared hook

    async def write(self, route: str, states: dict[str, RingState], events: list[Event],
                    judged: bool) -> bool:
        """Write a decision before it is applied (``Controller._commit``, lock held)."""
        leading = self.lease.leading
        token = self.lease.token if judged and leading else None
        less = bool(events) and all(e.kind == "rollback" for e in events)
        if judged and not leading and (self.up or not less):
            raise Stale  # a follower's round (the lease just went): the leader judges
        try:
            async with asyncio.timeout(TIMEOUT * 2):
                written = await self.store.write(self.version, token, route, states, events)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("fleet: writing a decision of route %s failed: %s", route,
                        type(exc).__name__ + (f" ({exc})" if str(exc) else ""))
            self._set_up(False, exc)
            if less:
                for event in events:
                    state = states.get(event.ring)
                    self.pending[route, event.ring] = LocalRollback(
                        route, event.ring, state.fingerprint if state else "", event.reason)
                log.warning("fleet: %s/%s taken off LOCALLY (shared state out of reach); "
                            "it is recorded there when it is back", route,
                            ",".join(e.ring for e in events))
                return False
            raise SharedUnavailable(
                f"the shared rollout state ({self.settings.redacted_url}) is out of reach: "
                "nothing changed; members keep serving the last agreed state") from None
        if written.deposed:
            log.warning("fleet: a decision of member %s was refused: its lease is no longer "
                        "current", self.id)
            self.lease.lost()
            self._role()
            raise Stale
        if not written.ok:
            await self._sync()
            raise Stale
        self.version = written.version
        self.writes += 1
        return True

    async def _record_local_rollbacks(self) -> None:
        """Write the rollbacks taken while Redis was out of reach (if still exposed there)."""
        async with self.controller.lock:
            version, shared = await self.store.read()
            for key, held in list(self.pending.items()):
                route, ring = key
                plan = self.controller.plans.get(route)
                theirs = shared.get(route, {}).get(ring)
                if (plan is None or theirs is None or not theirs.enabled
                        or theirs.fingerprint != held.fingerprint):
                    del self.pending[key]  # agreed already, or no longer the same ring
                    continue
                new, events = act(plan, shared[route], ring, Trigger.ROLLBACK, time.time(),
                                  f"{held.reason} (taken off locally by member {self.id} "
                                  "while the shared state was out of reach)",
                                  actor=f"member:{self.id}")
                written = await self.store.write(version, None, route, new, events)
                if written.ok:
                    version = written.version
                    del self.pending[key]
                    log.warning("fleet: the local rollback of %s/%s is recorded in the "
                                "shared state", route, ring)
                else:
                    break  # the version moved on: next round
            await self._sync()

    # ------------------------------------------------------------------ views

    def info(self) -> dict[str, object]:
        """For the status API and /readyz (the URL without its password)."""
        return {
            "backend": "redis", "url": self.settings.redacted_url,
            "prefix": self.settings.prefix, "member": self.id, "up": self.up,
            "leader": self.leader, "leading": self.lease.leading,
            "version": self.version, "judging": self.controller.judging,
            "local_rollbacks_pending": [f"{r.route}/{r.ring}" for r in self.pending.values()],
        }

    def gauges(self) -> Iterable[tuple[str, str, float]]:
        yield ("ringproxy_state_backend_up", "1 while the shared state (Redis) answers; "
               "0: serving the last agreed states, nothing advances.", float(self.up))
        yield ("ringproxy_fleet_leader", "1 while this member holds the fleet's lease and "
               "judges the merged evidence.", float(self.lease.leading))
        yield ("ringproxy_fleet_state_version", "The version of the shared rollout states "
               "this member applied.", float(self.version))
        yield ("ringproxy_fleet_local_rollbacks_pending", "Rings this member took off while "
               "the shared state was out of reach, not yet recorded there.",
               float(len(self.pending)))

    def __repr__(self) -> str:
        role = "leader" if self.lease.leading else "follower"
        return f"<Member {self.id} {role} up={self.up} version={self.version}>"


def _append(path: Path, events: list[dict[str, object]]) -> None:
    """The fleet's events into this member's local audit file (JSON lines)."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in events))


def fleet_member(settings: StateFiles, controller: Controller,
                 metrics: Metrics) -> Member | None:
    """The member for ``state.backend: redis``; None for the file backend."""
    redis = settings.backend
    return Member(redis, controller, metrics) if redis is not None else None
