"""The admin listener: health, metrics, the JSON API, and the status page.

Who may call what is declared per endpoint (``ENDPOINTS``) and decided by
``proxy.admin.auth.authorize``; every route is registered through that table, so a new
endpoint cannot skip the check.  Unauthenticated: ``/healthz``, ``/readyz``, ``/metrics``
(probes and Prometheus) and ``/`` (the status page's static HTML; it carries no data and
calls the API with the token the operator gives it).  Everything under ``/api`` needs a
bearer token with a role: ``viewer`` may read, ``operator`` may also act on rings and
create, change and delete them in the config file (the Rings API, ``proxy.admin.rings``),
optionally only named routes and rings, ``admin`` may do everything including reload and
pools.  With no token configured the API is read-only and only from loopback.  Errors are
JSON ``{"error": ...}`` with 400, 401, 403, 404, 405, 409, 412 or 422.

The admin app also runs the series sampler (``proxy.admin.sampler``) while it is up: it
feeds ``GET /api/routes/{route}/series``, the status page's charts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.admin import rings
from proxy.admin.auth import (
    ACT,
    PUBLIC,
    READ,
    Access,
    Caller,
    Denied,
    Requirement,
    Target,
    admin_only,
    authorize,
    host_allowed,
)
from proxy.admin.configfile import WRITE_LOCK_KEY
from proxy.admin.context import PROXY_KEY, Proxy, checked_reason, json_body, proxy_of
from proxy.admin.sampler import Sampler
from proxy.admin.series import series_view
from proxy.admin.views import RingView, RouteView, ring_views, route_view
from proxy.errors import ApiError, RolloutConflict
from proxy.rollout.machine import Trigger
from proxy.routing.assign import CompiledRoute, StaticRequest
from proxy.routing.explain import explain as explain_decision

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("ringproxy.admin")

ACTIONS = {
    "promote": Trigger.PROMOTE,
    "approve": Trigger.APPROVE,
    "pause": Trigger.PAUSE,
    "resume": Trigger.RESUME,
    "rollback": Trigger.ROLLBACK,
    "weight": Trigger.SET_WEIGHT,
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# An endpoint's handler runs only once its requirement is met, and gets the caller.
EndpointHandler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]
# What an ACT request acts on, or the answer to give an authenticated caller instead.
TargetResolver = Callable[[web.Request], Awaitable[Target | Denied]]

SAMPLER_KEY = web.AppKey("sampler", Sampler)
# Every registered handler and the requirement it enforces (tests read it back).
REQUIREMENTS_KEY: web.AppKey[dict[Handler, Requirement]] = web.AppKey("requirements")


def _is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response({"error": exc.message}, status=exc.status)
    except web.HTTPNotFound:
        return web.json_response(
            {"error": f"no such endpoint: {request.method} {request.path}"}, status=404)
    except web.HTTPMethodNotAllowed:
        return web.json_response(
            {"error": f"{request.method} is not allowed on {request.path}"}, status=405)
    except RolloutConflict as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)


def _unknown_route(runtime: Runtime, name: str) -> str:
    return f"unknown route {name!r} (routes: {', '.join(runtime.table.routes)})"


def _route_or_404(request: web.Request, name: str) -> CompiledRoute:
    runtime = proxy_of(request).runtime
    compiled = runtime.table.routes.get(name)
    if compiled is None:
        raise ApiError(404, _unknown_route(runtime, name))
    return compiled


def _target(request: web.Request) -> Target | Denied:
    """The ring an action names, or the 404 to answer (once the caller is authenticated)."""
    verb = request.match_info["action"]
    if verb not in ACTIONS:
        return Denied(404, f"unknown action {verb!r} (actions: {', '.join(ACTIONS)})")
    route_name, ring = request.match_info["route"], request.match_info["ring"]
    runtime = proxy_of(request).runtime
    compiled = runtime.table.routes.get(route_name)
    if compiled is None:
        return Denied(404, _unknown_route(runtime, route_name))
    if ring not in compiled.ring_index:
        return Denied(404, f"route {route_name!r} has no ring {ring!r}")
    return Target(route_name, ring, verb)


async def _action_target(request: web.Request) -> Target | Denied:
    return _target(request)


def _guarded(requirement: Requirement, handler: EndpointHandler,
             resolve: TargetResolver = _action_target) -> Handler:
    """``handler`` behind ``requirement``: the only way an endpoint is registered.
    ``resolve`` finds what an ACT request acts on (default: a rollout action's ring)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        target = await resolve(request) if requirement.access is Access.ACT else None
        admin = proxy_of(request).config.admin
        host = request.headers.get("Host", "")
        decision = authorize(
            requirement, admin.tokens,
            request.headers.get("Authorization", ""), is_loopback=_is_loopback(request),
            method=request.method, target=target,
            host_allowed=bool(admin.tokens) or host_allowed(host, admin.hosts))
        if isinstance(decision, Denied):
            raise ApiError(decision.status, decision.message)
        return await handler(request, decision)

    return guarded


# --------------------------------------------------------------------------- reads


def _route_view(proxy: Proxy, name: str) -> RouteView:
    runtime = proxy.runtime
    return route_view(runtime.table.routes[name], runtime.rings[name], proxy.controller,
                      proxy.metrics, time.monotonic(), time.time())


def _ring_view(proxy: Proxy, route: str, ring: str) -> RingView | None:
    """The ring as it is now; None when a reload removed it meanwhile (the action stands)."""
    runtime = proxy.runtime
    compiled = runtime.table.routes.get(route)
    if compiled is None:
        return None
    views = ring_views(compiled, runtime.rings[route], proxy.controller,
                       proxy.metrics, time.monotonic(), time.time())
    return next((r for r in views if r["name"] == ring), None)


async def routes(request: web.Request, caller: Caller) -> web.Response:
    proxy = proxy_of(request)
    return web.json_response({
        "revision": proxy.config.revision,
        "routes": [_route_view(proxy, name) for name in proxy.runtime.table.routes],
        **_fleet(proxy),
    })


def _fleet(proxy: Proxy) -> dict[str, object]:
    """``{"fleet": ...}`` for a member of a fleet (state.backend: redis), else nothing."""
    shared = proxy.controller.shared
    return {"fleet": shared.info()} if shared is not None else {}


async def route(request: web.Request, caller: Caller) -> web.Response:
    name = request.match_info["route"]
    _route_or_404(request, name)
    return web.json_response(_route_view(proxy_of(request), name))


def _pairs(request: web.Request, key: str) -> list[tuple[str, str]]:
    out = []
    for item in request.query.getall(key, []):
        name, sep, value = item.partition(":")
        if not sep or not name:
            raise ApiError(400, f"{key}={item!r}: expected NAME:VALUE")
        out.append((name, value))
    return out


async def explain(request: web.Request, caller: Caller) -> web.Response:
    name = request.query.get("route")
    if not name:
        raise ApiError(400, "the route parameter is required")
    compiled = _route_or_404(request, name)
    ip = request.query.get("ip")
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise ApiError(400, f"ip={ip!r} is not an IP address") from None
    described = StaticRequest(
        headers={k.lower(): v for k, v in _pairs(request, "header")},
        cookies=dict(_pairs(request, "cookie")), query=dict(_pairs(request, "query")),
        remote=ip, path=request.query.get("path", "/"),
        method=request.query.get("method", "GET").upper(),
    )
    return web.json_response(explain_decision(compiled, described))


def _time_of(event: Mapping[str, object]) -> float:
    when = event.get("time", 0)
    return float(when) if isinstance(when, int | float) else 0.0


async def events(request: web.Request, caller: Caller) -> web.Response:
    history = list(proxy_of(request).controller.history)
    route_name = request.query.get("route")
    if route_name:
        history = [e for e in history if e.get("route") == route_name]
    since = request.query.get("since")
    if since:
        try:
            after = float(since)
        except ValueError:
            raise ApiError(400, f"since={since!r}: expected a Unix time in seconds") from None
        history = [e for e in history if _time_of(e) > after]
    return web.json_response({"events": history})


def _since(request: web.Request) -> float | None:
    since = request.query.get("since")
    if since is None:
        return None
    try:
        after = float(since)
    except ValueError:
        after = math.nan
    if not math.isfinite(after):
        raise ApiError(400, f"since={since!r}: expected a Unix time in seconds, "
                            "e.g. since=1700000000.5")
    return after


async def series(request: web.Request, caller: Caller) -> web.Response:
    """Per ring, its points (1 s, 10 s before the last 15 min) and the route's events
    after ``since`` (default: from where the page's time axis starts)."""
    name = request.match_info["route"]
    compiled = _route_or_404(request, name)
    since = _since(request)
    proxy = proxy_of(request)
    controller = proxy.controller
    plan = controller.plans.get(name)
    baseline = plan.baseline if plan is not None else compiled.route.rings[-1].name
    states = controller.states.get(name, {})
    rings = []
    for ring in compiled.route.rings:
        state = states.get(ring.name)
        rings.append((ring.name, ring.name == baseline,
                      state.phase.value if state else None,
                      state.step_since if state else None))
    store = request.app[SAMPLER_KEY].store
    return web.json_response(series_view(store, name, rings, baseline, controller.history,
                                         time.time(), since))


# --------------------------------------------------------------------------- actions


def _weight(body: Mapping[str, object]) -> int:
    """The body's weight in basis points; 400 unless a percentage in 0.01 steps."""
    raw = body.get("weight")
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise ApiError(400, 'weight needs {"weight": PERCENT}')
    if not 0 <= raw <= 100 or abs(round(raw * 100) - raw * 100) > 1e-6:
        raise ApiError(400, f"weight {raw} is not a percentage 0..100 in 0.01 steps")
    return round(raw * 100)


async def action(request: web.Request, caller: Caller) -> web.Response:
    # The guard has resolved the target: the action, route and ring exist.
    route_name, ring = request.match_info["route"], request.match_info["ring"]
    verb = request.match_info["action"]
    trigger = ACTIONS[verb]
    body = await json_body(request)
    reason = checked_reason(body.get("reason", ""))
    weight = _weight(body) if trigger is Trigger.SET_WEIGHT else None
    proxy = proxy_of(request)
    done = await proxy.controller.act(route_name, ring, trigger, reason, weight, caller.actor)
    log.info("admin: %s %s %s/%s", caller.actor, verb, route_name, ring)
    return web.json_response({
        "events": [e.as_dict() for e in done],
        "ring": _ring_view(proxy, route_name, ring),
    })


async def reload(request: web.Request, caller: Caller) -> web.Response:
    reloader = proxy_of(request).reloader
    if reloader is None:
        raise ApiError(409, "this proxy was not started from a config file; nothing to reload")
    result = await reloader.reload(f"api:{caller.actor}")
    if result.ok:
        return web.json_response(result.as_dict())
    more = f" (+{len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
    return web.json_response(
        {"error": f"config rejected, still serving {result.revision}: "
                  f"{result.errors[0]}{more}", **result.as_dict()}, status=422)


# --------------------------------------------------------------------------- probes and page


async def healthz(request: web.Request, caller: Caller) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request, caller: Caller) -> web.Response:
    proxy = proxy_of(request)
    missing = [name for name, pool in proxy.runtime.pools.items() if not pool.started]
    # A pool without a server in rotation: its rings' users get 503s (or a later ring).
    down = [name for name, pool in proxy.runtime.pools.items() if pool.health.down]
    # After SIGTERM, for drain_delay: load balancers take this replica out while it serves.
    draining = proxy.draining
    ready = not missing and not down and not draining
    return web.json_response(
        {"ready": ready, "revision": proxy.config.revision, "pools_not_started": missing,
         "pools_down": down, "draining": draining,
         # A fleet member cut off from the shared state still serves (ready), says so.
         **_fleet(proxy)},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request, caller: Caller) -> web.Response:
    # Rendered on the loop thread, where the recorders are written: a consistent snapshot.
    body, content_type = proxy_of(request).metrics.exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


