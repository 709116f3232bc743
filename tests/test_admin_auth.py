"""proxy.admin.auth: who may call which admin endpoint, as tables (pure: no sockets).

The messages and statuses are the admin API's contract (tests/test_admin_sockets.py checks
a few of them end to end); here every role meets every requirement.
"""

from __future__ import annotations

import pytest

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
)
from proxy.config.admin import AdminToken

ADMIN = AdminToken("RP_ADMIN", "admin", "admin-secret-0123456789")
OPERATOR = AdminToken("RP_OPS", "operator", "operator-secret-012345")
LIMITED = AdminToken("RP_LIMITED", "operator", "limited-secret-0123456",
                     routes=frozenset({"api"}), rings=frozenset({"beta"}))
VIEWER = AdminToken("RP_VIEW", "viewer", "viewer-secret-01234567")
TOKENS = (ADMIN, OPERATOR, LIMITED, VIEWER)

RELOAD = admin_only("reload")
BETA = Target("api", "beta", "pause")
CANARY = Target("api", "canary", "pause")
OTHER_ROUTE = Target("web", "beta", "rollback")

READ_ONLY = Denied(403, "no admin tokens are configured: the API is read-only "
                        "(set admin.tokens to allow actions)")
LOOPBACK_ONLY = Denied(403, "no admin tokens are configured: only loopback may read")
MISSING = Denied(401, "missing bearer token (Authorization: Bearer <token>)")
INVALID = Denied(401, "invalid token")
NO_RING = Denied(404, "route 'api' has no ring 'nope'")


def bearer(token: AdminToken) -> str:
    return f"Bearer {token.secret}"


def decide(requirement: Requirement, token: AdminToken | None, *, method: str = "GET",
           loopback: bool = True, target: Target | Denied | None = None,
           tokens: tuple[AdminToken, ...] = TOKENS, header: str | None = None) -> Caller | Denied:
    authorization = header if header is not None else (bearer(token) if token else "")
    return authorize(requirement, tokens, authorization, is_loopback=loopback, method=method,
                     target=target)


# Every role x every requirement, with tokens configured.  "ok" means the caller proceeds
# as its own token; the method and the peer address make no difference once a token is given.
ROLE_TABLE: list[tuple[AdminToken, Requirement, Target | None, Denied | str]] = [
    (ADMIN, PUBLIC, None, "ok"),
    (OPERATOR, PUBLIC, None, "ok"),
    (LIMITED, PUBLIC, None, "ok"),
    (VIEWER, PUBLIC, None, "ok"),
    (ADMIN, READ, None, "ok"),
    (OPERATOR, READ, None, "ok"),
    (LIMITED, READ, None, "ok"),
    (VIEWER, READ, None, "ok"),
    (ADMIN, ACT, BETA, "ok"),
    (OPERATOR, ACT, BETA, "ok"),
    (LIMITED, ACT, BETA, "ok"),
    (VIEWER, ACT, BETA, Denied(403, "a viewer token may not pause")),
    (ADMIN, ACT, CANARY, "ok"),
    (OPERATOR, ACT, CANARY, "ok"),
    (LIMITED, ACT, CANARY, Denied(403, "this operator token may not act on api/canary")),
    (VIEWER, ACT, CANARY, Denied(403, "a viewer token may not pause")),
    (ADMIN, ACT, OTHER_ROUTE, "ok"),
    (OPERATOR, ACT, OTHER_ROUTE, "ok"),
    (LIMITED, ACT, OTHER_ROUTE, Denied(403, "this operator token may not act on web/beta")),
    (VIEWER, ACT, OTHER_ROUTE, Denied(403, "a viewer token may not rollback")),
    (ADMIN, RELOAD, None, "ok"),
    (OPERATOR, RELOAD, None, Denied(403, "only an admin token may reload")),
    (LIMITED, RELOAD, None, Denied(403, "only an admin token may reload")),
    (VIEWER, RELOAD, None, Denied(403, "only an admin token may reload")),
]


@pytest.mark.parametrize(("token", "requirement", "target", "expected"), ROLE_TABLE)
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("loopback", [True, False])
def test_every_role_meets_every_requirement(
    token: AdminToken, requirement: Requirement, target: Target | None,
    expected: Denied | str, method: str, loopback: bool,
) -> None:
    got = decide(requirement, token, method=method, loopback=loopback, target=target)
    if expected == "ok":
        # A public endpoint does not look at the token: it serves everyone alike.
        assert got == (Caller(None) if requirement is PUBLIC else Caller(token))
    else:
        assert got == expected


