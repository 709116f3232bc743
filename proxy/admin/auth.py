"""Who may call which admin endpoint: one pure decision, declared per endpoint.

Every endpoint of the admin listener declares a ``Requirement`` when it is registered;
``authorize`` turns (requirement, the configured tokens, what the request shows) into the
``Caller`` it may proceed as, or a ``Denied`` with the status and message to answer.  No
aiohttp here: the listener reads the header, the peer address and the path, and asks.

The rules:

* ``PUBLIC``: anyone (probes, metrics, the static status page).
* ``READ``: any token (viewer, operator, admin).  With no token configured, GET from
  loopback only.
* ``ACT`` on a route's ring: operator (within its ``routes``/``rings`` limits) or admin.
* ``ADMIN``: admin tokens only.

With no token configured the API is read-only and loopback-only, and it answers only
requests whose ``Host`` is a loopback name (``localhost``, ``*.localhost``, a loopback
address) or one of ``admin.hosts``: a web page the operator's browser opens cannot rebind
its own name to 127.0.0.1 and read the API (DNS rebinding).  The order of the checks
is part of the contract: authentication (401) first, then an unknown target (404), then
the role (403), so an unauthenticated caller learns nothing about routes and rings.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence, Set
from dataclasses import dataclass
from enum import Enum

from proxy.config.admin import AdminToken


class Access(Enum):
    PUBLIC = "public"
    READ = "read"  # viewer and up
    ACT = "act"  # operator (limited by its routes/rings) or admin, on one route's ring
    ADMIN = "admin"  # admin only


@dataclass(frozen=True, slots=True)
class Requirement:
    """What an endpoint needs; ``verb`` names what an ADMIN endpoint does, for messages."""

    access: Access
    verb: str = ""

    def __post_init__(self) -> None:
        if self.access is Access.ADMIN and not self.verb:
            raise ValueError("Requirement(ADMIN): verb is empty; expected what the endpoint "
                             "does, e.g. 'reload'")


PUBLIC = Requirement(Access.PUBLIC)
READ = Requirement(Access.READ)
ACT = Requirement(Access.ACT)


def admin_only(verb: str) -> Requirement:
    return Requirement(Access.ADMIN, verb)


@dataclass(frozen=True, slots=True)
class Target:
    """The ring an ACT request acts on, and the action (``verb``) it asks for."""

    route: str
    ring: str
    verb: str


@dataclass(frozen=True, slots=True)
class Denied:
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request proceeds as: a token, or nobody (public, or no tokens configured)."""

    token: AdminToken | None = None

    @property
    def actor(self) -> str:
        """How the audit trail names the caller."""
        return self.token.actor if self.token is not None else "anonymous"


ANONYMOUS = Caller()

READ_ONLY = Denied(403, "no admin tokens are configured: the API is read-only "
                        "(set admin.tokens to allow actions)")
LOOPBACK_ONLY = Denied(403, "no admin tokens are configured: only loopback may read")
FOREIGN_HOST = Denied(403, "no admin tokens are configured: the Host header must be a "
                           "loopback name or one of admin.hosts (DNS rebinding protection)")
MISSING_BEARER = Denied(401, "missing bearer token (Authorization: Bearer <token>)")
INVALID_TOKEN = Denied(401, "invalid token")


def authorize(
    requirement: Requirement,
    tokens: Sequence[AdminToken],
    authorization: str,
    *,
    is_loopback: bool,
    method: str,
    target: Target | Denied | None = None,
    host_allowed: bool = True,
) -> Caller | Denied:
    """The caller a request may proceed as, or why not.

    ``authorization`` is the Authorization header ("" when absent).  ``target`` is what an
    ACT request acts on, or the ``Denied`` (404) the listener found resolving it: shown
    only to an authenticated caller.  ``host_allowed``: what ``host_allowed`` said of the
    request's Host (checked only when no token is configured).
    """
    if requirement.access is Access.PUBLIC:
        return ANONYMOUS
    if not tokens:
        if not host_allowed:
            return FOREIGN_HOST
        if method != "GET" or requirement.access is not Access.READ:
            return READ_ONLY
        return ANONYMOUS if is_loopback else LOOPBACK_ONLY
    token = _authenticate(tokens, authorization)
    if isinstance(token, Denied):
        return token
    if requirement.access is Access.READ:
        return Caller(token)
    if requirement.access is Access.ADMIN:
        if token.role != "admin":
            return Denied(403, f"only an admin token may {requirement.verb}")
        return Caller(token)
    return _act(token, target)


def _authenticate(tokens: Sequence[AdminToken], authorization: str) -> AdminToken | Denied:
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return MISSING_BEARER
    for token in tokens:
        # Constant time per comparison: the time taken says nothing about the secrets.
        if hmac.compare_digest(given.encode(), token.secret.encode()):
            return token
    return INVALID_TOKEN


def _act(token: AdminToken, target: Target | Denied | None) -> Caller | Denied:
    if target is None:
        raise ValueError("authorize(ACT): target is None; expected the Target the request "
                         "acts on, or the Denied its lookup gave")
    if isinstance(target, Denied):
        return target
    if token.role == "viewer":
        return Denied(403, f"a viewer token may not {target.verb}")
    if not token.may_act_on(target.route, target.ring):
        return Denied(403, f"this operator token may not act on {target.route}/{target.ring}")
    return Caller(token)


def host_allowed(host: str, hosts: Set[str]) -> bool:
    """Is ``host`` (a Host header, port and all) a loopback name or one of ``hosts``?
    No Host at all (HTTP/1.0 from a tool) is allowed: a browser always sends one."""
    if not host:
        return True
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in hosts:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
