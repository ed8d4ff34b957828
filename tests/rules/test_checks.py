"""The checks as decision tables: who delivered, who wrote, what the room's ACL says."""

from __future__ import annotations

import json

import pytest

from rules.acl import ServerAcl
from rules.canonical import encode_canonical_json
from rules.checks import (
    UNAVAILABLE,
    check_edu,
    check_event,
    check_pdu,
    check_transaction,
    judge_event,
    pdu_bytes,
    with_signature_check,
)
from rules.eventhash import compute_event_id
from rules.federation import MAX_PDU_BYTES, Edu, Pdu, parse_transaction
from rules.findings import Confidence, Decision, Rule
from rules.policy import BanList, CheckActions, CheckSetting, OperatorPolicy
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


# -- the homeserver's judges: judge_event, shared with the edge through author_refusals ----

BANS = OperatorPolicy("hs.test", bans=BanList(["banned.test"], ["@spammer:good.test"]))
ACTIVE = RoomPolicy(
    ROOM,
    "10",
    get_room_version("10"),
    POLICY.acl,
    knock_rule="active",
    participation={"relay.test": "permitted"},
)


def _event(sender, event_type="m.room.message", **extra):
    return {"event_id": "$e", "room_id": ROOM, "sender": sender, "type": event_type, **extra}


@pytest.mark.parametrize(
    ("sender", "event_type", "room", "rules"),
    [
        ("@a:good.test", "m.room.message", POLICY, []),
        ("@a:denied.test", "m.room.message", POLICY, [Rule.ACL_SENDER]),
        ("@a:banned.test", "m.room.message", POLICY, [Rule.POLICY_SENDER]),
        ("@spammer:good.test", "m.room.message", POLICY, [Rule.POLICY_USER]),
        ("@a:good.test", "m.room.message", ACTIVE, [Rule.PARTICIPATION_SENDER]),
        ("@a:good.test", "m.room.message", None, []),
    ],
)
def test_the_edge_and_the_homeservers_judges_agree_on_the_author(sender, event_type, room, rules):
    """An event delivered by a permitted relay: what the edge holds against its author
    (check_pdu, sender findings) is exactly what the hook and the Synapse module hold
    against it (judge_event), and both refuse or allow alike. (A room the homeserver does
    not know is left to the homeserver at the edge, and judged when it asks.)"""
    pdu = make_pdu(sender)
    rooms = {ROOM: room} if room is not None else {ROOM: None}
    edge = check_pdu(pdu, "relay.test", rooms, fail_open=True, policy=BANS)
    judged = judge_event(_event(sender, event_type), room, "hs.test", fail_open=True, policy=BANS)
    server_rules = {Rule.ACL_SENDER, Rule.POLICY_SENDER, Rule.PARTICIPATION_SENDER}
    relayed = [Rule.LEAK_RELAYED] if room is not None and not server_rules & set(rules) else []
    assert [f.rule for f in edge.findings] == relayed + rules
    assert [f.rule for f in judged.findings] == rules
    assert judged.decision is (Decision.REFUSE if rules else Decision.ALLOW)
    assert edge.decision is judged.decision


def test_judge_event_applies_the_operators_actions():
    """`flag` records without refusing, `off` drops the finding: for the hook and the
    module as at the edge."""
    flag = OperatorPolicy(
        "hs.test", actions=CheckActions({"acl": CheckSetting("flag")}), bans=BanList()
    )
    off = OperatorPolicy("hs.test", actions=CheckActions({"acl": CheckSetting("off")}))
    event = _event("@a:denied.test")
    flagged = judge_event(event, POLICY, "hs.test", fail_open=True, policy=flag)
    assert flagged.decision is Decision.ALLOW and [f.rule for f in flagged.findings] == [
        Rule.ACL_SENDER
    ]
    quiet = judge_event(event, POLICY, "hs.test", fail_open=True, policy=off)
    assert quiet.decision is Decision.ALLOW and quiet.findings == ()


@pytest.mark.parametrize(
    ("sender", "size", "decision"),
    [
        ("@a:good.test", MAX_PDU_BYTES, Decision.ALLOW),
        ("@a:good.test", MAX_PDU_BYTES + 1, Decision.REFUSE),
        ("@me:hs.test", MAX_PDU_BYTES + 1, Decision.ALLOW),  # local: the homeserver's own
        ("@a:good.test", None, Decision.ALLOW),
    ],
)
def test_an_event_over_the_pdu_limit_is_refused_by_the_judges(sender, size, decision):
    """The limit is inclusive (65,536 bytes may pass); over it a remote event is refused
    as malformed, whatever the room's state (also when it is unavailable)."""
    for room in (POLICY, UNAVAILABLE):
        verdict = judge_event(_event(sender), room, "hs.test", fail_open=True, pdu_bytes=size)
        assert verdict.decision is decision
        if decision is Decision.REFUSE:
            assert [f.rule for f in verdict.findings] == [Rule.MALFORMED_PDU]


