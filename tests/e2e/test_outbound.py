"""The outbound listener against real Synapse: hs1's https_proxy is modgud, hs1 trusts
modgud's CA (federation_custom_ca_list, certificates verified). What hs1 would send to a
server refused in a room never reaches it; a transaction mixing refused and allowed
events is rebuilt and signed again with hs1's key; events a server serves to hs1's own
pulls are attributed to it; the capture replays to the same findings."""

from __future__ import annotations

import json
import time

import pytest
from signedjson.key import get_verify_key

from proxy_addons.testbed.homeserver import read_signing_key
from proxy_addons.testbed.scenarios import Stage
from rules.xmatrix import parse_xmatrix, verify_request_signature

pytestmark = pytest.mark.e2e

DENY = {"participation": "deny"}


def _received(topo, body):
    return any(
        p.get("content", {}).get("body") == body
        for _, txn in topo.peer.received
        for p in txn.get("pdus", [])
    )


def _outbound(rows):
    return [f for f in rows if f["rule"] == "leak.outbound"]


def _room_with_outcast(topo, localpart):
    room_id = topo.alice.create_room(room_version="10")
    topo.peer_join(topo.outcast, localpart, room_id)
    return room_id


def _deny_outcast(topo, room_id):
    topo.alice.send_state(room_id, "m.server.participation", topo.outcast.name, DENY)
    time.sleep(1.5)  # the hook hears of it before Synapse stores it


def test_push_to_a_server_refused_in_the_room_never_reaches_it(outbound_topology):
    """Participation `deny` (Synapse knows nothing of MSC4124 and keeps sending the room's
    events to the server): modgud answers those transactions itself, as delivered, so the
    server gets nothing and hs1 does not back off it — its other room still flows."""
    topo = outbound_topology
    refused_room = _room_with_outcast(topo, "out1")
    other_room = _room_with_outcast(topo, "out2")
    topo.alice.send_message(refused_room, "before the deny")
    assert topo.alice.wait_for(lambda: _received(topo, "before the deny")), topo.modgud_log()
    _deny_outcast(topo, refused_room)
    topo.alice.send_message(refused_room, "after the deny")
    rows = topo.wait_for_findings(lambda r: bool(_outbound(r)), room=refused_room)
    found = _outbound(rows)
    assert found, topo.modgud_log()
    assert {f["attributed_to"] for f in found} == {topo.hs1.server_name}
    assert {(f["direction"], f["action"]) for f in found} == {("outbound", "rejected")}
    assert "participation" in found[0]["detail"]
    topo.alice.send_message(other_room, "the other room still flows")
    assert topo.alice.wait_for(lambda: _received(topo, "the other room still flows"), timeout=20)
    assert not _received(topo, "after the deny")


def test_acl_denied_server_gets_none_of_the_rooms_events(outbound_topology):
    """Synapse sends a room's events to every joined server, the ones its ACL denies
    included: those pushes are refused, and so are typing notices for the room."""
    topo = outbound_topology
    room_id = _room_with_outcast(topo, "out3")
    host = topo.outcast.name.rsplit(":", 1)[0]
    topo.alice.send_state(room_id, "m.room.server_acl", "", {"allow": ["*"], "deny": [host]})
    time.sleep(1.5)
    topo.alice.send_message(room_id, "not for the denied server")
    topo.alice.typing(room_id, topo.users["alice"], True)
    rows = topo.wait_for_findings(
        lambda r: {"m.room.message", "m.typing"} <= {f["event_type"] for f in _outbound(r)},
        room=room_id,
    )
    assert {"m.room.message", "m.typing"} <= {f["event_type"] for f in _outbound(rows)}, rows
    assert all("ACL" in f["detail"] for f in _outbound(rows))
    time.sleep(1)
    assert not _received(topo, "not for the denied server")
    typing = [
        e
        for _, txn in topo.peer.received
        for e in txn.get("edus", [])
        if e.get("edu_type") == "m.typing" and e.get("content", {}).get("room_id") == room_id
    ]
    assert typing == []


