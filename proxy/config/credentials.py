"""Per-pool upstream credentials: ``auth`` headers, client TLS (``tls``), ``environment``.

A pool may carry credentials the proxy adds to every request it sends to that pool's
servers (``auth``: one header or a list, each ``{header, value, shared}``) and the TLS
settings of its ``https://`` servers (``tls``: ``ca``, ``cert``/``key`` for mTLS,
``server_name``, ``verify``).  A credential's value always comes from the environment:
it must name at least one ``${VAR}`` and no ``${VAR:-default}`` (a default would put the
secret in the file), so the file, the Rings API and audit diffs only ever hold the names.

Isolation, checked at load (``check_isolation``; every violation is an issue with its path):

- a credential variable belongs to one pool, unless every pool that uses it says
  ``shared: true`` for it;
- a pool whose ``environment`` is not ``production`` never carries a production pool's
  credential: not its variable (``shared`` or not) and not its value under another name
  (the whole header value, and each variable's value on its own);
  A ring sends only its own pool's credentials (``on_pool_down: next_ring`` sends a later
  ring's request with that ring's pool's), so no ring on a non-production pool can send one;
- a credential variable is used only in ``pools.*.auth`` (not in ``add_headers``, rules,
  health-check or hook headers, ...), nor its value under another variable, and a ring's
  ``add_headers`` never sets its pool's credential header.

A pool that sends its credentials over plain ``http://`` or without verifying its
``https://`` servers is warned about at each load (``plaintext_credentials``: logged,
so ``ringproxy check`` shows it too).

Secrets are held in :class:`Secret`, whose ``repr``/``str`` is ``***``: a model printed
or logged never shows one, and no message here quotes one.  Limits: the header values
are latin-1 text without control characters; a TLS key is an unencrypted PEM file (as
``listen_tls``); active health checks do not carry ``auth`` (point them at a path that
needs none) but do use the pool's TLS settings, client certificate included.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.config.limits import load_certificate
from proxy.config.reader import Ctx, Section, kind
from proxy.config.source import join, unset_variable
from proxy.config.values import TOKEN_RE

log = logging.getLogger("ringproxy.config")

REDACTED = "***"
PRODUCTION = "production"
# Words that look meant as production but would not be protected as such.
_PRODUCTION_LOOKALIKES = frozenset({"prod", "prd", "live", "productive", "prod-env"})
# Headers the proxy itself sets or that never cross it: a credential cannot be one.
_PROXY_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive",
    "proxy-connection", "te", "trailer", "upgrade", "expect", "x-forwarded-for",
    "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id", "x-ring",
    "x-ring-reason", "proxy-authorization",
})


class Secret:
    """A credential's value: shown as ``***`` everywhere; ``reveal()`` is the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Credential:
    """One header the proxy sets on every request to the pool (the client's is removed)."""

    header: str
    value: Secret
    variables: tuple[str, ...]  # the environment variables the value is made of
    shared: bool = False  # other pools may use the same variables (never a lower environment)


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """How the pool's ``https://`` servers are spoken to."""

    ca: str | None = None  # PEM bundle to verify servers with; None: the system's store
    cert: str | None = None  # client certificate (mTLS), PEM path; with ``key``
    key: str | None = None  # its unencrypted PEM private key
    server_name: str | None = None  # SNI and the name verified; None: the server's host
    verify: bool = True  # False: no certificate or name verification (test setups only)


