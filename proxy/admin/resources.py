"""The Rings API's JSON shapes, shared by the server (``proxy.admin.rings``) and the SDK
(``proxy.client``).  Types only: importing this pulls in nothing else."""

from __future__ import annotations

from typing import Any, TypedDict

Spec = dict[str, Any]  # a ring or pool as the file writes it, as JSON


class RingStatus(TypedDict):
    weight: float | None  # live share of buckets in percent (None: rules only)
    phase: str | None  # rollout phase (None: no analysis on the route)
    default: bool  # the last ring: everyone else
    active: bool  # takes traffic: the default, a weight above 0, or rules not rolled back


class Ring(TypedDict):
    route: str
    name: str
    position: int  # in the route's ring order (the last is the default)
    spec: Spec  # as the file writes it: ${VAR} references unexpanded
    status: RingStatus | None  # None: in the file, not serving (yet)
    revision: str  # the file's revision it was read at: If-Match for a write


class CredentialView(TypedDict):
    header: str
    value: str  # always "***": a credential is never shown
    variables: list[str]  # the environment variables it is made of
    shared: bool


class PoolStatus(TypedDict):
    servers: list[str]  # as serving (environment variables expanded)
    rings: list[str]  # route/ring of every serving ring sent to it
    environment: str | None
    credentials: list[CredentialView]  # the auth headers set on its requests, redacted


class Pool(TypedDict):
    name: str
    spec: Spec
    status: PoolStatus | None
    revision: str


class ConfigEvent(TypedDict):
    """The audit event of one change to the file (``kind`` config_change)."""

    time: float
    kind: str
    action: str  # create | update | delete
    route: str  # "" for a pool
    ring: str  # "" for a pool
    pool: str  # "" for a ring
    actor: str
    reason: str
    from_revision: str
    revision: str
    diff: str  # unified diff of the file
    from_weight: None
    to_weight: None
    from_phase: None
    phase: None
    numbers: dict[str, object]


class Written(TypedDict, total=False):
    """A write's answer: the revision serving now, and what changed."""

    revision: str
    previous_revision: str
    changed: bool  # False: the file already said so (nothing written, no event)
    event: ConfigEvent | None
    ring: Ring | None  # ring writes (None after a delete)
    pool: Pool | None  # pool writes
