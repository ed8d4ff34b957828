"""The edge reads what the Synapse module recorded: rooms to refetch, refused events."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from proxy_addons.changes import ChangeFollower
from proxy_addons.store import FindingRecord, FindingStore, StateChange
from tests.proxy_addons.conftest import ROOM


def module_finding(event_id, rule="acl.sender", endpoint="module"):
    return FindingRecord(
        time.time(),
        rule,
        "dropped",
        "high",
        "inbound",
        ROOM,
        event_id,
        "m.room.message",
        "@x:denied.test",
        "denied.test",
        None,
        None,
        "low",
        endpoint,
        None,
        "d",
    )


async def test_the_edge_refetches_what_the_module_saw_change_and_learns_its_refusals(
    make_runtime,
):
    """A state change and a refusal the module recorded reach the edge's next poll: the
    room is refetched, the refused event joins the memory behind leak.reference. What
    was recorded before the edge started is not replayed."""
    holder = make_runtime()
    runtime = holder.runtime
    module = FindingStore(runtime.config.database, flush_interval=0.02)
    module.record([StateChange(time.time(), "!old:hs.test", "m.room.server_acl", "", "$0")])
    assert module.flush(5)
    follower = ChangeFollower(runtime)
    follower.start_at_the_end()
    await runtime.state.get(ROOM, 1)
    fetches = runtime.state.source.fetches
    module.record(
        [
            StateChange(time.time(), ROOM, "m.room.server_acl", "", "$acl"),
            module_finding("$refused"),
            module_finding("$origin_only", rule="acl.origin"),  # about a deliverer: kept
            replace(module_finding("$edge"), endpoint="send"),  # another replica's edge's
        ]
    )
    assert module.flush(5)
    assert follower.poll() == 4
    await runtime.state.get(ROOM, 1)
    assert runtime.state.source.fetches == fetches + 1
    assert "$refused" in runtime.refused.rooms[ROOM]
    assert "$edge" in runtime.refused.rooms[ROOM]  # replicas share what their edges refused
    assert "$origin_only" in runtime.refused.rooms[ROOM]
    assert follower.poll() == 0  # nothing new
    module.close()


async def test_the_follower_lives_through_an_unreadable_database(make_runtime, tmp_path):
    """A database that cannot be read (gone, here) is tried again, never fatal."""
    holder = make_runtime()
    object.__setattr__(holder.runtime.config, "database", str(tmp_path / "missing" / "x.db"))
    follower = ChangeFollower(holder.runtime, interval=0.01)
    task = asyncio.ensure_future(follower.run())
    await asyncio.sleep(0.1)
    assert not task.done()
    task.cancel()


async def test_rows_committed_out_of_id_order_still_reach_the_follower(make_runtime, pg_url):
    """On PostgreSQL several writers (replicas, Synapse workers) commit concurrently: a
    row can become visible after one with a higher ID. The follower looks back and still
    applies it, once."""
    from proxy_addons.database import open_db

    holder = make_runtime()
    runtime = holder.runtime
    object.__setattr__(runtime.config, "database", pg_url)
    database = open_db(pg_url)
    database.migrate()
    follower = ChangeFollower(runtime)
    follower.start_at_the_end()
    insert = (
        "INSERT INTO state_changes (ts, room_id, event_type, state_key, event_id) "
        "VALUES (?, ?, ?, ?, ?)"
    )
    slow, quick = database.connect(), database.connect()
    try:
        with slow.transaction():
            slow.execute(insert, (time.time(), "!slow:hs.test", "m.room.server_acl", "", "$1"))
            with quick.transaction():
                quick.execute(
                    insert, (time.time(), "!quick:hs.test", "m.room.server_acl", "", "$2")
                )
            assert follower.poll() == 1  # only the committed one is visible yet
        assert follower.poll() == 1  # the lower ID, committed later
        assert follower.poll() == 0
    finally:
        slow.close()
        quick.close()


async def test_on_postgresql_news_arrive_as_they_commit_not_at_the_next_poll(make_runtime, pg_url):
    """Replicas hear of each other's refusals as they commit (NOTIFY/LISTEN): with a poll
    interval of 30 s, a refusal another process records reaches the follower at once."""
    holder = make_runtime()
    runtime = holder.runtime
    object.__setattr__(runtime.config, "database", pg_url)
    other = FindingStore(pg_url, flush_interval=0.02)
    follower = ChangeFollower(runtime, interval=30.0)
    task = asyncio.ensure_future(follower.run())
    try:
        await asyncio.sleep(1.0)  # listening
        started = time.monotonic()
        other.record([replace(module_finding("$elsewhere"), endpoint="send")])
        while "$elsewhere" not in runtime.refused.rooms.get(ROOM, {}):
            assert time.monotonic() - started < 5, "not heard before the poll"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        other.close()
