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
  The answer is read up to ``MAX_ANSWER`` bytes (1 MiB; more is ``no_data`` "answer too
  large": a query returning megabytes of series must not be parsed on the event loop that
  serves the requests) and decoded with replacement characters.  Any other exception while
  querying or reading the answer (a body that is not UTF-8, a number JSON cannot hold...)
  is ``no_data`` with its reason too: a check never keeps an older result because the
  newer one raised.
* **Health**: ``GET path`` to each server of the ring's pool on a connection of its own
  (``proxy.health.checker.probe``, the pool's own prober) with the pool's own TLS settings
  (``tls``: CA, client certificate, ``server_name``, ``verify``; ``HealthTLS``), so a
  private-CA or mTLS pool is probed as its traffic is sent; a server failing ``threshold``
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
from proxy.config.credentials import UpstreamTLS, client_context
from proxy.config.health import HealthCheck
from proxy.config.values import Upstream
from proxy.health.checker import probe

BODY_SHOWN = 200  # characters of a failing answer's body kept in its result
MAX_ANSWER = 1 << 20  # bytes of a Prometheus answer read at most (more: no_data)
HOOK_BODY_READ = 4096  # bytes of a hook's answer read (its first BODY_SHOWN characters shown)


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
        return await _query(session, check, url, query, base)
    except Exception as exc:  # any failure is no data, never the previous result kept
        return _no_data(base, f"the query failed ({type(exc).__name__})")


async def _query(session: aiohttp.ClientSession, check: ExternalCheck, url: str,
                 query: str, base: Result) -> Result:
    assert check.prometheus is not None
    try:
        async with session.get(url, params={"query": query}, timeout=aiohttp.ClientTimeout(
                total=check.prometheus.timeout)) as resp:
            raw = await read_at_most(resp.content, MAX_ANSWER + 1)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        why = "timeout" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}"
        return _no_data(base, f"Prometheus unreachable ({why})")
    if len(raw) > MAX_ANSWER:
        return _no_data(base, f"answer too large (over {MAX_ANSWER} bytes, HTTP {status}); "
                        "the query must return one number")
    try:
        body = json.loads(raw.decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return _no_data(base, f"Prometheus answered HTTP {status}, not JSON")
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error", "") if isinstance(body, dict) else ""
        return _no_data(base, f"query error (HTTP {status}): {str(error)[:BODY_SHOWN]}")
    value, why = _one_number(body.get("data"))
    if value is None:
        return _no_data(base, why)
    ok = (check.max is None or value <= check.max) and (check.min is None or value >= check.min)
    return _with(base, Status.PASS if ok else Status.FAIL, value,
                 f"{value:g} (bound {check.bound_text})")


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body's first ``limit`` bytes (all of it when shorter); the rest is not read."""
    parts: list[bytes] = []
    got = 0
    while got < limit:
        part = await content.read(limit - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


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
    except (TypeError, ValueError, OverflowError):
        return None, f"not a number: {str(raw)[:40]!r}"
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
            text = (await read_at_most(resp.content, HOOK_BODY_READ)).decode(
                "utf-8", errors="replace")[:BODY_SHOWN]
            ok = 200 <= resp.status < 300
            return ok, resp.status, f"HTTP {resp.status}" + (f": {text}" if text and not ok
                                                               else "")
    except Exception as exc:  # unreachable, a timeout, a broken answer: a failed call
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


@dataclass(slots=True)
class HealthTLS:
    """The pool's TLS settings for a ring's health check: one client context per pool
    (``client_context``: its CA, client certificate and ``verify``), built on first use;
    ``server_name`` is sent and verified instead of each server's host."""

    tls: UpstreamTLS | None = None
    _context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """The context (raises ``ValueError`` when the pool's files cannot be loaded)."""
        if self._context is None:
            self._context = client_context(self.tls)
        return self._context

    @property
    def server_name(self) -> str | None:
        return self.tls.server_name if self.tls is not None else None


async def check_health(check: RingHealthCheck, servers: tuple[Upstream, ...],
                       state: HealthState, now: float,
                       pool_tls: HealthTLS | None = None) -> Result:
    """Every server of the pool, at once, as the pool's own traffic (its TLS settings,
    ``pool_tls``); the worst server decides."""
    as_pool_check = HealthCheck(path=check.path, interval=check.interval,
                                timeout=check.timeout, headers=check.headers)
    pool_tls = pool_tls if pool_tls is not None else HealthTLS()
    tls: ssl.SSLContext | None = None
    broken = ""
    if any(s.scheme == "https" for s in servers):
        try:
            tls = pool_tls.context()
        except ValueError as exc:  # the pool's files went missing since the load
            broken = f"tls: {exc}"

    async def one(server: Upstream) -> tuple[bool, str]:
        if server.scheme != "https":
            return await probe(server, as_pool_check, None)
        if tls is None:
            return False, broken
        return await probe(server, as_pool_check, tls, pool_tls.server_name)

    seen = await asyncio.gather(*(one(s) for s in servers))
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
