"""The room-state cache: one fetch per cold room however many ask at once, refetch when
stale or expired, and a short life for rooms the homeserver does not know yet. The state
source is a test double: this is the cache's logic, the e2e tests use Synapse's admin API."""

from __future__ import annotations

import asyncio

from proxy_addons.statesource import RoomStateCache
from tests.proxy_addons.conftest import ROOM, StaticStateSource, policy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowSource(StaticStateSource):
    async def fetch(self, room_id):
        await asyncio.sleep(0.05)
        return await super().fetch(room_id)


async def test_concurrent_lookups_of_a_cold_room_share_one_fetch():
    """No thundering herd: 20 concurrent lookups, one request."""
    source = SlowSource({ROOM: policy()})
    cache = RoomStateCache(source)
    results = await asyncio.gather(*(cache.get(ROOM, 1.0) for _ in range(20)))
    assert source.fetches == 1
    assert all(r is results[0] for r in results)


async def test_stale_and_expired_rooms_are_refetched():
    clock = Clock()
    source = StaticStateSource({ROOM: policy()})
    cache = RoomStateCache(source, ttl=300, clock=clock)
    await cache.get(ROOM, 1.0)
    await cache.get(ROOM, 1.0)
    assert source.fetches == 1
    cache.mark_stale(ROOM)
    await cache.get(ROOM, 1.0)
    assert source.fetches == 2
    clock.now += 301
    await cache.get(ROOM, 1.0)
    assert source.fetches == 3


async def test_unknown_room_is_asked_again_soon():
    """A room the homeserver does not know (yet) is not cached for the full TTL: it is
    usually being joined, and its state must count as soon as it exists."""
    clock = Clock()
    source = StaticStateSource({})
    cache = RoomStateCache(source, ttl=300, unknown_ttl=2, clock=clock)
    assert await cache.get(ROOM, 1.0) is None
    clock.now += 1
    assert await cache.get(ROOM, 1.0) is None
    assert source.fetches == 1
    source.rooms[ROOM] = policy()
    clock.now += 2
    assert await cache.get(ROOM, 1.0) is not None
    assert source.fetches == 2


class PerRoomSlowSource(StaticStateSource):
    """One room's state takes long to fetch (the homeserver struggling with a big room)."""

    def __init__(self, rooms, slow_room, delay):
        super().__init__(rooms)
        self.slow_room, self.delay = slow_room, delay

    async def fetch(self, room_id):
        if room_id == self.slow_room:
            await asyncio.sleep(self.delay)
        return await super().fetch(room_id)


async def test_a_slow_cold_room_does_not_hold_up_other_rooms():
    """While one room's state is being fetched, lookups of other rooms — cached or cold —
    are answered at once: fetching never blocks the event loop."""
    import time

    other = "!other:hs.test"
    source = PerRoomSlowSource({ROOM: policy(), other: policy(other)}, ROOM, 0.5)
    cache = RoomStateCache(source)
    slow = asyncio.ensure_future(cache.get(ROOM, 2.0))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    assert await cache.get(other, 2.0) is not None  # cold, fetched meanwhile
    assert await cache.get(other, 2.0) is not None  # cached
    assert time.monotonic() - started < 0.2
    assert not slow.done()
    assert await slow is not None
    assert source.fetches == 2


async def test_concurrent_transactions_for_a_cold_room_cost_one_state_request(make_runtime):
    """At the edge: ten transactions for the same cold room arrive together; the homeserver
    is asked for the room's state once."""
    from mitmproxy.test import taddons

    from proxy_addons.enforcer import Enforcer
    from tests.proxy_addons.conftest import pdu, send_flow

    source = SlowSource({ROOM: policy()})
    holder = make_runtime(source=source)
    enforcer = Enforcer(holder)
    flows = [
        send_flow("good.test", [pdu("@a:good.test", body=str(i))], txn_id=f"t{i}")
        for i in range(10)
    ]
    with taddons.context(enforcer):
        await asyncio.gather(*(enforcer.request(f) for f in flows))
    assert source.fetches == 1
    assert all(f.response is None for f in flows)  # all forwarded


async def test_a_refetch_that_finds_the_same_state_keeps_the_policy_object():
    """What was decided under the cached policy (the edge's allows, checked by identity
    by the hook) stays valid through refetches that find nothing relevant changed."""
    from rules.roomstate import room_policy_from_state
    from tests.rules.test_roomstate import state

    class Events(StaticStateSource):
        events = state()

        async def fetch(self, room_id):
            self.fetches += 1
            return room_policy_from_state(room_id, self.events)

    source = Events()
    cache = RoomStateCache(source)
    first = await cache.get(ROOM, 1.0)
    cache.mark_stale(ROOM)
    assert await cache.get(ROOM, 1.0) is first and source.fetches == 2
    source.events = state(acl_id="$acl2")
    cache.mark_stale(ROOM)
    changed = await cache.get(ROOM, 1.0)
    assert changed is not first and changed.state_ids[("m.room.server_acl", "")] == "$acl2"


async def test_a_transaction_of_cached_rooms_is_answered_without_yielding():
    """get_many over rooms all cached completes in one step (it never suspends: no task,
    no pass of the event loop per transaction); one cold room among them is fetched once,
    and each room gets its own answer."""
    other = "!other:hs.test"
    source = SlowSource({ROOM: policy(), other: policy(other)})
    cache = RoomStateCache(source)
    await cache.get(ROOM, 1.0)
    step = cache.get_many({ROOM}, 1.0)
    try:
        step.send(None)
    except StopIteration as done:
        assert done.value == {ROOM: await cache.get(ROOM, 1.0)}
    else:
        step.close()
        raise AssertionError("get_many suspended for a cached room")
    both = await cache.get_many({ROOM, other}, 1.0)
    assert both[ROOM].room_id == ROOM and both[other].room_id == other
    assert source.fetches == 2
