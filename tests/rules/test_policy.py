"""Server authorisation beyond ACLs: participation (MSC4099/MSC4124), policy lists (spec:
"Moderation policy lists") and restricted joins (MSC3083), in rules/ and in the checks."""

from __future__ import annotations

import json

import pytest

from rules.checks import check_event, check_pdu, check_request_origin, check_restricted_join
from rules.federation import parse_pdu
from rules.findings import Decision, Rule
from rules.policy import BanList, Barrier, OperatorPolicy, authorise_server
from rules.roomstate import room_policy_from_state

ROOM = "!r:hs.test"
LOCAL = "hs.test"


def state(*extra, version="10", invite=0, users=None):
    events = [
        {
            "type": "m.room.create",
            "state_key": "",
            "sender": "@admin:hs.test",
            "content": {"room_version": version},
        },
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {"invite": invite, "users": users or {"@admin:hs.test": 100}},
        },
        {"type": "m.room.member", "state_key": "@admin:hs.test", "content": {"membership": "join"}},
        {
            "type": "m.room.member",
            "state_key": "@lee:leaky.test",
            "content": {"membership": "join"},
        },
        *extra,
    ]
    return room_policy_from_state(ROOM, events)


def participation(server, value, unstable=False):
    kind = "me.marewolf.msc4124.server.participation" if unstable else "m.server.participation"
    return {"type": kind, "state_key": server, "content": {"participation": value}}


ACTIVE = {"type": "m.server.knock_rule", "state_key": "", "content": {"rule": "active"}}


@pytest.mark.parametrize(
    ("extra", "operator_rooms", "server", "barrier"),
    [
        ((), (), "new.test", None),  # no opt-in: everyone (ACL aside)
        ((ACTIVE,), (), "new.test", Barrier.PARTICIPATION),  # opted in by state
        ((), (ROOM,), "new.test", Barrier.PARTICIPATION),  # opted in by the operator
        ((ACTIVE, participation("new.test", "permitted")), (), "new.test", None),
        ((ACTIVE, participation("new.test", "permitted", unstable=True)), (), "new.test", None),
        ((participation("new.test", "deny"),), (), "new.test", Barrier.PARTICIPATION),  # always
        ((participation("new.test", "denied"),), (), "new.test", Barrier.PARTICIPATION),  # MSC4099
        ((ACTIVE,), (), LOCAL, None),  # the protected homeserver is always allowed
        (
            (
                ACTIVE,
                {
                    "type": "m.room.server_acl",
                    "state_key": "",
                    "content": {"allow": ["*"], "deny": ["new.test"]},
                },
                participation("new.test", "permitted"),
            ),
            (),
            "new.test",
            Barrier.ACL,
        ),
    ],
)
def test_participation(extra, operator_rooms, server, barrier):
    room = state(*extra)
    policy = OperatorPolicy(LOCAL, frozenset(operator_rooms))
    refusal = authorise_server(server, room, policy)
    assert (refusal.barrier if refusal else None) is barrier


def test_a_servers_own_knock_is_exempt_from_participation_but_not_from_deny():
    room = state(ACTIVE)
    assert authorise_server("new.test", room, OperatorPolicy(LOCAL), knocking=True) is None
    denied = state(ACTIVE, participation("new.test", "deny"))
    assert authorise_server("new.test", denied, OperatorPolicy(LOCAL), knocking=True) is not None


def test_ban_list_from_policy_room_state():
    """m.ban rules, legacy names too; other recommendations and incomplete rules ignored."""
    bans = BanList.from_state(
        [
            {
                "type": "m.policy.rule.server",
                "state_key": "r1",
                "content": {"entity": "*.denied.test", "recommendation": "m.ban"},
            },
            {
                "type": "org.matrix.mjolnir.rule.server",
                "state_key": "r2",
                "content": {"entity": "old.test", "recommendation": "org.matrix.mjolnir.ban"},
            },
            {
                "type": "m.policy.rule.server",
                "state_key": "r3",
                "content": {"entity": "meh.test", "recommendation": "m.mute"},
            },
            {"type": "m.policy.rule.server", "state_key": "r4", "content": {}},
            {
                "type": "m.policy.rule.user",
                "state_key": "r5",
                "content": {"entity": "@spam*:*", "recommendation": "m.ban"},
            },
        ]
    )
    assert bans.bans_server("a.denied.test:8448") and bans.bans_server("OLD.test")
    assert not bans.bans_server("denied.test") and not bans.bans_server("meh.test")
    assert bans.bans_user("@spammer:x.test") and not bans.bans_user("@ham:x.test")


