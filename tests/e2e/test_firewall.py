"""modgud in front of a real Synapse (hs1), with real Synapse peers hs2 and hs3.

hs2 (127.0.0.1:*) is the server the rooms' ACLs deny; hs3 (localhost:*) stays allowed and
plays the relay. Synapse 1.163 checks ACLs only against the delivering server, so an event
written by hs2 and relayed by hs3 is shown to hs1's users unless modgud stops it.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.e2e

VERSIONS = ["10", "12"]
DENY_HS2 = {"allow": ["*"], "deny": ["127.0.0.1"]}


def shared_room(topo, version, *, with_carol=False):
    """A public room on hs1 that bob (hs2), and optionally carol (hs3), have joined."""
    room_id = topo.alice.create_room(room_version=version)
    topo.bob.join(room_id, via=[topo.hs1.server_name])
    assert topo.alice.wait_for(lambda: topo.users["bob"] in topo.alice.joined_members(room_id))
    if with_carol:
        topo.carol.join(room_id, via=[topo.hs1.server_name])
        assert topo.alice.wait_for(
            lambda: topo.users["carol"] in topo.alice.joined_members(room_id)
        )
    return room_id


def deny_hs2(topo, room_id):
    """Set the ACL, then give modgud time to see it: the hook hears of a local state event
    before Synapse stores it, and modgud refetches the room 1 s later to be sure."""
    topo.alice.send_state(room_id, "m.room.server_acl", "", DENY_HS2)
    time.sleep(1.5)


def bodies(api, room_id):
    return [
        e["content"].get("body") for e in api.messages(room_id) if e["type"] == "m.room.message"
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_benign_federation_passes_with_zero_findings(any_enforce_topology, version):
    """Messages both ways, typing and receipts through modgud: everything arrives and
    modgud records nothing (no false positives)."""
    topo = any_enforce_topology
    room_id = shared_room(topo, version)
    topo.bob.send_message(room_id, f"hello from bob v{version}")
    assert topo.alice.wait_for_message(room_id, f"hello from bob v{version}")
    event_id = topo.alice.send_message(room_id, f"hello from alice v{version}")
    assert topo.bob.wait_for_message(room_id, f"hello from alice v{version}")
    topo.bob.typing(room_id, topo.users["bob"], True)
    topo.bob.receipt(room_id, event_id)
    topo.bob.send_message(room_id, "last")
    assert topo.alice.wait_for_message(room_id, "last")
    time.sleep(1)  # let the store flush
    assert topo.findings(room=room_id) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_acl_denied_server_is_refused_and_recorded(enforce_topology, version):
    """After hs1's admin denies hs2, hs2's next message is refused by modgud (at the edge
    or by the hook) with a finding naming hs2, and hs1's users never see it."""
    topo = enforce_topology
    room_id = shared_room(topo, version)
    deny_hs2(topo, room_id)
    assert topo.bob.wait_for(lambda: topo.bob.get_state(room_id, "m.room.server_acl"))
    topo.bob.send_message(room_id, "after the ACL")
    rows = topo.wait_for_findings(lambda r: any(f["rule"] == "acl.origin" for f in r), room=room_id)
    refused = [f for f in rows if f["rule"] == "acl.origin"]
    assert refused, topo.modgud_log()
    assert refused[0]["attributed_to"] == topo.hs2.server_name
    assert refused[0]["action"] in ("rejected", "dropped")
    assert refused[0]["event_id"]
    time.sleep(2)
    assert "after the ACL" not in bodies(topo.alice, room_id)


@pytest.fixture(params=["module", "hook"])
def judged_inside(request):
    """Enforce mode with modgud's Synapse module, and with the HTTP hook, inside hs1."""
    return request.getfixturevalue(
        "enforce_topology" if request.param == "module" else "hook_topology"
    )


def judged_by_inside(topo, callback="check_event_for_spam"):
    """The refusals counted by what judges inside hs1: the module's calls on hs1's own
    metrics listener (decided by itself), or the hook's on modgud's (decided by what the
    edge told it)."""
    if topo.inside == "module":
        metric = "modgud_module_calls_total"
        text, decided_by = topo.hs1.metrics_text(), "module"
    else:
        metric = "modgud_hook_calls_total"
        text, decided_by = topo.metrics_text(), "edge"
    labels = f'{{answer="refuse",callback="{callback}",decided_by="{decided_by}"}}'
    for line in text.splitlines():
        if line.startswith(metric + labels):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("version", VERSIONS)
def test_relayed_event_of_denied_server_is_hidden_inside_the_homeserver(judged_inside, version):
    """hs3 (allowed) relays an event written by hs2 (denied) next to an allowed EDU: the
    transaction is forwarded untouched, and the module (or the event hook) makes Synapse
    drop the event; the edge's finding blames the relay."""
    topo = judged_inside
    refused_before = judged_by_inside(topo)
    room_id = shared_room(topo, version, with_carol=True)
    deny_hs2(topo, room_id)
    body = f"leak v{version}"
    event_id, pdu = topo.craft_message(room_id, version, topo.hs2, topo.users["bob"], body)
    typing = {
        "edu_type": "m.typing",
        "content": {"room_id": room_id, "user_id": topo.users["carol"], "typing": True},
    }
    status, answer = topo.send_transaction(topo.hs3, [pdu], [typing])
    assert status == 200, answer
    rows = topo.wait_for_findings(lambda r: any(f["event_id"] == event_id for f in r), room=room_id)
    (finding,) = [f for f in rows if f["event_id"] == event_id]
    assert (finding["rule"], finding["action"]) == ("acl.sender", "dropped")
    assert finding["attributed_to"] == topo.hs3.server_name
    assert finding["sender_server"] == topo.hs2.server_name
    assert finding["confidence"] == "high"  # hs2's signature verified: hs2 really wrote it
    time.sleep(2)
    assert body not in bodies(topo.alice, room_id)
    assert judged_by_inside(topo) > refused_before


