"""The fleet's Redis scripts against a real redis-server: the lease and its fencing token,
the version check, and a decision written with its events and announcement at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from proxy.fleet.lease import Lease
from proxy.fleet.store import Store, TooOld, check_version
from proxy.rollout.state import Event, Phase, RingState
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 - a fixture

STATES = {"canary": RingState(Phase.ROLLED_BACK, 0, 0, 1.0, fingerprint="f1"),
          "stable": RingState(Phase.STEADY, None, None, 1.0, fingerprint="f2")}
EVENT = Event(2.0, "api", "canary", "rollback", 1000, 0, "progressing", "rolled_back",
              "errors", label="error_rate", actor="analysis")


async def shared(store: Store) -> tuple[int, dict[str, dict[str, RingState]]]:
    read = await store.read()
    return read.version, read.states


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[Store]:  # noqa: F811
    client = Redis.from_url(redis_server.url)
    yield Store(client, "t:")
    await client.aclose()


async def test_a_deposed_leaders_write_is_refused_by_its_token(store: Store) -> None:
    first = Lease(store, "m1", 0.5)
    second = Lease(store, "m2", 0.5)
    assert await first.renew() and first.leading and first.token == 1
    assert not await second.renew() and not second.leading
    assert await first.renew() and first.token == 1  # renewed: the same lease
    await asyncio.sleep(0.8)  # m1 stalls past its lease
    assert not first.leading  # (it stopped counting itself leader before the expiry)
    assert await second.renew() and second.token == 2
    stale = await store.write(0, 1, "api", STATES, [EVENT])  # m1's token, the current version
    assert not stale.ok and stale.deposed and stale.version == 0
    assert await shared(store) == (0, {})  # nothing written
    assert not await first.renew() and first.token == 0
    written = await store.write(0, second.token, "api", STATES, [EVENT])
    assert written.ok and written.version == 1
    assert await shared(store) == (1, {"api": STATES})


async def test_a_write_on_states_that_moved_on_is_refused(store: Store) -> None:
    assert (await store.write(0, None, "api", STATES, [])).ok
    again = await store.write(0, None, "api", {}, [EVENT])  # decided on version 0
    assert not again.ok and not again.deposed and again.version == 1
    assert await shared(store) == (1, {"api": STATES})
    assert await store.events_after("0-0") == []


async def test_a_decision_its_events_and_its_announcement_come_together(
    store: Store, redis_server: RedisServer,  # noqa: F811
) -> None:
    listener = Redis.from_url(redis_server.url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(store.channel)
    await pubsub.get_message(timeout=1.0)  # the subscription's confirmation
    written = await store.write(0, None, "api", STATES, [EVENT, EVENT])
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2.0)
    assert message is not None and int(message["data"]) == written.version == 1
    events = await store.events_after("0-0")
    assert [e for _, e in events] == [EVENT.as_dict(), EVENT.as_dict()]
    assert await store.last_events(1) == events[-1:]
    assert await store.events_after(events[-1][0]) == []
    await pubsub.aclose()
    await listener.aclose()


async def test_a_resigning_leader_frees_the_lease_at_once(store: Store) -> None:
    first, second = Lease(store, "m1", 5.0), Lease(store, "m2", 5.0)
    assert await first.renew()
    await first.resign()
    assert await second.renew() and second.token == 2
    assert await store.holder() == "m2"


async def test_a_route_whose_shared_states_are_not_usable_is_skipped(store: Store) -> None:
    assert (await store.write(0, None, "api", STATES, [])).ok
    await store.redis.hset(store.states, "other", "{not json")
    await store.redis.hset(store.states, "third", '{"canary": {"phase": "sideways"}}')
    assert await shared(store) == (1, {"api": STATES})


async def test_a_reader_tells_a_lost_write_from_a_newer_one(store: Store) -> None:
    first = await store.write(0, None, "api", STATES, [])
    second = await store.write(1, None, "api", {}, [])
    assert first.stamp and second.stamp and first.stamp != second.stamp
    assert (await store.head()) == (2, second.stamp)
    assert not (await store.read(1, first.stamp)).lost  # newer: adopted as usual
    assert not (await store.read(2, second.stamp)).lost
    # Redis lost the last write (restored by hand: the version and its stamp gone) ...
    await store.redis.set(store.version, 1)
    await store.redis.hdel(store.stamps, "2")
    assert (await store.read(2, second.stamp)).lost  # a lower version
    # ... and a new write re-uses version 2 with other content
    again = await store.write(1, None, "api", STATES, [])
    assert again.ok and again.version == 2
    assert (await store.read(2, second.stamp)).lost  # the same number, another write
    assert not (await store.read(2, again.stamp)).lost
    # everything lost (a Redis without persistence restarted)
    await store.redis.flushdb()
    assert (await store.read(2, again.stamp)).lost


async def test_the_server_version_is_checked(store: Store) -> None:
    version = await store.check_server()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (6, 2)
    for ok in ("6.2.0", "7.0.15", "7.2.4", "10.0.1"):
        check_version(ok)
    for old in ("6.0.16", "5.0.7", "garbage"):
        with pytest.raises(TooOld, match=r"older than 6\.2.*upgrade the server"):
            check_version(old)
