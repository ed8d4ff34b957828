"""`modgud audit` over the capture of a live run (modgud run -- --set save_stream_file=…)
finds what the live edge found, for the flows after the room's last state change."""

from __future__ import annotations

import json
import time

import pytest

from proxy_addons.testbed.scenarios import Stage

pytestmark = pytest.mark.e2e


def test_replaying_a_live_capture_finds_the_same(enforce_topology, tmp_path):
    topo = enforce_topology
    stage = Stage(topo, "10")
    stage.open_room()
    dee = stage.join("denied", "dee")
    lee = stage.join("leaky", "lee")
    stage.deny("denied")
    time.sleep(1)
    since = time.time()
    leak = stage.message("denied", dee, "leak for the replay")
    stage.send("leaky", [leak])
    stage.send(
        "leaky",
        [stage.message("leaky", lee, "on top", prev_events=[stage.event_id(leak)])],
    )
    stage.send("leaky", [stage.message("leaky", lee, "mixed"), stage.message("denied", dee, "m")])

    def live():
        return {
            (f["rule"], f["event_id"], f["attributed_to"])
            for f in topo.findings(room=stage.room_id)
            if f["ts"] >= since and f["endpoint"] != "hook"
        }

    assert topo.alice.wait_for(lambda: len(live()) >= 3, timeout=20)
    time.sleep(1)
    out = tmp_path / "replay.db"
    audit = topo.cli("audit", str(topo.capture), "--db", str(out), "--since", str(since), "--json")
    assert audit.returncode == 1, audit.stderr  # leaks found
    replayed = {
        (f["rule"], f["event_id"], f["attributed_to"])
        for f in map(json.loads, audit.stdout.splitlines())
        if f["room_id"] == stage.room_id
    }
    assert replayed == live()
    assert {rule for rule, _, _ in replayed} == {"acl.sender", "leak.reference"}
