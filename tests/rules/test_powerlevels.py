"""m.room.power_levels as the auth rules read it (rules.powerlevels): the merge of a space's
m.space.power_levels into a room's, the sanitizing of the space's levels, the diff, and the
pre-check of the room admin's writes against the room's auth rules (spec "Authorization
rules", room v11/v12: rules 5.6, 8, 10; v12's creators from MSC4289)."""

from __future__ import annotations

import copy

import pytest

from rules.powerlevels import (
    RoomAuth,
    check_ban,
    check_power_levels_change,
    diff_power_levels,
    merge_power_levels,
    sanitize_power_levels,
)

ADMIN = "@admin:hs.test"
BOB = "@bob:hs.test"
DAVE = "@dave:hs.test"


def room_state(
    version="10",
    creator=ADMIN,
    levels=None,
    members=None,
    additional_creators=None,
    no_levels=False,
):
    """State events of a room as the admin API returns them."""
    create = {"room_version": version}
    if additional_creators is not None:
        create["additional_creators"] = additional_creators
    state = [{"type": "m.room.create", "state_key": "", "sender": creator, "content": create}]
    if not no_levels:
        content = {"users": {ADMIN: 100}} if levels is None else levels
        state.append({"type": "m.room.power_levels", "state_key": "", "content": content})
    for user, membership in ({ADMIN: "join"} if members is None else members).items():
        state.append(
            {"type": "m.room.member", "state_key": user, "content": {"membership": membership}}
        )
    return state


def auth(admin_level=50, version="10", creator=DAVE, **levels):
    """A room where ADMIN has `admin_level` (None: not listed), plus other levels."""
    users = dict(levels.pop("users", {}))
    if admin_level is not None:
        users[ADMIN] = admin_level
    return RoomAuth.from_state(room_state(version, creator, {"users": users, **levels}))


# -- the merge ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "space", "creators", "merged"),
    [
        # single levels the space sets replace the room's; others stay
        ({"ban": 50, "kick": 50}, {"ban": 100}, (), {"ban": 100, "kick": 50}),
        # users merge entry by entry: the room's own extra user stays
        (
            {"users": {ADMIN: 100, BOB: 20}},
            {"users": {DAVE: 50}},
            (),
            {"users": {ADMIN: 100, BOB: 20, DAVE: 50}},
        ),
        # the space's entry wins over the room's for the same user
        ({"users": {BOB: 20}}, {"users": {BOB: 50}}, (), {"users": {BOB: 50}}),
        # events merge the same way; the room's other events stay
        (
            {"events": {"m.room.name": 50, "m.room.topic": 0}},
            {"events": {"m.room.name": 100}},
            (),
            {"events": {"m.room.name": 100, "m.room.topic": 0}},
        ),
        (
            {"notifications": {"room": 50}},
            {"notifications": {"room": 100}},
            (),
            {"notifications": {"room": 100}},
        ),
        # a v12 creator is never written into users, even when the space lists them
        (
            {"users": {BOB: 0}},
            {"users": {ADMIN: 100, BOB: 50}},
            (ADMIN,),
            {"users": {BOB: 50}},
        ),
        # keys that are not power levels stay as the room has them
        ({"historical": 100, "ban": 50}, {"ban": 60}, (), {"historical": 100, "ban": 60}),
        # an equal level keeps the room's own spelling (old rooms' "50")
        ({"ban": "50"}, {"ban": 50}, (), {"ban": "50"}),
        # invalid space levels are skipped, never written
        (
            {"ban": 50},
            {"ban": True, "kick": "100", "users": {BOB: 1.5}},
            (),
            {"ban": 50, "users": {}},
        ),
        # a room without power levels gets the space's
        (None, {"ban": 100}, (), {"ban": 100}),
        # the space sets nothing: the room stays as it is
        ({"ban": 50, "users": {BOB: 1}}, {}, (), {"ban": 50, "users": {BOB: 1}}),
    ],
)
def test_merge_power_levels(room, space, creators, merged):
    """The space's keys win; the room's own other users, events and levels stay."""
    assert merge_power_levels(room, space, creators) == merged


def test_merge_does_not_mutate_its_inputs():
    """Room and space content are left as they were (the merge builds a new dict)."""
    room = {"users": {BOB: 1}, "events": {"m.room.name": 50}}
    space = {"users": {DAVE: 50}, "events": {"m.room.name": 100}}
    before = copy.deepcopy((room, space))
    merge_power_levels(room, space)
    assert (room, space) == before


@pytest.mark.parametrize(
    ("content", "levels", "ignored"),
    [
        ({"ban": 100, "users": {BOB: 50}}, {"ban": 100, "users": {BOB: 50}}, []),
        ({"ban": "100"}, {}, ["ban: not an integer"]),
        ({"users": [BOB]}, {}, ["users: not an object"]),
        ({"events": {"m.room.name": None}}, {"events": {}}, ["events m.room.name: not an integer"]),
        ({"ban": 2**60}, {}, ["ban: not an integer"]),
        ({"space_defaults": {"ban": 1}}, {}, []),  # MSC3216's room key, not a level
        ("nonsense", {}, ["its content is not an object"]),
    ],
)
def test_sanitize_power_levels(content, levels, ignored):
    """Only integer levels of the known keys are replicated; the rest is reported."""
    assert sanitize_power_levels(content) == (levels, ignored)


