"""The admin listener: health, metrics, the JSON API, and the status page.

Unauthenticated: ``/healthz``, ``/readyz``, ``/metrics`` (probes and Prometheus) and ``/``
(the status page's static HTML; it carries no data and calls the API with the token the
operator gives it).  Everything under ``/api`` needs a bearer token with a role:
``viewer`` may GET, ``operator`` may also act on rings (optionally only named routes and
rings), ``admin`` may do everything including reload.  With no token configured the API
is read-only and only from loopback.  Errors are JSON ``{"error": ...}`` with 400, 401,
403, 404 or 409.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from proxy.config.admin import AdminToken
from proxy.errors import ApiError, RolloutConflict
from proxy.rollout.machine import Trigger
from proxy.routing.assign import StaticRequest, assign

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.control.controller import Controller
    from proxy.metrics import Metrics
    from proxy.reload import Reloader
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


class Proxy(Protocol):
    """What the admin listener reads and drives (``proxy.server.Proxy`` is one).

    A protocol, not an import: the server builds the admin app, so the admin side names
    only what it uses and never imports the server.
    """

    @property
    def config(self) -> Config: ...
    @property
    def runtime(self) -> Runtime: ...
    @property
    def controller(self) -> Controller: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def reloader(self) -> Reloader | None: ...


PROXY_KEY = web.AppKey("proxy", Proxy)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]



def _proxy(request: web.Request) -> Proxy:
    return request.app[PROXY_KEY]


def _is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False


def _caller(request: web.Request) -> AdminToken | None:
    """The token the request proves, None without tokens configured; raises 401/403."""
    tokens = _proxy(request).config.admin.tokens
    if not tokens:
        if request.method != "GET":
            raise ApiError(403, "no admin tokens are configured: the API is read-only "
                           "(set admin.tokens to allow actions)")
        if not _is_loopback(request):
            raise ApiError(403, "no admin tokens are configured: only loopback may read")
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    for token in tokens:
        if hmac.compare_digest(given.encode(), token.secret.encode()):
            return token
    raise ApiError(401, "invalid token")


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
        return web.json_response({"error": str(exc)}, status=409)


def _route_or_404(request: web.Request, name: str) -> Any:
    runtime = _proxy(request).runtime
    compiled = runtime.table.routes.get(name)
    if compiled is None:
        raise ApiError(404, f"unknown route {name!r} (routes: {', '.join(runtime.table.routes)})")
    return compiled


# --------------------------------------------------------------------------- reads


def _ring_view(proxy: Proxy, route: str) -> list[dict[str, object]]:
    runtime, controller = proxy.runtime, proxy.controller
    compiled = runtime.table.routes[route]
    plan = controller.plans.get(route)
    status: dict[str, Any] = controller.status().get(route, {})  # type: ignore[assignment]
    window = plan.window if plan else 60.0
    now = time.monotonic()
    wall = time.time()
    rings = []
    for ring_rt, ring in zip(runtime.rings[route], compiled.route.rings, strict=True):
        state: dict[str, Any] = dict(status.get(ring.name, {}))
        try:
            summary = proxy.metrics.window(route, ring.name, now, window)
            traffic: dict[str, object] | None = {
                "window_seconds": window,
                "requests": summary.requests,
                "errors": summary.errors,
                "error_rate": summary.error_rate,
                "rps": summary.requests / window,
                "p50": summary.p50,
                "p95": summary.p95,
                "p99": summary.p99,
            }
        except KeyError:
            traffic = None
        since = state.get("step_since")
        rings.append({
            "name": ring.name,
            "pool": ring.pool,
            "servers": [s.url for s in ring_rt.pool.config.servers],
            "rules": [" and ".join(r.describe() for r in group) for group in ring.rules],
            "default": ring is compiled.route.rings[-1],
            "weight": ring_rt.weight,
            "range": compiled.range_of(ring.name),
            "phase": state.get("phase"),
            "step": state.get("step"),
            "steps": state.get("steps", []),
            "seconds_in_step": round(wall - since, 1) if isinstance(since, float) else None,
            "failures": state.get("failures"),
            "baseline": state.get("baseline", False),
            "pinned": ring.pinned,
            "verdict": state.get("verdict"),
            "inflight": ring_rt.inflight,
            "traffic": traffic,
        })
    return rings


def _route_view(proxy: Proxy, name: str) -> dict[str, object]:
    compiled = proxy.runtime.table.routes[name]
    route = compiled.route
    plan = proxy.controller.plans.get(name)
    return {
        "name": name,
        "hosts": list(route.hosts),
        "path_prefix": route.path_prefix,
        "analysis": None if route.analysis is None else {
            "interval": route.analysis.interval,
            "window": route.analysis.window,
            "baseline": plan.baseline if plan else None,
            "failure_limit": route.analysis.failure_limit,
        },
        "rings": _ring_view(proxy, name),
    }


async def routes(request: web.Request) -> web.Response:
    _caller(request)
    proxy = _proxy(request)
    return web.json_response({
        "revision": proxy.config.revision,
        "routes": [_route_view(proxy, name) for name in proxy.runtime.table.routes],
    })


async def route(request: web.Request) -> web.Response:
    _caller(request)
    name = request.match_info["route"]
    _route_or_404(request, name)
    return web.json_response(_route_view(_proxy(request), name))


def _pairs(request: web.Request, key: str) -> list[tuple[str, str]]:
    out = []
    for item in request.query.getall(key, []):
        name, sep, value = item.partition(":")
        if not sep or not name:
            raise ApiError(400, f"{key}={item!r}: expected NAME:VALUE")
        out.append((name, value))
    return out


async def explain(request: web.Request) -> web.Response:
    _caller(request)
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
    fake = StaticRequest.build(
        _pairs(request, "header"), cookies=dict(_pairs(request, "cookie")),
        query=dict(_pairs(request, "query")), remote=ip,
        path=request.query.get("path", "/"), method=request.query.get("method", "GET").upper(),
    )
    decision = assign(compiled, fake)
    return web.json_response({"route": name, **decision.as_dict()})


async def events(request: web.Request) -> web.Response:
    _caller(request)
    history = list(_proxy(request).controller.history)
    route_name = request.query.get("route")
    if route_name:
        history = [e for e in history if e.get("route") == route_name]
    since = request.query.get("since")
    if since:
        try:
            after = float(since)
        except ValueError:
            raise ApiError(400, f"since={since!r}: expected a Unix time in seconds") from None
        history = [e for e in history if float(e.get("time", 0)) > after]  # type: ignore[arg-type]
    return web.json_response({"events": history})


# --------------------------------------------------------------------------- actions


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


async def action(request: web.Request) -> web.Response:
    caller = _caller(request)
    route_name = request.match_info["route"]
    ring = request.match_info["ring"]
    verb = request.match_info["action"]
    trigger = ACTIONS.get(verb)
    if trigger is None:
        raise ApiError(404, f"unknown action {verb!r} (actions: {', '.join(ACTIONS)})")
    compiled = _route_or_404(request, route_name)
    if ring not in compiled.ring_index:
        raise ApiError(404, f"route {route_name!r} has no ring {ring!r}")
    if caller is not None:
        if caller.role == "viewer":
            raise ApiError(403, f"a viewer token may not {verb}")
        if not caller.may_act_on(route_name, ring):
            raise ApiError(403, f"this operator token may not act on {route_name}/{ring}")
    body = await _body(request)
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise ApiError(400, "reason must be a string")
    weight = None
    if trigger is Trigger.SET_WEIGHT:
        raw = body.get("weight")
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ApiError(400, 'weight needs {"weight": PERCENT}')
        if not 0 <= raw <= 100 or abs(round(raw * 100) - raw * 100) > 1e-6:
            raise ApiError(400, f"weight {raw} is not a percentage 0..100 in 0.01 steps")
        weight = round(raw * 100)
    actor = caller.actor if caller else "anonymous"
    done = await _proxy(request).controller.act(route_name, ring, trigger, reason, weight, actor)
    log.info("admin: %s %s %s/%s", actor, verb, route_name, ring)
    return web.json_response({
        "events": [e.as_dict() for e in done],
        "ring": next(r for r in _ring_view(_proxy(request), route_name) if r["name"] == ring),
    })


async def reload(request: web.Request) -> web.Response:
    caller = _caller(request)
    if caller is not None and caller.role != "admin":
        raise ApiError(403, "only an admin token may reload")
    reloader = _proxy(request).reloader
    if reloader is None:
        raise ApiError(409, "this proxy was not started from a config file; nothing to reload")
    result = await reloader.reload(f"api:{caller.actor if caller else 'anonymous'}")
    if result.ok:
        return web.json_response(result.as_dict())
    more = f" (+{len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
    return web.json_response(
        {"error": f"config rejected, still serving {result.revision}: "
                  f"{result.errors[0]}{more}", **result.as_dict()}, status=422)


# --------------------------------------------------------------------------- probes and page


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    proxy = _proxy(request)
    missing = [name for name, pool in proxy.runtime.pools.items() if not pool.started]
    ready = not missing
    return web.json_response(
        {"ready": ready, "revision": proxy.config.revision, "pools_not_started": missing},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    # Rendered on the loop thread, where the recorders are written: a consistent snapshot.
    body, content_type = _proxy(request).metrics.exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


_PAGE: bytes | None = None


async def page(request: web.Request) -> web.Response:
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("proxy.admin").joinpath("status.html").read_bytes()
    return web.Response(body=_PAGE, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'self'; "
                                 "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})


async def no_icon(request: web.Request) -> web.Response:
    return web.Response(status=204)  # keeps browsers from logging a 404 for the page


def admin_app(proxy: Proxy) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[PROXY_KEY] = proxy
    r = app.router
    r.add_get("/", page)
    r.add_get("/favicon.ico", no_icon)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/api/routes", routes)
    r.add_get("/api/routes/{route}", route)
    r.add_get("/api/explain", explain)
    r.add_get("/api/events", events)
    r.add_post("/api/routes/{route}/rings/{ring}/{action}", action)
    r.add_post("/api/reload", reload)
    if not proxy.config.admin.tokens:
        log.warning("admin API: no tokens configured (admin.tokens): read-only, loopback only")
    return app
