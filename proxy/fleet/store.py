"""The fleet's Redis keys and Lua scripts: the one place either is written.

Every key starts with ``state.prefix`` (default ``ringproxy:``), so several fleets share
one Redis.  Keys:

- ``leader``: the member id holding the lease (``SET NX PX``); ``fence``: a counter, one
  ``INCR`` per new lease; ``token``: the current lease's fencing token.
- ``states``: a hash, route -> JSON of its ring states (``RingState.as_dict``);
  ``version``: a counter, one ``INCR`` per decision written; ``stamps``: a hash, version ->
  the random id of the write that made it (the last ``STAMPS_KEPT``), so a member tells a
  history it applied from one Redis lost (a lower version after an AOF ``everysec`` crash
  or a failover to a replica that lagged; or the same version number re-used by a new
  write): ``Read.lost``.
- ``events``: the fleet's audit trail, a stream bounded by ``XADD MAXLEN ~ EVENTS_KEPT``.
- ``decisions``: the pub/sub channel a write announces its new version on.
- ``evidence``: a hash, member id -> JSON of its cumulative per-ring tallies.

A decision is written by ``WRITE``: atomically, only if the writer's version is the
current one (optimistic: it decided on the newest states) and, for the leader's own
judged decisions, only while its fencing token is the current one (a deposed leader's
write is refused: never a split brain); then the states, the version, the events and the
announcement, in one script, so nobody sees one without the others.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from proxy.rollout.state import Event, RingState

log = logging.getLogger("ringproxy.fleet")

EVENTS_KEPT = 10_000  # the stream's approximate bound (XADD MAXLEN ~)
EVENTS_READ = 1000  # stream entries read at a time
STAMPS_KEPT = 1000  # write ids kept (a member polls every second: far fewer go by)
MIN_SERVER = (6, 2)  # XRANGE's exclusive start "(id" (events_after)

# KEYS: leader, fence, token.  ARGV: member, lease ms, the token it holds ("" if none).
# A free lease is taken with a new token; the holder renews it with the token it holds.
LEAD = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[3], token)
  return token
end
if holder == ARGV[1] and redis.call('GET', KEYS[3]) == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(ARGV[3])
end
return 0
"""

# KEYS: leader, token.  ARGV: member, token.  Let the lease go (a clean stop).
RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS: states, version, token, events, channel, stamps.
# ARGV: expected version, token ("" = not a leader's judged write), route, states JSON,
#       events kept, this write's id, stamps kept, then the events' JSON, one argument each.
# Returns {1, new version} when written, {0, current version} when the version moved on,
# {-1, current version} when the token is not the current one.
WRITE = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current ~= tonumber(ARGV[1]) then return {0, current} end
if ARGV[2] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[2] then return {-1, current} end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
local version = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[6], version, ARGV[6])
redis.call('HDEL', KEYS[6], version - tonumber(ARGV[7]))
for i = 8, #ARGV do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[i],
             'version', version)
