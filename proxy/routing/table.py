"""The routing table: the compiled, immutable form of a Config that requests look up.

Built once per config; a reload builds a new one and swaps a single reference, so a
request that started on the old table finishes on it.  Route matching is "first route in
file order whose host and path prefix match", worked out from precomputed candidate lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import Config, Route
from proxy.routing.assign import CompiledRoute, compile_route


def normalize_host(host: str) -> str:
    """``API.example.com:8080`` -> ``api.example.com``; ``[::1]:80`` -> ``[::1]``."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    return host.partition(":")[0].lower().rstrip(".")


class _Slot:
    """Where a route's compiled form lives; the rollout loop replaces it (live weights)."""

    __slots__ = ("compiled",)

    def __init__(self, compiled: CompiledRoute) -> None:
        self.compiled = compiled


@dataclass(frozen=True, slots=True)
class _Candidate:
    slot: _Slot
    prefix: str
    wildcard: str  # ".example.com" for "*.example.com", else ""
    # A path prefix matches: "/api" matches "/api" and "/api/..." but not "/apiary"; "/"
    # and "/api/" are plain (a startswith).  (``match`` tests it inline: a call less.)
    plain: bool  # the prefix ends with "/"


# Host header values repeat (a handful per site), so match() remembers their normal form.
# Bounded: at most _HOSTS_MAX entries of at most _HOST_MAX_LEN characters (the Host header
# is the client's to choose); a full cache is emptied and refilled.
_HOSTS_MAX = 1024
_HOST_MAX_LEN = 255


class RoutingTable:
    __slots__ = ("_by_host", "_fallback", "_hosts", "_slots", "config", "routes")

    def __init__(self, config: Config) -> None:
        self.config = config
        self.routes = {r.name: compile_route(r, config.revision) for r in config.routes}
        self._slots = {name: _Slot(compiled) for name, compiled in self.routes.items()}
        every: list[tuple[Route, _Candidate]] = []
        for route in config.routes:
            slot = self._slots[route.name]
            if not route.hosts:
                every.append((route, _Candidate(slot, route.path_prefix, "",
                                                 route.path_prefix.endswith("/"))))
            for h in route.hosts:
                wild = h[1:] if h.startswith("*.") else ""
                every.append((route, _Candidate(slot, route.path_prefix, wild,
                                                 route.path_prefix.endswith("/"))))
        exact_hosts = {h for r in config.routes for h in r.hosts if not h.startswith("*.")}
        # For a configured exact host: every candidate that could match it, in file order.
        self._by_host: dict[str, tuple[_Candidate, ...]] = {
            host: tuple(
                c for route, c in every
                if not route.hosts
                or host in route.hosts
                or (c.wildcard and host.endswith(c.wildcard))
            )
            for host in exact_hosts
        }
        # For any other host: wildcard and any-host candidates, checked per request.
        self._fallback = tuple(c for route, c in every if not route.hosts or c.wildcard)
        self._hosts: dict[str, str] = {}  # Host header value -> normalize_host(value)

    def set_route(self, compiled: CompiledRoute) -> None:
        """Replace a route's compiled form (same route, new live weights): one assignment."""
        name = compiled.route.name
        if name not in self._slots:
            raise KeyError(name)
        self.routes[name] = compiled
        self._slots[name].compiled = compiled

    def match(self, host: str, path: str) -> CompiledRoute | None:
        name = self._hosts.get(host)
        if name is None:
            name = normalize_host(host)
            if len(host) <= _HOST_MAX_LEN:
                if len(self._hosts) >= _HOSTS_MAX:
                    self._hosts.clear()
                self._hosts[host] = name
        candidates = self._by_host.get(name)
        if candidates is not None:
            for c in candidates:
                prefix = c.prefix
                if path.startswith(prefix) and (
                        c.plain or len(path) == len(prefix) or path[len(prefix)] == "/"):
                    return c.slot.compiled
            return None
        for c in self._fallback:
            if c.wildcard and not name.endswith(c.wildcard):
                continue
            prefix = c.prefix
            if path.startswith(prefix) and (
                    c.plain or len(path) == len(prefix) or path[len(prefix)] == "/"):
                return c.slot.compiled
        return None

    def __repr__(self) -> str:
        return (f"<RoutingTable revision={self.config.revision} routes={len(self.routes)} "
                f"pools={len(self.config.pools)}>")
