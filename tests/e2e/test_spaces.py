"""One policy for a whole space (MSC3216) against real Synapse behind modgud: the space's
ACL binds three nested rooms at the edge, `drift` reports the rooms that differ, an
atomic `sync` that would fail in one room changes nothing, and `sync` with that room
allowed to fail brings every other room in line. The same for the space's power levels
(m.space.power_levels, merged into each room's) and its bans."""

from __future__ import annotations

import secrets

import pytest

from proxy_addons.testbed.homeserver import ClientApi
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


def test_space_power_levels_and_bans_reach_the_rooms(enforce_topology):
    """m.space.power_levels is merged into every child room's power levels (a room's own
    extra user stays, a v12 creator is never listed); a room where the room admin is at
    level 0 blocks an atomic sync and is skipped with --allow-fail; `--only` limits a
    sync to one kind; a ban in the space reaches the rooms with its reason."""
    topo = enforce_topology
    alice, admin, via = topo.alice, topo.users["alice"], {"via": [topo.hs1.server_name]}
    carol, bob = topo.users["carol"], topo.users["bob"]
    space = alice.create_room(name="levels space")  # not topo.space: the test above uses it
    own = alice.create_room()  # v12: alice is its creator, never in `users`
    older = alice.create_room(room_version="10")
    levels = alice.get_state(own, "m.room.power_levels")
    assert levels is not None and admin not in levels.get("users", {})
    alice.send_state(own, "m.room.power_levels", "", {**levels, "users": {bob: 10}})
    # A room another user created, where alice (the room admin) is at level 0.
    _, token = topo.hs1.register_user(f"dave{secrets.token_hex(4)}")
    dave = ClientApi(topo.hs1.base_url, token)
    locked = dave.create_room()
    alice.join(locked)
    locked_before = alice.get_state(locked, "m.room.power_levels")
    for room in (own, older, locked):
        alice.send_state(space, "m.space.child", room, via)
    space_levels = {"users": {admin: 100, carol: 50}, "ban": 60, "events": {"m.room.topic": 75}}
    alice.send_state(space, "m.space.power_levels", "", space_levels)
    spammer = "@spammer:spam.example"
    ban = {"membership": "ban", "reason": "spam all over the space"}
    alice.send_state(space, "m.room.member", spammer, ban)

    drift = topo.cli("spaces", "drift", space)
    assert drift.returncode == 1, drift.stderr
    assert "3 rooms" in drift.stdout and "3 differ" in drift.stdout
    assert drift.stdout.count("power levels differ") == 3
    assert drift.stdout.count(f"users {carol}: unset → 50") == 3
    assert drift.stdout.count(f"{spammer} is not banned (space: spam all over") == 3

    refused = topo.cli("spaces", "sync", space, "--only", "powerlevels")
    assert refused.returncode == 1
    assert "nothing changed" in refused.stderr and locked in refused.stderr, refused.stderr
    assert f"{admin} has 0, m.room.power_levels needs 100" in refused.stderr
    assert own not in refused.stderr and older not in refused.stderr
    assert alice.get_state(own, "m.room.power_levels") == {**levels, "users": {bob: 10}}

    synced = topo.cli("spaces", "sync", space, "--only", "powerlevels", "--allow-fail", locked)
    assert synced.returncode == 0, synced.stderr
    assert f"skipped {locked}" in synced.stdout and "synced 2 rooms" in synced.stdout
    after = alice.get_state(own, "m.room.power_levels")
    assert after is not None
    assert after["users"] == {bob: 10, carol: 50}  # bob stays; alice, a creator, not listed
    assert after["ban"] == 60 and after["events"]["m.room.topic"] == 75
    assert after["events"]["m.room.power_levels"] == levels["events"]["m.room.power_levels"]
    older_levels = alice.get_state(older, "m.room.power_levels")
    assert older_levels is not None and older_levels["users"] == {admin: 100, carol: 50}
    assert alice.get_state(locked, "m.room.power_levels") == locked_before
    assert alice.get_state(own, "m.room.member", spammer) is None  # --only powerlevels

    bans = topo.cli("spaces", "sync", space, "--allow-fail", locked)
    assert bans.returncode == 0, bans.stderr
    assert f"{own}  banned {spammer}" in bans.stdout
    assert "wrote m.room.power_levels" not in bans.stdout  # already in line
    for room in (own, older):
        member = alice.get_state(room, "m.room.member", spammer)
        assert member is not None and member.get("membership") == "ban", room
        assert member.get("reason") == "spam all over the space"
    assert alice.get_state(locked, "m.room.member", spammer) is None

    last = topo.cli("spaces", "drift", space)
    assert last.returncode == 1 and "1 differ" in last.stdout and locked in last.stdout
    assert own not in last.stdout and older not in last.stdout
