"""Which config changes a reload applies live, and which wait for a restart.  Pure.

``reload_plan(old, new)`` compares two configs key by key against one table, ``KEYS``:
the reload follows the plan it returns instead of deciding key by key where it applies.
A key is *live* when the running proxy takes it at the swap (routing, pools, admin tokens,
which the admin API reads on every request), and *restart* when what it configures was
built at start and is not rebuilt (listening sockets, the shutdown timeout, the state
files the controller writes, the connection cap).  Every field of the model is in the
table, so a new one cannot be silently ignored on reload (``tests/test_reload_plan.py``
checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from proxy.config.model import Config
from proxy.config.values import Listen


class Applies(StrEnum):
    LIVE = "live"  # taken by the running proxy at the swap
    RESTART = "restart"  # only a restart takes it; a reload logs a warning


@dataclass(frozen=True, slots=True)
class Key:
    """A config key the reload knows: its dotted path, when it applies, how to read it."""

    path: str
    applies: Applies
    read: Callable[[Config], object]


KEYS: tuple[Key, ...] = (
    Key("listen", Applies.RESTART, lambda c: c.listen),
    Key("admin.listen", Applies.RESTART, lambda c: c.admin.listen),
    Key("admin.tokens", Applies.LIVE, lambda c: c.admin.tokens),
    # The Rings API reads it at every write.
    Key("admin.config_writes", Applies.LIVE, lambda c: c.admin.config_writes),
    Key("access_log", Applies.LIVE, lambda c: c.access_log),
    Key("shutdown_grace", Applies.RESTART, lambda c: c.shutdown_grace),
    Key("drain_delay", Applies.RESTART, lambda c: c.drain_delay),
    Key("workers", Applies.RESTART, lambda c: c.workers),
    # Read when a connection is accepted, as limits are.
    Key("trusted_proxies", Applies.LIVE, lambda c: c.trusted_proxies),
    Key("admin.hosts", Applies.LIVE, lambda c: c.admin.hosts),
    # Metrics.attach reads it for every new runtime: off drops the per-ring series.
    Key("metrics.enabled", Applies.LIVE, lambda c: c.metrics.enabled),
    Key("state.path", Applies.RESTART, lambda c: c.state.path),
    Key("state.audit", Applies.RESTART, lambda c: c.state.audit),
    # The fleet's member (proxy.fleet) is made at start; the URL shown without its password.
    Key("state.backend", Applies.RESTART,
        lambda c: str(c.state.backend) if c.state.backend else "file"),
    Key("webhooks", Applies.LIVE, lambda c: c.webhooks),
    Key("pools", Applies.LIVE, lambda c: c.pools),
    Key("routes", Applies.LIVE, lambda c: c.routes),
    # The data plane reads config.limits when it accepts a connection: a change applies to
    # the connections accepted after the swap; open ones finish under the limits they had.
    Key("limits.head_timeout", Applies.LIVE, lambda c: c.limits.head_timeout),
    Key("limits.body_timeout", Applies.LIVE, lambda c: c.limits.body_timeout),
    Key("limits.keepalive_timeout", Applies.LIVE, lambda c: c.limits.keepalive_timeout),
    Key("limits.max_request_line", Applies.LIVE, lambda c: c.limits.max_request_line),
    Key("limits.max_head_size", Applies.LIVE, lambda c: c.limits.max_head_size),
    Key("limits.max_headers", Applies.LIVE, lambda c: c.limits.max_headers),
    # The one ConnectionGate of the process is sized at start (with RLIMIT_NOFILE).
    Key("limits.max_connections", Applies.RESTART, lambda c: c.limits.max_connections),
    Key("limits.request_buffer", Applies.LIVE, lambda c: c.limits.request_buffer),
    Key("limits.underscores_in_headers", Applies.LIVE,
        lambda c: c.limits.underscores_in_headers),
    # Read when a tunnel starts, from its client connection's limits (accept time).
    Key("limits.tunnel_idle_timeout", Applies.LIVE, lambda c: c.limits.tunnel_idle_timeout),
    # Set on the process log's handler at the swap.
    Key("log_format", Applies.LIVE, lambda c: c.log_format),
    # Read per request.
    Key("request_id", Applies.LIVE, lambda c: c.request_id),
    # The TLS listener and its CertificateWatcher are built at start.  New contents of the
    # same files need no reload: the watcher loads them when they change.
    Key("listen_tls.listen", Applies.RESTART, lambda c: c.listen_tls and c.listen_tls.listen),
    Key("listen_tls.cert", Applies.RESTART, lambda c: c.listen_tls and c.listen_tls.cert),
    Key("listen_tls.key", Applies.RESTART, lambda c: c.listen_tls and c.listen_tls.key),
)
# Not keys of the file: what the reader adds about it.
NOT_KEYS = frozenset({"revision", "source"})


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    applies: Applies
    old: str  # shown for restart keys only: live ones can be large (routes) or secret
    new: str

    @property
    def message(self) -> str:
        if self.applies is Applies.LIVE:
            return f"config reload: {self.key} changed; applied now"
        return (f"config reload: {self.key} changed from {self.old} to {self.new}; "
                "it takes effect at the next restart")


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What changed between two configs, each change with when it applies."""

    changes: tuple[Change, ...] = ()

    def changed(self, key: str) -> bool:
        return any(c.key == key for c in self.changes)

    @property
    def live(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.applies is Applies.LIVE)

    @property
    def restart(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.applies is Applies.RESTART)


def reload_plan(old: Config, new: Config) -> ReloadPlan:
    changes = []
    for key in KEYS:
        before, after = key.read(old), key.read(new)
        if before == after:
            continue
        if key.applies is Applies.RESTART:
            changes.append(Change(key.path, key.applies, _show(before), _show(after)))
        else:
            changes.append(Change(key.path, key.applies, "", ""))
    return ReloadPlan(tuple(changes))


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, Listen):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}s"
    return repr(value)
