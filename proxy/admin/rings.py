"""The Rings API: rings and pools as managed objects, kept in the config file.

    GET    /api/routes/{route}/rings            ?pool= ?phase= ?active=true
    POST   /api/routes/{route}/rings            ?before=RING  (default: before the default)
    GET    /api/routes/{route}/rings/{ring}
    PUT    /api/routes/{route}/rings/{ring}     the whole ring
    PATCH  /api/routes/{route}/rings/{ring}     a JSON merge patch (RFC 7396)
    DELETE /api/routes/{route}/rings/{ring}
    GET    /api/pools,  POST /api/pools          (the body names the pool: {"name": ...})
    GET/PUT/PATCH/DELETE /api/pools/{pool}

A ring is answered as ``{route, name, position, spec, status}``: ``spec`` as the file
writes it (``${VAR}`` references unexpanded, so no secret shows), ``status`` what the
running proxy does with it (live weight, phase, active) or null while it is in the file
only.  Every answer carries the file's revision as its ``ETag``; a write takes ``If-Match``
(stale: 412) and answers with the new revision and its audit event.  How a write reaches
the file is ``proxy.admin.configfile``'s job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.admin.auth import Caller, Denied, Target
from proxy.admin.configfile import (
    WRITE_LOCK_KEY,
    Change,
    Snapshot,
    Written,
    change,
    etag,
    snapshot,
)
from proxy.admin.context import Proxy, checked_reason, json_body, proxy_of
from proxy.admin.resources import CredentialView, Pool, PoolStatus, Ring, RingStatus, Spec
from proxy.config.credentials import REDACTED
from proxy.config.edit import Document
from proxy.errors import ApiError

# --------------------------------------------------------------------------- views


def ring_status(proxy: Proxy, route: str, name: str) -> RingStatus | None:
    runtime = proxy.runtime
    compiled = runtime.table.routes.get(route)
    index = compiled.ring_index.get(name) if compiled is not None else None
    if compiled is None or index is None:
        return None
    ring = compiled.route.rings[index]
    weight = runtime.rings[route][index].weight
    state = proxy.controller.states.get(route, {}).get(name)
    default = index == len(compiled.route.rings) - 1
    enabled = state.enabled if state is not None else True
    return {
        "weight": weight,
        "phase": state.phase.value if state is not None else None,
        "default": default,
        "active": enabled and (default or (weight or 0) > 0 or bool(ring.rules)),
    }


def _ring(proxy: Proxy, route: str, position: int, spec: Spec, rev: str) -> Ring:
    name = str(spec.get("name"))
    return {"route": route, "name": name, "position": position, "spec": spec,
            "status": ring_status(proxy, route, name), "revision": rev}


def pool_status(proxy: Proxy, name: str) -> PoolStatus | None:
    pool = proxy.runtime.pools.get(name)
    if pool is None:
        return None
    rings = [f"{route}/{ring.name}" for route, compiled in proxy.runtime.table.routes.items()
             for ring in compiled.route.rings if ring.pool == name]
    credentials: list[CredentialView] = [
        {"header": c.header, "value": REDACTED, "variables": list(c.variables),
         "shared": c.shared} for c in pool.config.auth]
    return {"servers": [s.url for s in pool.config.servers], "rings": rings,
            "environment": pool.config.environment, "credentials": credentials}


def _pool(proxy: Proxy, name: str, spec: Spec, rev: str) -> Pool:
    return {"name": name, "spec": spec, "status": pool_status(proxy, name), "revision": rev}


def _answer(data: object, rev: str, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"ETag": etag(rev)})


async def _read(proxy: Proxy) -> tuple[Snapshot, Document]:
    """The file now, parsed for reading (in a thread: a big file takes a while)."""
    snap = await snapshot(proxy)
    return snap, await asyncio.to_thread(Document, snap.text)


def _filtered(rings: list[Ring], request: web.Request) -> list[Ring]:
    pool = request.query.get("pool")
    phase = request.query.get("phase")
    active = request.query.get("active")
    if active not in (None, "true", "false"):
        raise ApiError(400, f"active={active!r}: expected true or false")
    out = []
    for ring in rings:
        status = ring["status"]
        if pool is not None and ring["spec"].get("pool") != pool:
            continue
        if phase is not None and (status is None or status["phase"] != phase):
            continue
        if active is not None and (status is not None and status["active"]) != (
                active == "true"):
            continue
        out.append(ring)
    return out


# --------------------------------------------------------------------------- targets


async def ring_target(request: web.Request) -> Target | Denied:
    """The ring a write names (the URL's, or for a create the body's ``name``)."""
    route = request.match_info["route"]
    verbs = {"POST": "create rings", "PUT": "update rings", "PATCH": "update rings",
             "DELETE": "delete rings"}
    ring = request.match_info.get("ring")
    if ring is None:
        try:
            body = await json_body(request)
        except ApiError as exc:
            return Denied(exc.status, exc.message)
        spec = body.get("spec", body)
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name:
            return Denied(400, 'a new ring needs its name in the body: {"name": ..., '
                               '"pool": ...}')
        ring = name
    return Target(route, ring, verbs.get(request.method, "change rings"))


# --------------------------------------------------------------------------- handlers


async def list_rings(request: web.Request, caller: Caller) -> web.Response:
    proxy = proxy_of(request)
    route = request.match_info["route"]
    snap, document = await _read(proxy)
    specs = document.rings(route)
    rings = [_ring(proxy, route, i, spec, snap.revision) for i, spec in enumerate(specs)]
    return _answer({"route": route, "revision": snap.revision,
                    "rings": _filtered(rings, request)}, snap.revision)


async def get_ring(request: web.Request, caller: Caller) -> web.Response:
    proxy = proxy_of(request)
    route, name = request.match_info["route"], request.match_info["ring"]
    snap, document = await _read(proxy)
    ring = _find(proxy, snap.revision, document, route, name)
    if ring is None:
        raise ApiError(404, f"route {route!r} has no ring {name!r}")
    return _answer({"revision": snap.revision, "ring": ring}, snap.revision)


def _find(proxy: Proxy, rev: str, document: Document, route: str, name: str
          ) -> Ring | None:
    for position, spec in enumerate(document.rings(route)):
        if spec.get("name") == name:
            return _ring(proxy, route, position, spec, rev)
    return None


def _reason(body: dict[str, Any]) -> str:
    return checked_reason(body.pop("reason", "") if "spec" in body else "")


def _spec(body: dict[str, Any]) -> Spec:
    """The ring or pool a body describes: the body itself, or its ``spec`` (then a
    ``reason`` beside it goes into the audit trail)."""
    spec = body.get("spec", body)
    if not isinstance(spec, dict):
        raise ApiError(400, "spec must be a JSON object")
    return spec


async def _written_ring(request: web.Request, written: Written, route: str, name: str,
                        status: int = 200) -> web.Response:
    proxy = proxy_of(request)
    snap, document = await _read(proxy)
    return _answer({"revision": written.revision, "previous_revision": written.previous,
                    "changed": written.event is not None,
                    "ring": _find(proxy, snap.revision, document, route, name),
                    "event": written.event}, snap.revision, status)


def _write(request: web.Request, caller: Caller, what: Change,
           edit: Callable[[Document], object]) -> Awaitable[Written]:
    return change(proxy_of(request), request.app[WRITE_LOCK_KEY], caller.actor,
                  request.headers.get("If-Match"), what, edit)


async def create_ring(request: web.Request, caller: Caller) -> web.Response:
    route = request.match_info["route"]
    body = await json_body(request)
    reason = _reason(body)
    spec = _spec(body)
    name = str(spec.get("name"))
    before = request.query.get("before")
    written = await _write(request, caller, Change("create", route, name, "", reason),
                           lambda d: d.create_ring(route, spec, before))
    response = await _written_ring(request, written, route, name, 201)
    response.headers["Location"] = f"/api/routes/{route}/rings/{name}"
    return response


async def put_ring(request: web.Request, caller: Caller) -> web.Response:
    route, name = request.match_info["route"], request.match_info["ring"]
    body = await json_body(request)
    reason = _reason(body)
    spec = _spec(body)
    written = await _write(request, caller, Change("update", route, name, "", reason),
                           lambda d: d.replace_ring(route, name, spec))
    return await _written_ring(request, written, route, name)


async def patch_ring(request: web.Request, caller: Caller) -> web.Response:
    route, name = request.match_info["route"], request.match_info["ring"]
    body = await json_body(request)
    reason = _reason(body)
    patch = _spec(body)
    if "name" in patch and patch["name"] != name:
        raise ApiError(400, "a ring is not renamed (create the new one, then delete the old)")
    written = await _write(request, caller, Change("update", route, name, "", reason),
                           lambda d: d.patch_ring(route, name, patch))
    return await _written_ring(request, written, route, name)


async def delete_ring(request: web.Request, caller: Caller) -> web.Response:
    route, name = request.match_info["route"], request.match_info["ring"]
    reason = request.query.get("reason", "")
    written = await _write(request, caller, Change("delete", route, name, "", reason),
                           lambda d: d.delete_ring(route, name))
    return _answer({"revision": written.revision, "previous_revision": written.previous,
                    "changed": written.event is not None, "event": written.event},
                   written.revision)


# --------------------------------------------------------------------------- pools


async def list_pools(request: web.Request, caller: Caller) -> web.Response:
    proxy = proxy_of(request)
    snap, document = await _read(proxy)
    pools = [_pool(proxy, name, spec, snap.revision)
             for name, spec in document.pools().items()]
    return _answer({"revision": snap.revision, "pools": pools}, snap.revision)


async def get_pool(request: web.Request, caller: Caller) -> web.Response:
    proxy = proxy_of(request)
    name = request.match_info["pool"]
    snap, document = await _read(proxy)
    return _answer({"revision": snap.revision,
                    "pool": _pool(proxy, name, document.pool(name), snap.revision)},
                   snap.revision)


async def _written_pool(request: web.Request, written: Written, name: str,
                        status: int = 200) -> web.Response:
    proxy = proxy_of(request)
    snap, document = await _read(proxy)
    return _answer({"revision": written.revision, "previous_revision": written.previous,
                    "changed": written.event is not None,
                    "pool": _pool(proxy, name, document.pool(name), snap.revision),
                    "event": written.event}, snap.revision, status)


async def create_pool(request: web.Request, caller: Caller) -> web.Response:
    body = await json_body(request)
    reason = _reason(body)
    spec = dict(_spec(body))
    name = spec.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ApiError(400, 'a new pool needs its name in the body: {"name": ..., '
                            '"servers": [...]}')
    written = await _write(request, caller, Change("create", "", "", name, reason),
                           lambda d: d.create_pool(name, spec))
    response = await _written_pool(request, written, name, 201)
    response.headers["Location"] = f"/api/pools/{name}"
    return response


def _pool_body(spec: Spec, name: str) -> Spec:
    given = spec.get("name", name)
    if given != name:
        raise ApiError(400, "a pool is not renamed (create the new one, move its rings, "
                            "then delete the old)")
    return {k: v for k, v in spec.items() if k != "name"}


async def put_pool(request: web.Request, caller: Caller) -> web.Response:
    name = request.match_info["pool"]
    body = await json_body(request)
    reason = _reason(body)
    spec = _pool_body(_spec(body), name)
    written = await _write(request, caller, Change("update", "", "", name, reason),
                           lambda d: d.replace_pool(name, spec))
    return await _written_pool(request, written, name)


async def patch_pool(request: web.Request, caller: Caller) -> web.Response:
    name = request.match_info["pool"]
    body = await json_body(request)
    reason = _reason(body)
    patch = _pool_body(_spec(body), name)
    written = await _write(request, caller, Change("update", "", "", name, reason),
                           lambda d: d.patch_pool(name, patch))
    return await _written_pool(request, written, name)


async def delete_pool(request: web.Request, caller: Caller) -> web.Response:
    name = request.match_info["pool"]
    reason = request.query.get("reason", "")
    written = await _write(request, caller, Change("delete", "", "", name, reason),
                           lambda d: d.delete_pool(name))
    return _answer({"revision": written.revision, "previous_revision": written.previous,
                    "changed": written.event is not None, "event": written.event},
                   written.revision)
