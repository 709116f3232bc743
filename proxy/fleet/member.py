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
soon as it is back (if the ring is still exposed there) and recorded in the fleet's trail,
once.  Until then an adopted state never re-exposes a ring this member took off.  Such a
rollback is kept in a file next to the state file (``<state.path>.fleet-pending``), so
that a restart while Redis is still out of reach loses it neither.

If Redis loses writes it acknowledged (an AOF ``everysec`` crash, a failover to a replica
that lagged, a Redis without persistence restarted: ``Read.lost``), no member adopts more
exposure than it serves: for each ring of the same config it keeps the less exposed of the
shared state and its own (rolled back beats progressing, a lower weight a higher one) and
writes that back.

A write that fails may or may not have run (a timeout after the script was sent): for a
rollback the member takes the ring off locally anyway and leaves the audit trail to the
stream (it brings the event if the write ran, and the pending rollback's record if not);
any other action answers 503 saying the outcome is unknown (``ringproxy status`` shows it).

The Redis server must be 6.2 or newer (``store.MIN_SERVER``); an older one is refused
(logged; the member stays as if Redis were out of reach).
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
    Seen,
    decode,
    encode,
    subtract,
)
from proxy.fleet.lease import Lease
from proxy.fleet.store import Read, SharedStates, Store, TooOld
from proxy.metrics import plain_gauges
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
    at: float = 0.0  # when (wall clock)

    def as_dict(self) -> dict[str, object]:
        return {"route": self.route, "ring": self.ring, "fingerprint": self.fingerprint,
                "reason": self.reason, "at": self.at}


