"""Space-wide power levels, bans and policy (MSC3216): the plan for one room, the atomic
apply, and the lines the CLI and a bot print. The merge and the pre-check of every write
against the room's auth rules are rules.powerlevels' (tests/rules/test_powerlevels.py). No
homeserver here: tests/e2e/test_spaces.py runs the same against real Synapse."""

from __future__ import annotations

import pytest

from proxy_addons import spaces
from proxy_addons.cli import build_parser
from proxy_addons.participation import ParticipationError
from proxy_addons.spaces import (
    Change,
    RoomPlan,
    SpacePlan,
    apply_plan,
    format_drift,
    format_sync,
    plan_room,
    run_for_bot,
    space_wanted_from_state,
    sync_space,
)
from tests.rules.test_powerlevels import ADMIN, BOB, DAVE, room_state

# -- the plan for one room -------------------------------------------------------------------


SPACE = [
    {"type": "m.room.create", "state_key": "", "sender": ADMIN, "content": {"room_version": "12"}},
    {
        "type": "m.space.power_levels",
        "state_key": "",
        "content": {"users": {ADMIN: 100, DAVE: 50}, "ban": 60, "events": {"m.room.name": 70}},
    },
    {
        "type": "m.room.server_acl",
        "state_key": "",
        "content": {"allow": ["*"], "deny": ["evil.test"]},
    },
    {"type": "m.room.member", "state_key": ADMIN, "content": {"membership": "join"}},
    {
        "type": "m.room.member",
        "state_key": "@spam:evil.test",
        "content": {"membership": "ban", "reason": "spam"},
    },
    {"type": "m.room.member", "state_key": "@old:evil.test", "content": {"membership": "ban"}},
    {"type": "m.room.member", "state_key": "@gone:hs.test", "content": {"membership": "leave"}},
]
WANTED, NOTES = space_wanted_from_state(SPACE)


def test_space_wanted_reads_levels_bans_and_acl():
    """The space's power levels, its banned users with their reasons, and its ACL."""
    assert WANTED.power_levels == {
        "users": {ADMIN: 100, DAVE: 50},
        "ban": 60,
        "events": {"m.room.name": 70},
    }
    assert WANTED.bans == {"@spam:evil.test": "spam", "@old:evil.test": None}
    assert WANTED.acl == {"allow": ["*"], "deny": ["evil.test"]}
    assert NOTES == []


def test_a_space_without_power_levels_says_so():
    """No m.space.power_levels: nothing to replicate, and a note saying so."""
    wanted, notes = space_wanted_from_state(SPACE[2:])
    assert wanted.power_levels is None
    assert notes == ["the space has no m.space.power_levels: no power levels to replicate"]
    plan = plan_room("!r", room_state(levels={"users": {ADMIN: 100}}), wanted, admin_user=ADMIN)
    assert [c.kind for c in plan.changes] == ["policy", "bans", "bans"]


def test_plan_room_orders_writes_and_keeps_the_rooms_own_users():
    """Policy, then bans (not for a user already banned), then power levels last; the
    merged levels keep the room's own extra user and never list the v12 creator."""
    state = room_state(
        "12",
        ADMIN,
        {"users": {BOB: 20}, "ban": 50},
        members={ADMIN: "join", "@old:evil.test": "ban"},
    )
    plan = plan_room("!r", state, WANTED, admin_user=ADMIN)
    assert [(c.kind, c.state_key) for c in plan.changes] == [
        ("policy", ""),
        ("bans", "@spam:evil.test"),
        ("powerlevels", ""),
    ]
    assert plan.changes[1].content == {"membership": "ban", "reason": "spam"}
    levels = plan.changes[2].content
    assert levels == {"users": {BOB: 20, DAVE: 50}, "ban": 60, "events": {"m.room.name": 70}}
    assert plan.changes[2].details == (
        "ban: 50 → 60",
        f"users {DAVE}: unset → 50",
        "events m.room.name: unset → 70",
    )
    assert plan.problems == []


