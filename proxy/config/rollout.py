"""Config for rollouts: progression steps, rollback, state files, webhooks.

Models and their validation; ``proxy.rollout.plan.build_plan`` turns them into ``RoutePlan``s.
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proxy.config.analysis import QUANTILES, AbsoluteLatency, percent_key
from proxy.config.reader import Ctx, Section, kind
from proxy.config.source import join
from proxy.config.values import parse_weight

WINDOW_HORIZON = 300.0  # seconds of per-ring history kept in memory (metrics windows)


@dataclass(frozen=True, slots=True)
class Step:
    """One weight of a ring's schedule, with what a ring must show *at* it to move on.

    ``min_duration`` replaces the progression's ``min_step_duration`` for this step (it
    counts from the step's start as saved in the state file: a restart does not reset
    it).  ``max_error_rate`` and ``max_latency`` tighten the route's absolute limits
    while the ring is at this step (the stricter of the two holds), judged by the same
    anytime-valid tests (``proxy.rollout.steps``).  ``checks`` names ``analysis.checks``
    that apply at this step only (a check no step names applies at every step).
    """

    weight: int  # basis points
    approval: bool = False  # an operator must approve moving *to* this step
    min_duration: float | None = None  # seconds; None: the progression's min_step_duration
    max_error_rate: float | None = None  # fraction
    max_latency: tuple[AbsoluteLatency, ...] = ()
    checks: tuple[str, ...] = ()

    @property
    def criteria_key(self) -> str:
        """The step as earlier versions wrote it into a ring's fingerprint (weight and
        approval): a state file of theirs still matches, and tuning a step's limits or
        duration keeps the ring's live state."""
        return f"Step(weight={self.weight!r}, approval={self.approval!r})"


@dataclass(frozen=True, slots=True)
class Progression:
    steps: tuple[Step, ...]
    min_step_duration: float = 300.0


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    timeout: float = 5.0
    retries: int = 3


STATE_BACKENDS = ("file", "redis")
LEASE_MIN, LEASE_MAX = 0.5, 60.0  # seconds: a leader's lease (renewed every third of it)