def load_pending(path: Path) -> dict[tuple[str, str], LocalRollback]:
    """The local rollbacks a previous run left unrecorded; a file that is not what
    ``save_pending`` writes is logged and ignored (the state file still has the rings off)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data["pending"]
        out = {}
        for item in items:
            held = LocalRollback(str(item["route"]), str(item["ring"]),
                                 str(item["fingerprint"]), str(item["reason"]),
                                 float(item.get("at", 0.0)))
            out[held.route, held.ring] = held
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("fleet: %s is not usable (%s): no pending local rollback read from it",
                    path, exc)
        return {}


def save_pending(path: Path, pending: Iterable[LocalRollback]) -> None:
    """Durably (a temporary file, fsync, rename), or the file removed when none is left."""
    items = [held.as_dict() for held in pending]
    if not items:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    temp = path.with_name(path.name + ".tmp")
    with temp.open("w", encoding="utf-8") as f:
        json.dump({"pending": items}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def less_exposed(a: RingState, b: RingState) -> bool:
    """``a`` exposes fewer users than ``b``: rolled back beats enabled, then lower weight."""
    if a.enabled != b.enabled:
        return not a.enabled
    return a.enabled and a.weight is not None and b.weight is not None and a.weight < b.weight


def _unknown(exc: BaseException) -> bool:
    """Whether a failed command may have run: anything but a failure to connect."""
    return "connecting to" not in str(exc)


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
        self.stamp = ""  # ... and the id of the write that made it
        self.last_event = ""  # the stream id of the last event taken into the trail
        self.pending_path = controller.state_path.with_name(
            controller.state_path.name + ".fleet-pending")
        self.pending: dict[tuple[str, str], LocalRollback] = load_pending(self.pending_path)
        self.merger = Merger()
        self.merged = MergedTallies()
        self.seen = Seen()
        self.writes = 0  # decisions this member wrote
        self.server = ""  # the Redis server's version, once checked
        self._shared_routes: set[str] = set()
        # (route, ring) -> (tally, fingerprint, generation, base: what it held at the
        # config's change, None if it started with it)
        self._gens: dict[tuple[str, str], tuple[Tally, str, int, Evidence | None]] = {}
        self._gen = 0
        self._seq = 0
        self._led = 0  # the token of the last lease this member led with
        self._tasks: list[asyncio.Task[None]] = []
        controller.shared = self
        metrics.extra.append(plain_gauges(self.gauges))

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
        if isinstance(exc, TooOld) and (self.up or not self._tasks):
            log.error("shared state %s REFUSED: %s", self.settings.redacted_url, exc)
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
            self.server = ""  # checked again when it answers (a failover may change it)
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
        """The fleet's evidence of the ring's config this leader's state holds."""
        self.metrics.tally(route, ring)  # KeyError when metrics are off: nothing judged
        state = self.controller.states.get(route, {}).get(ring)
        return self.merged.get((route, ring, state.fingerprint if state else ""))

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
                    if not self.server:  # nothing (not even the lease) on a refused one
                        self.server = await self.store.check_server()
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
                    if self.lease.leading and self.controller.states.keys() \
                            - self._shared_routes:
                        async with self.controller.lock:  # a route a reload added
                            await self._sync()
                            await self._seed()
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
        if not self.server:
            self.server = await self.store.check_server()
        if await self.store.head() != (self.version, self.stamp):
            await self._sync_states()

    async def _sync_states(self) -> None:
        async with self.controller.lock:
            await self._sync()

    # ------------------------------------------------------------------ evidence

    def _totals(self) -> tuple[dict[Key, tuple[int, Evidence]], dict[Key, int | None]]:
        """Each ring's totals under the fingerprint of the config it serves here (from
        the config's change on: a new generation), and its step."""
        out: dict[Key, tuple[int, Evidence]] = {}
        steps: dict[Key, int | None] = {}
        gens: dict[tuple[str, str], tuple[Tally, str, int, Evidence | None]] = {}
        for route, plan in self.controller.plans.items():
            if plan.analysis is None:
                continue
            states = self.controller.states.get(route, {})
            for ring in plan.rings:
                name = (route, ring.name)
                try:
                    tally = self.metrics.tally(route, ring.name)
                except KeyError:
                    continue
                held = self._gens.get(name)
                if held is None or held[0] is not tally:
                    self._gen += 1
                    held = (tally, ring.fingerprint, self._gen, None)
                elif held[1] != ring.fingerprint:
                    self._gen += 1
                    held = (tally, ring.fingerprint, self._gen, tally.evidence())
                gens[name] = held
                key = (route, ring.name, ring.fingerprint)
                totals = tally.evidence()
                out[key] = (held[2], totals if held[3] is None else subtract(totals, held[3]))
                state = states.get(ring.name)
                steps[key] = state.step if state is not None else None
        self._gens = gens
        return out, steps

    async def _publish(self) -> None:
        self._seq += 1
        totals, steps = self._totals()
        body = encode(self.boot, time.time(), totals, self._seq, steps)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.store.evidence, self.id, body)
            pipe.pexpire(self.store.evidence, round(STALE_AFTER * 2000))
            await pipe.execute()

    async def _merge(self) -> None:
        """The leader's read of every member's evidence, into the merged tallies."""
        raw = await self.redis.hgetall(self.store.evidence)
        published: dict[str, Published] = {}
        now = asyncio.get_running_loop().time()
        for name, body in raw.items():
            member = name.decode() if isinstance(name, bytes) else str(name)
            try:
                doc = decode(body)
            except ValueError as exc:
                log.warning("fleet evidence of member %s skipped: %s", member, exc)
                continue
            published[member] = doc
            self.seen.saw(member, doc, now)
        # Gone (its document unchanged for STALE_AFTER by this leader's clock): its last
        # totals stay counted (Merger.forget).
        old = self.seen.stale(now, STALE_AFTER)
        for member in old:
            published.pop(member, None)
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
                self.merger, self.merged, self.seen = Merger(), MergedTallies(), Seen()
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
        read = await self.store.read()
        self._shared_routes = set(read.states)
        for route, states in self.controller.states.items():
            if route not in read.states:
                written = await self.store.write(self.version, self.lease.token, route,
                                                 states, [])
                if written.ok:
                    self.version, self.stamp = written.version, written.stamp
                    self._shared_routes.add(route)

    # ------------------------------------------------------------------ states

    async def _sync(self, first: bool = False) -> None:
        """Adopt the newest shared states and take the new events into the trail; the
        caller holds the controller's lock."""
        if not self.server:
            self.server = await self.store.check_server()
        read = await self.store.read(self.version, self.stamp)
        self._shared_routes = set(read.states)
        if read.lost:
            await self._recover(read)
        else:
            if (read.version, read.stamp) != (self.version, self.stamp) and read.states:
                await self.controller.adopt_locked(self._keep_local(read.states))
            self.version, self.stamp = read.version, read.stamp
        if first:
            await self._first_events()
        else:
            await self._events()

    async def _recover(self, read: Read) -> None:
        """Redis lost writes this member applied: adopt no more exposure than it serves.

        For each ring of the same config, the less exposed of (shared, local), written
        back (version-checked; if another member wrote first, the next sync does this
        again on what it wrote) and applied."""
        log.warning("fleet: the shared state LOST writes (version %d, this member applied "
                    "%d): keeping, ring by ring, the less exposed of it and this member's "
                    "states", read.version, self.version)
        version, stamp, ok = read.version, read.stamp, True
        merged: SharedStates = {}
        for route, rings in read.states.items():
            mine = self.controller.states.get(route, {})
            kept = dict(rings)
            for name, theirs in rings.items():
                local = mine.get(name)
                if (local is not None and local.fingerprint == theirs.fingerprint
                        and less_exposed(local, theirs)):
                    kept[name] = local
            merged[route] = kept
            if kept != rings and ok:
                written = await self.store.write(version, None, route, kept, [])
                if written.ok:
                    version, stamp = written.version, written.stamp
                    log.warning("fleet: route %s's shared states written back with this "
                                "member's less exposed rings", route)
                else:
                    ok = False  # moved on: the next sync merges what is there now
        if merged:
            await self.controller.adopt_locked(self._keep_local(merged))
        if ok:
            self.version, self.stamp = version, stamp

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
            unknown = _unknown(exc)
            if less:
                for event in events:
                    state = states.get(event.ring)
                    self.pending[route, event.ring] = LocalRollback(
                        route, event.ring, state.fingerprint if state else "", event.reason,
                        event.time)
                await asyncio.to_thread(save_pending, self.pending_path,
                                        list(self.pending.values()))
                log.warning("fleet: %s/%s taken off LOCALLY (shared state out of reach%s); "
                            "it is recorded there when it is back", route,
                            ",".join(e.ring for e in events),
                            ", the write's outcome unknown" if unknown else "")
                # Outcome unknown: the stream brings the event if the write ran (and the
                # pending record's if not); never the local audit too (a duplicate).
                return unknown
            if unknown:
                raise SharedUnavailable(
                    f"the shared rollout state ({self.settings.redacted_url}) did not answer "
                    "in time: the outcome is unknown (the decision may have been written); "
                    "check `ringproxy status`") from None
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
        self.version, self.stamp = written.version, written.stamp
        self.writes += 1
        return True

    async def _record_local_rollbacks(self) -> None:
        """Write the rollbacks taken while Redis was out of reach (if still exposed there)."""
        async with self.controller.lock:
            before = dict(self.pending)
            read = await self.store.read()
            version, shared = read.version, read.states
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
            if self.pending != before:
                await asyncio.to_thread(save_pending, self.pending_path,
                                        list(self.pending.values()))
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