@pytest.mark.parametrize(
    "rule",
    [
        {"type": "m.policy.rule.server", "content": {"entity": "*", "recommendation": []}},
        {"type": "m.policy.rule.server", "content": {"entity": "*", "recommendation": {}}},
        {"type": ["m.policy.rule.server"], "content": {"entity": "*", "recommendation": "m.ban"}},
        {"type": {}, "content": {"entity": "*", "recommendation": "m.ban"}},
    ],
)
def test_ban_list_skips_rules_with_unhashable_fields(rule):
    """A rule whose recommendation or type is a list or an object (found by fuzzing: it
    raised TypeError, and one such event in a policy room stopped every refresh of the
    policy lists) is skipped like any other malformed rule."""
    good = {
        "type": "m.policy.rule.server",
        "content": {"entity": "x.test", "recommendation": "m.ban"},
    }
    bans = BanList.from_state([rule, good])
    assert bans.servers == ("x.test",) and bans.users == ()


def pdu(sender, event_type="m.room.message", content=None, state_key=None, signatures=None):
    event = {
        "room_id": ROOM,
        "sender": sender,
        "type": event_type,
        "content": content or {},
        "prev_events": [],
        "auth_events": [],
        "depth": 3,
        "origin_server_ts": 1,
        "signatures": signatures or {},
    }
    if state_key is not None:
        event["state_key"] = state_key
    parsed = parse_pdu(event, 0, "leaky.test")
    assert not hasattr(parsed, "rule")
    return parsed


def test_policy_list_bans_origin_sender_and_user_in_every_room():
    bans = BanList(["*.denied.test"], ["@spam:leaky.test"])
    policy = OperatorPolicy(LOCAL, bans=bans)
    rooms = {ROOM: state()}
    as_origin = check_pdu(
        pdu("@a:x.denied.test"), "x.denied.test", rooms, fail_open=True, policy=policy
    )
    assert [f.rule for f in as_origin.findings] == [Rule.POLICY_ORIGIN]
    relayed = check_pdu(pdu("@a:x.denied.test"), "leaky.test", rooms, fail_open=True, policy=policy)
    assert [f.rule for f in relayed.findings] == [Rule.POLICY_SENDER]
    assert relayed.findings[0].attributed_to == "leaky.test"
    user = check_pdu(pdu("@spam:leaky.test"), "leaky.test", rooms, fail_open=True, policy=policy)
    assert [f.rule for f in user.findings] == [Rule.POLICY_USER]
    assert all(v.decision is Decision.REFUSE for v in (as_origin, relayed, user))


def join(via, signed_by):
    user = "@new:unknown.test"
    return pdu(
        user,
        "m.room.member",
        {"membership": "join", "join_authorised_via_users_server": via},
        state_key=user,
        signatures={s: {"ed25519:a": "sig"} for s in signed_by},
    )


@pytest.mark.parametrize(
    ("via", "signed_by", "invite", "refused_because"),
    [
        ("@admin:hs.test", ("unknown.test", "hs.test"), 50, None),
        ("@admin:hs.test", ("unknown.test", "leaky.test"), 50, "not signed by hs.test"),
        ("@lee:leaky.test", ("unknown.test", "leaky.test"), 50, "below the invite level 50"),
        ("@lee:leaky.test", ("unknown.test", "leaky.test"), 0, None),
        ("@gone:hs.test", ("unknown.test", "hs.test"), 0, "not joined"),
        ("not a user", ("unknown.test",), 0, "not a user ID"),
    ],
)
def test_restricted_joins(via, signed_by, invite, refused_because):
    room = state(invite=invite)
    event = join(via, signed_by)
    why = check_restricted_join(event.event, room)
    assert (why is None) == (refused_because is None)
    if refused_because:
        assert refused_because in why
        verdict = check_pdu(event, "leaky.test", {ROOM: room}, fail_open=True)
        assert [f.rule for f in verdict.findings] == [Rule.RESTRICTED_JOIN]
        assert verdict.decision is Decision.REFUSE


def test_restricted_join_authorising_server_must_be_allowed():
    acl = {
        "type": "m.room.server_acl",
        "state_key": "",
        "content": {"allow": ["*"], "deny": ["leaky.test"]},
    }
    why = check_restricted_join(
        join("@lee:leaky.test", ("unknown.test", "leaky.test")).event, state(acl)
    )
    assert why and "denied by the room's server ACL" in why


