"""The external checks of every analysed ring, each on its own interval, off the request path.

One asyncio task per (route, ring, check): a Prometheus query, a webhook, or a custom
health check (``proxy.checks.probes``).  Its latest ``Result`` waits here for the control
loop, which joins the results into the ring's verdict at each analysis round
(``results_for``); a check that no step names runs at every step, one a step names runs
only at that step (``proxy.rollout.steps.active_checks``), and no check runs for a rolled
back ring.  A change of a check's outcome (pass, fail, no data) is an event
(``check_pass``, ``check_fail``, ``check_no_data``) and every result is counted in
``ringproxy_external_checks_total{route, ring, check, status}``; the last value is
``ringproxy_external_check_value``.

The gates: ``pre_advance`` is POSTed when the judge says a ring's step may advance
(``gate_open``); the advance waits for a 2xx for that very step (a new step, or a
restart of the step, needs a new one), a failure is an event (``gate_failed``) and is
tried again after the hook's ``interval``; the ring is judged, and may be rolled back,
all the while.  ``post_rollback`` is POSTed after each rollback, fire and forget, within
its ``timeout``.  At most one call per gate is in flight.

One aiohttp session serves every call (its connection pool is shared); it is created
on ``start`` and closed on ``stop``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from proxy.checks.probes import (
    HealthState,
    call_webhook,
    check_health,
    post_hook,
    query_prometheus,
)
from proxy.checks.results import Result, Status, advance, pending
from proxy.config.checks import ExternalCheck, Hook, RingHealthCheck, fill
from proxy.rollout.plan import RingPlan, RoutePlan
from proxy.rollout.state import Event, RingState
from proxy.rollout.steps import active_checks
from proxy.tasks import cancel_and_wait

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.rollout.judge import Verdict

log = logging.getLogger("ringproxy.checks")

Key = tuple[str, str, str]  # (route, ring, check)
StateOf = Callable[[str, str], RingState | None]
Record = Callable[[Event], None]


@dataclass(slots=True)
class _Gate:
    step: tuple[int | None, float]  # the step (index, start) the answer is for
    passed: bool = False
    last_try: float = -1e18  # monotonic
    task: asyncio.Task[None] | None = None


class CheckRunner:
    """Runs the checks of the plans it is given; the control loop reads their results."""

    def __init__(self, state_of: StateOf, record: Record,
                 wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self._state_of, self._record = state_of, record
        self.wall, self.mono = wall, mono
        self.plans: dict[str, RoutePlan] = {}
        self._servers: dict[str, tuple[object, ...]] = {}
        self._wanted: dict[Key, tuple[object, ...]] = {}  # key -> what defines its task
        self._tasks: dict[Key, tuple[tuple[object, ...], asyncio.Task[None]]] = {}
        self.results: dict[Key, Result] = {}
        self._counts: dict[tuple[Key, str], int] = {}
        self._gates: dict[tuple[str, str], _Gate] = {}
        self._posts: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._started = False
        self.snapshot: Callable[[str, str], dict[str, object]] = lambda route, ring: {}

    # ------------------------------------------------------------------ wiring

    def configure(self, config: Config, plans: Mapping[str, RoutePlan]) -> None:
        """Run the checks of ``plans`` from now on (unchanged ones keep their task and
        their last result; removed ones stop)."""
        self.plans = dict(plans)
        pools = {p.name: p.servers for p in config.pools}
        wanted: dict[Key, tuple[object, ...]] = {}
        for plan in plans.values():
            if plan.analysis is None:
                continue
            for ring in plan.analysed:
                servers = pools.get(ring.pool, ())
                for check in plan.analysis.checks:
                    wanted[plan.route, ring.name, check.name] = (check, ring.pool)
                for health in ring.health_checks:
                    wanted[plan.route, ring.name, health.name] = (health, servers)
        self._wanted = wanted
        for key in [k for k in self.results if k not in wanted]:
            del self.results[key]
        if self._started:
            self._sync()

    def start(self) -> None:
        self._started = True
        self._sync()

    async def stop(self) -> None:
        self._started = False
        for _, task in list(self._tasks.values()):
            await cancel_and_wait(task)
        self._tasks.clear()
        for gate in self._gates.values():
            await cancel_and_wait(gate.task)
        for post in list(self._posts):
            await cancel_and_wait(post)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _sync(self) -> None:
        for key, (spec, task) in list(self._tasks.items()):
            if self._wanted.get(key) != spec:
                task.cancel()
                del self._tasks[key]
                self.results.pop(key, None)
        for key, spec in self._wanted.items():
            if key not in self._tasks:
                self._tasks[key] = (spec, asyncio.ensure_future(self._run(key, spec)))

    # ------------------------------------------------------------------ the checks

    async def _run(self, key: Key, spec: tuple[object, ...]) -> None:
        route, ring_name, name = key
        check = spec[0]
        assert isinstance(check, ExternalCheck | RingHealthCheck)
        health = HealthState()
        while True:
            try:
                await self._once(key, check, spec[1], health)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one check must not end its loop
                log.exception("check %s of %s/%s failed", name, route, ring_name)
            await asyncio.sleep(check.interval)

    def _active(self, route: str, ring: str, check: ExternalCheck | RingHealthCheck
                ) -> tuple[RoutePlan, RingPlan, RingState] | None:
        plan = self.plans.get(route)
        state = self._state_of(route, ring)
        if plan is None or plan.analysis is None or state is None or not state.enabled:
            return None
        ring_plan = plan.ring(ring)
        if isinstance(check, ExternalCheck) and check not in active_checks(
                plan.analysis, ring_plan, state):
            return None
        return plan, ring_plan, state

    async def _once(self, key: Key, check: ExternalCheck | RingHealthCheck, extra: object,
                    health: HealthState) -> None:
        route, ring, _ = key
        found = self._active(route, ring, check)
        if found is None:
            self.results.pop(key, None)
            return
        _, ring_plan, _ = found
        now = self.wall()
        if isinstance(check, RingHealthCheck):
            assert isinstance(extra, tuple)
            result = await check_health(check, extra, health, now)
        elif check.prometheus is not None:
            query = fill(check.prometheus.query, ring, route, ring_plan.pool)
            result = advance(self.results.get(key),
                             await query_prometheus(self._client(), check, query, now))
        else:
            body = {"type": "check", "check": check.name, **self.snapshot(route, ring)}
            result = advance(self.results.get(key),
                             await call_webhook(self._client(), check, body, now))
        if self._active(route, ring, check) is None:
            return  # rolled back or moved on while it ran: the result is for nobody
        self._store(key, result)

    def _store(self, key: Key, result: Result) -> None:
        before = self.results.get(key)
        self.results[key] = result
        count = (key, result.status.value)
        self._counts[count] = self._counts.get(count, 0) + 1
        if before is None or before.status is not result.status:
            route, ring, _ = key
            state = self._state_of(route, ring)
            level = logging.INFO if result.status is Status.PASS else logging.WARNING
            log.log(level, "%s/%s check %s: %s (%s)", route, ring, result.name,
                    result.status.value, result.detail)
            self._record(_event(route, ring, state, f"check_{result.status.value}",
                                f"check {result.name} ({result.kind}): "
                                f"{result.status.value}: {result.detail}",
                                result.as_dict()))

    def results_for(self, plan: RoutePlan, ring: RingPlan, state: RingState) -> list[Result]:
        """The results the ring's verdict takes in now: its active checks, each its latest
        result or ``pending``."""
        if plan.analysis is None:
            return []
        now = self.wall()
        out = []
        for check in active_checks(plan.analysis, ring, state):
            key = (plan.route, ring.name, check.name)
            out.append(self.results.get(key) or pending(
                check.name, check.kind, check.bound_text,
                check.max if check.max is not None else check.min, check.on_fail,
                check.threshold, now))
        for health in ring.health_checks:
            key = (plan.route, ring.name, health.name)
            out.append(self.results.get(key) or pending(
                health.name, "health", "2xx-3xx", None, health.on_fail, health.threshold,
                now))
        return out

    def shown(self, route: str, ring: str) -> list[Result]:
        """Every latest result of a ring (the status page's list)."""
        return [r for (rt, rg, _), r in self.results.items() if (rt, rg) == (route, ring)]

    # ------------------------------------------------------------------ gates

    def gates_open(self, plan: RoutePlan, states: Mapping[str, RingState],
                   due: Sequence[str], verdicts: Mapping[str, Verdict]) -> frozenset[str]:
        """The rings of ``due`` (``machine.waiting_for_gate``) whose ``pre_advance`` hook
        passed for their current step; for the others a call starts unless one is in
        flight or the last failed less than the hook's ``interval`` ago."""
        hook = plan.analysis.pre_advance if plan.analysis is not None else None
        if hook is None:
            return frozenset()
        opened = set()
        for ring in due:
            state = states[ring]
            step = (state.step, state.step_since)
            gate = self._gates.get((plan.route, ring))
            if gate is None or gate.step != step:
                if gate is not None and gate.task is not None:
                    gate.task.cancel()
                gate = self._gates[plan.route, ring] = _Gate(step)
            if gate.passed:
                opened.add(ring)
            elif gate.task is None and self.mono() - gate.last_try >= hook.interval:
                gate.last_try = self.mono()
                body = {"type": "pre_advance", **self.snapshot(plan.route, ring)}
                gate.task = asyncio.ensure_future(self._call_gate(plan.route, ring, hook,
                                                                  gate, body))
        return frozenset(opened)

    async def _call_gate(self, route: str, ring: str, hook: Hook, gate: _Gate,
                         body: dict[str, object]) -> None:
        try:
            ok, status, seen = await post_hook(self._client(), hook, body)
        finally:
            gate.task = None
        gate.passed = ok
        state = self._state_of(route, ring)
        kind = "gate_passed" if ok else "gate_failed"
        if not ok:
            log.warning("%s/%s pre_advance hook failed: %s (the step is held)", route, ring,
                        seen)
        self._record(_event(route, ring, state, kind,
                            f"pre_advance {'passed' if ok else 'failed, the step is held'}: "
                            f"{seen}", {"hook": "pre_advance", "status": status,
                                        "step": gate.step[0]}))

    def rolled_back(self, events: Sequence[Event]) -> None:
        """POST each rollback to its route's ``post_rollback`` hook (fire and forget)."""
        for event in events:
            plan = self.plans.get(event.route)
            hook = plan.analysis.post_rollback if plan and plan.analysis else None
            if event.kind != "rollback" or hook is None or not self._started:
                continue
            body = {"type": "post_rollback", **event.as_dict(), "text": event.text}
            post = asyncio.ensure_future(self._post_rollback(hook, body))
            self._posts.add(post)
            post.add_done_callback(self._posts.discard)

    async def _post_rollback(self, hook: Hook, body: dict[str, object]) -> None:
        ok, _, seen = await post_hook(self._client(), hook, body)
        if not ok:
            log.warning("post_rollback hook for %s/%s: %s", body.get("route"),
                        body.get("ring"), seen)

    # ------------------------------------------------------------------ metrics

    def counts(self) -> dict[tuple[str, str, str, str], int]:
        """Results so far per (route, ring, check, status), for the metrics."""
        return {(*key, status): n for (key, status), n in self._counts.items()}

    def values(self) -> dict[tuple[str, str, str], float]:
        """The last value of each check that has one, for the metrics."""
        return {key: r.value for key, r in self.results.items() if r.value is not None}


def _event(route: str, ring: str, state: RingState | None, kind: str, reason: str,
           numbers: Mapping[str, object]) -> Event:
    phase = state.phase.value if state is not None else ""
    weight = state.weight if state is not None else None
    return Event(time.time(), route, ring, kind, weight, weight, phase, phase, reason,
                 numbers=numbers, actor="checks")
