"""A small typed Python SDK for a running ringproxy's admin API (the CLI's own client).

    from proxy.client import Client

    client = Client("http://127.0.0.1:9901", token=os.environ["RINGPROXY_ADMIN_TOKEN"])
    ring = client.rings.create("api", {"name": "beta", "pool": "canary", "weight": 5})
    client.rings.update("api", "beta", {"weight": 10}, if_match=ring["revision"])
    client.promote("api", "canary", reason="dashboards look good")
    for event in client.events(route="api"):
        print(event["kind"], event["ring"], event["actor"])

``client.rings`` and ``client.pools`` create, list, get, update (a JSON merge patch;
``replace=True`` for the whole object) and delete what the config file holds; the rollout
actions (promote, approve, pause, resume, rollback, set_weight), ``status``, ``explain``,
``events`` and ``reload`` drive the running proxy.  Plain ``urllib``, no event loop.  Every
failure is an ``AdminClientError`` with a one-line message and, when the API answered,
its ``http_status`` (412: the file changed since ``if_match``; 409: read-only or exists).
Calls to a loopback address never go through ``http_proxy``.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, cast

from proxy.admin.resources import ConfigEvent, Pool, Ring, Spec, Written
from proxy.errors import AdminClientError

DEFAULT_URL = "http://127.0.0.1:9901"

# A JSON object as the API answers it.
Answer = dict[str, Any]


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_url(request: urllib.request.Request, timeout: float) -> bytes:
    """The answer's body; loopback never goes through a proxy from the environment."""
    handlers: list[urllib.request.BaseHandler] = []
    if is_loopback(request.full_url):
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    with opener.open(request, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _error_of(exc: urllib.error.HTTPError) -> str | None:
    """The API's ``{"error": ...}`` message; None when the answer has none (another server)."""
    try:
        answer = json.loads(exc.read())
    except ValueError:
        return None
    finally:
        exc.close()
    message = answer.get("error") if isinstance(answer, dict) else None
    return str(message) if message else None


class Client:
    """The admin API at ``url`` (the admin listener, ``admin.listen``)."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None,
                 timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.rings = Rings(self)
        self.pools = Pools(self)

    def __repr__(self) -> str:
        return f"<Client {self.url} token={'set' if self.token else 'none'}>"

    def call(self, method: str, path: str, body: object | None = None,
             expect: str | None = None, if_match: str | None = None) -> Answer:
        """One request; ``expect``: a key the answer always has (else: not a ringproxy)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if if_match is not None:
            request.add_header("If-Match", f'"{if_match.strip(chr(34))}"')
        try:
            answer = json.loads(open_url(request, self.timeout) or b"null")
        except urllib.error.HTTPError as exc:
            message = _error_of(exc)
            if message is None:
                raise AdminClientError(
                    f"{self.url} is not a ringproxy admin API (HTTP {exc.code} {exc.reason} "
                    f"to {path.split('?')[0]}, without the API's JSON error); --admin takes "
                    "the admin listener's URL (admin.listen)", exc.code) from None
            raise AdminClientError(f"{message} (HTTP {exc.code})", exc.code) from None
        except urllib.error.URLError as exc:
            raise AdminClientError(f"cannot reach the admin API at {self.url}: "
                                   f"{exc.reason}") from None
        except (TimeoutError, ValueError) as exc:
            raise AdminClientError(f"{self.url} is not a ringproxy admin API (its answer to "
                                   f"{path} is not JSON: {exc})") from None
        if not isinstance(answer, dict) or (expect is not None and expect not in answer):
            shape = f"no {expect!r} in" if isinstance(answer, dict) else "not a JSON object:"
            raise AdminClientError(
                f"{self.url} is not a ringproxy admin API ({shape} its answer to {path}); "
                "--admin takes the admin listener's URL (admin.listen)")
        return answer

    # ------------------------------------------------------------------ the running proxy

    def status(self) -> Answer:
        """Every route with its rings: live weights, phases, verdicts, traffic."""
        return self.call("GET", "/api/routes", expect="routes")

    def explain(self, route: str, headers: list[tuple[str, str]] | None = None,
                cookies: list[tuple[str, str]] | None = None,
                query: list[tuple[str, str]] | None = None, ip: str | None = None,
                path: str = "/", method: str = "GET") -> Answer:
        """The running proxy's decision for such a request, at its live weights."""
        params: list[tuple[str, str]] = [("route", route), ("path", path), ("method", method)]
        params += [("header", f"{k}:{v}") for k, v in headers or ()]
        params += [("cookie", f"{k}:{v}") for k, v in cookies or ()]
        params += [("query", f"{k}:{v}") for k, v in query or ()]
        if ip is not None:
            params.append(("ip", ip))
        return self.call("GET", "/api/explain?" + urllib.parse.urlencode(params), expect="ring")

    def events(self, route: str | None = None, since: float | None = None
               ) -> list[dict[str, Any]]:
        """The audit trail, oldest first: rollout events and config changes."""
        if route is not None:
            # An unknown route is an error, as everywhere else (the API filters silently).
            self.call("GET", f"/api/routes/{_quote(route)}", expect="name")
        query = {k: v for k, v in (("route", route), ("since", since)) if v is not None}
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        events = self.call("GET", "/api/events" + suffix, expect="events")["events"]
        return [e for e in events if isinstance(e, dict)] if isinstance(events, list) else []

    def reload(self) -> Answer:
        """Reload the config file now: ``{ok, changed, revision, ...}``."""
        return self.call("POST", "/api/reload", {}, expect="revision")

    # ------------------------------------------------------------------ rollout actions

    def act(self, route: str, ring: str, action: str,
            body: Mapping[str, object] | None = None) -> Answer:
        """A rollout action: ``{events, ring}`` (the ring as it is after it)."""
        return self.call("POST", f"/api/routes/{_quote(route)}/rings/{_quote(ring)}/{action}",
                         dict(body or {}), expect="ring")

    def promote(self, route: str, ring: str, reason: str = "") -> Answer:
        return self.act(route, ring, "promote", {"reason": reason})

    def approve(self, route: str, ring: str, reason: str = "") -> Answer:
        return self.act(route, ring, "approve", {"reason": reason})

    def pause(self, route: str, ring: str, reason: str = "") -> Answer:
        return self.act(route, ring, "pause", {"reason": reason})

    def resume(self, route: str, ring: str, reason: str = "") -> Answer:
        return self.act(route, ring, "resume", {"reason": reason})

    def rollback(self, route: str, ring: str, reason: str = "") -> Answer:
        return self.act(route, ring, "rollback", {"reason": reason})

    def set_weight(self, route: str, ring: str, percent: float, reason: str = "") -> Answer:
        """Set a ring's live weight (pauses its progression; the file is not changed)."""
        return self.act(route, ring, "weight", {"weight": percent, "reason": reason})


def _written(answer: Answer) -> Written:
    return cast(Written, answer)


def _wrapped(spec: Spec, reason: str) -> dict[str, object]:
    return {"spec": spec, "reason": reason} if reason else dict(spec)


class Rings:
    """A route's rings as the config file holds them (``client.rings``)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _path(self, route: str, name: str | None = None) -> str:
        base = f"/api/routes/{_quote(route)}/rings"
        return base if name is None else f"{base}/{_quote(name)}"

    def list(self, route: str, pool: str | None = None, phase: str | None = None,
             active: bool | None = None) -> list[Ring]:
        """The route's rings in order, optionally only those sent to ``pool``, in ``phase``,
        or (in)active (taking traffic: the default, a weight above 0, rules not rolled
        back)."""
        query = {k: v for k, v in (("pool", pool), ("phase", phase),
                                   ("active", None if active is None else str(active).lower()))
                 if v is not None}
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        answer = self._client.call("GET", self._path(route) + suffix, expect="rings")
        return cast(list[Ring], answer["rings"])

    def get(self, route: str, name: str) -> Ring:
        return cast(Ring, self._client.call("GET", self._path(route, name), expect="ring")
                    ["ring"])

    def create(self, route: str, spec: Spec, before: str | None = None,
               if_match: str | None = None, reason: str = "") -> Ring:
        """Add a ring (``spec`` names it); by default just before the default ring."""
        suffix = "?" + urllib.parse.urlencode({"before": before}) if before else ""
        answer = self._client.call("POST", self._path(route) + suffix, _wrapped(spec, reason),
                                   expect="revision", if_match=if_match)
        return cast(Ring, answer["ring"])

    def update(self, route: str, name: str, spec: Spec, if_match: str | None = None,
               replace: bool = False, reason: str = "") -> Written:
        """Change a ring: ``spec`` is a JSON merge patch (None removes a key), or with
        ``replace`` the whole ring."""
        return _written(self._client.call("PUT" if replace else "PATCH", self._path(route, name),
                                          _wrapped(spec, reason), expect="revision",
                                          if_match=if_match))

    def delete(self, route: str, name: str, if_match: str | None = None,
               reason: str = "") -> Written:
        suffix = "?" + urllib.parse.urlencode({"reason": reason}) if reason else ""
        return _written(self._client.call("DELETE", self._path(route, name) + suffix,
                                          expect="revision", if_match=if_match))


class Pools:
    """The upstream pools the config file holds (``client.pools``; writes need admin)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _path(self, name: str | None = None) -> str:
        return "/api/pools" if name is None else f"/api/pools/{_quote(name)}"

    def list(self) -> list[Pool]:
        return cast(list[Pool], self._client.call("GET", self._path(), expect="pools")["pools"])

    def get(self, name: str) -> Pool:
        return cast(Pool, self._client.call("GET", self._path(name), expect="pool")["pool"])

    def create(self, name: str, spec: Spec, if_match: str | None = None,
               reason: str = "") -> Pool:
        answer = self._client.call("POST", self._path(), _wrapped({"name": name, **spec},
                                                                  reason),
                                   expect="revision", if_match=if_match)
        return cast(Pool, answer["pool"])

    def update(self, name: str, spec: Spec, if_match: str | None = None,
               replace: bool = False, reason: str = "") -> Written:
        return _written(self._client.call("PUT" if replace else "PATCH", self._path(name),
                                          _wrapped(spec, reason), expect="revision",
                                          if_match=if_match))

    def delete(self, name: str, if_match: str | None = None, reason: str = "") -> Written:
        suffix = "?" + urllib.parse.urlencode({"reason": reason}) if reason else ""
        return _written(self._client.call("DELETE", self._path(name) + suffix,
                                          expect="revision", if_match=if_match))


__all__ = ["DEFAULT_URL", "AdminClientError", "Client", "ConfigEvent", "Pool", "Pools",
           "Ring", "Rings", "Written", "is_loopback"]