def test_v12_creators_outrank_every_level():
    room = state(version="12", invite=100, users={})
    assert room.power.of("@admin:hs.test") == float("inf")
    assert (
        check_restricted_join(join("@admin:hs.test", ("unknown.test", "hs.test")).event, room)
        is None
    )


def test_room_data_and_hook_apply_the_same_policy():
    room = state(ACTIVE)
    policy = OperatorPolicy(LOCAL)
    item = check_request_origin("new.test", ROOM, room, "make_join", fail_open=True, policy=policy)
    assert item.decision is Decision.REFUSE and "knock first" in item.findings[0].detail
    event = {"room_id": ROOM, "sender": "@x:new.test", "type": "m.room.message", "event_id": "$e"}
    hook = check_event(event, room, LOCAL, fail_open=True, policy=policy)
    assert [f.rule for f in hook.findings] == [Rule.PARTICIPATION_SENDER]
    knock = {
        "room_id": ROOM,
        "sender": "@x:new.test",
        "type": "m.server.knock",
        "state_key": "new.test",
    }
    assert check_event(knock, room, LOCAL, fail_open=True, policy=policy).decision is Decision.ALLOW


def test_hook_does_not_require_the_local_servers_signature_on_a_join_it_vouches_for():
    """Synapse asks the hook about a send_join before adding its own signature."""
    room = state(invite=0)
    policy = OperatorPolicy(LOCAL)
    event = join("@admin:hs.test", ("unknown.test",)).event
    assert check_restricted_join(event, room, policy) is not None  # at the edge: refused
    assert check_restricted_join(event, room, policy, in_homeserver=True) is None
    other = join("@lee:leaky.test", ("unknown.test",)).event
    assert check_restricted_join(other, room, policy, in_homeserver=True) is not None


def test_operator_actions_flag_off_and_severity():
    """flag: recorded, not refused; off: no finding; a severity replaces the finding's;
    malformed input is refused whatever the settings."""
    from rules.checks import apply_actions
    from rules.policy import CheckActions, CheckSetting

    rooms = {
        ROOM: state(
            {
                "type": "m.room.server_acl",
                "state_key": "",
                "content": {"allow": ["*"], "deny": ["evil.test"]},
            }
        )
    }
    refused = check_pdu(pdu("@a:evil.test"), "evil.test", rooms, fail_open=True)
    assert refused.decision is Decision.REFUSE
    flag = OperatorPolicy(LOCAL, actions=CheckActions({"acl": CheckSetting("flag", "info")}))
    flagged = apply_actions(refused, flag)
    assert flagged.decision is Decision.ALLOW
    assert [(f.rule, str(f.severity)) for f in flagged.findings] == [(Rule.ACL_ORIGIN, "info")]
    off = OperatorPolicy(LOCAL, actions=CheckActions(rooms={ROOM: {"acl": CheckSetting("off")}}))
    assert apply_actions(refused, off).findings == ()
    assert apply_actions(refused, off).decision is Decision.ALLOW


def test_reference_to_a_refused_event_is_a_leak_finding_flagged_by_default():
    """prev_events or auth_events naming an event a refused server wrote: leak.reference,
    blamed on the server that built on it; recorded, not refused, unless set to drop."""
    from rules.checks import apply_actions, check_references
    from rules.policy import CheckActions, CheckSetting

    refused = {"$leak": "denied.test"}
    v1 = {"prev_events": [["$leak", {"sha256": "x"}]], "auth_events": []}
    assert "denied.test" in check_references(v1, refused)
    assert check_references({"prev_events": ["$fine"], "auth_events": ["$a"]}, refused) is None
    built = pdu("@lee:leaky.test")
    built.event["prev_events"].append("$leak")
    item = check_pdu(built, "leaky.test", {ROOM: state()}, fail_open=True, refused=refused)
    (finding,) = item.findings
    assert (finding.rule, finding.attributed_to) == (Rule.LEAK_REFERENCE, "leaky.test")
    assert item.decision is Decision.ALLOW
    assert apply_actions(item, OperatorPolicy(LOCAL)).decision is Decision.ALLOW
    drop = OperatorPolicy(LOCAL, actions=CheckActions({"leaks": CheckSetting("drop")}))
    assert apply_actions(item, drop).decision is Decision.REFUSE