def test_diff_names_each_changed_entry():
    """The diff lists single levels and map entries with old and new values, None for
    unset, and compares "50" equal to 50."""
    old = {"ban": "50", "users": {BOB: 0, DAVE: 50}, "events": {"m.room.name": 50}}
    new = {"ban": 50, "kick": 70, "users": {BOB: 50}, "events": {"m.room.name": 50}}
    assert diff_power_levels(old, new) == [
        ("kick", None, 70),
        (f"users {BOB}", 0, 50),
        (f"users {DAVE}", 50, None),
    ]


# -- the pre-check -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "new", "problem"),
    [
        # an admin at 100 may change anything up to 100
        (auth(100, ban=50), {"users": {ADMIN: 100}, "ban": 100}, None),
        # rule 8: the power-levels event's own level
        (
            auth(50, events={"m.room.power_levels": 100}),
            {"users": {ADMIN: 50}, "ban": 10},
            "m.room.power_levels needs 100",
        ),
        (auth(50), {"users": {ADMIN: 50}, "ban": 10}, None),  # state_default absent: 50
        # a room created by another user, the admin at level 0
        (
            auth(0, events={"m.room.power_levels": 100}),
            {"users": {ADMIN: 0}},
            f"no power: {ADMIN} has 0",
        ),
        # single levels: neither the current nor the new value above the sender's
        (auth(50, ban=50), {"users": {ADMIN: 50}, "ban": 100}, "ban: 100 would be above"),
        (auth(50, redact=100), {"users": {ADMIN: 50}, "redact": 50}, "redact: it is 100, above"),
        (auth(50), {"users": {ADMIN: 50}, "state_default": 51}, "state_default: 51 would be"),
        (auth(50), {"users": {ADMIN: 50}, "state_default": 50}, None),  # absent before: new only
        # events: the same
        (
            auth(50, events={"m.room.name": 100}),
            {"users": {ADMIN: 50}, "events": {}},
            "events m.room.name: it is 100",
        ),
        (
            auth(50),
            {"users": {ADMIN: 50}, "events": {"m.room.topic": 75}},
            "events m.room.topic: 75",
        ),
        # users: another user's current level must be below the sender's
        (
            auth(50, users={BOB: 50}),
            {"users": {ADMIN: 50, BOB: 0}},
            f"users {BOB}: it is 50, not below",
        ),
        (auth(50, users={BOB: 49}), {"users": {ADMIN: 50, BOB: 0}}, None),
        (auth(50), {"users": {ADMIN: 50, BOB: 50}}, None),  # up to one's own level
        (auth(50), {"users": {ADMIN: 50, BOB: 51}}, f"users {BOB}: 51 would be above"),
        (auth(50), {"users": {ADMIN: 10}}, None),  # demoting oneself is allowed
        (auth(50), {"users": {ADMIN: 60}}, f"users {ADMIN}: 60 would be above"),
        # notifications are checked from room v6 (MSC2209), not before
        (
            auth(50, version="10"),
            {"users": {ADMIN: 50}, "notifications": {"room": 99}},
            "notifications room",
        ),
        (auth(50, version="5"), {"users": {ADMIN: 50}, "notifications": {"room": 99}}, None),
        # v12 (MSC4289): a creator's power is infinite, and may not be listed in users
        (
            RoomAuth.from_state(room_state("12", ADMIN, {"users": {BOB: 100}, "ban": 100})),
            {"users": {BOB: 0}, "ban": 1000},
            None,
        ),
        (
            RoomAuth.from_state(room_state("12", ADMIN, {"users": {}})),
            {"users": {ADMIN: 100}},
            f"users {ADMIN}: a creator of this v12 room may not be listed",
        ),
        (
            RoomAuth.from_state(
                room_state("12", DAVE, {"users": {ADMIN: 100}}, additional_creators=[BOB])
            ),
            {"users": {ADMIN: 100, BOB: 50}},
            f"users {BOB}: a creator",
        ),
        # before v12 a creator is just a user with the level the room gives them
        (
            RoomAuth.from_state(room_state("11", ADMIN, {"users": {ADMIN: 50}})),
            {"users": {ADMIN: 50}, "ban": 100},
            "ban: 100 would be above",
        ),
        # a room without power levels: modgud does not write the first one
        (
            RoomAuth.from_state(room_state("10", ADMIN, no_levels=True)),
            {"ban": 50},
            "has no m.room.power_levels",
        ),
    ],
)
def test_check_power_levels_change(room, new, problem):
    """Exactly the auth rules' power-levels checks for the room admin's change."""
    problems = check_power_levels_change(room, ADMIN, new)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("room", "target", "problem"),
    [
        (auth(100), BOB, None),
        (auth(50), BOB, None),  # ban level defaults to 50
        (auth(50, ban=60), BOB, f"no power to ban {BOB}: {ADMIN} has 50, ban needs 60"),
        (auth(50, users={BOB: 50}), BOB, f"cannot ban {BOB}: their level 50 is not below 50"),
        (auth(0), BOB, "ban needs 50"),
        # v12: nobody outranks a creator; a creator outranks everybody
        (
            RoomAuth.from_state(room_state("12", DAVE, {"users": {ADMIN: 100}})),
            DAVE,
            "infinite (creator)",
        ),
        (
            RoomAuth.from_state(room_state("12", ADMIN, {"users": {BOB: 100}, "ban": 100})),
            BOB,
            None,
        ),
    ],
)
def test_check_ban(room, target, problem):
    """Rule 5.6.2: the ban level, and a target below the sender."""
    problems = check_ban(room, ADMIN, target)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems
