"""The operator's policy at the edge: participation (403 telling the server to knock),
the knock approval queue, and policy lists refreshed without a restart."""

from __future__ import annotations

import json

from proxy_addons.store import query_knocks
from rules.roomstate import room_policy_from_state
from tests.proxy_addons.conftest import (
    ROOM,
    StaticStateSource,
    get_flow,
    pdu,
    recorded_findings,
    run_edge,
    send_flow,
)

ACTIVE_ROOM = "!active:hs.test"
BANS = "!bans:hs.test"


def active_room(*permitted):
    events = [
        {
            "type": "m.room.create",
            "state_key": "",
            "sender": "@a:hs.test",
            "content": {"room_version": "10"},
        },
        {"type": "m.server.knock_rule", "state_key": "", "content": {"rule": "active"}},
        *(
            {
                "type": "m.server.participation",
                "state_key": s,
                "content": {"participation": "permitted"},
            }
            for s in permitted
        ),
    ]
    return room_policy_from_state(ACTIVE_ROOM, events)


run = run_edge
rows = recorded_findings


async def test_not_permitted_server_is_told_to_knock(make_runtime):
    """make_join into a room with an active knock rule: 403 naming the knock; a permitted
    server goes through."""
    holder = make_runtime(source=StaticStateSource({ACTIVE_ROOM: active_room("good.test")}))
    path = "/_matrix/federation/v1/make_join/%21active%3Ahs.test/%40x%3Arelay.test"
    flow = await run(holder, get_flow("relay.test", path))
    assert flow.response.status_code == 403
    assert "knock first" in json.loads(flow.response.content)["error"]
    ok = await run(holder, get_flow("good.test", path.replace("relay", "good")))
    assert ok.response is None
    assert [r["rule"] for r in rows(holder)] == ["participation.origin"]


async def test_knock_edu_is_queued_and_forwarded(make_runtime):
    """An m.server.knock EDU from a server not yet permitted: forwarded untouched, queued
    once per (room, server) with a count; a permitted server's knock is not queued."""
    holder = make_runtime(source=StaticStateSource({ACTIVE_ROOM: active_room("good.test")}))
    knock = {"edu_type": "m.server.knock", "content": {"room_id": ACTIVE_ROOM}}
    for _ in range(2):
        flow = await run(holder, send_flow("relay.test", edus=[knock]))
        assert flow.response is None
    await run(holder, send_flow("good.test", edus=[knock]))
    assert holder.runtime.store.flush(5)
    (row,) = query_knocks(holder.runtime.config.database)
    assert (row["room_id"], row["server"], row["count"], row["status"]) == (
        ACTIVE_ROOM,
        "relay.test",
        2,
        "pending",
    )
    assert rows(holder) == []  # asking is not an offence


async def test_policy_list_ban_applies_in_every_room_and_follows_the_list(make_runtime):
    """A ban on *.denied.test read from a policy room refuses that server as origin in a
    room without any ACL; removing the rule lifts it after a refresh, no restart."""
    rule = {
        "type": "m.policy.rule.server",
        "state_key": "r",
        "content": {"entity": "*.denied.test", "recommendation": "m.ban"},
    }
    source = StaticStateSource({ROOM: room_policy_from_state(ROOM, [])}, raw={BANS: [rule]})
    holder = make_runtime(source=source, extra=f"policy: {{policy_lists: ['{BANS}']}}\n")
    await holder.runtime.policy.refresh()
    flow = await run(holder, send_flow("x.denied.test", [pdu("@a:x.denied.test")]))
    assert flow.response is not None  # every PDU refused: answered locally
    assert [r["rule"] for r in rows(holder)] == ["policy.origin"]
    source.raw[BANS] = [{**rule, "content": {}}]  # rule removed (spec: empty content)
    await holder.runtime.policy.refresh()
    allowed = await run(holder, send_flow("x.denied.test", [pdu("@a:x.denied.test", body="2")]))
    assert allowed.response is None


async def test_reference_to_relayed_leak_and_the_leaks_report(make_runtime, capsys):
    """The relay's next event built on the leaked one: leak.reference blamed on the relay;
    `modgud leaks` groups both per room and blamed server; a restart remembers."""
    from proxy_addons.cli import main
    from proxy_addons.leaks import RefusedEvents
    from rules.eventhash import compute_event_id
    from rules.roomversion import get_room_version

    holder = make_runtime()
    leaked = pdu("@evil:denied.test", body="leak")
    await run(holder, send_flow("relay.test", [leaked]))  # refused: acl.sender
    leaked_id = compute_event_id(leaked, get_room_version("10"))
    built = pdu("@ok:relay.test", body="on top")
    built["prev_events"] = [leaked_id]
    flow = await run(holder, send_flow("relay.test", [built], txn_id="t2"))
    assert flow.response is None  # flagged, forwarded
    found = [(r["rule"], r["action"], r["attributed_to"]) for r in rows(holder)]
    assert found == [
        ("acl.sender", "rejected", "relay.test"),
        ("leak.reference", "flagged", "relay.test"),
    ]
    database = holder.runtime.config.database
    assert main(["leaks", "--db", database]) == 0
    report = capsys.readouterr().out
    assert "blamed relay.test: 2 event(s)" in report and "leak.reference" in report
    restarted = RefusedEvents()
    assert restarted.load(database) == 1 and restarted.rooms[ROOM] == {leaked_id: "denied.test"}


async def test_event_index_records_author_and_every_delivering_server(make_runtime):
    """Every PDU is indexed by room and content hash: author, first deliverer, all
    deliverers, and the event ID where the edge computed one."""
    from proxy_addons.eventindex import lookup_events

    holder = make_runtime()
    event = pdu("@a:good.test", body="indexed")
    await run(holder, send_flow("good.test", [event]))
    await run(holder, send_flow("relay.test", [event], txn_id="t2"))  # the same event, relayed
    await run(holder, send_flow("relay.test", [event], txn_id="t3"))  # again: no new row work
    assert holder.runtime.store.flush(5)
    content_hash = event["hashes"]["sha256"]
    row = lookup_events(holder.runtime.config.database, ROOM, [content_hash])[content_hash]
    assert (row["author"], row["first_origin"], row["delivered_by"], row["deliveries"]) == (
        "good.test",
        "good.test",
        "good.test,relay.test",
        2,
    )
    assert row["event_id"] is not None  # the relay made it a leak.relayed finding: ID known