def tls_stamp(tls: UpstreamTLS | None) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of each file ``tls`` names (-1s for one that cannot be read):
    compared with the settings, it tells a renewed certificate at the same path from the
    one a context was built with (a reload builds a new context for it)."""
    if tls is None:
        return ()
    out = []
    for path in (tls.ca, tls.cert, tls.key):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append((path, -1, -1))
        else:
            out.append((path, st.st_mtime_ns, st.st_size))
    return tuple(out)


def client_context(tls: UpstreamTLS | None) -> ssl.SSLContext:
    """The client SSLContext for a pool (raises ``ValueError`` with a plain message)."""
    if tls is None:
        return ssl.create_default_context()
    try:
        context = ssl.create_default_context(cafile=tls.ca)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"cannot load the CA bundle {tls.ca}: {reason}") from exc
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert is not None and tls.key is not None:
        load_certificate(context, tls.cert, tls.key)
    return context


def read_environment(ctx: Ctx, sec: Section) -> str | None:
    """A pool's ``environment``: a free word; ``production`` is the protected one."""
    if not sec.has("environment"):
        sec.seen.add("environment")
        return None
    value = sec.text("environment")
    word = value.strip()
    if not word or not TOKEN_RE.match(word):
        ctx.err(sec.sub("environment"), f"{value!r} is not an environment name; write one "
                "word, e.g. production or staging")
        return None
    if word != PRODUCTION and word.lower() in _PRODUCTION_LOOKALIKES | {PRODUCTION}:
        ctx.err(sec.sub("environment"), f"{value!r}: write production (the one word the "
                "credential isolation protects)")
        return None
    return word


def read_auth(ctx: Ctx, data: object, path: str) -> tuple[Credential, ...]:
    """``auth``: one ``{header, value, shared}`` mapping or a list of them."""
    if data is None:
        return ()
    items = data if isinstance(data, list) else [data]
    if isinstance(data, list) and not data:
        ctx.err(path, "an empty list; leave auth out for no credentials")
    out: list[Credential] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        ipath = join(path, i) if isinstance(data, list) else path
        cred = _read_credential(ctx, item, ipath)
        if cred is None:
            continue
        lower = cred.header.lower()
        if lower in seen:
            ctx.err(join(ipath, "header"), f"{cred.header} is set twice in this pool's auth")
            continue
        seen[lower] = i
        out.append(cred)
    return tuple(out)


def _read_credential(ctx: Ctx, data: object, path: str) -> Credential | None:
    if not isinstance(data, dict):
        ctx.err(path, f"expected a mapping {{header: ..., value: ${{VAR}}}}, got {kind(data)}")
        return None
    sec = Section(ctx, data, path)
    header = sec.text("header")
    has_value = sec.has("value")
    raw_value = sec.raw("value")
    shared = sec.flag("shared", False)
    sec.close()
    vpath = sec.sub("value")
    ok = True
    if header and not TOKEN_RE.match(header):
        ctx.err(sec.sub("header"), f"{header!r} is not a valid header name")
        ok = False
    elif header.lower() in _PROXY_HEADERS:
        ctx.err(sec.sub("header"), f"{header} is set or removed by the proxy itself; it "
                "cannot be a credential")
        ok = False
    if not has_value:
        return None
    if not isinstance(raw_value, str):
        # Never the value itself in a message: it may be a secret written in by mistake.
        ctx.err(vpath, f"expected a string naming an environment variable, e.g. "
                f"${{API_TOKEN}}, got {kind(raw_value)}")
        return None
    refs = ctx.env_refs.get(vpath, [])
    if not refs:
        ctx.err(vpath, "a credential comes from the environment: write ${VAR} (e.g. "
                "'Bearer ${API_TOKEN}'), never the secret itself (the value is not shown)")
        return None
    defaulted = [name for name, has_default in refs if has_default]
    if defaulted:
        ctx.err(vpath, f"${{{defaulted[0]}:-...}}: a credential has no default (it would "
                f"put a secret in the file); write ${{{defaulted[0]}}}")
        return None
    names = tuple(dict.fromkeys(name for name, _ in refs))
    set_somewhere = vpath in ctx.env_paths
    if set_somewhere and not raw_value.strip():
        ctx.err(vpath, f"{', '.join(names)} is empty: a credential needs a value")
        ok = False
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in raw_value):
        ctx.err(vpath, f"the value of {', '.join(names)} holds a control character "
                "(a line break?); a header value cannot")
        ok = False
    else:
        try:
            raw_value.encode("latin-1")
        except UnicodeEncodeError:
            ctx.err(vpath, f"the value of {', '.join(names)} is not latin-1 text; a header "
                    "value must be")
            ok = False
    if not ok or not header:
        return None
    # A variable left unset (an issue already; a warning under ``check --env-optional``)
    # leaves no value to compare: an empty one, never equal to another pool's.
    unset = any(i.path == vpath and unset_variable(i) for i in ctx.issues)
    return Credential(header, Secret("" if unset else raw_value.strip()), names, shared)


