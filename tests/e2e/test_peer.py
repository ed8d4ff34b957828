"""The scripted federation peer against real Synapse, through modgud: it joins, its events
arrive, hs1's events reach it, and hs1 can pull from it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("version", ["1", "3", "5", "10", "11", "12"])
def test_peer_joins_through_modgud_and_its_events_arrive(enforce_topology, version):
    """make_join/send_join via modgud, then a message both ways; no finding (benign)."""
    topo = enforce_topology
    room_id = topo.alice.create_room(room_version=version)
    user, _ = topo.peer_join(topo.leaky, "lee", room_id)
    assert topo.alice.wait_for(lambda: user in topo.alice.joined_members(room_id))
    _, pdu = topo.peer.build_event(
        room_id, topo.leaky, user, "m.room.message", {"msgtype": "m.text", "body": f"hi v{version}"}
    )
    answer = topo.peer_send(topo.leaky, [pdu])
    assert answer.status == 200, answer.body
    assert topo.alice.wait_for_message(room_id, f"hi v{version}")
    topo.alice.send_message(room_id, f"hello peer v{version}")
    assert topo.alice.wait_for(
        lambda: any(
            p.get("content", {}).get("body") == f"hello peer v{version}"
            for _, body in topo.peer.received
            for p in body.get("pdus", [])
        )
    )
    assert topo.findings(room=room_id) == []
