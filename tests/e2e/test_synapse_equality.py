"""modgud's protocol core against real Synapse: for events a real Synapse created in rooms
of versions 1, 3, 5, 10, 11 and 12, modgud computes exactly Synapse's event IDs, content
hashes, redacted forms and (v12) room IDs, and verifies Synapse's signatures.

The events are read from Synapse's own database (`event_json`); the expected redacted
forms come from Synapse's own code (`redact_event_dict`), run in Synapse's interpreter.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest
from signedjson.key import get_verify_key

from proxy_addons.testbed.homeserver import (
    ClientApi,
    SynapseHomeserver,
    free_port,
    read_signing_key,
    synapse_python,
)
from rules.eventhash import (
    check_content_hash,
    compute_content_hash,
    compute_event_id,
    compute_room_id_v12,
    encode_unpadded_base64,
)
from rules.redaction import redact_event
from rules.roomversion import get_room_version
from rules.signatures import ServerKey, verify_event_signatures

pytestmark = pytest.mark.e2e

VERSIONS = ["1", "3", "5", "10", "11", "12"]

# Runs inside Synapse's virtualenv: Synapse's own redaction of each event.
SYNAPSE_SCRIPT = """
import json, sys
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.synapse_rust.events import redact_event_dict
out = []
for item in json.load(sys.stdin):
    rv = KNOWN_ROOM_VERSIONS[item["room_version"]]
    out.append(dict(redact_event_dict(rv, item["event"])))
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """Rooms of every version with a varied set of events, read back from Synapse's DB."""
    port = free_port()
    hs = SynapseHomeserver(tmp_path_factory.mktemp("eq"), f"localhost:{port}", http_port=port)
    hs.start()
    try:
        _, token = hs.register_user("admin", admin=True)
        api = ClientApi(hs.base_url, token)
        rooms = {}
        for version in VERSIONS:
            room_id = api.create_room(room_version=version, name=f"v{version}")
            rooms[room_id] = version
            api.send_state(room_id, "m.room.topic", "", {"topic": "equality"})
            api.send_state(
                room_id, "m.room.server_acl", "", {"allow": ["*"], "deny": ["evil.example"]}
            )
            api.send_state(
                room_id, "m.room.history_visibility", "", {"history_visibility": "joined"}
            )
            rule = (
                "restricted" if int(version) >= 8 else ("knock" if int(version) >= 7 else "invite")
            )
            content = {"join_rule": rule}
            if rule == "restricted":
                content["allow"] = [{"type": "m.room_membership", "room_id": room_id}]
            api.send_state(room_id, "m.room.join_rules", "", content)
            message = api.send_message(room_id, f"hello v{version} ✓")
            api.redact(room_id, message, reason="equality test")
            api.send_message(room_id, "after the redaction")
        db = sqlite3.connect(f"file:{hs.workdir / 'homeserver.db'}?mode=ro", uri=True)
        rows = db.execute(
            "SELECT e.event_id, e.room_id, j.json FROM events e JOIN event_json j USING (event_id)"
        ).fetchall()
        db.close()
        events = [(eid, rooms[rid], json.loads(js)) for eid, rid, js in rows if rid in rooms]
        payload = json.dumps([{"room_version": v, "event": ev} for _, v, ev in events])
        result = subprocess.run(
            [synapse_python(), "-c", SYNAPSE_SCRIPT],
            input=payload,
            capture_output=True,
            text=True,
            check=True,
        )
        redacted = json.loads(result.stdout)
        key = read_signing_key(hs.signing_key_path)
        return hs.server_name, key, rooms, [(*e, r) for e, r in zip(events, redacted, strict=True)]
    finally:
        hs.stop()


def test_every_room_version_was_captured(captured):
    """All six room versions produced events (so a missing version cannot pass silently)."""
    _, _, rooms, events = captured
    assert sorted(set(rooms.values()), key=int) == VERSIONS
    for version in VERSIONS:
        assert sum(1 for _, v, _, _ in events if v == version) >= 8


def test_event_ids_match_synapse(captured):
    """modgud computes exactly Synapse's event ID for every event of every version."""
    _, _, _, events = captured
    mismatches = [
        (v, eid, compute_event_id(ev, get_room_version(v)))
        for eid, v, ev, _ in events
        if compute_event_id(ev, get_room_version(v)) != eid
    ]
    assert mismatches == []


def test_content_hashes_match_synapse(captured):
    """Synapse's hashes.sha256 equals modgud's content hash (redacted events excepted:
    Synapse stores the original, so those must match too)."""
    _, _, _, events = captured
    for eid, _, ev, _ in events:
        assert check_content_hash(ev), eid
        assert ev["hashes"]["sha256"] == encode_unpadded_base64(compute_content_hash(ev))


def test_redacted_forms_match_synapse(captured):
    """modgud's redaction equals Synapse's redact_event_dict, event by event."""
    _, _, _, events = captured
    for eid, v, ev, expected in events:
        assert redact_event(ev, get_room_version(v)) == expected, (v, eid, ev["type"])


def test_v12_room_id_derives_from_create_event(captured):
    """Room v12: the room ID is the create event's reference hash (no server part)."""
    _, _, rooms, events = captured
    (room_id,) = [r for r, v in rooms.items() if v == "12"]
    (create,) = [ev for _, v, ev, _ in events if v == "12" and ev["type"] == "m.room.create"]
    assert "room_id" not in create
    assert ":" not in room_id
    assert compute_room_id_v12(create) == room_id


def test_synapse_signatures_verify(captured):
    """Every event verifies against the server's real signing key; tampering breaks it."""
    server_name, key, _, events = captured
    verify_key = get_verify_key(key)
    key_id = f"ed25519:{key.version}"

    def lookup(name, kid):
        return (
            ServerKey(name, kid, verify_key, 2**62)
            if (name, kid) == (server_name, key_id)
            else None
        )

    for eid, v, ev, _ in events:
        assert verify_event_signatures(ev, get_room_version(v), lookup).ok, eid
    _, v, ev, _ = events[-1]
    assert not verify_event_signatures(
        {**ev, "depth": ev["depth"] + 1}, get_room_version(v), lookup
    ).ok
