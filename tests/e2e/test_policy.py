"""Server authorisation beyond ACLs against real Synapse behind modgud, with the peer:
the knock approval queue end to end through the CLI, and a policy-list ban applied in
every room, to origin and author, without a restart."""

from __future__ import annotations

import json
import time

import pytest

from proxy_addons.testbed.homeserver import ClientApi, ClientError
from proxy_addons.testbed.peer import PeerError

pytestmark = pytest.mark.e2e


def test_knock_queue_approve_then_join_and_post(enforce_topology):
    """A room with MSC4124's knock rule `active`: an unknown server is told to knock, its
    knock is queued, `modgud approve` writes m.server.participation through the
    Client-Server API, and the server can then join and post; a server nobody approved
    still cannot post."""
    topo = enforce_topology
    room_id = topo.alice.create_room(room_version="10")
    topo.peer_join(topo.leaky, "early", room_id)  # joined before the room opted in
    topo.alice.send_state(room_id, "m.server.knock_rule", "", {"rule": "active"})
    time.sleep(1.5)  # modgud refetches the room 1 s after the hook heard of the rule
    with pytest.raises(PeerError, match="knock first"):
        topo.peer_join(topo.unknown, "newbie", room_id)

    knock = {"edu_type": "m.server.knock", "content": {"room_id": room_id}}
    assert topo.peer_send(topo.unknown, edus=[knock]).status == 200
    listed = topo.alice.wait_for(
        lambda: [
            json.loads(line)
            for line in topo.cli("knocks", "--room", room_id, "--json").stdout.splitlines()
        ],
        timeout=15,
    )
    assert [(k["server"], k["status"], k["count"]) for k in listed] == [
        (topo.unknown.name, "pending", 1)
    ]
    table = topo.cli("knocks", "--room", room_id).stdout
    assert topo.unknown.name in table and "pending" in table

    approved = topo.cli("approve", room_id, topo.unknown.name, "--reason", "welcome")
    assert approved.returncode == 0, approved.stderr
    state = topo.alice.get_state(room_id, "m.server.participation", topo.unknown.name)
    assert state == {"participation": "permitted", "reason": "welcome"}
    # The module notes the approval as Synapse takes it; the edge reads the change within
    # 0.5 s (ChangeFollower) and the room's state again: a join before that is refused.
    time.sleep(1.5)

    def joins() -> bool:
        try:
            topo.peer_join(topo.unknown, "newbie", room_id)
            return True
        except PeerError:
            return False

    assert topo.alice.wait_for(joins, timeout=20), topo.modgud_log()
    user = topo.unknown.user("newbie")
    _, pdu = topo.peer.build_event(
        room_id, topo.unknown, user, "m.room.message", {"msgtype": "m.text", "body": "approved!"}
    )
    assert topo.peer_send(topo.unknown, [pdu]).status == 200
    assert topo.alice.wait_for_message(room_id, "approved!")

    early = topo.leaky.user("early")
    _, pdu = topo.peer.build_event(
        room_id, topo.leaky, early, "m.room.message", {"msgtype": "m.text", "body": "unapproved"}
    )
    topo.peer_send(topo.leaky, [pdu])
    rows = topo.wait_for_findings(
        lambda r: any(f["attributed_to"] == topo.leaky.name for f in r), room=room_id
    )
    assert [(f["rule"], f["attributed_to"], f["endpoint"]) for f in rows] == [
        ("participation.origin", topo.unknown.name, "make_join"),  # before its approval
        ("participation.origin", topo.leaky.name, "send"),
    ]
    assert topo.alice.messages(room_id) and "unapproved" not in [
        e["content"].get("body") for e in topo.alice.messages(room_id)
    ]
    assert [
        k["status"]
        for k in json.loads(
            "["
            + ",".join(topo.cli("knocks", "--room", room_id, "--json").stdout.splitlines())
            + "]"
        )
    ] == ["approved"]


def test_deny_without_power_or_room_is_a_clear_error(enforce_topology):
    topo = enforce_topology
    unknown_room = topo.cli("deny", "!nope:" + topo.hs1.server_name, "x.test")
    assert unknown_room.returncode == 1
    assert "unknown room" in unknown_room.stderr
    room_id = topo.bob.create_room()  # a room on hs2: hs1's admin is not in it
    outsider = topo.cli("deny", room_id, "x.test")
    assert outsider.returncode == 1 and "unknown room" in outsider.stderr


def test_policy_list_ban_blocks_origin_and_author_in_every_room(enforce_topology):
    """A rule banning *.denied.test in the subscribed policy room: the banned server is
    refused as origin in one room and as author (relayed by the leaky server) in another,
    though neither room has an ACL; removing the rule lifts the ban. No restart."""
    topo = enforce_topology
    rooms = [topo.alice.create_room(room_version="10") for _ in range(2)]
    for room_id in rooms:
        topo.peer_join(topo.spammer, "spam", room_id)
        topo.peer_join(topo.leaky, "lee", room_id)
    rule = {"entity": "*.denied.test", "recommendation": "m.ban", "reason": "spam"}
    topo.alice.send_state(topo.policy_room, "m.policy.rule.server", "ban-denied", rule)
    spam = topo.spammer.user("spam")

    def message(room_id, body):
        # Built on what hs1 has: the refused messages are in the peer's view, not in hs1's.
        latest = topo.alice.messages(room_id, limit=1)[0]["event_id"]
        content = {"msgtype": "m.text", "body": body}
        return topo.peer.build_event(
            room_id, topo.spammer, spam, "m.room.message", content, prev_events=[latest]
        )[1]

    def refused_as_origin():
        topo.peer_send(topo.spammer, [message(rooms[0], "spam as origin")])
        return any(f["rule"] == "policy.origin" for f in topo.findings(room=rooms[0]))

    assert topo.alice.wait_for(refused_as_origin, timeout=20, interval=1), topo.modgud_log()
    topo.peer_send(topo.leaky, [message(rooms[1], "spam relayed")])
    rows = topo.wait_for_findings(
        lambda r: any(f["rule"] == "policy.sender" for f in r), room=rooms[1]
    )
    assert [(f["rule"], f["attributed_to"]) for f in rows] == [("policy.sender", topo.leaky.name)]
    bodies = [e["content"].get("body") for r in rooms for e in topo.alice.messages(r)]
    assert "spam relayed" not in bodies
    # The hook's user_may_invite (Synapse skips it for server admins, so not alice).
    _, token = topo.hs1.register_user("dave")
    dave = ClientApi(topo.hs1.base_url, token)
    with pytest.raises(ClientError) as refused:
        dave.invite(dave.create_room(), topo.spammer.user("other"))
    assert refused.value.status == 403 and "policy list" in refused.value.body

    topo.alice.send_state(topo.policy_room, "m.policy.rule.server", "ban-denied", {})

    def lifted():
        body = f"forgiven {len(topo.findings(room=rooms[0]))}"
        topo.peer_send(topo.spammer, [message(rooms[0], body)])
        return topo.alice.wait_for_message(rooms[0], body, timeout=3)

    assert topo.alice.wait_for(lifted, timeout=30, interval=1)
