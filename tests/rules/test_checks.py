"""The checks as decision tables: who delivered, who wrote, what the room's ACL says."""

from __future__ import annotations

import pytest

from rules.acl import ServerAcl
from rules.checks import (
    UNAVAILABLE,
    check_edu,
    check_event,
    check_pdu,
    check_transaction,
    with_signature_check,
)
from rules.federation import Edu, Pdu, parse_transaction
from rules.findings import Confidence, Decision, Rule
from rules.roomstate import RoomPolicy, room_policy_from_state
from rules.roomversion import get_room_version
from rules.signatures import SignatureCheck

ROOM = "!r:hs.test"
POLICY = RoomPolicy(
    ROOM,
    "10",
    get_room_version("10"),
    ServerAcl.from_content({"allow": ["*"], "deny": ["denied.test"]}),
)


def make_pdu(sender):
    event = {
        "room_id": ROOM,
        "sender": sender,
        "type": "m.room.message",
        "content": {},
        "hashes": {"sha256": "x"},
    }
    return Pdu(0, event, ROOM, sender, sender.split(":", 1)[1], "m.room.message", None)


@pytest.mark.parametrize(
    ("origin", "sender", "rooms", "fail_open", "decision", "rules"),
    [
        ("good.test", "@a:good.test", {ROOM: POLICY}, True, Decision.ALLOW, []),
        ("denied.test", "@a:denied.test", {ROOM: POLICY}, True, Decision.REFUSE, [Rule.ACL_ORIGIN]),
        ("good.test", "@a:denied.test", {ROOM: POLICY}, True, Decision.REFUSE, [Rule.ACL_SENDER]),
        ("denied.test", "@a:good.test", {ROOM: POLICY}, True, Decision.REFUSE, [Rule.ACL_ORIGIN]),
        # another allowed server's event pushed by a server that did not write it: evidence
        ("good.test", "@a:other.test", {ROOM: POLICY}, True, Decision.ALLOW, [Rule.LEAK_RELAYED]),
        ("denied.test", "@a:denied.test", {ROOM: None}, True, Decision.ALLOW, []),
        ("denied.test", "@a:denied.test", {}, True, Decision.ALLOW, []),
        (
            "good.test",
            "@a:good.test",
            {ROOM: UNAVAILABLE},
            True,
            Decision.ALLOW,
            [Rule.STATE_UNAVAILABLE],
        ),
        (
            "good.test",
            "@a:good.test",
            {ROOM: UNAVAILABLE},
            False,
            Decision.REFUSE,
            [Rule.STATE_UNAVAILABLE],
        ),
        (
            "good.test",
            "@a:good.test",
            {ROOM: RoomPolicy(ROOM, "99", None, None)},
            True,
            Decision.ALLOW,
            [],
        ),
        (
            "good.test",
            "@a:denied.test",
            {ROOM: RoomPolicy(ROOM, "99", None, POLICY.acl)},
            True,
            Decision.REFUSE,
            [Rule.ACL_SENDER, Rule.UNKNOWN_ROOM_VERSION],
        ),
    ],
)
def test_check_pdu(origin, sender, rooms, fail_open, decision, rules):
    """ACL on the origin AND on the sender's server; unknown rooms are the homeserver's call."""
    verdict = check_pdu(make_pdu(sender), origin, rooms, fail_open=fail_open)
    assert verdict.decision is decision
    assert [f.rule for f in verdict.findings] == rules


def test_relayed_leak_is_blamed_on_the_relay():
    """An event written by a denied server and delivered by another blames the deliverer."""
    verdict = check_pdu(make_pdu("@a:denied.test"), "relay.test", {ROOM: POLICY}, fail_open=True)
    (finding,) = verdict.findings
    assert (finding.attributed_to, finding.sender_server, finding.confidence) == (
        "relay.test",
        "denied.test",
        Confidence.MEDIUM,
    )
    assert verdict.event_id and verdict.event_id.startswith("$")