@pytest.mark.parametrize("version", VERSIONS)
def test_relayed_event_alone_is_answered_at_the_edge(enforce_topology, version):
    """A transaction holding only the denied server's event is answered by modgud itself,
    with that event ID's error in Synapse's /send response shape."""
    topo = enforce_topology
    room_id = shared_room(topo, version, with_carol=True)
    deny_hs2(topo, room_id)
    event_id, pdu = topo.craft_message(room_id, version, topo.hs2, topo.users["bob"], "edge leak")
    status, answer = topo.send_transaction(topo.hs3, [pdu])
    assert status == 200
    assert answer["pdus"][event_id]["errcode"] == "M_FORBIDDEN"
    assert "127.0.0.1" in answer["pdus"][event_id]["error"]
    rows = topo.wait_for_findings(lambda r: any(f["event_id"] == event_id for f in r), room=room_id)
    assert [f["action"] for f in rows if f["event_id"] == event_id] == ["rejected"]


@pytest.mark.parametrize("version", VERSIONS)
def test_audit_mode_passes_everything_and_flags(audit_topology, version):
    """Audit: the relayed leak passes (Synapse shows it — the gap modgud reports) and the
    finding is `flagged`; nothing is refused by modgud."""
    topo = audit_topology
    room_id = shared_room(topo, version, with_carol=True)
    deny_hs2(topo, room_id)
    body = f"audited leak v{version}"
    event_id, pdu = topo.craft_message(room_id, version, topo.hs2, topo.users["bob"], body)
    status, answer = topo.send_transaction(topo.hs3, [pdu])
    assert status == 200
    assert answer["pdus"].get(event_id, {}) == {}, answer
    assert topo.alice.wait_for_message(room_id, body), (
        "Synapse itself should accept the relayed event"
    )
    rows = topo.wait_for_findings(lambda r: any(f["event_id"] == event_id for f in r), room=room_id)
    assert [(f["rule"], f["action"]) for f in rows if f["event_id"] == event_id] == [
        ("acl.sender", "flagged")
    ]


def test_benign_room_hosted_elsewhere_yields_no_leak_finding(any_enforce_topology):
    """A room on hs2 that hs1 and hs3 join through hs2: hs2 passes hs3's join and leave on
    to hs1 (legitimate relays), and messages, reactions, edits, redactions and state
    changes flow; modgud records nothing for the room (nor for hs1's own requests, through
    the outbound listener)."""
    topo = any_enforce_topology
    room_id = topo.bob.create_room(room_version="10")
    topo.alice.join(room_id, via=[topo.hs2.server_name])
    topo.carol.join(room_id, via=[topo.hs2.server_name])
    assert topo.alice.wait_for(lambda: topo.users["carol"] in topo.alice.joined_members(room_id))
    message = topo.carol.send_message(room_id, "hello from carol")
    topo.carol.send_event(
        room_id,
        "m.reaction",
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": message, "key": "+1"}},
    )
    topo.carol.send_event(
        room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "* edited",
            "m.new_content": {"msgtype": "m.text", "body": "edited"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": message},
        },
    )
    topo.bob.redact(room_id, topo.bob.send_message(room_id, "oops"))
    topo.bob.send_state(room_id, "m.room.topic", "", {"topic": "benign"})
    topo.carol.leave(room_id)
    assert topo.alice.wait_for(
        lambda: topo.users["carol"] not in topo.alice.joined_members(room_id)
    )
    assert topo.alice.wait_for_message(room_id, "hello from carol")
    time.sleep(2)
    assert topo.findings(room=room_id) == []


def test_benign_invites_knocks_and_a_room_upgrade_yield_no_finding(any_enforce_topology):
    """Between real Synapses, through hs2's room: bob invites alice (an /invite into hs1),
    carol knocks and bob lets her in, then bob upgrades the room and alice follows; modgud
    records nothing for either room."""
    topo = any_enforce_topology
    knock_rule = {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
    room_id = topo.bob.create_room(room_version="10", initial_state=[knock_rule])
    topo.bob.invite(room_id, topo.users["alice"])
    assert topo.alice.wait_for(lambda: _invited(topo, room_id), timeout=30)
    topo.alice.join(room_id, via=[topo.hs2.server_name])
    topo.carol.knock(room_id, via=[topo.hs2.server_name])
    assert topo.bob.wait_for(
        lambda: (
            (topo.bob.get_state(room_id, "m.room.member", topo.users["carol"]) or {}).get(
                "membership"
            )
            == "knock"
        )
    )
    topo.bob.invite(room_id, topo.users["carol"])
    topo.carol.join(room_id, via=[topo.hs2.server_name])
    assert topo.alice.wait_for(lambda: topo.users["carol"] in topo.alice.joined_members(room_id))
    topo.bob.send_state(room_id, "m.room.join_rules", "", {"join_rule": "public"})
    new_room = topo.bob.upgrade(room_id, "11")  # keeps the join rule: alice may follow
    assert topo.alice.wait_for(lambda: topo.alice.get_state(room_id, "m.room.tombstone"))
    topo.alice.join(new_room, via=[topo.hs2.server_name])
    topo.bob.send_message(new_room, "upgraded")
    assert topo.alice.wait_for_message(new_room, "upgraded")
    time.sleep(2)
    assert topo.findings(room=room_id) == [] and topo.findings(room=new_room) == []


def _invited(topo, room_id):
    sync = topo.alice._call("GET", "/sync?timeout=0")
    return room_id in sync.get("rooms", {}).get("invite", {})