def test_pdu_bytes_counts_canonical_json_without_unsigned():
    event = {"b": 1, "a": "é", "unsigned": {"age": 5}}
    assert pdu_bytes(event) == len('{"a":"é","b":1}'.encode())
    assert pdu_bytes({"x": object()}) is None


def test_pdu_bytes_is_exact_around_the_limit():
    """Near MAX_PDU_BYTES the size decides a refusal: it is canonical JSON's, byte for byte
    (a float is spelt alike by both encoders only by chance, so it shows the exact path)."""
    for body in (MAX_PDU_BYTES - 60, MAX_PDU_BYTES - 5000, MAX_PDU_BYTES + 10):
        event = {"type": "m.room.message", "content": {"body": "é" * (body // 2), "f": 1e16}}
        exact = len(encode_canonical_json(event))
        size = pdu_bytes(event)
        assert size is not None
        if exact > MAX_PDU_BYTES - 4096:
            assert size == exact
        else:
            assert abs(size - exact) < 4


def test_an_oversized_pdu_is_refused_at_the_edge_by_its_event_id():
    """The edge refuses a PDU over the limit by its event ID (so the hook refuses it when
    the homeserver asks), also when its author and room were already found fine for an
    earlier PDU of the transaction; the PDU beside it is allowed."""
    sender = "@a:good.test"
    small = {
        "room_id": ROOM,
        "sender": sender,
        "type": "m.room.message",
        "content": {"body": "small"},
        "origin_server_ts": 1,
        "depth": 2,
        "prev_events": [],
        "auth_events": [],
        "hashes": {"sha256": "x"},
    }
    big = {**small, "content": {"body": "x" * MAX_PDU_BYTES}}
    body = json.dumps({"origin": "good.test", "pdus": [small, big]}).encode()
    verdict = check_transaction(
        parse_transaction(body, "t", "good.test"), {ROOM: POLICY}, fail_open=True
    )
    ok, refused = verdict.pdus
    assert not ok.refused and refused.refused
    assert [f.rule for f in refused.findings] == [Rule.MALFORMED_PDU]
    assert refused.event_id == compute_event_id(big, get_room_version("10"))
    assert refused.findings[0].event_id == refused.event_id
    assert refused.findings[0].attributed_to == "good.test"


def test_a_receipt_about_several_rooms_is_refused_only_when_every_room_refuses():
    """A receipt EDU cannot be cut: refused when every room it covers refuses its origin;
    when only some do, it passes (the other rooms' receipts would be lost), with a finding
    for each refusing room that says so."""
    other = "!other:hs.test"
    rooms = {ROOM: POLICY, other: RoomPolicy(other, "10", get_room_version("10"), None)}

    def receipt(*room_ids):
        read = {"m.read": {"@a:denied.test": {"event_ids": ["$x"], "data": {"ts": 1}}}}
        return Edu(0, "m.receipt", {r: read for r in room_ids})

    both = check_edu(receipt(ROOM, other), "denied.test", rooms, fail_open=True)
    assert both.decision is Decision.ALLOW
    assert [(f.rule, f.room_id) for f in both.findings] == [(Rule.ACL_EDU, ROOM)]
    assert "also about allowed rooms" in both.findings[0].detail
    alone = check_edu(receipt(ROOM), "denied.test", rooms, fail_open=True)
    assert alone.decision is Decision.REFUSE
    denied_both = {ROOM: POLICY, other: RoomPolicy(other, "10", get_room_version("10"), POLICY.acl)}
    assert check_edu(receipt(ROOM, other), "denied.test", denied_both, fail_open=True).refused


def test_a_transaction_of_one_partly_refused_receipt_is_not_answered_locally():
    """The defect this fixes: a /send holding only a receipt EDU for an allowed and a
    refusing room was answered by modgud, and the allowed room's receipt never arrived."""
    other = "!other:hs.test"
    read = {"m.read": {"@a:denied.test": {"event_ids": ["$x"], "data": {"ts": 1}}}}
    body = json.dumps(
        {
            "origin": "denied.test",
            "pdus": [],
            "edus": [{"edu_type": "m.receipt", "content": {ROOM: read, other: read}}],
        }
    ).encode()
    rooms = {ROOM: POLICY, other: RoomPolicy(other, "10", get_room_version("10"), None)}
    verdict = check_transaction(parse_transaction(body, "t", "denied.test"), rooms, fail_open=True)
    assert not verdict.refused_all and not verdict.refused_any
