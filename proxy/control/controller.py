"""The control loop: judge every analysed ring on a timer and apply what the rollout decides.

The shell around the pure ``rollout.judge`` and ``rollout.machine``: it takes the evidence
off the rings' tallies, keeps the ring states, persists them (state file, then audit file)
before it applies a change to the routing table, counts rollbacks, and hands events to the
webhook sender.  Operator actions (the admin API) come in through ``act``.

Every ``analysis.interval`` the judge reads each ring's evidence since its step began
against its baseline's over the same time (``proxy.control.looks``: evidence starts at
the first look at a step, after a restart too).  Every ``FAST_TICK`` in between, a quick
look runs the error checks alone on the counts since each mark (``judge.errors_worse``:
the same tests at the same alpha, looked at more often, which an anytime-valid test
allows; a few tens of microseconds a ring) and calls a full round when they would roll
back; and the fast path, where configured, reads each ring's last ``fast.window``
seconds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from proxy.checks.results import join as join_external
from proxy.checks.runner import CheckRunner
from proxy.config import Config
from proxy.config.analysis import FastRollback
from proxy.control.looks import Looks
from proxy.control.statefile import (
    append_audit,
    load_state,
    read_audit,
    save_state,
    set_aside,
)
from proxy.control.webhooks import WebhookSender
from proxy.errors import RolloutConflict, StateError
from proxy.health.state import Transition
from proxy.rollout.evidence import Tally
from proxy.rollout.judge import Verdict, errors_worse, judge_fast, judge_marks
from proxy.rollout.machine import (
    Trigger,
    act,
    on_fast_failure,
    on_verdicts,
    restore,
    unmatched,
    waiting_for_gate,
)
from proxy.rollout.plan import RoutePlan, build_plan
from proxy.rollout.state import Event, Phase, RingState
from proxy.rollout.steps import ring_criteria
from proxy.tasks import cancel_and_wait

if TYPE_CHECKING:
    from proxy.config.rollout import Webhook
    from proxy.metrics import Metrics
    from proxy.runtime import Runtime

log = logging.getLogger("ringproxy.rollout")
WEBHOOK_DRAIN = 10.0  # seconds a replaced webhook sender gets to post what it has queued

States = Mapping[str, RingState]
Decision = tuple[dict[str, RingState], list[Event]]
# Decides a route's new states from its current plan (None: the route left the config).
Decide = Callable[[RoutePlan | None, States], Decision]
FAST_TICK = 0.1  # seconds between fast-path checks, when a route has one
# Which analysis this process runs: all of it (alone, or a fleet's leader), none (a fleet's
# follower: it applies the leader's decisions), or the fast path alone (a follower cut off
# from the shared state: it may still take a failing ring off, never add exposure).
Judging = Literal["all", "none", "fast"]
SHARED_TRIES = 5  # an operator action decided again at most this often on newer states


class SharedUnavailable(RolloutConflict):
    """The fleet's shared state cannot take the decision now (Redis out of reach, or it
    kept changing): nothing changed anywhere; the admin API answers 503."""

    status = 503


class Stale(Exception):
    """The shared state moved on since this process decided: it has adopted the newer
    states; an operator's action is decided again on them, a judged decision dropped."""