def test_the_table_covers_every_role_and_access() -> None:
    pairs = {(t.role, r.access) for t, r, _, _ in ROLE_TABLE}
    assert pairs == {(role, access) for role in ("admin", "operator", "viewer")
                     for access in Access}


@pytest.mark.parametrize("requirement", [READ, ACT, RELOAD])
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", MISSING),
        ("Bearer", MISSING),
        ("Bearer ", MISSING),
        (f"Basic {ADMIN.secret}", MISSING),
        (ADMIN.secret, MISSING),
        ("Bearer wrong-token-wrong-token", INVALID),
        (f"Bearer {ADMIN.secret}x", INVALID),
        (f"Bearer {ADMIN.secret[:-1]}", INVALID),
    ],
)
def test_a_missing_or_bad_bearer_is_401(requirement: Requirement, header: str,
                                        expected: Denied) -> None:
    # Authentication comes before everything, even an unknown target: a stranger learns
    # nothing about routes and rings.
    for target in (BETA, NO_RING):
        got = decide(requirement, None, header=header,
                     target=target if requirement is ACT else None)
        assert got == expected


def test_the_scheme_is_case_insensitive_and_the_header_ignored_on_public_endpoints() -> None:
    assert decide(RELOAD, None, header=f"bearer {ADMIN.secret}") == Caller(ADMIN)
    assert decide(READ, None, header=f"BEARER {VIEWER.secret}") == Caller(VIEWER)
    assert decide(PUBLIC, None, header="Bearer wrong-token-wrong-token") == Caller(None)
    assert decide(PUBLIC, None, header="") == Caller(None)


@pytest.mark.parametrize("token", TOKENS)
def test_an_unknown_target_is_404_for_any_authenticated_caller(token: AdminToken) -> None:
    # 404 before the role's 403: a viewer asking to pause a ring that does not exist hears
    # that it does not exist (as before authorisation moved out of the handler).
    assert decide(ACT, token, method="POST", target=NO_RING) == NO_RING


# Without tokens: read-only, and only from loopback.  (requirement, method, loopback) -> answer
NO_TOKEN_TABLE: list[tuple[Requirement, str, bool, Denied | None]] = [
    (PUBLIC, "GET", True, None),
    (PUBLIC, "GET", False, None),
    (PUBLIC, "POST", False, None),
    (READ, "GET", True, None),
    (READ, "GET", False, LOOPBACK_ONLY),
    (READ, "HEAD", True, READ_ONLY),
    (READ, "POST", True, READ_ONLY),
    (READ, "POST", False, READ_ONLY),
    (ACT, "POST", True, READ_ONLY),
    (ACT, "POST", False, READ_ONLY),
    (ACT, "GET", True, READ_ONLY),
    (RELOAD, "POST", True, READ_ONLY),
    (RELOAD, "POST", False, READ_ONLY),
    (RELOAD, "GET", True, READ_ONLY),
]


@pytest.mark.parametrize(("requirement", "method", "loopback", "expected"), NO_TOKEN_TABLE)
@pytest.mark.parametrize("header", ["", f"Bearer {ADMIN.secret}"])
def test_without_tokens_the_api_is_read_only_from_loopback(
    requirement: Requirement, method: str, loopback: bool, expected: Denied | None, header: str
) -> None:
    # A bearer means nothing when no token is configured; an unknown target stays hidden.
    for target in (BETA, NO_RING):
        got = decide(requirement, None, method=method, loopback=loopback, tokens=(),
                     header=header, target=target if requirement is ACT else None)
        assert got == (Caller(None) if expected is None else expected)


def test_the_caller_names_itself_for_the_audit_trail() -> None:
    assert Caller(LIMITED).actor == "operator:RP_LIMITED"
    assert Caller(None).actor == "anonymous"


def test_declarations_that_cannot_be_decided_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Requirement\(ADMIN\): verb is empty"):
        Requirement(Access.ADMIN)
    with pytest.raises(ValueError, match=r"authorize\(ACT\): target is None"):
        decide(ACT, OPERATOR, method="POST")
