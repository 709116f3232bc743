"""Admin API settings: where it listens and who may do what.  Pure: no I/O.

Tokens never live in the file: each entry names an environment variable that holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.config.reader import Ctx, Section, kind
from proxy.config.source import join
from proxy.config.values import Listen, parse_listen

ROLES = ("viewer", "operator", "admin")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class AdminToken:
    env: str  # the variable it came from: how the audit trail names the caller
    role: str  # viewer | operator | admin
    secret: str = field(repr=False, compare=False)
    routes: frozenset[str] | None = None  # operator limited to these routes (None: all)
    rings: frozenset[str] | None = None  # ... and these rings (None: all)

    def may_act_on(self, route: str, ring: str) -> bool:
        if self.role == "admin":
            return True
        return (self.routes is None or route in self.routes) and (
            self.rings is None or ring in self.rings)

    @property
    def actor(self) -> str:
        return f"{self.role}:{self.env}"


@dataclass(frozen=True, slots=True)
class Admin:
    listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", 9901))
    tokens: tuple[AdminToken, ...] = ()
    # May the Rings API write the config file?  None: when the file is writable (a
    # ConfigMap is not), decided when a write comes; False: never, the file lives in Git.
    config_writes: bool | None = None
    # Host names (lower case, no port) the API answers besides loopback names when it
    # runs without tokens: a browser tricked by DNS rebinding sends another name.
    hosts: frozenset[str] = frozenset()


def read_admin(ctx: Ctx, data: object, path: str, environ: dict[str, str]) -> Admin:
    sec = Section(ctx, data, path)
    listen = sec.parsed("listen", parse_listen, Admin().listen)
    tokens: list[AdminToken] = []
    items = sec.items("tokens")
    for i, item in enumerate(items):
        where = join(sec.sub("tokens"), i)
        tsec = Section(ctx, item, where)
        env = tsec.text("env")
        role = tsec.text("role")
        if role and role not in ROLES:
            ctx.err(tsec.sub("role"), f"{role!r} is not one of: {', '.join(ROLES)}")
        routes = _names(ctx, tsec, "routes")
        rings = _names(ctx, tsec, "rings")
        if (routes is not None or rings is not None) and role != "operator":
            ctx.err(where, "routes/rings limits apply to operator tokens only")
        tsec.close()
        if not env:
            continue
        if not _ENV_NAME.match(env):
            ctx.err(tsec.sub("env"), f"{env!r} is not an environment variable name "
                    "(write the variable's name, never the token itself)")
            continue
        secret = environ.get(env)
        if secret is None:
            ctx.err(tsec.sub("env"), f"environment variable {env} is not set")
            continue
        if len(secret) < 16:
            ctx.err(tsec.sub("env"), f"the token in {env} is shorter than 16 characters")
            continue
        if any(t.secret == secret for t in tokens):
            ctx.err(tsec.sub("env"), f"{env} holds the same token as another entry")
            continue
        tokens.append(AdminToken(env, role, secret, routes, rings))
    hosts = _names(ctx, sec, "hosts")
    writes = sec.raw("config_writes", None)
    if writes is not None and not isinstance(writes, bool):
        ctx.err(sec.sub("config_writes"), f"expected true or false, got {writes!r}")
        writes = None
    sec.close()
    return Admin(listen, tuple(tokens), writes,
                 frozenset(h.lower() for h in hosts) if hosts else frozenset())


def _names(ctx: Ctx, sec: Section, key: str) -> frozenset[str] | None:
    if not sec.has(key):
        sec.seen.add(key)
        return None
    raw = sec.raw(key)
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        ctx.err(sec.sub(key), f"expected a list of names, got {kind(raw)}")
        return None
    return frozenset(raw)
