"""Reading a config: one YAML file parsed into the frozen, validated model.

``load_config(path)`` / ``parse_config(text)`` return a :class:`Config` or raise
:class:`~proxy.errors.ConfigError` holding *every* issue found, each with its YAML path
and line.  Nothing here does network I/O; nothing is mutated after it is built: a reload
builds a new Config and swaps the reference.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Callable, Mapping
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import TypeVar

from proxy.config.admin import read_admin
from proxy.config.analysis import read_analysis
from proxy.config.assignment import (
    Sticky,
    read_decision_headers,
    read_override,
    read_sticky,
)
from proxy.config.checks import check_route_checks, read_ring_health_checks
from proxy.config.credentials import (
    check_credential_uses,
    check_isolation,
    read_auth,
    read_environment,
    read_tls,
)
from proxy.config.health import PoolDown, read_health, read_outlier, read_pool_down, read_retries
from proxy.config.limits import read_limits, read_listen_tls, read_max_body
from proxy.config.model import (
    REQUEST_ID_LENGTH,
    AccessLog,
    Balance,
    Config,
    LogFormat,
    Metrics,
    Policy,
    Pool,
    RequestIds,
    Ring,
    Route,
)
from proxy.config.proxies import read_trusted_proxies
from proxy.config.reader import Ctx, Section, kind
from proxy.config.ringlimits import read_policy_max_body, read_rate_limit
from proxy.config.rollout import (
    read_progression,
    read_rollback,
    read_state_files,
    read_webhooks,
)
from proxy.config.rules import read_rule
from proxy.config.source import join, load_yaml
from proxy.config.values import (
    NAME_RE,
    TOKEN_RE,
    parse_host_pattern,
    parse_listen,
    parse_upstream,
    parse_weight,
)
from proxy.errors import ConfigError, ConfigIssue

E = TypeVar("E", bound=Enum)


def load_config(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, fast: bool = True
) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        issue = ConfigIssue("", f"cannot read the file: {exc.strerror}")
        raise ConfigError([issue], str(p)) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"not UTF-8 text: {exc}")], str(p)) from exc
    return parse_config(text, source=str(p), environ=environ, raw=raw, fast=fast)


def parse_config(
    text: str,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    raw: bytes | None = None,
    fast: bool = True,
) -> Config:
    """Parse and validate; ``fast=False`` parses gently beside a running loop (reloads)."""
    loaded = load_yaml(text, os.environ if environ is None else environ, fast)
    ctx = Ctx(loaded.lines, list(loaded.issues), loaded.env_paths, loaded.env_refs,
              loaded.expanded)
    config = None
    if loaded.data is not None or not ctx.issues:
        config = _read_config(ctx, loaded.data, os.environ if environ is None else environ)
    if ctx.issues or config is None:
        ctx.issues.sort(key=lambda i: (i.line or 0))
        raise ConfigError(ctx.issues, source)
    revision = hashlib.sha256(raw if raw is not None else text.encode()).hexdigest()[:12]
    return replace(config, revision=revision, source=source)


# Defaults are written once, on the model classes; the reader takes them from these.
_CONFIG = Config()
_POOL = Pool(name="", servers=())
_RING = Ring(name="", pool="")
_ROUTE = Route(name="", rings=())


def _name(ctx: Ctx, sec: Section, what: str) -> str:
    name = sec.text("name")
    if name and not NAME_RE.match(name):
        ctx.err(
            sec.sub("name"),
            f"{name!r} is not a valid {what} name; use letters, digits, '_', '.', '-' "
            "(at most 63, starting with a letter or digit)",
        )
    return name


def _read_config(ctx: Ctx, data: object, environ: Mapping[str, str]) -> Config | None:
    top = Section(ctx, data, "")
    listen = top.parsed("listen", parse_listen, _CONFIG.listen)
    admin = read_admin(ctx, top.raw("admin", {}), "admin", dict(environ))
    access_log = _read_access_log(ctx, top.raw("access_log", {}), "access_log")
    grace = top.duration("shutdown_grace", _CONFIG.shutdown_grace, minimum=0.0)
    drain_delay = top.duration("drain_delay", _CONFIG.drain_delay, minimum=0.0)
    workers = _read_workers(ctx, top)
    trusted = read_trusted_proxies(ctx, top)
    msec = Section(ctx, top.raw("metrics", {}), "metrics")
    metrics = Metrics(msec.flag("enabled", _CONFIG.metrics.enabled))
    msec.close()
    state = read_state_files(ctx, top.raw("state", None), "state")
    webhooks = read_webhooks(ctx, top.raw("webhooks", None), "webhooks")
    pools = _read_pools(ctx, top.raw("pools"), "pools")
    routes = _read_routes(ctx, top, {p.name for p in pools})
    _check_credentials(ctx, pools, routes)
    limits = read_limits(ctx, top.raw("limits", None), "limits")
    log_format = top.parsed("log_format", _enum(LogFormat), _CONFIG.log_format)
    request_id = _read_request_id(ctx, top.raw("request_id", None), "request_id")
    listen_tls = read_listen_tls(ctx, top.raw("listen_tls", None), "listen_tls")
    top.close()
    if admin.listen == listen and listen.port != 0:
        ctx.err("admin.listen", f"{admin.listen} is also the proxy's listen address")
    if listen_tls is not None and listen_tls.listen.port != 0:
        for other, where in ((listen, "listen"), (admin.listen, "admin.listen")):
            if listen_tls.listen == other:
                ctx.err("listen_tls.listen", f"{other} is also the {where} address")
    if not top.ok:
        return None
    if not metrics.enabled:
        for i, route in enumerate(routes):
            if route.analysis is not None:
                ctx.err(f"routes[{i}].analysis", "analysis reads the per-ring metrics; "
                        "it needs metrics.enabled: true")
    return Config(listen, pools, routes, admin, access_log, grace, metrics, state, webhooks,
                  limits, listen_tls, trusted_proxies=trusted, drain_delay=drain_delay,
                  workers=workers, log_format=log_format, request_id=request_id)


MAX_WORKERS = 256


def _read_workers(ctx: Ctx, top: Section) -> int:
    """``workers``: a whole number 1..256, or ``auto`` (the CPUs this process may use:
    its affinity mask and cgroup CPU quota, ``proxy.workers.cpus``)."""
    if top.has("workers") and top.data["workers"] == "auto":
        from proxy.workers.cpus import usable_cpus

        top.raw("workers")
        return max(1, min(usable_cpus(), MAX_WORKERS))
    value = top.raw("workers", _CONFIG.workers)
    if isinstance(value, str):
        ctx.err(top.sub("workers"), f"{value!r} is not a number of processes; write a "
                f"whole number 1..{MAX_WORKERS} or auto (one per CPU)")
        return _CONFIG.workers
    return top.integer("workers", _CONFIG.workers, 1, MAX_WORKERS)


def _read_access_log(ctx: Ctx, data: object, path: str) -> AccessLog:
    sec = Section(ctx, data, path)
    base = _CONFIG.access_log
    result = AccessLog(sec.flag("enabled", base.enabled), sec.text("path", base.path) or base.path)
    sec.close()
    return result


def _read_request_id(ctx: Ctx, data: object, path: str) -> RequestIds:
    base = _CONFIG.request_id
    if data is None:
        return base
    sec = Section(ctx, data, path)
    result = RequestIds(sec.flag("trust_incoming", base.trust_incoming),
                        sec.integer("max_length", base.max_length, *REQUEST_ID_LENGTH))
    sec.close()
    return result


def _read_pools(ctx: Ctx, data: object, path: str) -> tuple[Pool, ...]:
    if data is None:
        return ()
    if not isinstance(data, dict) or not data:
        ctx.err(path, f"expected a mapping of pool name to pool, got {kind(data)}")
        return ()
    pools = []
    for name, body in data.items():
        sub = join(path, name)
        if not NAME_RE.match(name):
            ctx.err(sub, f"{name!r} is not a valid pool name; use letters, digits, '_', '.', '-'")
        sec = Section(ctx, body, sub)
        servers = []
        raw_servers = sec.items("servers")
        if sec.ok and not raw_servers:
            ctx.err(sec.sub("servers"), "a pool needs at least one server")
        for i, item in enumerate(raw_servers):
            try:
                servers.append(parse_upstream(item))
            except ValueError as exc:
                ctx.err(join(sec.sub("servers"), i), str(exc))
        dupes = {s.url for s in servers if servers.count(s) > 1}
        for url in sorted(dupes):
            ctx.err(sec.sub("servers"), f"{url} is listed twice")
        pool = Pool(
            name,
            tuple(servers),
            sec.parsed("balance", _enum(Balance), _POOL.balance),
            connect_timeout=sec.duration("connect_timeout", _POOL.connect_timeout),
            max_connections=sec.integer("max_connections", _POOL.max_connections, 1, 1_000_000),
            keepalive_timeout=sec.duration("keepalive_timeout", _POOL.keepalive_timeout),
            preserve_host=sec.flag("preserve_host", _POOL.preserve_host),
            health=read_health(ctx, sec.raw("health", None), sec.sub("health")),
            outlier=read_outlier(ctx, sec.raw("outlier", None), sec.sub("outlier")),
            retries=read_retries(ctx, sec.raw("retries", None), sec.sub("retries")),
            auth=read_auth(ctx, sec.raw("auth", None), sec.sub("auth")),
            tls=read_tls(ctx, sec.raw("tls", None), sec.sub("tls"),
                         any(s.scheme == "https" for s in servers)),
            environment=read_environment(ctx, sec),
        )
        sec.close()
        pools.append(pool)
    return tuple(pools)


def _enum(kind: type[E]) -> Callable[[object], E]:
    def parse(value: object) -> E:
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in kind)
            raise ValueError(f"{value!r} is not one of: {allowed}") from None

    return parse


def _read_routes(ctx: Ctx, top: Section, pool_names: set[str]) -> tuple[Route, ...]:
    items = top.items("routes")
    if top.ok and top.has("routes") and not items:
        ctx.err("routes", "at least one route is required")
    routes: list[Route] = []
    seen_names: dict[str, int] = {}
    seen_matches: dict[tuple[tuple[str, ...], str], int] = {}
    for i, item in enumerate(items):
        path = join("routes", i)
        route = _read_route(ctx, item, path, pool_names)
        if route is None:
            continue
        if route.name in seen_names:
            ctx.err(join(path, "name"), f"duplicate route name {route.name!r} "
                    f"(also routes[{seen_names[route.name]}])")
        seen_names.setdefault(route.name, i)
        key = (route.hosts, route.path_prefix)
        if key in seen_matches:
            ctx.err(join(path, "match"), f"same match as routes[{seen_matches[key]}], "
                    "which comes first, so this route would never be used")
        seen_matches.setdefault(key, i)
        routes.append(route)
    return tuple(routes)


def _read_route(ctx: Ctx, data: object, path: str, pool_names: set[str]) -> Route | None:
    sec = Section(ctx, data, path)
    name = _name(ctx, sec, "route")
    hosts: tuple[str, ...] = ()
    prefix = _ROUTE.path_prefix
    match = sec.raw("match", None)
    if match is not None:
        msec = Section(ctx, match, sec.sub("match"))
        raw_hosts = msec.raw("host", None)
        if raw_hosts is not None:
            host_list = raw_hosts if isinstance(raw_hosts, list) else [raw_hosts]
            parsed = []
            for j, h in enumerate(host_list):
                hpath = msec.sub("host") + (f"[{j}]" if isinstance(raw_hosts, list) else "")
                try:
                    parsed.append(parse_host_pattern(h))
                except ValueError as exc:
                    ctx.err(hpath, str(exc))
            hosts = tuple(parsed)
        prefix = msec.text("path_prefix", _ROUTE.path_prefix)
        if not prefix.startswith("/"):
            ctx.err(msec.sub("path_prefix"), f"{prefix!r} must start with '/'")
        msec.close()
    defaults = _read_policy(ctx, sec.raw("policy", None), sec.sub("policy"), Policy(), name, "")
    sticky = read_sticky(ctx, sec.raw("sticky", None), sec.sub("sticky"), name)
    override = read_override(ctx, sec.raw("override", None), sec.sub("override"))
    decision = read_decision_headers(ctx, sec.raw("decision", None), sec.sub("decision"))
    analysis = read_analysis(ctx, sec.raw("analysis", None), sec.sub("analysis"))
    max_body = read_max_body(ctx, sec)
    if read_rollback(ctx, sec.raw("rollback", None), sec.sub("rollback")) and analysis:
        analysis = replace(analysis, rollback_to_previous=True)
    rings: list[Ring] = []
    ring_items = sec.items("rings")
    if sec.ok and not ring_items:
        ctx.err(sec.sub("rings"), "a route needs at least one ring (the last is the default)")
    seen: dict[str, int] = {}
    for j, item in enumerate(ring_items):
        rpath = join(sec.sub("rings"), j)
        ring = _read_ring(ctx, item, rpath, pool_names, defaults, name)
        if ring.name in seen:
            ctx.err(join(rpath, "name"), f"duplicate ring name {ring.name!r} in route {name!r}")
        seen.setdefault(ring.name, j)
        rings.append(ring)
    _check_default_and_weights(ctx, sec, rings, sticky)
    if rings and rings[-1].on_pool_down is PoolDown.NEXT_RING:
        ctx.err(join(join(sec.sub("rings"), len(rings) - 1), "on_pool_down"),
                f"next_ring on the last ring ({rings[-1].name!r}): no ring comes after it "
                "(a ring may only send its users to a later ring, toward less exposure)")
    if analysis is not None and analysis.baseline is not None and rings and \
            analysis.baseline not in {r.name for r in rings}:
        ctx.err(sec.sub("analysis.baseline"), f"unknown ring {analysis.baseline!r} "
                f"(rings: {', '.join(r.name for r in rings)})")
    check_route_checks(ctx, sec.sub("rings"), analysis, rings)
    if analysis is None:
        for j, ring in enumerate(rings):
            if ring.progression is not None:
                ctx.err(join(join(sec.sub("rings"), j), "progression"),
                        "progression needs the route's analysis (what decides a step passed)")
    sec.close()
    if not sec.ok:
        return None
    return Route(name, tuple(rings), hosts, prefix, sticky, override, decision, analysis,
                 max_body)


def _check_default_and_weights(
    ctx: Ctx, sec: Section, rings: list[Ring], sticky: Sticky | None
) -> None:
    if not rings:
        return
    last = join(sec.sub("rings"), len(rings) - 1)
    if rings[-1].rules or rings[-1].weight is not None:
        ctx.err(last, f"the last ring ({rings[-1].name!r}) is the default and takes everyone "
                "else; it cannot have rules or a weight")
    weighted = [(i, r) for i, r in enumerate(rings)
                if r.weight is not None or r.progression is not None]
    if weighted and sticky is None:
        i, _ = weighted[0]
        ctx.err(join(join(sec.sub("rings"), i), "weight"),
                "a weight needs the route's sticky.key (what to hash users by)")
    if sticky is not None and not sticky.key:
        ctx.err(sec.sub("sticky.key"), "is required")
    def most(r: Ring) -> int:
        steps = r.progression.steps if r.progression else ()
        return max([r.weight or 0, *(s.weight for s in steps)])

    total = sum(most(r) for _, r in weighted)
    if total > 10_000:
        shown = ", ".join(f"{r.name} {most(r) / 100:g}" for _, r in weighted)
        what = "ring weights (the largest step of progressing rings)" if any(
            r.progression for _, r in weighted) else "ring weights"
        ctx.err(sec.sub("rings"), f"{what} add up to {total / 100:g} %, above 100 % ({shown})")


def _read_ring(
    ctx: Ctx, data: object, path: str, pool_names: set[str], defaults: Policy, route: str
) -> Ring:
    sec = Section(ctx, data, path)
    name = _name(ctx, sec, "ring")
    pool = sec.text("pool")
    if pool and pool not in pool_names:
        known = ", ".join(sorted(pool_names)) or "none defined"
        ctx.err(sec.sub("pool"), f"unknown pool {pool!r} (pools: {known})")
    groups = []
    for k, item in enumerate(sec.items("rules")):
        gpath = join(sec.sub("rules"), k)
        if isinstance(item, dict) and "all" in item:
            gsec = Section(ctx, item, gpath)
            rules = [read_rule(ctx, r, join(gsec.sub("all"), n))
                     for n, r in enumerate(gsec.items("all"))]
            if not rules:
                ctx.err(gsec.sub("all"), "a rule group needs at least one rule")
            gsec.close()
        else:
            rules = [read_rule(ctx, item, gpath)]
        groups.append(tuple(r for r in rules if r is not None))
    policy = _read_policy(ctx, sec.raw("policy", None), sec.sub("policy"), defaults, route, name)
    weight = sec.parsed("weight", parse_weight, _RING.weight)
    progression = read_progression(ctx, sec.raw("progression", None), sec.sub("progression"))
    if progression is not None and weight is not None:
        ctx.err(sec.sub("weight"), "a progressing ring's weight is its first step; "
                "leave weight out")
    if progression is not None and progression.steps:
        weight = progression.steps[0].weight
    pinned = sec.flag("pinned", _RING.pinned)
    on_pool_down = read_pool_down(ctx, sec, _RING.on_pool_down)
    health_checks = read_ring_health_checks(ctx, sec.raw("health_checks", None),
                                            sec.sub("health_checks"))
    sec.close()
    return Ring(name, pool, tuple(groups), policy, weight, progression, pinned, on_pool_down,
                health_checks)


_FORMATTER = string.Formatter()


def _read_policy(
    ctx: Ctx, data: object, path: str, base: Policy, route: str, ring: str
) -> Policy:
    if data is None:
        return _expand_headers(base, route, ring)
    sec = Section(ctx, data, path)
    timeout = sec.duration("timeout", base.timeout)
    idle = sec.duration("idle_timeout", base.idle_timeout)
    limit = sec.integer("max_concurrency", base.max_concurrency, 1, 10_000_000)
    headers = dict(base.add_headers)
    raw = sec.raw("add_headers", {})
    if not isinstance(raw, dict):
        ctx.err(sec.sub("add_headers"), f"expected a mapping of header to value, got {kind(raw)}")
        raw = {}
    for key, value in raw.items():
        hpath = join(sec.sub("add_headers"), key)
        if not TOKEN_RE.match(key):
            ctx.err(hpath, f"{key!r} is not a valid header name")
            continue
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            ctx.err(hpath, f"expected a string, got {kind(value)}")
            continue
        value = str(value)
        if "\r" in value or "\n" in value:
            ctx.err(hpath, "a header value cannot contain a line break")
            continue
        try:
            fields = {f for _, f, _, _ in _FORMATTER.parse(value) if f is not None}
        except ValueError as exc:
            ctx.err(hpath, f"{value!r}: {exc} (write {{{{ and }}}} for literal braces)")
            continue
        if fields - {"ring", "route"}:
            bad = ", ".join(sorted(fields - {"ring", "route"}))
            ctx.err(hpath, f"{value!r}: unknown placeholder {bad}; only {{ring}} and {{route}}")
            continue
        headers[key] = value
    rate_limit = read_rate_limit(ctx, sec, base.rate_limit)
    max_body = read_policy_max_body(ctx, sec, base.max_body)
    sec.close()
    policy = Policy(timeout, idle, limit, tuple(headers.items()), rate_limit, max_body)
    return _expand_headers(policy, route, ring) if ring else policy


def _expand_headers(policy: Policy, route: str, ring: str) -> Policy:
    if not ring or not policy.add_headers:
        return policy
    expanded = tuple((k, v.format(ring=ring, route=route)) for k, v in policy.add_headers)
    return replace(policy, add_headers=expanded)


def _check_credentials(ctx: Ctx, pools: tuple[Pool, ...], routes: tuple[Route, ...]) -> None:
    """Credential isolation (proxy.config.credentials), and no ring's ``add_headers``
    setting its pool's credential header (the credential would be sent twice)."""
    check_isolation(ctx, pools)
    check_credential_uses(ctx, pools)
    by_name = {p.name: p for p in pools}
    for i, route in enumerate(routes):
        for j, ring in enumerate(route.rings):
            pool = by_name.get(ring.pool)
            if pool is None or not pool.auth:
                continue
            own = {c.header.lower() for c in pool.auth}
            for key, _ in ring.policy.add_headers:
                if key.lower() in own:
                    ctx.err(f"routes[{i}].rings[{j}].policy.add_headers.{key}",
                            f"{key} is a credential of pool {pool.name} (its auth sets it); "
                            "add_headers cannot set it too")
