"""The three kinds of external check, one call each: a Prometheus query, a webhook POST, a
ring's custom health check on every server of its pool.

Each returns a ``Result`` (``proxy.checks.results``) and never raises for a foreign
failure.  The rules:

* **Prometheus**: ``GET {url}/api/v1/query?query=...`` within ``timeout``.  One number is
  wanted: a scalar, or a vector of exactly one series.  Unreachable, a timeout, an error
  answer (``status: error``, a bad query), an empty vector, several series or a NaN are
  ``no_data`` with the reason; never a failure (an outage of the monitoring must not roll
  back a release).  The number is held to ``max`` and/or ``min``.
* **Webhook**: ``POST url`` with the ring's state and numbers as JSON, within ``timeout``;
  2xx passes, anything else (another status, no answer) fails, with the status and the
  first 200 characters of the body.
* **Health**: ``GET path`` to each server of the ring's pool on a connection of its own
  (``proxy.health.checker.probe``, the pool's own prober); a server failing ``threshold``
  times in a row fails the check, named with what it answered.  Failures in a row are
  counted per server by the caller (``HealthState``).
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.checks.results import Result, Status
from proxy.config.checks import ExternalCheck, Hook, RingHealthCheck
from proxy.config.health import HealthCheck
from proxy.config.values import Upstream
from proxy.health.checker import probe

BODY_SHOWN = 200  # characters of a failing answer's body kept in its result


async def query_prometheus(session: aiohttp.ClientSession, check: ExternalCheck, query: str,
                           now: float) -> Result:
    """The query's one number against the check's bound (see the module's rules)."""
    assert check.prometheus is not None
    prom = check.prometheus
    base = Result(check.name, "prometheus", Status.NO_DATA, None, check.bound_text,
                  check.max if check.max is not None else check.min, check.on_fail, "", now,
                  0, check.threshold)
    url = prom.url.rstrip("/") + "/api/v1/query"
    try:
        async with session.get(url, params={"query": query},
                               timeout=aiohttp.ClientTimeout(total=prom.timeout)) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        why = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}"
        return _no_data(base, f"Prometheus unreachable ({why})")
    try:
        body = json.loads(text)
    except ValueError:
        return _no_data(base, f"Prometheus answered HTTP {resp.status}, not JSON")
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error", "") if isinstance(body, dict) else ""
        return _no_data(base, f"query error (HTTP {resp.status}): {str(error)[:BODY_SHOWN]}")
    value, why = _one_number(body.get("data"))
    if value is None:
        return _no_data(base, why)
    ok = (check.max is None or value <= check.max) and (check.min is None or value >= check.min)
    return _with(base, Status.PASS if ok else Status.FAIL, value,
                 f"{value:g} (bound {check.bound_text})")


def _one_number(data: Any) -> tuple[float | None, str]:
    if not isinstance(data, dict):
        return None, "no data in the answer"
    kind, result = data.get("resultType"), data.get("result")
    raw: Any = None
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        raw = result[1]
    elif kind == "vector" and isinstance(result, list):
        if not result:
            return None, "empty result (no series matched)"
        if len(result) > 1:
            return None, f"{len(result)} series; the query must return one (aggregate it)"
        sample = result[0].get("value") if isinstance(result[0], dict) else None
        raw = sample[1] if isinstance(sample, list) and len(sample) == 2 else None
    else:
        return None, f"a {kind} result; the query must return one number"
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None, f"not a number: {raw!r}"
    if not math.isfinite(value):
        return None, f"the value is {raw}"
    return value, ""


def _no_data(base: Result, why: str) -> Result:
    return _with(base, Status.NO_DATA, None, why)


def _with(base: Result, status: Status, value: float | None, detail: str) -> Result:
    return Result(base.name, base.kind, status, value, base.bound, base.limit, base.on_fail,
                  detail, base.at, 0, base.threshold)


async def post_hook(session: aiohttp.ClientSession, hook: Hook,
                    body: Mapping[str, object]) -> tuple[bool, int | None, str]:
    """(passed, HTTP status or None, what was seen): 2xx passes."""
    try:
        async with session.post(hook.url, json=body, headers=dict(hook.headers),
                                timeout=aiohttp.ClientTimeout(total=hook.timeout)) as resp:
            text = (await resp.text(errors="replace"))[:BODY_SHOWN]
            ok = 200 <= resp.status < 300
            return ok, resp.status, f"HTTP {resp.status}" + (f": {text}" if text and not ok
                                                               else "")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        why = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        return False, None, f"no answer ({why})"


async def call_webhook(session: aiohttp.ClientSession, check: ExternalCheck,
                       body: Mapping[str, object], now: float) -> Result:
    assert check.webhook is not None
    ok, status, seen = await post_hook(session, check.webhook, body)
    return Result(check.name, "webhook", Status.PASS if ok else Status.FAIL,
                  None if status is None else float(status), "2xx", None, check.on_fail,
                  seen, now, 0, check.threshold)


@dataclass(slots=True)
class HealthState:
    """Failures in a row per server of one ring's custom health check."""

    failures: dict[str, int] = field(default_factory=dict)


async def check_health(check: RingHealthCheck, servers: tuple[Upstream, ...],
                       state: HealthState, now: float) -> Result:
    """Every server of the pool, at once; the worst server decides."""
    as_pool_check = HealthCheck(path=check.path, interval=check.interval,
                                timeout=check.timeout, headers=check.headers)
    tls = ssl.create_default_context() if any(s.scheme == "https" for s in servers) else None
    seen = await asyncio.gather(*(
        probe(s, as_pool_check, tls if s.scheme == "https" else None) for s in servers))
    worst: tuple[int, str, str] | None = None
    for server, (ok, answer) in zip(servers, seen, strict=True):
        n = 0 if ok else state.failures.get(server.url, 0) + 1
        state.failures[server.url] = n
        if n and (worst is None or n > worst[0]):
            worst = (n, server.url, answer)
    state.failures = {s.url: state.failures.get(s.url, 0) for s in servers}
    base = Result(check.name, "health", Status.PASS, None, "2xx-3xx", None, check.on_fail,
                  "", now, 0, check.threshold)
    if worst is None:
        return _with(base, Status.PASS, 200.0 if servers else None,
                     f"GET {check.path}: {len(servers)} of {len(servers)} servers pass")
    n, url, answer = worst
    value = float(answer) if answer.isdigit() else None
    result = _with(base, Status.FAIL, value,
                   f"GET {check.path} on {url} answered {answer} ({n} in a row)")
    return Result(result.name, result.kind, result.status, result.value, result.bound,
                  result.limit, result.on_fail, result.detail, result.at, n, result.threshold)