@pytest.mark.parametrize(
    ("edu", "origin", "rules"),
    [
        (Edu(0, "m.typing", {"room_id": ROOM, "user_id": "@a:good.test"}), "good.test", []),
        (
            Edu(0, "m.typing", {"room_id": ROOM, "user_id": "@a:good.test"}),
            "evil.test",
            [Rule.EDU_IMPERSONATION],
        ),
        (
            Edu(0, "m.typing", {"room_id": ROOM, "user_id": "@a:denied.test"}),
            "denied.test",
            [Rule.ACL_EDU],
        ),
        (
            Edu(0, "m.receipt", {ROOM: {"m.read": {"@a:denied.test": {}}}}),
            "denied.test",
            [Rule.ACL_EDU],
        ),
        (
            Edu(0, "m.presence", {"push": [{"user_id": "@a:x.test"}]}),
            "y.test",
            [Rule.EDU_IMPERSONATION],
        ),
        (Edu(0, "m.direct_to_device", {"sender": "@a:x.test"}), "x.test", []),
        (Edu(0, "m.device_list_update", {"user_id": 5}), "x.test", [Rule.EDU_IMPERSONATION]),
        (Edu(0, "m.something_new", {}), "x.test", []),
    ],
)
def test_check_edu(edu, origin, rules):
    """EDUs speak only for the origin's users; typing/receipts obey the ACL (MSC4163)."""
    verdict = check_edu(edu, origin, {ROOM: POLICY}, fail_open=True)
    assert [f.rule for f in verdict.findings] == rules
    assert verdict.refused is bool(rules)


def test_refused_all_only_when_every_item_is_refused():
    """A transaction is answered locally only if every PDU and EDU is refused."""
    body = b'{"origin":"denied.test","pdus":[{"room_id":"!r:hs.test","sender":"@a:denied.test","type":"m","content":{}}],"edus":[]}'
    assert check_transaction(
        parse_transaction(body, "t", "denied.test"), {ROOM: POLICY}, fail_open=True
    ).refused_all
    body2 = body.replace(
        b'"edus":[]',
        b'"edus":[{"edu_type":"m.typing","content":{"room_id":"!other:x","user_id":"@a:denied.test"}}]',
    )
    verdict = check_transaction(
        parse_transaction(body2, "t", "denied.test"), {ROOM: POLICY}, fail_open=True
    )
    assert verdict.refused_any and not verdict.refused_all
    empty = check_transaction(
        parse_transaction(b'{"pdus":[],"edus":[]}', "t", "x.test"), {}, fail_open=True
    )
    assert not empty.refused_all


@pytest.mark.parametrize(
    ("event", "decision"),
    [
        ({"event_id": "$e", "room_id": ROOM, "sender": "@a:denied.test"}, Decision.REFUSE),
        ({"event_id": "$e", "room_id": ROOM, "sender": "@a:good.test"}, Decision.ALLOW),
        ({"event_id": "$e", "room_id": ROOM, "sender": "@me:hs.test"}, Decision.ALLOW),
        ({"event_id": "$e", "room_id": ROOM, "sender": 5}, Decision.ALLOW),
    ],
)
def test_check_event_for_the_hook(event, decision):
    """The hook's own check of an event the edge never saw: the author's server vs the ACL."""
    assert check_event(event, POLICY, "hs.test", fail_open=True).decision is decision


def test_signature_check_folds_into_the_verdict():
    """Bad signature → refused; verified author → high confidence; missing keys → unchanged."""
    pdu = make_pdu("@a:denied.test")
    verdict = check_pdu(pdu, "relay.test", {ROOM: POLICY}, fail_open=True)
    high = with_signature_check(
        verdict,
        pdu,
        "relay.test",
        SignatureCheck(True, verified_servers=frozenset({"denied.test"})),
    )
    assert high.findings[0].confidence is Confidence.HIGH
    ok = check_pdu(make_pdu("@a:good.test"), "good.test", {ROOM: POLICY}, fail_open=True)
    bad = with_signature_check(
        ok, make_pdu("@a:good.test"), "good.test", SignatureCheck(False, reason="bad signature")
    )
    assert bad.refused and bad.findings[-1].rule is Rule.BAD_EVENT_SIGNATURE
    missing = SignatureCheck(False, (("good.test", "ed25519:1"),), "keys unavailable")
    assert with_signature_check(ok, make_pdu("@a:good.test"), "good.test", missing) == ok


def test_room_policy_from_admin_state():
    """The create event gives the version; the ACL event is compiled; junk is skipped."""
    state = [
        {"type": "m.room.create", "state_key": "", "content": {"room_version": "12"}},
        {
            "type": "m.room.server_acl",
            "state_key": "",
            "event_id": "$acl",
            "content": {"allow": ["*"], "deny": ["d.test"]},
        },
        "junk",
        {"type": "m.room.server_acl", "state_key": "not-empty", "content": {}},
    ]
    policy = room_policy_from_state("!r", state)
    assert policy.room_version_id == "12" and policy.acl_event_id == "$acl"
    assert not policy.acl.check("d.test").allowed and policy.acl.check("ok.test").allowed
    assert room_policy_from_state("!r", []).room_version_id == "1"
