"""What every admin handler reaches for: the proxy it serves and the request's JSON body.

Its own module so that the handler modules (``proxy.admin.api``, ``proxy.admin.rings``)
share it without importing one another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from proxy.errors import ApiError

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.control.controller import Controller
    from proxy.metrics import Metrics
    from proxy.reload import Reloader
    from proxy.runtime import Runtime


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
    @property
    def draining(self) -> bool: ...  # after SIGTERM, for drain_delay: /readyz says 503


PROXY_KEY = web.AppKey("proxy", Proxy)


def proxy_of(request: web.Request) -> Proxy:
    return request.app[PROXY_KEY]


async def json_body(request: web.Request) -> dict[str, object]:
    """The body as a JSON object ({} when there is none); 400 otherwise."""
    if not request.body_exists:  # (read already: ``request.json`` answers from its copy)
        return {}
    try:
        data = await request.json()
    except (ValueError, RecursionError):  # (nesting beyond the decoder's recursion limit)
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


MAX_REASON = 1000  # characters of an action's ``reason`` (kept in events, state and the audit)


def checked_reason(reason: object) -> str:
    """An action's ``reason``: a string of at most MAX_REASON characters; 400 otherwise.
    (Any characters: the process log escapes control characters, JSON does the rest.)"""
    if not isinstance(reason, str):
        raise ApiError(400, "reason must be a string")
    if len(reason) > MAX_REASON:
        raise ApiError(400, f"reason is {len(reason)} characters; at most {MAX_REASON}")
    return reason