def test_plan_room_in_sync_has_no_changes():
    """A room that already follows the space needs nothing."""
    levels = {"users": {ADMIN: 100, DAVE: 50, BOB: 1}, "ban": 60, "events": {"m.room.name": 70}}
    members = {ADMIN: "join", "@spam:evil.test": "ban", "@old:evil.test": "ban"}
    state = room_state("10", ADMIN, levels, members=members)
    state.append({"type": "m.room.server_acl", "state_key": "", "content": dict(WANTED.acl or {})})
    assert plan_room("!r", state, WANTED, admin_user=ADMIN).changes == []


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        (("policy",), ["policy"]),
        (("bans",), ["bans", "bans"]),
        (("powerlevels",), ["powerlevels"]),
        (("powerlevels", "policy"), ["policy", "powerlevels"]),
    ],
)
def test_plan_room_only_the_given_kinds(kinds, expected):
    """`--only` limits the plan to those kinds."""
    plan = plan_room("!r", room_state(), WANTED, kinds=kinds)
    assert [c.kind for c in plan.changes] == expected


@pytest.mark.parametrize(
    ("state", "problem"),
    [
        # the room admin at level 0 in a room another user created
        (
            room_state("12", DAVE, {"users": {}, "events": {"m.room.power_levels": 100}}),
            f"no power: {ADMIN} has 0, m.room.server_acl needs 50",
        ),
        (room_state(levels={"users": {ADMIN: 50}, "ban": 100}), "ban needs 100"),
        (room_state(members={ADMIN: "leave"}), f"{ADMIN} is not joined (leave)"),
        (room_state(members={}), f"{ADMIN} is not joined (no membership)"),
    ],
)
def test_plan_room_problems(state, problem):
    """With the room admin's ID the plan says why the admin could not write."""
    plan = plan_room("!r", state, WANTED, admin_user=ADMIN)
    assert plan.changes and any(problem in p for p in plan.problems), plan.problems


def test_plan_room_without_admin_checks_nothing():
    """`drift` plans without the room admin: differences only, no problems."""
    state = room_state("12", DAVE, {"users": {}, "events": {"m.room.power_levels": 100}})
    plan = plan_room("!r", state, WANTED)
    assert plan.changes and plan.problems == []


# -- applying a plan -----------------------------------------------------------------------


def space_plan(*rooms):
    return SpacePlan("!space", spaces.KINDS, list(rooms))


def change(kind="policy"):
    if kind == "bans":
        return Change(kind, "m.room.member", "@spam:evil.test", {"membership": "ban"}, "not banned")
    return Change(kind, "m.room.server_acl", "", {"allow": ["*"]}, "server ACL differs")


@pytest.fixture
def writes(monkeypatch):
    """The rooms write_plan was asked to write; a room named in `refuse` fails."""
    done: list[str] = []
    refuse: set[str] = set()

    def write(config, room):
        if room.room_id in refuse:
            raise ParticipationError(f"{room.room_id}: m.room.server_acl refused: 403")
        done.append(room.room_id)

    monkeypatch.setattr(spaces, "write_plan", write)
    return done, refuse


def test_apply_is_atomic(writes):
    """One room that would fail and is not allowed to: nothing is written."""
    done, _ = writes
    plan = space_plan(RoomPlan("!a", [change()]), RoomPlan("!locked", [change()], ["no power"]))
    result = apply_plan(None, plan)  # type: ignore[arg-type]
    assert not result.ok and [p.room_id for p in result.blocking] == ["!locked"]
    assert done == [] and result.written == []
    assert format_sync(result) == [
        "nothing changed; these rooms would fail:",
        "  !locked  no power",
    ]


def test_apply_skips_rooms_allowed_to_fail(writes):
    """With --allow-fail the failing room is skipped whole, the others written."""
    done, _ = writes
    plan = space_plan(
        RoomPlan("!a", [change(), change("bans")]),
        RoomPlan("!locked", [change()], ["no power"]),
        RoomPlan("!same"),
    )
    result = apply_plan(None, plan, ["!locked", "!elsewhere"])  # type: ignore[arg-type]
    assert result.ok and done == ["!a"]
    assert [p.room_id for p in result.skipped] == ["!locked"]
    assert format_sync(result) == [
        "  note: --allow-fail !elsewhere: not a room of this space",
        "  !a  wrote m.room.server_acl",
        "  !a  banned @spam:evil.test",
        "  skipped !locked (allowed to fail): no power",
        "synced 1 rooms of !space",
    ]


