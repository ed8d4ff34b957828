"""One policy for a whole space (MSC3216) against real Synapse behind modgud: the space's
ACL binds three nested rooms at the edge, `drift` reports the rooms that differ, an
atomic `sync` that would fail in one room changes nothing, and `sync` with that room
allowed to fail brings every other room in line."""

from __future__ import annotations

import pytest

from proxy_addons.testbed.peer import PeerError

pytestmark = pytest.mark.e2e


def test_space_policy_reaches_nested_rooms_and_sync_is_atomic(enforce_topology):
    topo = enforce_topology
    alice, space, via = topo.alice, topo.space, {"via": [topo.hs1.server_name]}
    a, sub, b, c = (alice.create_room(room_version="10") for _ in range(4))
    for parent, child in ((space, a), (space, sub), (sub, b), (sub, c), (c, space)):  # cycle
        alice.send_state(parent, "m.space.child", child, via)
    acl = {"allow": ["*"], "deny": ["denied.test"], "allow_ip_literals": True}
    alice.send_state(space, "m.room.server_acl", "", acl)

    def refused_in(room_id) -> bool:
        try:
            topo.peer_join(topo.denied, "dee", room_id)
        except PeerError as e:
            return "space" in str(e)
        return False

    for room_id in (c, b, a):  # two levels down, then one: the space's ACL reaches them all
        assert alice.wait_for(lambda r=room_id: refused_in(r), timeout=30, interval=1), room_id
    topo.peer_join(topo.denied, "dee", alice.create_room())  # outside the space: no ACL

    alice.send_state(a, "m.room.server_acl", "", acl)  # a already follows the space
    drift = topo.cli("spaces", "drift", space)
    assert drift.returncode == 1, drift.stderr
    assert "4 rooms" in drift.stdout and "3 differ" in drift.stdout
    assert (
        all(room in drift.stdout for room in (sub, b, c))
        and a not in drift.stdout.split("differ")[1]
    )

    # A room where alice (power 50) may not send state: the sync must change nothing.
    locked = alice.create_room(room_version="10")
    levels = alice.get_state(locked, "m.room.power_levels")
    levels.update(users={topo.users["alice"]: 50}, state_default=100, events={})
    alice.send_state(locked, "m.room.power_levels", "", levels)  # alice demotes herself
    alice.send_state(space, "m.space.child", locked, via)
    refused = topo.cli("spaces", "sync", space)
    assert refused.returncode == 1
    assert (
        "nothing changed" in refused.stderr
        and locked in refused.stderr
        and "no power" in refused.stderr
    )
    assert alice.get_state(b, "m.room.server_acl") is None

    synced = topo.cli("spaces", "sync", space, "--allow-fail", locked)
    assert synced.returncode == 0, synced.stderr
    assert f"skipped {locked}" in synced.stdout
    assert alice.get_state(b, "m.room.server_acl") == acl
    after = topo.cli("spaces", "drift", space)
    assert "1 differ" in after.stdout and locked in after.stdout