def read_tls(ctx: Ctx, data: object, path: str, has_https: bool) -> UpstreamTLS | None:
    """``tls``: CA, client certificate and key, server name, verify; loaded here to check."""
    if data is None:
        return None
    sec = Section(ctx, data, path)
    ca = sec.text("ca", None) or None
    cert = sec.text("cert", None) or None
    key = sec.text("key", None) or None
    server_name = sec.text("server_name", None) or None
    verify = sec.flag("verify", True)
    sec.close()
    if not sec.ok:
        return None
    if not has_https:
        ctx.err(path, "tls applies to https:// servers; this pool has none")
        return None
    for name, value in (("ca", ca), ("cert", cert), ("key", key)):
        if value is not None and "-----BEGIN" in value:
            ctx.err(sec.sub(name), "write the path of the PEM file, never its contents")
            return None
    if (cert is None) != (key is None):
        missing = "key" if key is None else "cert"
        ctx.err(sec.sub(missing), "a client certificate needs both cert and key")
        return None
    if server_name is not None and (not TOKEN_RE.match(server_name) or "/" in server_name):
        ctx.err(sec.sub("server_name"), f"{server_name!r} is not a host name")
        return None
    tls = UpstreamTLS(ca, cert, key, server_name, verify)
    try:
        client_context(tls)
    except ValueError as exc:
        ctx.err(path, str(exc))
        return None
    return tls


class _Pool(Protocol):
    """What the isolation check reads of a pool (proxy.config.model.Pool)."""

    @property
    def name(self) -> str: ...
    @property
    def environment(self) -> str | None: ...
    @property
    def auth(self) -> tuple[Credential, ...]: ...


def check_isolation(ctx: Ctx, pools: Sequence[_Pool], path: str = "pools") -> None:
    """Record an issue for every credential that could reach a pool it does not belong to."""
    users: dict[str, list[tuple[_Pool, int, Credential]]] = {}
    for pool in pools:
        for i, cred in enumerate(pool.auth):
            for name in cred.variables:
                users.setdefault(name, []).append((pool, i, cred))

    def where(pool: _Pool, i: int) -> str:
        return join(join(join(path, pool.name), "auth"), i) if len(pool.auth) > 1 or \
            _is_list(ctx, join(join(path, pool.name), "auth")) else \
            join(join(path, pool.name), "auth")

    for name, uses in users.items():
        owners = list(dict.fromkeys(pool.name for pool, _, _ in uses))
        if len(owners) > 1:
            for pool, i, cred in uses:
                if not cred.shared:
                    others = ", ".join(o for o in owners if o != pool.name)
                    ctx.err(join(where(pool, i), "shared"),
                            f"{name} is also a credential of pool {others}; a credential "
                            "variable belongs to one pool unless every pool using it says "
                            "shared: true")
        production = [p.name for p, _, _ in uses if p.environment == PRODUCTION]
        if production:
            for pool, i, _cred in uses:
                if pool.environment != PRODUCTION:
                    ctx.err(join(where(pool, i), "value"),
                            f"{name} is a credential of production pool "
                            f"{production[0]}; pool {pool.name} (environment: "
                            f"{pool.environment or 'not set'}) must never send it, shared or "
                            "not: give it a variable of its own")
    # The same secret under another name: compared, never shown; each variable's value
    # (the whole header value may differ: "Bearer ${A}" and "${B}" with A == B).
    prod_values = {cred.value: (pool.name, cred.variables)
                   for pool in pools if pool.environment == PRODUCTION for cred in pool.auth
                   if cred.value.reveal()}
    prod_vars = _variable_values(ctx, pools, production_only=True)
    for pool in pools:
        if pool.environment == PRODUCTION:
            continue
        for i, cred in enumerate(pool.auth):
            owner = prod_values.get(cred.value)
            if owner is not None and not set(cred.variables) & set(owner[1]):
                ctx.err(join(where(pool, i), "value"),
                        f"the value of {', '.join(cred.variables)} equals that of "
                        f"{', '.join(owner[1])}, a credential of production pool {owner[0]}; "
                        f"pool {pool.name} must never send it")
                continue
            for name in cred.variables:
                same = prod_vars.get(_value_of(ctx, name))
                if same is not None and same[1] != name:
                    ctx.err(join(where(pool, i), "value"),
                            f"the value of {name} equals that of {same[1]}, a credential "
                            f"of production pool {same[0]}; pool {pool.name} must never "
                            "send it")
                    break
    warn_plaintext(pools)


