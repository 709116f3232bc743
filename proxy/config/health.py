"""A pool's upstream health settings: ``health:`` (active checks), ``outlier:`` (passive
ejection from real traffic) and ``retries:``, and a ring's ``on_pool_down``.

Defaults live on the classes; the readers pass them on.  ``health`` is off unless the pool
names a check ``path``; ``outlier`` is on (``outlier: off`` turns it off); ``retries`` are
off unless the pool has a ``retries:`` section.  No I/O: ``proxy.health`` does the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.config.reader import Ctx, Section, kind
from proxy.config.source import join
from proxy.config.values import TOKEN_RE

# What a failed attempt may be retried on: the upstream's failures (connect_failure: refused,
# unreachable, or no connection within connect_timeout; reset: the connection closed or
# reset before a response; timeout: no response head within the ring's timeout) and the
# statuses a proxy or a restarting server answers with.
RETRY_FAILURES = ("connect_failure", "reset", "timeout")
RETRY_STATUSES = (500, 502, 503, 504)
RETRY_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "POST", "PATCH")
# RFC 9110 9.2.2: idempotent; a POST or PATCH may be listed only on purpose.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class PoolDown(StrEnum):
    """What a ring's requests get when its pool has no healthy server."""

    REFUSE = "refuse"  # 503 with Retry-After
    NEXT_RING = "next_ring"  # the first later ring of the route whose pool has one


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active checks: ``GET path`` to each server on its own connection."""

    path: str
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2  # consecutive successes that bring a server back
    unhealthy_threshold: int = 3  # consecutive failures that take it out
    expect_status: tuple[int, int] = (200, 399)  # inclusive
    headers: tuple[tuple[str, str], ...] = ()
    # (A server starts healthy: a check only takes it out after unhealthy_threshold failures.)


@dataclass(frozen=True, slots=True)
class Outlier:
    """Passive ejection from real traffic (as Envoy's outlier detection)."""

    consecutive_failures: int = 5  # connect failures, resets, timeouts (and 5xx if on_5xx)
    base_ejection: float = 30.0  # times the number of ejections in a row, up to max_ejection
    max_ejection: float = 300.0
    max_ejection_percent: int = 50  # of the pool's servers, rounded down
    on_5xx: bool = False  # 5xx answers count as failures too


@dataclass(frozen=True, slots=True)
class Retries:
    """Retries of failed attempts, on another server of the same pool."""

    attempts: int = 1  # retries after the first attempt
    on: frozenset[str] = frozenset({"connect_failure", "reset", "502", "503"})
    methods: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
    budget: float = 0.2  # retries at most this share of the pool's requests (last 10 s)
    min_retries: int = 3  # ... but this many in any 10 s even at low traffic

    def retries_status(self, status: int) -> bool:
        return str(status) in self.on


_HEALTH = HealthCheck(path="/")
_OUTLIER = Outlier()
_RETRIES = Retries()
_OFF = ("off", False)


def read_health(ctx: Ctx, data: object, path: str) -> HealthCheck | None:
    if data is None or data in _OFF:
        return None
    sec = Section(ctx, data, path)
    check_path = sec.text("path")
    if check_path and not check_path.startswith("/"):
        ctx.err(sec.sub("path"), f"{check_path!r} must start with '/'")
    if any(c in check_path for c in " \r\n\t"):
        ctx.err(sec.sub("path"), f"{check_path!r} cannot contain spaces or line breaks")
    d = _HEALTH
    interval = sec.duration("interval", d.interval, minimum=0.01)
    timeout = sec.duration("timeout", d.timeout)
    healthy = sec.integer("healthy_threshold", d.healthy_threshold, 1, 100)
    unhealthy = sec.integer("unhealthy_threshold", d.unhealthy_threshold, 1, 100)
    expect = sec.parsed("expect_status", parse_status_range, d.expect_status)
    headers = _read_headers(ctx, sec)
    sec.close()
    if timeout > interval:
        ctx.err(sec.sub("timeout"), f"{timeout:g}s is above the interval ({interval:g}s): "
                "a check would still be waiting when the next is due")
    if not sec.ok or not check_path:
        return None
    return HealthCheck(check_path, interval, timeout, healthy, unhealthy, expect, headers)


def parse_status_range(value: object) -> tuple[int, int]:
    """``200`` | ``"200-399"`` | ``"2xx"`` -> an inclusive range of statuses."""
    text = str(value).strip().lower() if isinstance(value, int | str) and \
        not isinstance(value, bool) else ""
    lo = hi = -1
    if text.isdigit():
        lo = hi = int(text)
    elif len(text) == 3 and text[0].isdigit() and text[1:] == "xx":
        lo, hi = int(text[0]) * 100, int(text[0]) * 100 + 99
    elif "-" in text:
        a, _, b = text.partition("-")
        if a.strip().isdigit() and b.strip().isdigit():
            lo, hi = int(a), int(b)
    if not (100 <= lo <= hi <= 599):
        raise ValueError(f"{value!r} is not a status range; expected e.g. 200, 200-399 or 2xx "
                         "(within 100..599)")
    return lo, hi


def _read_headers(ctx: Ctx, sec: Section) -> tuple[tuple[str, str], ...]:
    raw = sec.raw("headers", {})
    if not isinstance(raw, dict):
        ctx.err(sec.sub("headers"), f"expected a mapping of header to value, got {kind(raw)}")
        return ()
    out = []
    for key, value in raw.items():
        hpath = join(sec.sub("headers"), key)
        if not isinstance(key, str) or not TOKEN_RE.match(key):
            ctx.err(hpath, f"{key!r} is not a valid header name")
        elif str(key).lower() in ("host", "content-length", "transfer-encoding", "connection"):
            ctx.err(hpath, f"{key} is set by the check itself")
        elif not isinstance(value, str | int | float) or isinstance(value, bool):
            ctx.err(hpath, f"expected a string, got {kind(value)}")
        elif "\r" in str(value) or "\n" in str(value):
            ctx.err(hpath, "a header value cannot contain a line break")
        else:
            out.append((key, str(value)))
    return tuple(out)


def read_outlier(ctx: Ctx, data: object, path: str) -> Outlier | None:
    if data is None:
        return _OUTLIER
    if data in _OFF:
        return None
    sec = Section(ctx, data, path)
    d = _OUTLIER
    outlier = Outlier(
        consecutive_failures=sec.integer("consecutive_failures", d.consecutive_failures,
                                         1, 1000),
        base_ejection=sec.duration("base_ejection", d.base_ejection, minimum=0.01),
        max_ejection=sec.duration("max_ejection", d.max_ejection, minimum=0.01),
        max_ejection_percent=sec.integer("max_ejection_percent", d.max_ejection_percent,
                                         0, 100),
        on_5xx=sec.flag("on_5xx", d.on_5xx),
    )
    sec.close()
    if outlier.max_ejection < outlier.base_ejection:
        ctx.err(sec.sub("max_ejection"), f"{outlier.max_ejection:g}s is below base_ejection "
                f"({outlier.base_ejection:g}s)")
    return outlier


def parse_share(value: object) -> float:
    """``"20%"`` or ``20`` (percent) -> 0.2."""
    number: object = value
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1])
        except ValueError:
            number = value
    if isinstance(number, bool) or not isinstance(number, int | float) or \
            not 0 <= number <= 100:
        raise ValueError(f"{value!r} is not a share; expected a percentage from 0 to 100, "
                         "e.g. 20%")
    return float(number) / 100