@dataclass(frozen=True, slots=True)
class RedisState:
    """``state.backend: redis``: one rollout shared by every process naming the same
    ``url`` and ``prefix`` (``proxy.fleet``).  ``url`` may hold a password: it must come
    from ``${VAR}`` and is never shown (``repr``, logs and the admin API use
    ``redacted_url``)."""

    url: str = field(default="", repr=False)  # redis://[user:password@]host:port/db
    prefix: str = "ringproxy:"  # every key of this fleet starts with it
    lease: float = 3.0  # seconds a leader holds its lease without renewing it

    @property
    def redacted_url(self) -> str:
        """The URL without its user and password (for logs and the admin API)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}" if self.url else ""

    def __str__(self) -> str:
        return f"redis {self.redacted_url} (prefix {self.prefix!r}, lease {self.lease:g}s)"


@dataclass(frozen=True, slots=True)
class StateFiles:
    """Where rollout state lives: this process's files and, with ``backend``, a Redis
    shared by a fleet (the files stay each member's local copy and audit trail)."""

    path: str = "ringproxy-state.json"  # relative to the working directory
    audit: str = "ringproxy-audit.jsonl"
    backend: RedisState | None = None  # None: the file backend (this process alone)


# The defaults, read off the settings classes (the one place they are written).
_PROGRESSION = Progression(())
_WEBHOOK = Webhook("")


def read_rollback(ctx: Ctx, data: object, path: str) -> bool:
    """``rollback: {to: zero | previous_step}`` -> whether to go back one step only."""
    if data is None:
        return False
    sec = Section(ctx, data, path)
    to = sec.text("to", "zero")
    if to not in ("zero", "previous_step"):
        ctx.err(sec.sub("to"), f"{to!r} is not one of: zero, previous_step")
    sec.close()
    return to == "previous_step"


def read_progression(ctx: Ctx, data: object, path: str) -> Progression | None:
    if data is None:
        return None
    sec = Section(ctx, data, path)
    steps: list[Step] = []
    items = sec.items("steps")
    if sec.ok and not items:
        ctx.err(sec.sub("steps"), "list at least one step, e.g. [1, 5, 25, 50]")
    for i, item in enumerate(items):
        where = join(sec.sub("steps"), i)
        approval = False
        value: object = item
        extra: dict[str, object] = {}
        if isinstance(item, dict):
            ssec = Section(ctx, item, where)
            value = ssec.raw("weight")
            mode = ssec.text("approval", "none")
            if mode not in ("none", "required"):
                ctx.err(ssec.sub("approval"), f"{mode!r} is not one of: none, required")
            approval = mode == "required"
            extra = _step_criteria(ctx, ssec)
            ssec.close()
        try:
            weight = parse_weight(value)
        except ValueError as exc:
            ctx.err(where, str(exc) if not isinstance(value, dict | list) else
                    f"expected a weight or {{weight, approval}}, got {kind(value)}")
            continue
        if steps and weight <= steps[-1].weight:
            ctx.err(where, f"{weight / 100:g} is not above the previous step "
                    f"{steps[-1].weight / 100:g}")
        steps.append(Step(weight, approval, **extra))  # type: ignore[arg-type]
    duration = sec.duration("min_step_duration", _PROGRESSION.min_step_duration, minimum=0.0)
    sec.close()
    return Progression(tuple(steps), duration)


def _step_criteria(ctx: Ctx, sec: Section) -> dict[str, object]:
    """A step's own ``min_duration``, ``max_error_rate``, ``max_pXX`` and ``checks``."""
    out: dict[str, object] = {}
    if sec.has("min_duration"):
        out["min_duration"] = sec.duration("min_duration", 0.0, minimum=0.0)
    rate = percent_key(sec, "max_error_rate", None)
    if rate is not None:
        out["max_error_rate"] = rate
    out["max_latency"] = tuple(
        AbsoluteLatency(q, seconds) for name, q in QUANTILES.items()
        if (seconds := sec.duration(f"max_{name}", 0.0, minimum=0.0)))
    names = sec.raw("checks", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        ctx.err(sec.sub("checks"), f"expected a list of check names (analysis.checks), got "
                f"{kind(names)}")
        names = []
    out["checks"] = tuple(names)
    return out


def read_state_files(ctx: Ctx, data: object, path: str) -> StateFiles:
    if data is None:
        return StateFiles()
    sec = Section(ctx, data, path)
    base, shared = StateFiles(), RedisState()
    backend = sec.text("backend", "file")
    if backend not in STATE_BACKENDS:
        ctx.err(sec.sub("backend"), f"{backend!r} is not one of: {', '.join(STATE_BACKENDS)}")
    url = sec.text("url", "")
    prefix = sec.text("prefix", shared.prefix)
    lease = sec.duration("lease", shared.lease, minimum=LEASE_MIN)
    if lease > LEASE_MAX:
        ctx.err(sec.sub("lease"), f"{lease:g}s is longer than {LEASE_MAX:g}s: a dead "
                "leader would hold the rollout that long")
    redis = None
    if backend == "redis":
        _check_redis_url(ctx, sec.sub("url"), url)
        if not prefix:
            ctx.err(sec.sub("prefix"), "an empty prefix: write e.g. prefix: \"ringproxy:\"")
        redis = RedisState(url, prefix, lease)
    elif url:
        ctx.err(sec.sub("url"), "a url needs backend: redis (the file backend has none)")
    result = StateFiles(sec.text("path", base.path) or base.path,
                        sec.text("audit", base.audit) or base.audit, redis)
    sec.close()
    return result


def _check_redis_url(ctx: Ctx, where: str, url: str) -> None:
    """A Redis URL from the environment; the error never echoes the value (a password)."""
    if not url:
        ctx.err(where, "backend: redis needs a url, e.g. url: ${REDIS_URL}")
        return
    if where not in ctx.env_paths:
        ctx.err(where, "the Redis URL must come from the environment (it may hold a "
                "password), e.g. url: ${REDIS_URL}, never from the file itself")
        return
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or (
            parts.scheme != "unix" and not parts.hostname):
        ctx.err(where, "the environment variable does not hold a Redis URL "
                "(redis://[:password@]host:port/db, rediss://... or unix:///path)")


def read_webhooks(ctx: Ctx, data: object, path: str) -> tuple[Webhook, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        ctx.err(path, f"expected a list of webhooks, got {kind(data)}")
        return ()
    hooks = []
    for i, item in enumerate(data):
        where = join(path, i)
        sec = Section(ctx, item if not isinstance(item, str) else {"url": item}, where)
        url = sec.text("url")
        parts = urlsplit(url)
        if url and (parts.scheme not in ("http", "https") or not parts.hostname):
            ctx.err(sec.sub("url"), f"{url!r} is not an http(s) URL")
        hooks.append(Webhook(url, sec.duration("timeout", _WEBHOOK.timeout),
                             sec.integer("retries", _WEBHOOK.retries, 0, 20)))
        sec.close()
    return tuple(hooks)
