"""Config for checks from outside the proxy's own traffic: Prometheus queries, webhooks,
custom health endpoints per ring, and the ``pre_advance`` / ``post_rollback`` gates.

Models and their validation; ``proxy.checks`` runs them.  Pure: no I/O (``ringproxy
check`` parses the PromQL with ``promtool`` separately, when it is installed:
``proxy.checks.promql``).

* ``analysis.checks``: ``[{name, prometheus: {url, query, timeout}, max|min: NUMBER,
  on_fail: rollback|hold, interval, threshold}]`` or ``{name, webhook: {url, timeout,
  headers}, on_fail, interval, threshold}``.  A query may name ``{ring}``, ``{route}``
  and ``{pool}`` (written as such inside the PromQL; any other ``{word}`` is refused,
  since a brace around one bare word is never PromQL).
* ``analysis.pre_advance`` / ``analysis.post_rollback``: ``{url, timeout, headers}``.
* ``rings[].health_checks``: ``[{name, path, interval, timeout, threshold, on_fail,
  headers}]``, sent to every server of the ring's pool on connections of their own.

Header values may come from the environment (``${TOKEN}``); they are never shown (the
admin API lists header names only).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from proxy.config.reader import Ctx, Section, kind
from proxy.config.source import join
from proxy.config.values import NAME_RE, TOKEN_RE

if TYPE_CHECKING:
    from proxy.config.analysis import Analysis
    from proxy.config.model import Ring

PLACEHOLDERS = ("ring", "route", "pool")
# A brace around one bare word: a placeholder (PromQL's label matchers always hold an
# operator, so ``{job}`` is never valid PromQL).
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Check names the judge uses itself (a custom check may not take one).
BUILTIN_NAMES = frozenset({"error_rate_increase", "error_rate", "fast_error_rate", "manual",
                           "p50", "p75", "p90", "p95", "p99", "p999", "max_p50", "max_p75",
                           "max_p90", "max_p95", "max_p99", "max_p999", "progression",
                           "analysis_starved", "pre_advance"})


class OnFail(StrEnum):
    ROLLBACK = "rollback"  # a failing check rolls the ring back
    HOLD = "hold"  # a failing check holds progression (the ring stays where it is)


@dataclass(frozen=True, slots=True)
class Hook:
    """An HTTP endpoint the proxy POSTs a ring's state to (JSON); 2xx passes."""

    url: str
    timeout: float = 10.0
    headers: tuple[tuple[str, str], ...] = ()
    interval: float = 30.0  # pre_advance: seconds between tries while it fails


@dataclass(frozen=True, slots=True)
class PrometheusQuery:
    url: str  # the server's base URL: http://prometheus:9090
    query: str  # PromQL; {ring}, {route}, {pool} filled in per ring
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ExternalCheck:
    """One of ``analysis.checks``: a Prometheus query with a bound, or a webhook."""

    name: str
    prometheus: PrometheusQuery | None = None
    webhook: Hook | None = None
    max: float | None = None  # the query's value must be at most this
    min: float | None = None  # ... at least this
    on_fail: OnFail = OnFail.ROLLBACK
    interval: float = 30.0
    threshold: int = 1  # failing results in a row that fail the check

    @property
    def kind(self) -> str:
        return "prometheus" if self.prometheus is not None else "webhook"

    @property
    def bound_text(self) -> str:
        if self.prometheus is None:
            return "2xx"
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + \
            ([f"<= {self.max:g}"] if self.max is not None else [])
        return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class RingHealthCheck:
    """``GET path`` to each server of the ring's pool; ``threshold`` failures in a row at
    any server fail the ring's verdict.  Separate from the pool's own checks (routing)."""

    name: str
    path: str
    interval: float = 10.0
    timeout: float = 2.0
    threshold: int = 3
    on_fail: OnFail = OnFail.ROLLBACK
    headers: tuple[tuple[str, str], ...] = ()


_HOOK = Hook("")
_CHECK = ExternalCheck("")
_PROM = PrometheusQuery("", "")
_HEALTH = RingHealthCheck("", "/")


def placeholders(query: str) -> list[str]:
    return PLACEHOLDER_RE.findall(query)


def fill(query: str, ring: str, route: str, pool: str) -> str:
    """The query for one ring (names are ``NAME_RE``: nothing to escape in PromQL)."""
    values = {"ring": ring, "route": route, "pool": pool}
    return PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), m.group(0)), query)