def _value_of(ctx: Ctx, name: str) -> str:
    """A variable's value as expanded (stripped; "" when unset)."""
    return ctx.expanded.variables.get(name, "").strip()


def _variable_values(ctx: Ctx, pools: Iterable[_Pool], production_only: bool = False
                     ) -> dict[str, tuple[str, str]]:
    """Each credential variable's non-empty value -> (its pool, its name)."""
    out: dict[str, tuple[str, str]] = {}
    for pool in pools:
        if production_only and pool.environment != PRODUCTION:
            continue
        for cred in pool.auth:
            for name in cred.variables:
                value = _value_of(ctx, name)
                if value:
                    out.setdefault(value, (pool.name, name))
    return out


class _Served(Protocol):
    @property
    def scheme(self) -> str: ...
    @property
    def url(self) -> str: ...


def plaintext_credentials(pools: Iterable[_Pool]) -> list[str]:
    """Warnings: a pool whose ``auth`` is sent over plain ``http://`` or to ``https://``
    servers it does not verify (``tls.verify: false``), where a credential can be read or
    taken by whoever is in between."""
    out = []
    for pool in pools:
        if not pool.auth:
            continue
        servers: Sequence[_Served] = getattr(pool, "servers", ())
        tls: UpstreamTLS | None = getattr(pool, "tls", None)
        plain = [s for s in servers if s.scheme != "https"]
        headers = ", ".join(c.header for c in pool.auth)
        if plain:
            out.append(f"pool {pool.name} sends its credentials ({headers}) over plain "
                       f"http:// to {len(plain)} of {len(servers)} servers: anyone on the "
                       "path can read them; use https:// servers")
        if tls is not None and not tls.verify and len(plain) < len(servers):
            out.append(f"pool {pool.name} sends its credentials ({headers}) to https:// "
                       "servers it does not verify (tls.verify: false): anyone on the path "
                       "can take them; give the pool a tls.ca instead")
    return out


_warned: set[str] = set()  # warnings this process has logged (each once, not per parse)


def warn_plaintext(pools: Iterable[_Pool]) -> None:
    """Log ``plaintext_credentials``' warnings (the process log at load, and ``ringproxy
    check``'s output); each once per process (a Rings API write parses a config twice, a
    reload once more: the same warning is not repeated for each)."""
    for warning in plaintext_credentials(pools):
        if warning not in _warned:
            _warned.add(warning)
            log.warning("%s", warning)


def check_credential_uses(ctx: Ctx, pools: Iterable[_Pool], path: str = "pools") -> None:
    """A credential variable appears only in ``pools.*.auth`` values."""
    owners: dict[str, str] = {}
    for pool in pools:
        for cred in pool.auth:
            for name in cred.variables:
                owners.setdefault(name, pool.name)
    if not owners:
        return
    in_auth = re.compile(re.escape(path) + r"\.(.+)\.auth(\[\d+\])?\.value")
    values = _variable_values(ctx, pools)
    for at, refs in sorted(ctx.env_refs.items()):
        if in_auth.fullmatch(at):
            continue
        for name, _ in refs:
            if name in owners:
                ctx.err(at, f"{name} is a credential of pool {owners[name]}; a credential "
                        "variable is used only in pools.*.auth (where it is kept out of "
                        "logs, views and other pools)")
                break
            # The same secret under another name (add_headers, a health check's or a
            # hook's headers, ...): compared, never shown.
            same = values.get(_value_of(ctx, name))
            if same is not None:
                ctx.err(at, f"the value of {name} equals that of {same[1]}, a credential "
                        f"of pool {same[0]}; a credential is used only in pools.*.auth "
                        "(give this one a secret of its own)")
                break


def _is_list(ctx: Ctx, path: str) -> bool:
    return join(path, 0) in ctx.lines