_PAGE: bytes | None = None


async def page(request: web.Request, caller: Caller) -> web.Response:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("proxy.admin").joinpath("status.html").read_bytes()
    return web.Response(body=_PAGE, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'self'; "
                                 "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})


async def no_icon(request: web.Request, caller: Caller) -> web.Response:
    return web.Response(status=204)  # keeps browsers from logging a 404 for the page


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str  # GET also answers HEAD
    path: str
    requirement: Requirement
    handler: EndpointHandler
    target: TargetResolver = _action_target  # for ACT: what the request acts on


_CHANGE_POOLS = admin_only("change pools")


ENDPOINTS = (
    Endpoint("GET", "/", PUBLIC, page),
    Endpoint("GET", "/favicon.ico", PUBLIC, no_icon),
    Endpoint("GET", "/healthz", PUBLIC, healthz),
    Endpoint("GET", "/readyz", PUBLIC, readyz),
    Endpoint("GET", "/metrics", PUBLIC, metrics),
    Endpoint("GET", "/api/routes", READ, routes),
    Endpoint("GET", "/api/routes/{route}", READ, route),
    Endpoint("GET", "/api/routes/{route}/series", READ, series),
    Endpoint("GET", "/api/explain", READ, explain),
    Endpoint("GET", "/api/events", READ, events),
    Endpoint("POST", "/api/routes/{route}/rings/{ring}/{action}", ACT, action),
    Endpoint("POST", "/api/reload", admin_only("reload"), reload),
    # The Rings API (proxy.admin.rings): rings and pools kept in the config file.
    Endpoint("GET", "/api/routes/{route}/rings", READ, rings.list_rings),
    Endpoint("POST", "/api/routes/{route}/rings", ACT, rings.create_ring, rings.ring_target),
    Endpoint("GET", "/api/routes/{route}/rings/{ring}", READ, rings.get_ring),
    Endpoint("PUT", "/api/routes/{route}/rings/{ring}", ACT, rings.put_ring,
             rings.ring_target),
    Endpoint("PATCH", "/api/routes/{route}/rings/{ring}", ACT, rings.patch_ring,
             rings.ring_target),
    Endpoint("DELETE", "/api/routes/{route}/rings/{ring}", ACT, rings.delete_ring,
             rings.ring_target),
    Endpoint("GET", "/api/pools", READ, rings.list_pools),
    Endpoint("POST", "/api/pools", _CHANGE_POOLS, rings.create_pool),
    Endpoint("GET", "/api/pools/{pool}", READ, rings.get_pool),
    Endpoint("PUT", "/api/pools/{pool}", _CHANGE_POOLS, rings.put_pool),
    Endpoint("PATCH", "/api/pools/{pool}", _CHANGE_POOLS, rings.patch_pool),
    Endpoint("DELETE", "/api/pools/{pool}", _CHANGE_POOLS, rings.delete_pool),
)


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    """The series sampler runs while the admin app does."""
    sampler = app[SAMPLER_KEY]
    sampler.start()
    yield
    await sampler.stop()


def admin_app(proxy: Proxy) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[PROXY_KEY] = proxy
    app[SAMPLER_KEY] = Sampler(lambda: proxy.runtime, proxy.metrics)
    app[WRITE_LOCK_KEY] = asyncio.Lock()  # the Rings API's writes, one at a time
    app.cleanup_ctx.append(_sampling)
    requirements: dict[Handler, Requirement] = {}
    for endpoint in ENDPOINTS:
        handler = _guarded(endpoint.requirement, endpoint.handler, endpoint.target)
        requirements[handler] = endpoint.requirement
        if endpoint.method == "GET":
            app.router.add_get(endpoint.path, handler)
        else:
            app.router.add_route(endpoint.method, endpoint.path, handler)
    app[REQUIREMENTS_KEY] = requirements
    if not proxy.config.admin.tokens:
        log.warning("admin API: no tokens configured (admin.tokens): read-only, loopback only")
    return app