def shown_url(url: str) -> str:
    """What a view shows of a check's or hook's URL: ``scheme://host[:port]`` only (a
    webhook's path or query often holds its secret: Slack-style ``/services/...``,
    ``?token=``; the file may fill it from ``${VAR}``)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return ""
    if not parts.scheme or not parts.hostname:
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def _url(ctx: Ctx, sec: Section, key: str) -> str:
    url = sec.text(key)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad port raises)
    except ValueError:
        # Never the URL itself in a message: its path or query may hold a secret.
        ctx.err(sec.sub(key), "is not a valid URL (e.g. http://prometheus:9090)")
        return url
    if url and (parts.scheme not in ("http", "https") or not parts.hostname):
        ctx.err(sec.sub(key), f"is not an http(s) URL (scheme {parts.scheme or 'none'!r}"
                f"{'' if parts.hostname else ', no host'}; e.g. http://prometheus:9090)")
    elif url and (parts.username or parts.password):
        ctx.err(sec.sub(key), "credentials in the URL would be shown; send them as a header "
                "from the environment instead (headers: {Authorization: ${TOKEN}})")
    return url


def _headers(ctx: Ctx, sec: Section) -> tuple[tuple[str, str], ...]:
    raw = sec.raw("headers", {})
    if not isinstance(raw, dict):
        ctx.err(sec.sub("headers"), f"expected a mapping of header to value, got {kind(raw)}")
        return ()
    out = []
    for key, value in raw.items():
        where = join(sec.sub("headers"), str(key))
        if not isinstance(key, str) or not TOKEN_RE.match(key):
            ctx.err(where, f"{key!r} is not a valid header name")
        elif not isinstance(value, str) or "\r" in value or "\n" in value:
            ctx.err(where, "expected a string on one line")
        else:
            out.append((key, value))
    return tuple(out)


def _on_fail(ctx: Ctx, sec: Section, default: OnFail) -> OnFail:
    value = sec.text("on_fail", default.value)
    if value not in (o.value for o in OnFail):
        ctx.err(sec.sub("on_fail"), f"{value!r} is not one of: rollback, hold")
        return default
    return OnFail(value)


def _name(ctx: Ctx, sec: Section) -> str:
    name = sec.text("name")
    if name and not NAME_RE.match(name):
        ctx.err(sec.sub("name"), f"{name!r} is not a valid check name; use letters, digits, "
                "'_', '.', '-'")
    elif name in BUILTIN_NAMES:
        ctx.err(sec.sub("name"), f"{name!r} is the name of one of the judge's own checks; "
                "pick another")
    return name


def read_hook(ctx: Ctx, data: object, path: str) -> Hook | None:
    """``{url, timeout, headers, interval}`` (a bare string is the URL)."""
    if data is None:
        return None
    sec = Section(ctx, {"url": data} if isinstance(data, str) else data, path)
    url = _url(ctx, sec, "url")
    hook = Hook(url, sec.duration("timeout", _HOOK.timeout), _headers(ctx, sec),
                sec.duration("interval", _HOOK.interval, minimum=0.1))
    sec.close()
    return hook


def _read_prometheus(ctx: Ctx, data: object, path: str) -> PrometheusQuery:
    sec = Section(ctx, data, path)
    url = _url(ctx, sec, "url")
    query = sec.text("query").strip()
    if sec.ok and sec.has("query") and not query:
        ctx.err(sec.sub("query"), "is empty; write a PromQL expression")
    unknown = sorted(set(placeholders(query)) - set(PLACEHOLDERS))
    if unknown:
        ctx.err(sec.sub("query"), f"unknown placeholder {', '.join('{' + u + '}' for u in unknown)}"
                f"; only {{ring}}, {{route}} and {{pool}}")
    result = PrometheusQuery(url, query, sec.duration("timeout", _PROM.timeout))
    sec.close()
    return result


def _number(ctx: Ctx, sec: Section, key: str) -> float | None:
    value = sec.raw(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        ctx.err(sec.sub(key), f"expected a number, got {value!r}")
        return None
    return float(value)


def read_checks(ctx: Ctx, data: object, path: str) -> tuple[ExternalCheck, ...]:
    """``analysis.checks``: each a ``prometheus`` query with ``max``/``min``, or a
    ``webhook``; names unique."""
    if data is None:
        return ()
    if not isinstance(data, list):
        ctx.err(path, f"expected a list of checks, got {kind(data)}")
        return ()
    checks: list[ExternalCheck] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        where = join(path, i)
        sec = Section(ctx, item, where)
        name = _name(ctx, sec)
        if name in seen:
            ctx.err(sec.sub("name"), f"duplicate check name {name!r}")
        seen.add(name)
        prom_raw, hook_raw = sec.raw("prometheus", None), sec.raw("webhook", None)
        prom = hook = None
        if (prom_raw is None) == (hook_raw is None) and sec.ok:
            ctx.err(where, "write exactly one of prometheus: {url, query} or webhook: {url}")
        elif prom_raw is not None:
            prom = _read_prometheus(ctx, prom_raw, sec.sub("prometheus"))
        else:
            hook = read_hook(ctx, hook_raw, sec.sub("webhook"))
        high, low = _number(ctx, sec, "max"), _number(ctx, sec, "min")
        if prom is not None and high is None and low is None:
            ctx.err(where, "a prometheus check needs max: NUMBER and/or min: NUMBER (the "
                    "bound its value is held to)")
        if hook is not None and (high is not None or low is not None):
            ctx.err(sec.sub("max" if high is not None else "min"), "a webhook check passes "
                    "on 2xx; it has no bound")
        if high is not None and low is not None and low > high:
            ctx.err(sec.sub("min"), f"min {low:g} is above max {high:g}")
        checks.append(ExternalCheck(
            name, prom, hook, high, low, _on_fail(ctx, sec, _CHECK.on_fail),
            sec.duration("interval", _CHECK.interval, minimum=0.1),
            sec.integer("threshold", _CHECK.threshold, 1, 1000)))
        sec.close()
    return tuple(checks)


def read_ring_health_checks(ctx: Ctx, data: object, path: str) -> tuple[RingHealthCheck, ...]:
    """``rings[].health_checks``."""
    if data is None:
        return ()
    if not isinstance(data, list):
        ctx.err(path, f"expected a list of health checks, got {kind(data)}")
        return ()
    out: list[RingHealthCheck] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        sec = Section(ctx, item, join(path, i))
        name = _name(ctx, sec)
        if name in seen:
            ctx.err(sec.sub("name"), f"duplicate health check name {name!r}")
        seen.add(name)
        check_path = sec.text("path")
        if check_path and (not check_path.startswith("/") or any(
                c in check_path for c in " \r\n")):
            ctx.err(sec.sub("path"), f"{check_path!r} is not a request path (e.g. /health/db)")
        interval = sec.duration("interval", _HEALTH.interval, minimum=0.1)
        timeout = sec.duration("timeout", _HEALTH.timeout)
        if timeout > interval:
            ctx.err(sec.sub("timeout"), f"{timeout:g}s is longer than the interval "
                    f"{interval:g}s")
        out.append(RingHealthCheck(
            name, check_path, interval, timeout,
            sec.integer("threshold", _HEALTH.threshold, 1, 1000),
            _on_fail(ctx, sec, _HEALTH.on_fail), _headers(ctx, sec)))
        sec.close()
    return tuple(out)


def check_route_checks(ctx: Ctx, rings_path: str, analysis: Analysis | None,
                       rings: Sequence[Ring]) -> None:
    """Cross references: a step names known checks; health checks need an analysed ring."""
    known = {c.name for c in analysis.checks} if analysis is not None else set()
    baseline = (analysis.baseline or (rings[-1].name if rings else "")) if analysis else ""
    for j, ring in enumerate(rings):
        where = join(rings_path, j)
        if ring.health_checks and analysis is None:
            ctx.err(join(where, "health_checks"), "health checks feed the ring's verdict; "
                    "they need the route's analysis")
        elif ring.health_checks and ring.name == baseline:
            ctx.err(join(where, "health_checks"), f"ring {ring.name!r} is the baseline, "
                    "which is never rolled back or held; put the checks on the rings "
                    "being rolled out")
        steps = ring.progression.steps if ring.progression is not None else ()
        for k, step in enumerate(steps):
            for name in step.checks:
                if name not in known:
                    shown = ", ".join(sorted(known)) or "none defined"
                    ctx.err(join(join(join(where, "progression.steps"), k), "checks"),
                            f"unknown check {name!r} (analysis.checks: {shown})")
