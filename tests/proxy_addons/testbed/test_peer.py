"""The federation peer's own logic, without a network: the events it builds must be what
rules/ (and so Synapse) accepts, its misbehaviours must be the ones asked for, and what it
serves must follow the DAG it knows."""

from __future__ import annotations

import pytest
from signedjson.key import get_verify_key
from signedjson.sign import verify_signed_json

from proxy_addons.testbed.homeserver import free_port
from proxy_addons.testbed.peer import FederationPeer
from rules.eventhash import check_content_hash
from rules.signatures import ServerKey, verify_event_signatures

VERSIONS = [str(v) for v in range(1, 13)]


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    peer = FederationPeer(tmp_path_factory.mktemp("peer"), free_port())
    peer.add_server()  # leaky
    peer.add_server("denied.test")
    return peer


def leaky(peer):
    return next(s for s in peer.servers.values() if s.reachable and s is not peer.notary)


def lookup(peer):
    def find(server_name, key_id):
        server = peer.servers.get(server_name)
        if server is None or server.key_id != key_id:
            return None
        return ServerKey(server_name, key_id, get_verify_key(server.signing_key), 2**53)

    return find


@pytest.mark.parametrize("version", VERSIONS)
def test_built_events_verify_in_every_room_version(peer, version):
    """Hashes and signatures of a hosted room's events verify with rules/, event IDs are
    computed, and v1/v2 references carry the referenced event's hash."""
    server = leaky(peer)
    room_id = peer.create_room(server, server.user("host"), version)
    room = peer.rooms[room_id]
    event_id, event = peer.build_event(
        room_id, server, server.user("host"), "m.room.message", {"body": "x"}
    )
    assert check_content_hash(event)
    assert verify_event_signatures(event, room.version, lookup(peer)).ok
    assert event_id in room.events and room.extremities == [event_id]
    assert len(room.events) == 6  # create, join, power levels, join rules, visibility, message
    if version in ("1", "2"):
        assert isinstance(event["prev_events"][0], list) and "sha256" in event["prev_events"][0][1]
    if version == "12":
        assert room_id.startswith("!") and ":" not in room_id
        assert peer.event_id_of(room, room.events[room.state[("m.room.create", "")]])


def test_signature_misbehaviours(peer):
    """drop: no signatures; forge: same key ID, another key; both fail verification."""
    server = leaky(peer)
    room_id = peer.create_room(server, server.user("host"))
    room = peer.rooms[room_id]
    for mode in ("drop", "forge"):
        _, event = peer.build_event(
            room_id, server, server.user("host"), "m.room.message", {}, signature=mode, record=False
        )
        assert not verify_event_signatures(event, room.version, lookup(peer)).ok
    # a relayed event signed by its author and by the relay
    denied = peer.servers["denied.test"]
    _, event = peer.build_event(
        room_id, denied, denied.user("d"), "m.room.message", {}, signers=[server]
    )
    assert set(event["signatures"]) == {"denied.test", server.name}


def test_missing_events_follow_the_dag_and_poison_is_added(peer):
    """get_missing_events walks back from latest to earliest; poisoned events are added."""
    server = leaky(peer)
    room_id = peer.create_room(server, server.user("host"))
    first, _ = peer.build_event(room_id, server, server.user("host"), "m.room.message", {"n": 1})
    second, _ = peer.build_event(room_id, server, server.user("host"), "m.room.message", {"n": 2})
    third, _ = peer.build_event(room_id, server, server.user("host"), "m.room.message", {"n": 3})
    body = {"earliest_events": [first], "latest_events": [third], "limit": 10}
    status, answer = peer._answer(
        server, "POST", f"/_matrix/federation/v1/get_missing_events/{room_id}", {}, body
    )
    assert status == 200
    assert [e["content"] for e in answer["events"]] == [{"n": 2}]
    _, stray = peer.build_event(
        room_id, server, server.user("host"), "m.room.message", {"n": "x"}, record=False
    )
    peer.poison[room_id] = [stray]
    status, answer = peer._answer(
        server, "POST", f"/_matrix/federation/v1/get_missing_events/{room_id}", {}, body
    )
    assert [e["content"] for e in answer["events"]] == [{"n": 2}, {"n": "x"}]
    assert second in peer.rooms[room_id].events


def test_notary_answers_are_signed_by_the_server_and_the_notary(peer):
    status, answer = peer._answer(
        peer.notary,
        "POST",
        "/_matrix/key/v2/query",
        {},
        {"server_keys": {"denied.test": {}, "nobody.test": {}}},
    )
    assert status == 200
    (entry,) = answer["server_keys"]
    denied = peer.servers["denied.test"]
    verify_signed_json(entry, "denied.test", get_verify_key(denied.signing_key))
    verify_signed_json(entry, peer.notary.name, get_verify_key(peer.notary.signing_key))