class Shared(Protocol):
    """Where a fleet's decisions are written before any member applies them
    (``proxy.fleet.member``); absent, the state file is the only record."""

    async def write(self, route: str, states: dict[str, RingState], events: list[Event],
                    judged: bool) -> bool:
        """Write the route's new states; True: shared (the audit trail comes back through
        the fleet's stream), False: kept local (a rollback while the shared state is out
        of reach).  Raises ``Stale``, or ``SharedUnavailable`` when it cannot be written."""
        ...

    def info(self) -> dict[str, object]:
        """The shared state's status for the admin API (no secret in it)."""
        ...


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What ``configure`` replaces, kept so a reload that fails later can put it back."""

    plans: dict[str, RoutePlan]
    states: dict[str, dict[str, RingState]]
    verdicts: dict[str, dict[str, Verdict]]
    runtime: Runtime | None


class Controller:
    """Ring states for every route of the current config, and the loop that moves them."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        save: Callable[[Path, Mapping[str, Mapping[str, RingState]]], None] = save_state,
    ) -> None:
        self.metrics = metrics
        self.wall, self.mono = wall, mono
        self._save = save  # runs in a worker thread; tests pass a slow one
        self.state_path = Path(config.state.path)
        self.audit_path = Path(config.state.audit)
        self.plans: dict[str, RoutePlan] = {}
        self.states: dict[str, dict[str, RingState]] = {}
        self.verdicts: dict[str, dict[str, Verdict]] = {}
        self.events: collections.deque[Event] = collections.deque(maxlen=1000)
        # The audit trail as the admin API serves it: this process's events, after the last
        # ones of earlier runs read back from the audit file at start.
        self.history: collections.deque[dict[str, object]] = collections.deque(maxlen=1000)
        self.webhooks = WebhookSender(config.webhooks)
        # The last states of every route seen: read from the state file at start, and kept
        # for a route a reload removes, so re-adding it never forgets a rollback.
        self._known: dict[str, dict[str, RingState]] = {}
        self._runtime: Runtime | None = None
        self._lock = asyncio.Lock()
        self._generation = 0  # bumped by every configure()
        self._task: asyncio.Task[None] | None = None
        self._retired: dict[WebhookSender, asyncio.Task[None]] = {}  # senders draining
        self.looks = Looks()  # per ring: where its evidence starts, its recent history
        # Called with the runtime and a route's name after the route's states went into
        # that runtime's table (worker processes are told: proxy.workers.supervisor).
        self.on_apply: list[Callable[[Runtime, str], None]] = []
        self._unsaved = False  # states configure() created that the state file lacks
        # External checks (Prometheus, webhooks, custom health) and the step gates.
        self.checks = CheckRunner(self._state_of, self._note, wall)
        self.checks.snapshot = self._snapshot
        metrics.checks_source = self.checks
        # Fleet hooks (``proxy.fleet``): where the judge reads a ring's evidence (the
        # fleet's merged totals on a leader), what it runs, and where decisions go first.
        self.tally: Callable[[str, str], Tally] = metrics.tally
        self.judging: Judging = "all"
        self.shared: Shared | None = None

    # ------------------------------------------------------------------ configuration

    def load(self, fresh: bool = False) -> None:
        """Read the audit and state files; with ``fresh`` an unusable one is set aside,
        loudly (a ``StateError`` otherwise, with one line saying what is wrong where)."""
        try:
            self.history.extend(read_audit(self.audit_path))
        except StateError as exc:
            if not fresh:
                raise
            aside = set_aside(self.audit_path)
            log.warning("%s; STARTING A NEW AUDIT FILE (--fresh-state); the old file is "
                        "kept as %s", exc, aside)
        try:
            self._known = load_state(self.state_path)
        except StateError as exc:
            if not fresh:
                raise
            aside = set_aside(self.state_path)
            log.warning("%s; STARTING WITH FRESH ROLLOUT STATE (--fresh-state); the old file "
                        "is kept as %s", exc, aside)
            self._known = {}

    def configure(self, runtime: Runtime) -> None:
        """Plans and states for ``runtime``'s config, applied to its routing table.

        Call before the runtime serves a request (at start, and on reload before the swap),
        so a rolled-back ring is never served at its configured weight, not even once.
        Synchronous and lock-free on purpose: a reload never waits on a state save or an
        analysis round; a commit whose save it overtakes decides again (see ``_commit``).
        """
        now = self.wall()
        config = runtime.config
        self._known.update(self.states)
        plans, states = {}, {}
        kept: list[Event] = []
        for route in config.routes:
            plan = build_plan(config, route)
            plans[route.name] = plan
            saved = self._known.get(route.name, {})
            states[route.name] = restore(plan, saved, now)
            kept += [_kept_back(route.name, ring, states[route.name][ring], now)
                     for ring in unmatched(plan, saved)]
        for name, rings in states.items():
            old = self._known.get(name, {})
            for ring, state in rings.items():
                before = old.get(ring)
                if before is not None and before.fingerprint != state.fingerprint:
                    log.info("ring %s/%s changed in the config: its rollout starts over (%s)",
                             name, ring, state.phase.value)
        # A ring whose state is new (a first start, a new ring or version) is saved by the
        # loop soon (``_save_new``): its step's start must survive a restart even before
        # its first change (a 72 h step is not reset by a restart).
        self._unsaved = self._unsaved or any(
            self._known.get(name, {}).get(ring) != state
            for name, rings in states.items() for ring, state in rings.items())
        self.plans, self.states = plans, states
        self._note_unmatched(kept)
        self._generation += 1  # a commit whose save spans this call decides again
        self.verdicts = {k: v for k, v in self.verdicts.items() if k in plans}
        self.looks.keep({(p.route, r.name) for p in plans.values() for r in p.rings})
        self._runtime = runtime
        self.checks.configure(config, plans)
        for name in plans:
            self._apply(name)
        runtime.take_over()

    def _note_unmatched(self, events: list[Event]) -> None:
        """Say that unmatched saved states kept their rings rolled back: a warning, an
        event in memory and in the audit file, and the states saved bound to their rings
        (written now: it happens at start, before anything serves, or on the reload that
        brings a route back)."""
        for event in events:
            log.warning("%s", event.text)
            self.events.append(event)
            self.history.append(event.as_dict())
        if not events:
            return
        try:
            self._save(self.state_path, self.states)
            append_audit(self.audit_path, events)
        except OSError as exc:
            log.error("cannot save the rollout state or its audit: %s", exc)

    def checkpoint(self) -> Checkpoint:
        """What the next ``configure`` would replace (take it before a reload's apply)."""
        return Checkpoint(dict(self.plans), dict(self.states), dict(self.verdicts),
                          self._runtime)

    def back_to(self, checkpoint: Checkpoint) -> None:
        """Undo a ``configure`` whose reload failed: the states as they were, not re-derived.

        Re-deriving them from the new config's states would start over every ring the failed
        config changed (a rolled-back ring back at its configured weight).  Call it with no
        await since the checkpoint was taken, so no commit can have come in between.
        """
        self.plans, self.states = dict(checkpoint.plans), dict(checkpoint.states)
        self.verdicts = dict(checkpoint.verdicts)
        self._generation += 1  # a commit whose save spans this call decides again
        self._runtime = checkpoint.runtime
        if checkpoint.runtime is not None:
            self.checks.configure(checkpoint.runtime.config, self.plans)
            for name in self.plans:
                self._apply(name)
            checkpoint.runtime.take_over()

    def _apply(self, route: str) -> None:
        """Put the route's live weights and rolled-back rings into the routing table.

        The table's bucket layout is then the one truth of the weights (rings read their
        share off it); the phase (and the analysis) is copied to the ring for metrics.
        """
        runtime = self._runtime
        if runtime is None:
            return
        apply_states(runtime, route, self.states[route])
        self._show(route)
        self._look(route)
        for hook in self.on_apply:
            hook(runtime, route)

    def _look(self, route: str) -> None:
        """Start the evidence of every ring whose step began since the last look."""
        plan = self.plans[route]
        if plan.analysis is None:
            return
        try:
            baseline = self.tally(route, plan.baseline)
            for ring in plan.analysed:
                state = self.states[route][ring.name]
                if state.enabled:
                    self.looks.start((route, ring.name), state,
                                     self.tally(route, ring.name), baseline)
        except KeyError:
            return  # metrics are off: nothing is analysed

    def _show(self, route: str) -> None:
        """Copy each ring's phase, starved flag and last verdict to its runtime (metrics)."""
        if self._runtime is None:
            return
        states, verdicts = self.states[route], self.verdicts.get(route, {})
        for ring_rt in self._runtime.rings[route]:
            state = states[ring_rt.name]
            ring_rt.phase, ring_rt.starved = state.phase, state.starved
            ring_rt.verdict = verdicts.get(ring_rt.name)

    # ------------------------------------------------------------------ the loop

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        self.webhooks.start()
        self.checks.start()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.checks.stop()
        await self.webhooks.stop()
        for sender, draining in list(self._retired.items()):
            await cancel_and_wait(draining)
            await sender.stop()

    async def set_webhooks(self, hooks: tuple[Webhook, ...]) -> None:
        """Post events to ``hooks`` from now on (a reload changed them).

        The next event goes to the new hooks.  The old sender keeps posting what it has
        queued, in the background so a reload never waits on a slow receiver, for up to
        ``WEBHOOK_DRAIN`` seconds; what is left then is dropped with a warning.
        """
        if hooks == self.webhooks.hooks:
            return
        old, self.webhooks = self.webhooks, WebhookSender(hooks)
        if self._task is not None:  # started: so is the new sender
            self.webhooks.start()
        draining = asyncio.ensure_future(old.close(WEBHOOK_DRAIN))
        self._retired[old] = draining
        draining.add_done_callback(lambda _: self._retired.pop(old, None))

    async def _save_new(self) -> None:
        """Save the states ``configure`` created, if any (see there)."""
        if not self._unsaved:
            return
        async with self._lock:
            self._unsaved = False
            await asyncio.to_thread(self._save, self.state_path, dict(self.states))

    async def _run(self) -> None:
        due: dict[str, float] = {}
        while True:
            try:
                await self._save_new()
            except Exception:  # logged; a later change saves again
                log.exception("saving the new rollout states failed")
            now = self.mono()
            analysed = {name: p.analysis for name, p in self.plans.items()
                        if p.analysis is not None}
            if self.judging == "none":
                analysed = {}
            for name, analysis in analysed.items():
                when = due.setdefault(name, now + analysis.interval)
                if self.judging == "fast":
                    continue
                if now >= when:
                    due[name] = now + analysis.interval
                    try:
                        await self.evaluate(name)
                    except Exception:  # one bad round must not stop the loop
                        log.exception("analysis of route %s failed", name)
            for name in analysed if self.judging == "all" else ():
                try:
                    await self.check_errors(name)
                except Exception:  # pragma: no cover - logged, the loop goes on
                    log.exception("quick error look at route %s failed", name)
            fast = [name for name, a in analysed.items() if a.fast is not None]
            for name in fast:
                try:
                    await self.check_fast(name)
                except Exception:
                    log.exception("fast rollback check of route %s failed", name)
            ticks = [a.interval / 4 for a in analysed.values()]
            if analysed or self.judging == "none":
                ticks.append(FAST_TICK)  # (a follower: soon back if it becomes the leader)
            await asyncio.sleep(min(ticks) if ticks else 1.0)

    async def check_fast(self, route: str) -> list[Event]:
        """The fast path: a ring above the hard error limit over its last seconds goes back."""
        async with self._lock:
            plan = self.plans.get(route)
            fast = plan.analysis.fast if plan and plan.analysis else None
            if plan is None or fast is None:
                return []
            found = self._fast_failure(route, plan, fast)
            if found is None:
                return []
            ring, verdict = found
            self.verdicts.setdefault(route, {})[ring] = verdict
            now = self.wall()
            return await self._commit(route, _judged(
                plan, lambda p, s: on_fast_failure(p, s, ring, verdict, now)), judged=True)

    def _fast_failure(
        self, route: str, plan: RoutePlan, fast: FastRollback
    ) -> tuple[str, Verdict] | None:
        now = self.mono()
        try:
            baseline = self.looks.recent(
                (route, plan.baseline), self.states[route][plan.baseline],
                self.tally(route, plan.baseline), fast.window, now)
        except KeyError:
            return None  # metrics are off: nothing is analysed
        for ring in plan.analysed:
            state = self.states[route][ring.name]
            if not state.enabled:
                continue
            tally = self.tally(route, ring.name)
            requests, errors = self.looks.recent((route, ring.name), state, tally,
                                                 fast.window, now)
            verdict = judge_fast(requests, errors, fast, *baseline)
            if verdict is not None:
                return ring.name, verdict
        return None

    async def check_errors(self, route: str) -> list[Event]:
        """The quick look: a full round now if the error checks since any mark roll back."""
        async with self._lock:
            plan = self.plans.get(route)
            analysis = plan.analysis if plan is not None else None
            if plan is None or analysis is None or self._runtime is None:
                return []
            try:
                baseline = self.tally(route, plan.baseline)
                due = False
                for ring in plan.analysed:
                    state = self.states[route][ring.name]
                    if not state.enabled:
                        continue
                    counts = self.looks.counts_since_marks(
                        (route, ring.name), state, self.tally(route, ring.name),
                        baseline)
                    criteria = ring_criteria(analysis, ring, state)
                    if counts and errors_worse(counts, criteria) is not None:
                        due = True
                        break
            except KeyError:
                return []  # metrics are off: nothing is analysed
        return await self.evaluate(route) if due else []

    async def evaluate(self, route: str) -> list[Event]:
        """One analysis round for ``route``: verdicts, then whatever they decide."""
        async with self._lock:
            plan = self.plans.get(route)
            analysis = plan.analysis if plan is not None else None
            if plan is None or analysis is None or self._runtime is None:
                return []  # a route without analysis is never analysed
            try:
                baseline = self.tally(route, plan.baseline)
            except KeyError:
                return []  # metrics are off: nothing is analysed
            baseline_now = baseline.evidence()
            states = self.states[route]
            # A rolled-back ring keeps the verdict that sent it back, for the admin views.
            verdicts = {name: v for name, v in self.verdicts.get(route, {}).items()
                        if name in states and not states[name].enabled}
            for ring in plan.analysed:
                if states[ring.name].enabled:
                    marks = self.looks.since_marks(
                        (route, ring.name), states[ring.name],
                        self.tally(route, ring.name), baseline, baseline_now,
                        self.mono())
                    state = states[ring.name]
                    verdicts[ring.name] = join_external(
                        judge_marks(marks, ring_criteria(analysis, ring, state)),
                        self.checks.results_for(plan, ring, state))
            self.verdicts[route] = verdicts
            self._show(route)
            now = self.wall()
            gates = self.checks.gates_open(plan, states, waiting_for_gate(
                plan, states, verdicts, now), verdicts)
            return await self._commit(route, _judged(
                plan, lambda p, s: on_verdicts(p, s, verdicts, now, gates)), judged=True)

    # ------------------------------------------------------------------ operator actions

    async def act(
        self, route: str, ring: str, trigger: Trigger, reason: str = "",
        weight: int | None = None, actor: str = "operator",
    ) -> list[Event]:
        """promote / approve / pause / resume / rollback / set_weight; RolloutConflict if not."""
        now = self.wall()

        # An operator's action is meant for the ring whatever the config: after a reload
        # it is decided again under the new plan (a conflict if it no longer applies).
        def decide(plan: RoutePlan | None, states: States) -> Decision:
            if plan is None:
                raise RolloutConflict(f"no route {route!r}")
            return act(plan, states, ring, trigger, now, reason, weight, actor)

        async with self._lock:
            return await self._commit(route, decide)

    # ------------------------------------------------------------------ applying

    async def _commit(self, route: str, decide: Decide, judged: bool = False) -> list[Event]:
        """Decide, save, install, publish; the caller holds the lock.

        The lock keeps commits (and their saves) in turn.  ``configure`` does not take it
        (it is synchronous, so a reload never waits on the disk), so a reload can land
        while the save is awaited: the generation shows it, and the decision is made again
        on the states and plan that are current now, and saved again, before anything is
        installed.  The file never keeps a snapshot a reload overtook.

        In a fleet (``self.shared``), the decision is written to the shared state first
        and applied only once written: refused there, nothing changes here (see ``Stale``).
        """
        overtaken = False
        shared = False
        tries = 0
        while True:
            generation = self._generation
            current = self.states.get(route, {})
            conflict: RolloutConflict | None = None
            try:
                new, events = decide(self.plans.get(route), current)
            except RolloutConflict as exc:
                if not overtaken:
                    raise
                conflict, new, events = exc, current, []
            changed = new != current
            if not changed and not overtaken:
                return []
            if self.shared is not None and changed and not overtaken:
                try:
                    shared = await self.shared.write(route, new, events, judged)
                except Stale:
                    tries += 1
                    if judged:
                        return []  # judged on states that are no longer current: dropped
                    if tries >= SHARED_TRIES:
                        raise SharedUnavailable(
                            "the shared rollout state kept changing; try again") from None
                    continue
            snapshot = {**self.states, route: new} if route in self.plans else dict(self.states)
            # Durable first: a crash after this point never re-exposes users or loses a step.
            await asyncio.to_thread(self._save, self.state_path, snapshot)
            if generation == self._generation:
                break
            overtaken = True
            log.warning("route %s: the config was reloaded during the state save; deciding "
                        "again under the new config", route)
        if conflict is not None:
            raise conflict
        if not changed:
            return []
        self.states = snapshot
        self._apply(route)
        await self._publish(events, local=not shared)
        return events

    async def _publish(self, events: list[Event], local: bool = True) -> None:
        """Log, count and send ``events``; ``local``: also this process's audit trail
        (a fleet's shared events reach every member's trail through its stream)."""
        if not events:
            return
        # In memory together with the state they explain (no await in between), so a
        # reader never sees a new phase without its event; then the audit file; then out.
        for event in events:
            self.events.append(event)
            if local:
                self.history.append(event.as_dict())
            level = logging.WARNING if event.kind == "rollback" else logging.INFO
            log.log(level, "%s", event.text)
            if event.kind == "rollback":
                self.metrics.rollback(event.route, event.ring, event.label)
        if local:
            await asyncio.to_thread(append_audit, self.audit_path, events)
        for event in events:
            self.webhooks.send(event)
        self.checks.rolled_back(events)

    def _state_of(self, route: str, ring: str) -> RingState | None:
        return self.states.get(route, {}).get(ring)

    def _note(self, event: Event) -> None:
        """An event of the external checks (outcome changes, gates): in memory with the
        others, as ``server_changed``'s (not saved, not sent to webhooks)."""
        self.events.append(event)
        self.history.append(event.as_dict())

    def _snapshot(self, route: str, ring: str) -> dict[str, object]:
        """What a webhook check or gate is told of a ring: its state and last numbers."""
        state = self._state_of(route, ring)
        verdict = self.verdicts.get(route, {}).get(ring)
        plan = self.plans.get(route)
        steps = [s.weight / 100 for s in plan.ring(ring).steps] if plan else []
        return {"route": route, "ring": ring,
                "phase": state.phase.value if state else None,
                "weight": None if state is None or state.weight is None
                else state.weight / 100,
                "step": state.step if state else None, "steps": steps,
                "step_since": state.step_since if state else None,
                "outcome": verdict.outcome.value if verdict else None,
                "reason": verdict.reason if verdict else None,
                "numbers": verdict.numbers if verdict else {}}

    # ------------------------------------------------------------------ a fleet's follower

    @property
    def lock(self) -> asyncio.Lock:
        """Held by every commit; a fleet member takes it to adopt the shared states."""
        return self._lock

    async def adopt(self, shared: Mapping[str, Mapping[str, RingState]]) -> list[str]:
        """Take the fleet's agreed states (``proxy.fleet``): the routes that changed."""
        async with self._lock:
            return await self.adopt_locked(shared)

    async def adopt_locked(self, shared: Mapping[str, Mapping[str, RingState]]) -> list[str]:
        """``adopt`` for a caller holding the lock (a ``Shared.write`` found newer states).

        Each route's states go through ``restore`` under this process's plan (a ring whose
        config differs here starts over, as after a restart), are saved to the local state
        file (the last agreed state survives a restart without Redis), then installed.
        Routes this config lacks are remembered for a reload that adds them.
        """
        while True:
            generation, now = self._generation, self.wall()
            snapshot, changed = dict(self.states), []
            for route, rings in shared.items():
                plan = self.plans.get(route)
                if plan is None:
                    self._known[route] = dict(rings)
                    continue
                # A ring the shared states lack, or hold under another config, keeps
                # what it has here (restored anew only if that is not of this config).
                fingerprints = {r.name: r.fingerprint for r in plan.rings}
                candidates = dict(snapshot.get(route, {}))
                candidates.update({name: state for name, state in rings.items()
                                   if fingerprints.get(name) == state.fingerprint})
                restored = restore(plan, candidates, now)
                if restored != snapshot.get(route):
                    snapshot[route] = restored
                    changed.append(route)
            if not changed:
                return []
            await asyncio.to_thread(self._save, self.state_path, snapshot)
            if generation == self._generation:
                break  # else a reload came in during the save: restore under it again
        self.states = snapshot
        for route in changed:
            self._apply(route)
        return changed

    def server_changed(self, change: Transition, rings: list[tuple[str, str]]) -> None:
        """A server of a pool went out of rotation or came back: an event on every ring
        using the pool (``server_ejected``, ``server_unhealthy``, ``server_readmitted``,
        ``server_healthy``), in memory with the others (not judged, not sent to webhooks:
        hosts come and go), its reason saying whether it is one host's fault."""
        now = self.wall()
        for route, ring in rings:
            state = self.states.get(route, {}).get(ring)
            phase = state.phase.value if state is not None else ""
            weight = state.weight if state is not None else None
            event = Event(now, route, ring, f"server_{change.kind}", weight, weight, phase,
                          phase, change.text(), numbers={
                              "pool": change.pool, "server": change.server,
                              "one_host": change.one_host, "available": change.available,
                              "servers": change.servers, "ejection_seconds": change.duration},
                          actor="health")
            self.events.append(event)
            self.history.append(event.as_dict())

    def __repr__(self) -> str:
        phases = collections.Counter(
            s.phase.value for rings in self.states.values() for s in rings.values())
        return f"<Controller routes={len(self.plans)} {dict(phases)}>"