@pytest.mark.parametrize(
    ("sender", "event_type", "state_key", "membership", "relayed"),
    [
        ("@x:other.test", "m.room.message", None, None, True),
        ("@x:other.test", "m.room.member", "@x:other.test", "join", False),  # after send_join
        ("@x:other.test", "m.room.member", "@x:other.test", "leave", False),  # send_leave
        ("@x:other.test", "m.room.member", "@x:other.test", "knock", False),  # send_knock
        ("@x:other.test", "m.room.member", "@y:other.test", "join", True),  # not its own
        ("@x:other.test", "m.room.member", "@x:other.test", "ban", True),
        ("@x:leaky.test", "m.room.message", None, None, False),  # its own event
    ],
)
def test_relayed_detector_and_its_legitimate_relays(
    sender, event_type, state_key, membership, relayed
):
    content = {"membership": membership} if membership else {}
    event = pdu(sender, event_type, content, state_key=state_key)
    item = check_pdu(event, "leaky.test", {ROOM: state()}, fail_open=True)
    assert (Rule.LEAK_RELAYED in [f.rule for f in item.findings]) is relayed
    assert item.decision is Decision.ALLOW


@pytest.mark.parametrize("membership", [["join"], {"join": 1}])
def test_relayed_detector_with_an_unhashable_membership(membership):
    """A relayed member event whose membership is a list or an object (found by fuzzing:
    it raised TypeError, an internal error at the edge) is not a legitimate relay."""
    event = pdu("@x:other.test", "m.room.member", {"membership": membership}, "@x:other.test")
    item = check_pdu(event, "leaky.test", {ROOM: state()}, fail_open=True)
    assert Rule.LEAK_RELAYED in [f.rule for f in item.findings]


def test_outbound_push_is_refused_per_room_by_acl_policy_list_and_participation():
    """Our own transaction to a destination: an item is refused where the destination may
    not take part in its room, whatever barrier; blamed on the local server; the
    `outbound` check is drop by default, unlike the other leak checks (flag)."""
    from rules.checks import check_outbound
    from rules.federation import parse_transaction
    from rules.policy import CheckActions, CheckSetting

    deny_acl = {
        "type": "m.room.server_acl",
        "state_key": "",
        "content": {"allow": ["*"], "deny": ["acl.test"]},
    }
    rooms = {
        "!acl:hs.test": state(deny_acl),
        "!part:hs.test": state(participation("part.test", "deny")),
        "!open:hs.test": state(),
    }
    events = [
        {"room_id": room, "sender": "@admin:hs.test", "type": "m.room.message", "content": {}}
        for room in rooms
    ]
    body = json.dumps({"origin": LOCAL, "pdus": events, "edus": []}).encode()
    txn = parse_transaction(body, "t", LOCAL)
    policy = OperatorPolicy(LOCAL, bans=BanList(["banned.test"]))

    def refused(destination, operator=policy):
        verdict = check_outbound(txn, LOCAL, destination, rooms, operator)
        assert all(f.attributed_to == LOCAL for f in verdict.all_findings())
        return [v.room_id for v in verdict.pdus if v.refused]

    assert refused("acl.test") == ["!acl:hs.test"]
    assert refused("part.test") == ["!part:hs.test"]
    assert refused("banned.test") == list(rooms)
    assert refused("fine.test") == []
    flag = OperatorPolicy(LOCAL, actions=CheckActions({"outbound": CheckSetting("flag")}))
    assert refused("acl.test", flag) == []
    assert check_outbound(txn, LOCAL, "acl.test", rooms, flag).all_findings()


def test_a_join_without_its_signatures_is_judged_on_the_rest():
    """The hook gets events in the client format, without signatures (the homeserver has
    verified them): a restricted join is judged on the authoriser's membership and power,
    never refused as unsigned for want of the field."""
    room = state(invite=50)
    unsigned = {k: v for k, v in join("@admin:hs.test", ("unknown.test",)).event.items()}
    unsigned.pop("signatures")
    assert check_restricted_join(unsigned, room, signatures_known=False) is None
    weak = {k: v for k, v in join("@lee:leaky.test", ()).event.items() if k != "signatures"}
    why = check_restricted_join(weak, room, signatures_known=False)
    assert why and "below the invite level" in why
    assert "not signed" in check_restricted_join(unsigned, room)