def test_apply_stops_at_a_refused_write(writes):
    """A write the homeserver refuses stops the sync and says after how many rooms."""
    done, refuse = writes
    refuse.add("!b")
    plan = space_plan(
        RoomPlan("!a", [change()]), RoomPlan("!b", [change()]), RoomPlan("!c", [change()])
    )
    result = apply_plan(None, plan)  # type: ignore[arg-type]
    assert not result.ok and done == ["!a"]
    assert format_sync(result)[-1] == "stopped after 1 rooms: !b: m.room.server_acl refused: 403"


async def test_sync_without_a_room_admin_token_is_an_error_not_a_traceback():
    """No token configured: a result saying so."""

    class Config:
        room_admin_token = None

    result = await sync_space(Config(), "!space")  # type: ignore[arg-type]
    assert not result.ok and format_sync(result) == ["homeserver.room_admin_token_file is not set"]


async def test_sync_with_a_refused_token_is_an_error(monkeypatch):
    """whoami refused: a result saying so, nothing planned."""

    def refused(config):
        raise ParticipationError("the room admin token was refused (401)")

    monkeypatch.setattr(spaces, "whoami", refused)

    class Config:
        room_admin_token = "t"

    result = await sync_space(Config(), "!space")  # type: ignore[arg-type]
    assert result.error == "the room admin token was refused (401)" and not result.ok


@pytest.mark.parametrize(
    ("kind", "action", "line"),
    [
        ("roles", "sync", "unknown kind 'roles'; choose from policy, powerlevels, bans"),
        ("bans", "undo", "unknown action 'undo'; choose drift or sync"),
    ],
)
async def test_run_for_bot_bad_input(kind, action, line):
    """The bot's entry point answers bad input with a line, not an exception."""
    assert await run_for_bot(None, "!space", kind, action) == [line]  # type: ignore[arg-type]


def test_format_drift():
    """The drift report: summary, notes, per room what differs and the entries."""
    plan = space_plan(
        RoomPlan(
            "!a",
            [
                Change(
                    "powerlevels",
                    "m.room.power_levels",
                    "",
                    {},
                    "power levels differ",
                    ("ban: 50 → 60",),
                )
            ],
        ),
        RoomPlan("!b"),
        RoomPlan("!c", problems=["cannot read the room: 500"]),
    )
    plan.notes.append("the space has no m.space.power_levels: no power levels to replicate")
    assert format_drift(plan) == [
        "3 rooms in !space; 2 differ from its policy",
        "  note: the space has no m.space.power_levels: no power levels to replicate",
        "  !a  power levels differ",
        "      ban: 50 → 60",
        "  !c  cannot read the room: 500",
    ]
    assert format_drift(SpacePlan("!x", spaces.KINDS, error="unknown space !x")) == [
        "unknown space !x"
    ]


@pytest.mark.parametrize(
    ("argv", "only"),
    [
        (["spaces", "sync", "!s", "-c", "m.yaml"], None),
        (["spaces", "sync", "!s", "-c", "m.yaml", "--only", "powerlevels"], ["powerlevels"]),
        (
            ["spaces", "drift", "!s", "-c", "m.yaml", "--only", "bans", "--only", "policy"],
            ["bans", "policy"],
        ),
    ],
)
def test_cli_only(argv, only):
    """`--only` is repeatable and defaults to every kind."""
    assert build_parser().parse_args(argv).only == only


def test_cli_only_rejects_unknown_kinds(capsys):
    """An unknown kind is a usage error naming the choices."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["spaces", "sync", "!s", "-c", "m.yaml", "--only", "roles"])
    assert e.value.code == 2
    assert "invalid choice: 'roles'" in capsys.readouterr().err
