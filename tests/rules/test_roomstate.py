"""RoomPolicy.same_state and .reflects: what lets a refetch that finds nothing new keep
the cached policy (and the edge's verdicts given under it), and lets the hook tell an old
state event the homeserver checks again from a change."""

from __future__ import annotations

from rules.roomstate import room_policy_from_state

ROOM = "!r:hs.test"


def state(acl_id="$acl1", joined=("@a:hs.test", "@b:good.test"), with_ids=True):
    events = [
        {
            "type": "m.room.create",
            "state_key": "",
            "content": {"room_version": "10"},
            "sender": "@a:hs.test",
            "event_id": "$create",
        },
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {"users": {}},
            "event_id": "$pl",
        },
        {
            "type": "m.room.server_acl",
            "state_key": "",
            "content": {"allow": ["*"]},
            "event_id": acl_id,
        },
        {"type": "m.room.topic", "state_key": "", "content": {"topic": "x"}, "event_id": "$t"},
    ] + [
        {
            "type": "m.room.member",
            "state_key": u,
            "content": {"membership": "join"},
            "event_id": f"$m{i}",
        }
        for i, u in enumerate(joined)
    ]
    if not with_ids:
        for event in events:
            del event["event_id"]
    return events


def test_same_relevant_state_is_the_same_policy():
    assert room_policy_from_state(ROOM, state()).same_state(room_policy_from_state(ROOM, state()))


def test_a_new_acl_event_or_a_member_change_is_other_state():
    base = room_policy_from_state(ROOM, state())
    assert not base.same_state(room_policy_from_state(ROOM, state(acl_id="$acl2")))
    assert not base.same_state(room_policy_from_state(ROOM, state(joined=("@a:hs.test",))))
    assert not base.same_state(room_policy_from_state("!other:hs.test", state()))


def test_irrelevant_state_does_not_count():
    other = state()
    other[3] = {**other[3], "event_id": "$t2", "content": {"topic": "y"}}
    assert room_policy_from_state(ROOM, state()).same_state(room_policy_from_state(ROOM, other))


def test_state_without_event_ids_is_never_the_same():
    policy = room_policy_from_state(ROOM, state(with_ids=False))
    assert policy.state_ids is None
    assert not policy.same_state(room_policy_from_state(ROOM, state(with_ids=False)))


def test_reflects_old_state_events_but_not_changes():
    policy = room_policy_from_state(ROOM, state())
    old_acl = {"type": "m.room.server_acl", "state_key": "", "event_id": "$acl1"}
    assert policy.reflects(old_acl)
    assert not policy.reflects({**old_acl, "event_id": "$acl-new"})
    assert not policy.reflects({**old_acl, "state_key": "x"})
    join = {
        "type": "m.room.member",
        "state_key": "@b:good.test",
        "event_id": "$new",
        "content": {"membership": "join"},
    }
    assert policy.reflects(join)  # a profile change: still joined
    assert not policy.reflects({**join, "content": {"membership": "leave"}})
    assert not policy.reflects({**join, "state_key": "@c:good.test"})
    assert policy.reflects(
        {**join, "state_key": "@c:good.test", "content": {"membership": "invite"}}
    )
    assert not policy.reflects({"type": ["m.room.member"], "state_key": ""})
    assert not room_policy_from_state(ROOM, state(with_ids=False)).reflects(old_acl)