def read_retries(ctx: Ctx, data: object, path: str) -> Retries | None:
    if data is None or data in _OFF:
        return None
    if isinstance(data, dict) and "True" in data and "on" not in data:
        # YAML 1.1 reads a bare ``on`` key as true (the loader keeps keys as text): the key
        # the README writes is ``on``.
        data = {("on" if k == "True" else k): v for k, v in data.items()}
        for where, line in list(ctx.lines.items()):
            if where.startswith(join(path, "True")):
                ctx.lines[join(path, "on") + where[len(join(path, "True")):]] = line
    sec = Section(ctx, data, path)
    d = _RETRIES
    attempts = sec.integer("attempts", d.attempts, 1, 10)
    on = _read_set(ctx, sec, "on", d.on, (*RETRY_FAILURES, *map(str, RETRY_STATUSES)))
    methods = _read_set(ctx, sec, "methods", d.methods, RETRY_METHODS, upper=True)
    budget = sec.parsed("budget", parse_share, d.budget)
    min_retries = sec.integer("min_retries", d.min_retries, 0, 1_000_000)
    sec.close()
    return Retries(attempts, on, methods, budget, min_retries)


def _read_set(ctx: Ctx, sec: Section, key: str, default: frozenset[str],
              allowed: tuple[str, ...], upper: bool = False) -> frozenset[str]:
    if not sec.has(key):
        sec.seen.add(key)
        return default
    items = sec.items(key)
    out = set()
    for i, item in enumerate(items):
        value = str(item).upper() if upper else str(item)
        if isinstance(item, bool) or not isinstance(item, str | int) or value not in allowed:
            ctx.err(join(sec.sub(key), i), f"{item!r} is not one of: {', '.join(allowed)}")
        else:
            out.add(value)
    return frozenset(out)


def read_pool_down(ctx: Ctx, sec: Section, default: PoolDown) -> PoolDown:
    value = sec.raw("on_pool_down", default)
    try:
        return PoolDown(value)
    except ValueError:
        allowed = ", ".join(p.value for p in PoolDown)
        ctx.err(sec.sub("on_pool_down"), f"{value!r} is not one of: {allowed}")
        return default
