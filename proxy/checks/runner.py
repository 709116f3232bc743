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

A result is never kept past its time: a check whose run raised stores ``no_data`` with
the exception's name (never the previous, perhaps passing, result), and a result older
than ``2 x interval + timeout`` is taken as ``no_data`` ("stale") by ``results_for``.  A
ring's health-check failures in a row are forgotten when the ring goes inactive (a
rollback), so a resumed ring starts counting from zero.  A ring's health checks use its
pool's ``tls`` (one client context per pool and TLS files: a renewed certificate at the
same path makes a new one on the next reload).

One aiohttp session serves every call (its connection pool is shared); it is created
on ``start`` and closed on ``stop``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import aiohttp

from proxy.checks.probes import (
    HealthState,
    HealthTLS,
    call_webhook,
    check_health,
    post_hook,
    query_prometheus,
)
from proxy.checks.results import Result, Status, advance, pending
from proxy.config.checks import ExternalCheck, Hook, RingHealthCheck, fill
from proxy.config.credentials import UpstreamTLS, tls_stamp
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
TLSKey = tuple[UpstreamTLS | None, tuple[object, ...]]  # a pool's tls and its files' stamp
# A result older than STALE_INTERVALS intervals (plus its timeout) is no data.
STALE_INTERVALS = 2.0


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
        self._health: dict[Key, HealthState] = {}
        self._pool_tls: dict[TLSKey, HealthTLS] = {}
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
        pools = {p.name: p for p in config.pools}
        wanted: dict[Key, tuple[object, ...]] = {}
        tls_keys: dict[str, TLSKey] = {}
        for plan in plans.values():
            if plan.analysis is None:
                continue
            for ring in plan.analysed:
                pool = pools.get(ring.pool)
                servers = pool.servers if pool is not None else ()
                for check in plan.analysis.checks:
                    wanted[plan.route, ring.name, check.name] = (check, ring.pool)
                if ring.health_checks and ring.pool not in tls_keys:
                    tls = pool.tls if pool is not None else None
                    tls_keys[ring.pool] = (tls, tls_stamp(tls))
                for health in ring.health_checks:
                    wanted[plan.route, ring.name, health.name] = (
                        health, servers, tls_keys[ring.pool])
        self._wanted = wanted
        # One client context per pool TLS settings (and files) in use.
        used = set(tls_keys.values())
        self._pool_tls = {k: v for k, v in self._pool_tls.items() if k in used}
        for tls_key in used:
            self._pool_tls.setdefault(tls_key, HealthTLS(tls_key[0]))
        for key in [k for k in self.results if k not in wanted]:
            del self.results[key]
        for key in [k for k in self._health if k not in wanted]:
            del self._health[key]
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
        health = self._health.setdefault(key, HealthState())
        pool_tls: HealthTLS | None = None
        if isinstance(check, RingHealthCheck):
            tls_key = spec[2]
            assert isinstance(tls_key, tuple)
            pool_tls = self._pool_tls.setdefault(tls_key, HealthTLS(tls_key[0]))
        while True:
            try:
                await self._once(key, check, spec[1], health, pool_tls)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in one check must not end its loop
                log.exception("check %s of %s/%s failed", name, route, ring_name)
                # No result is kept past a failed run: the check has no data now.
                if self._active(route, ring_name, check) is not None:
                    self._store(key, _no_data(check, f"the check failed "
                                              f"({type(exc).__name__})", self.wall()))
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
                    health: HealthState, pool_tls: HealthTLS | None = None) -> None:
        route, ring, _ = key
        found = self._active(route, ring, check)
        if found is None:
            self.results.pop(key, None)
            health.failures.clear()  # a resumed ring counts its failures from zero
            return
        _, ring_plan, _ = found
        now = self.wall()
        if isinstance(check, RingHealthCheck):
            assert isinstance(extra, tuple)
            result = await check_health(check, extra, health, now, pool_tls)
        elif check.prometheus is not None:
            query = fill(check.prometheus.query, ring, route, ring_plan.pool)
            result = advance(self.results.get(key),
                             await query_prometheus(self._client(), check, query, now))
        else:
            body = {"type": "check", "check": check.name, **self.snapshot(route, ring)}
            result = advance(self.results.get(key),
                             await call_webhook(self._client(), check, body, now))
        if self._active(route, ring, check) is None:
            health.failures.clear()
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
            out.append(fresh(self.results.get(key), check, now) or pending(
                check.name, check.kind, check.bound_text,
                check.max if check.max is not None else check.min, check.on_fail,
                check.threshold, now))
        for health in ring.health_checks:
            key = (plan.route, ring.name, health.name)
            out.append(fresh(self.results.get(key), health, now) or pending(
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
            if event.kind == "rollback":
                self._forget(event.route, event.ring)
            plan = self.plans.get(event.route)
            hook = plan.analysis.post_rollback if plan and plan.analysis else None
            if event.kind != "rollback" or hook is None or not self._started:
                continue
            body = {"type": "post_rollback", **event.as_dict(), "text": event.text}
            post = asyncio.ensure_future(self._post_rollback(hook, body))
            self._posts.add(post)
            post.add_done_callback(self._posts.discard)

    def _forget(self, route: str, ring: str) -> None:
        """A ring went inactive: its results and health failures in a row start over."""
        for key, health in self._health.items():
            if key[:2] == (route, ring):
                health.failures.clear()
                self.results.pop(key, None)

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


def timeout_of(check: ExternalCheck | RingHealthCheck) -> float:
    if isinstance(check, RingHealthCheck):
        return check.timeout
    if check.prometheus is not None:
        return check.prometheus.timeout
    return check.webhook.timeout if check.webhook is not None else 0.0


def fresh(result: Result | None, check: ExternalCheck | RingHealthCheck,
          now: float) -> Result | None:
    """``result``, or ``no_data`` ("stale") when it is older than ``STALE_INTERVALS``
    intervals plus the check's timeout (its task stopped producing results: a passing
    result that old must not let the ring advance)."""
    if result is None or result.status is Status.PENDING:
        return result
    age = now - result.at
    if age <= STALE_INTERVALS * check.interval + timeout_of(check):
        return result
    return replace(result, status=Status.NO_DATA, value=None, failures=0,
                   detail=f"stale: the last result is {age:.0f}s old "
                   f"(was {result.status.value}: {result.detail})")


def _no_data(check: ExternalCheck | RingHealthCheck, why: str, now: float) -> Result:
    if isinstance(check, RingHealthCheck):
        return Result(check.name, "health", Status.NO_DATA, None, "2xx-3xx", None,
                      check.on_fail, why, now, 0, check.threshold)
    return Result(check.name, check.kind, Status.NO_DATA, None, check.bound_text,
                  check.max if check.max is not None else check.min, check.on_fail, why,
                  now, 0, check.threshold)


def _event(route: str, ring: str, state: RingState | None, kind: str, reason: str,
           numbers: Mapping[str, object]) -> Event:
    phase = state.phase.value if state is not None else ""
    weight = state.weight if state is not None else None
    return Event(time.time(), route, ring, kind, weight, weight, phase, phase, reason,
                 numbers=numbers, actor="checks")
