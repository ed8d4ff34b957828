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
            replace(module_finding("$edge"), endpoint="send"),  # the edge's own: not news
        ]
    )
    assert module.flush(5)
    assert follower.poll() == 3
    await runtime.state.get(ROOM, 1)
    assert runtime.state.source.fetches == fetches + 1
    assert "$refused" in runtime.refused.rooms[ROOM]
    assert "$edge" not in runtime.refused.rooms[ROOM]
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