def _kept_back(route: str, ring: str, state: RingState, now: float) -> Event:
    return Event(now, route, ring, "kept_rolled_back", state.weight, state.weight,
                 state.phase.value, state.phase.value,
                 "its saved state has no fingerprint to match it to the ring's config; it "
                 "stays rolled back until an operator resumes it", actor="restore")


def apply_states(runtime: Runtime, route: str, states: States) -> None:
    """Put a route's weights and rolled-back rings into ``runtime``'s routing table.

    The one way states reach a table: the controller's, and a worker process's with the
    states its supervisor sends (``proxy.workers``).  ``states`` has one entry per ring
    of the route in ``runtime``'s config (``restore`` makes them).
    """
    compiled = runtime.table.routes[route]
    weights = [states[r.name].weight for r in compiled.route.rings]
    blocked = [name for name, state in states.items() if not state.enabled]
    runtime.table.set_route(compiled.with_weights(weights, blocked))


def _judged(plan: RoutePlan, decide: Callable[[RoutePlan, States], Decision]) -> Decide:
    """An analysis decision: it stands only under the plan it was judged under.

    Verdicts were measured against that plan's thresholds and ring versions; after a reload
    that changed the route they are dropped (nothing changes), and the next round judges
    under the new plan.
    """
    def under_plan(current: RoutePlan | None, states: States) -> Decision:
        if current != plan:
            return dict(states), []
        return decide(plan, states)

    return under_plan


__all__ = ["Controller", "Phase", "Trigger", "apply_states"]