def test_mixed_transaction_is_rebuilt_and_signed_with_the_homeservers_key(outbound_topology):
    """The outcast server answers slowly, so hs1 queues and sends events of two rooms in
    one transaction; modgud removes the refused room's event and signs the rest with hs1's
    key — the server gets the allowed event and a signature that verifies."""
    topo = outbound_topology
    allowed = _room_with_outcast(topo, "out4")
    refused = _room_with_outcast(topo, "out5")
    _deny_outcast(topo, refused)
    topo.peer.send_delay[topo.outcast.name] = 3.0
    try:
        topo.alice.send_message(allowed, "first, sent alone")
        time.sleep(0.5)  # in flight now: what follows waits and goes out together
        topo.alice.send_message(refused, "refused, in the mix")
        topo.alice.send_message(allowed, "allowed, in the mix")
        assert topo.alice.wait_for(lambda: _received(topo, "allowed, in the mix"), timeout=30)
    finally:
        topo.peer.send_delay.pop(topo.outcast.name)
    assert not _received(topo, "refused, in the mix")
    rows = [
        f for f in _outbound(topo.findings(room=refused)) if f["event_type"] == "m.room.message"
    ]
    assert [f["action"] for f in rows] == ["rejected"], rows
    # The transaction that carried the allowed message was re-signed: verify it.
    verify_key = get_verify_key(read_signing_key(topo.hs1.signing_key_path))
    carrying = [
        (method, path, auth, body)
        for server, method, path, auth, body in topo.peer.signed_sends
        if server == topo.outcast.name
        and any(p.get("content", {}).get("body") == "allowed, in the mix" for p in body["pdus"])
    ]
    assert carrying
    method, path, auth, body = carrying[0]
    parsed = parse_xmatrix(auth[0])
    assert parsed is not None and parsed.origin == topo.hs1.server_name
    assert verify_request_signature(parsed, method, path, topo.outcast.name, body, verify_key)
    # ...and it is the very transaction the refused message was taken out of.
    assert path.rsplit("/", 1)[1] == rows[0]["txn_id"]


def test_pulled_events_of_a_denied_server_are_blamed_on_the_responder(outbound_topology):
    """hs1 pulls (/get_missing_events) the denied server's event from the leaky server: the
    hook keeps it out of the room, and the outbound listener blames the leaky server, low
    confidence, naming the earliest server the event index knows delivered it."""
    topo = outbound_topology
    stage = Stage(topo, "10")
    stage.open_room()
    dee = stage.join("denied", "dee")
    lee = stage.join("leaky", "lee")
    stage.deny("denied")
    hidden = stage.message("denied", dee, "pulled through the proxy")
    stage.send(
        "leaky", [stage.message("leaky", lee, "on top", prev_events=[stage.event_id(hidden)])]
    )
    rows = topo.wait_for_findings(
        lambda r: any(f["rule"] == "leak.pulled" for f in r), room=stage.room_id
    )
    pulled = [f for f in rows if f["rule"] == "leak.pulled"]
    assert pulled, topo.modgud_log()
    assert (pulled[0]["attributed_to"], pulled[0]["confidence"]) == (topo.leaky.name, "low")
    assert pulled[0]["endpoint"] == "get_missing_events"
    assert "no earlier delivery known" in pulled[0]["detail"]
    assert "pulled through the proxy" not in [
        e["content"].get("body") for e in topo.alice.messages(stage.room_id)
    ]


def test_outbound_pdus_are_indexed(outbound_topology):
    """The event index holds hs1's own events as sent (direction outbound)."""
    import sqlite3

    topo = outbound_topology
    room_id = _room_with_outcast(topo, "out6")
    topo.alice.send_message(room_id, "indexed on the way out")
    assert topo.alice.wait_for(lambda: _received(topo, "indexed on the way out"))
    time.sleep(1)
    db = sqlite3.connect(f"file:{topo.database}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT author, first_origin, direction FROM events WHERE room_id = ?", (room_id,)
        ).fetchall()
    finally:
        db.close()
    assert (topo.hs1.server_name, topo.hs1.server_name, "outbound") in rows, rows


def test_replaying_the_outbound_capture_finds_the_same(outbound_topology, tmp_path):
    """`modgud audit` over this topology's capture: the outbound listener's flows replay
    to the same leak.outbound and leak.pulled findings (flagged: audit never alters)."""
    topo = outbound_topology
    since = time.time()
    room_id = _room_with_outcast(topo, "out7")
    _deny_outcast(topo, room_id)
    topo.alice.send_message(room_id, "refused, then replayed")

    def live():
        return {
            (f["rule"], f["event_type"], f["attributed_to"])
            for f in topo.findings(room=room_id)
            if f["direction"] == "outbound"
        }

    assert topo.alice.wait_for(
        lambda: ("leak.outbound", "m.room.message", topo.hs1.server_name) in live()
    )
    time.sleep(1)
    out = tmp_path / "replay.db"
    audit = topo.cli("audit", str(topo.capture), "--db", str(out), "--since", str(since), "--json")
    assert audit.returncode == 1, audit.stderr
    replayed = [json.loads(line) for line in audit.stdout.splitlines()]
    # (the room's inbound flows replay too, judged by its state now: the outcast's join)
    mine = [f for f in replayed if f["room_id"] == room_id and f["direction"] == "outbound"]
    assert {(f["rule"], f["event_type"], f["attributed_to"]) for f in mine} == live()
    assert {f["action"] for f in mine} == {"flagged"}