end
redis.call('PUBLISH', KEYS[5], version)
return {1, version}
"""

# KEYS: states, version, stamps.  ARGV: the version the reader applied.
# The states, their version and its write id, and the id of the reader's version now.
READ = """
local version = redis.call('GET', KEYS[2]) or '0'
return {version, redis.call('HGET', KEYS[3], version) or '',
        redis.call('HGET', KEYS[3], ARGV[1]) or '', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: version, stamps.  The version and its write id (a member's poll).
HEAD = """
local version = redis.call('GET', KEYS[1]) or '0'
return {version, redis.call('HGET', KEYS[2], version) or ''}
"""

SharedStates = dict[str, dict[str, RingState]]


@dataclass(frozen=True, slots=True)
class Written:
    """What ``Store.write`` did: ``ok``, else why not (``stale`` or ``deposed``)."""

    ok: bool
    version: int
    deposed: bool = False
    stamp: str = ""


@dataclass(frozen=True, slots=True)
class Read:
    """The shared states as ``Store.read`` found them."""

    version: int
    stamp: str  # the id of the write that made ``version``
    states: SharedStates
    lost: bool  # the version the reader applied is not in Redis's history (see the module)


class TooOld(RedisError):
    """The Redis server is older than ``MIN_SERVER``: the member refuses it (it stays
    "out of reach", logging this)."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_version(text: str) -> None:
    """``TooOld`` for a server version below ``MIN_SERVER`` (or not a version)."""
    try:
        found = tuple(int(x) for x in text.split(".")[:2])
    except ValueError:
        found = (0, 0)
    if found < MIN_SERVER:
        need = ".".join(map(str, MIN_SERVER))
        raise TooOld(f"Redis {text} is older than {need}, the oldest ringproxy's fleet "
                     f"supports (XRANGE with an exclusive start): upgrade the server")


class Store:
    """The fleet's keys under one prefix, and the scripts that change them."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        key = prefix.__add__
        self.leader, self.fence, self.token = key("leader"), key("fence"), key("token")
        self.states, self.version = key("states"), key("version")
        self.events, self.channel, self.evidence = key("events"), key("decisions"), \
            key("evidence")
        self.stamps = key("stamps")
        self._lead: AsyncScript = redis.register_script(LEAD)
        self._resign: AsyncScript = redis.register_script(RESIGN)
        self._write: AsyncScript = redis.register_script(WRITE)
        self._read: AsyncScript = redis.register_script(READ)
        self._head: AsyncScript = redis.register_script(HEAD)

    async def check_server(self) -> str:
        """The server's version; ``TooOld`` (with what to do) below ``MIN_SERVER``."""
        info = await self.redis.info("server")
        text = str(info.get("redis_version", "0"))
        check_version(text)
        return text

    async def lead(self, member: str, lease: float, token: int) -> int:
        """Take or renew the lease: the token held now, 0 if another member holds it."""
        got = await self._lead(keys=[self.leader, self.fence, self.token],
                               args=[member, max(1, round(lease * 1000)),
                                     str(token) if token else ""])
        return int(got)

    async def resign(self, member: str, token: int) -> None:
        await self._resign(keys=[self.leader, self.token], args=[member, str(token)])

    async def holder(self) -> str | None:
        held = await self.redis.get(self.leader)
        return held.decode() if isinstance(held, bytes) else held

    async def write(
        self, version: int, token: int | None, route: str,
        states: Mapping[str, RingState], events: Sequence[Event],
    ) -> Written:
        """The route's new states and their events, if ``version`` is still current."""
        body = json.dumps({name: s.as_dict() for name, s in states.items()},
                          sort_keys=True)
        stamp = uuid.uuid4().hex
        got = await self._write(
            keys=[self.states, self.version, self.token, self.events, self.channel,
                  self.stamps],
            args=[version, "" if token is None else str(token), route, body, EVENTS_KEPT,
                  stamp, STAMPS_KEPT,
                  *(json.dumps(e.as_dict(), sort_keys=True) for e in events)])
        code, now = int(got[0]), int(got[1])
        return Written(code == 1, now, deposed=code == -1, stamp=stamp if code == 1 else "")

    async def head(self) -> tuple[int, str]:
        """The current version and its write id (cheap: a member's poll)."""
        version, stamp = await self._head(keys=[self.version, self.stamps])
        return int(version), _text(stamp)

    async def read(self, applied: int = 0, stamp: str = "") -> Read:
        """Every route's shared states and their version (0: nothing written yet);
        ``applied``/``stamp``: the version the reader applied and its write id, to tell
        whether Redis lost it (``Read.lost``)."""
        version, current, known, flat = await self._read(
            keys=[self.states, self.version, self.stamps], args=[applied])
        version = int(version)
        lost = applied > 0 and (version < applied or _text(known) != stamp)
        out: SharedStates = {}
        for name, body in zip(flat[::2], flat[1::2], strict=True):
            route = name.decode() if isinstance(name, bytes) else str(name)
            try:
                out[route] = parse_states(body)
            except ValueError as exc:  # input: skipped (the route keeps what it has here)
                log.warning("fleet: the shared states of route %s are not usable, skipped: "
                            "%s", route, exc)
        return Read(version, _text(current), out, lost)

    async def events_after(self, last: str) -> list[tuple[str, dict[str, object]]]:
        """The audit trail's entries after stream id ``last`` (at most ``EVENTS_READ``)."""
        entries = await self.redis.xrange(self.events, min=f"({last}", count=EVENTS_READ)
        return _entries(entries or [])

    async def last_events(self, count: int) -> list[tuple[str, dict[str, object]]]:
        """The audit trail's last ``count`` entries, oldest first."""
        entries = await self.redis.xrevrange(self.events, count=count)
        return _entries(reversed(entries or []))


def _entries(entries: Iterable[Any]) -> list[tuple[str, dict[str, object]]]:
    """Stream entries as (id, event); an entry that is not an event is skipped, never a
    crash (the stream is input: anything may have written to it)."""
    out = []
    for entry_id, fields in entries:
        raw = (fields or {}).get(b"event")
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            data = None
        ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        out.append((ident, data if isinstance(data, dict) else {}))
    return out


def parse_states(body: bytes | str) -> dict[str, RingState]:
    """One route's states as written by ``Store.write``; ValueError if not that."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("a route's shared states must be a JSON object")
    return {str(name): RingState.from_dict(value) for name, value in data.items()
            if isinstance(value, dict)}
