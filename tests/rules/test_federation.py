"""Transaction parsing (spec: Server-Server API, "Transactions", PDU/EDU limits):
malformed input becomes a finding, never an exception."""

from __future__ import annotations

import json

import pytest

from rules.federation import MAX_PDU_BYTES, edu_rooms, edu_users, parse_transaction
from rules.findings import Rule


def body(pdus=(), edus=(), origin="a.test", **extra):
    return json.dumps(
        {"origin": origin, "origin_server_ts": 1, "pdus": list(pdus), "edus": list(edus), **extra}
    ).encode()


def pdu(**over):
    base = {"room_id": "!r:x", "sender": "@u:a.test", "type": "m.room.message", "content": {}}
    base.update(over)
    return base


def test_well_formed_transaction():
    """PDUs and EDUs are parsed with the fields checks need."""
    txn = parse_transaction(
        body([pdu()], [{"edu_type": "m.typing", "content": {"room_id": "!r:x"}}]), "t", "a.test"
    )
    assert txn.error is None and len(txn.pdus) == 1 and len(txn.edus) == 1
    assert txn.pdus[0].sender_server == "a.test"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1,2]",
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"pdus": 5}',
        b'{"pdus": [], "edus": {}}',
        b'{"pdus": [' + b"1" * 5000 + b"]}",
        b'{"pdus": [{"content": NaN}]}',
    ],
)
def test_malformed_bodies_become_findings(raw):
    """Bodies that are not a transaction object give a malformed.request finding."""
    txn = parse_transaction(raw, "t", "a.test")
    assert txn.error is not None and txn.error.rule is Rule.MALFORMED_REQUEST
    assert txn.pdus == ()


def test_limits_51_pdus_or_101_edus():
    """More than 50 PDUs or 100 EDUs is refused as a whole."""
    assert parse_transaction(body([pdu()] * 51), "t", "a.test").error is not None
    assert (
        parse_transaction(body([], [{"edu_type": "x", "content": {}}] * 101), "t", "a.test").error
        is not None
    )
    assert parse_transaction(body([pdu()] * 50), "t", "a.test").error is None


@pytest.mark.parametrize(
    "bad",
    [
        5,
        "x",
        None,
        pdu(room_id=5),
        pdu(sender="nobody"),
        pdu(sender=None),
        pdu(type=["x"]),
        pdu(state_key=1),
        pdu(content={"big": "x" * MAX_PDU_BYTES}),
    ],
)
def test_malformed_pdus_are_findings_and_others_survive(bad):
    """One malformed PDU is a finding; the good PDU next to it still parses."""
    raw = json.dumps([pdu(), bad], allow_nan=True)
    txn = parse_transaction(('{"origin":"a.test","pdus":' + raw + "}").encode(), "t", "a.test")
    assert len(txn.pdus) == 1 and len(txn.bad_pdus) == 1
    assert txn.bad_pdus[0].rule is Rule.MALFORMED_PDU


def test_body_origin_mismatch_is_a_warning():
    """The body's origin must match the authenticated X-Matrix origin."""
    txn = parse_transaction(body([pdu()], origin="b.test"), "t", "a.test")
    assert [w.rule for w in txn.warnings] == [Rule.MALFORMED_REQUEST]


def test_edu_users_and_rooms():
    """Which users and rooms each EDU type speaks for."""
    txn = parse_transaction(
        body(
            edus=[
                {"edu_type": "m.typing", "content": {"room_id": "!r:x", "user_id": "@a:x"}},
                {
                    "edu_type": "m.receipt",
                    "content": {"!r:x": {"m.read": {"@b:x": {}, "@c:y": {}}}},
                },
                {"edu_type": "m.presence", "content": {"push": [{"user_id": "@d:x"}, "junk"]}},
                {"edu_type": "m.direct_to_device", "content": {"sender": "@e:x"}},
                {"edu_type": "m.device_list_update", "content": {"user_id": "@f:x"}},
                {"edu_type": "m.unknown", "content": {}},
            ]
        ),
        "t",
        "x",
    )
    users = [edu_users(e) for e in txn.edus]
    assert users == [["@a:x"], ["@b:x", "@c:y"], ["@d:x", None], ["@e:x"], ["@f:x"], []]
    assert [edu_rooms(e) for e in txn.edus] == [["!r:x"], ["!r:x"], [], [], [], []]
