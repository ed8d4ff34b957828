"""Transaction parsing (spec: Server-Server API, "Transactions", PDU/EDU limits):
malformed input becomes a finding, never an exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.canonical import encode_canonical_json
from rules.federation import (
    MAX_PDU_BYTES,
    edu_rooms,
    edu_users,
    parse_json_body,
    parse_transaction,
)
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
    ],
)
def test_malformed_pdus_are_findings_and_others_survive(bad):
    """One malformed PDU is a finding; the good PDU next to it still parses."""
    raw = json.dumps([pdu(), bad], allow_nan=True)
    txn = parse_transaction(('{"origin":"a.test","pdus":' + raw + "}").encode(), "t", "a.test")
    assert len(txn.pdus) == 1 and len(txn.bad_pdus) == 1
    assert txn.bad_pdus[0].rule is Rule.MALFORMED_PDU


def test_an_oversized_pdu_stays_a_pdu_marked_with_its_size():
    """A PDU over the size limit is kept as a PDU with its canonical size (the checks
    refuse it by its event ID, so the homeserver's judges refuse it too); the PDU next to
    it is untouched."""
    big = pdu(content={"big": "x" * MAX_PDU_BYTES})
    txn = parse_transaction(body([pdu(), big]), "t", "a.test")
    assert txn.bad_pdus == () and len(txn.pdus) == 2
    assert txn.pdus[0].oversized == 0
    assert txn.pdus[1].oversized == len(encode_canonical_json(big)) > MAX_PDU_BYTES


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


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
junk = st.sampled_from([b"", b" ", b"x", b"NaN", b"\xff", b"]", b'\\ud800"', b"1" * 4400])


@settings(max_examples=500, deadline=None)
@given(json_values, junk, st.integers(min_value=0, max_value=40))
def test_fast_decoder_agrees_with_the_stdlib(value, extra, cut):
    """msgspec first, stdlib on refusal: the same value or the same refusal as the stdlib
    alone, for valid JSON, truncated JSON, trailing junk, invalid UTF-8, NaN, huge ints."""
    from rules.federation import _parse_json_stdlib

    raw = json.dumps(value).encode()
    for body_bytes in (raw, raw + extra, raw[:cut] + extra, extra + raw):
        fast, fast_reason = parse_json_body(body_bytes)
        slow, slow_reason = _parse_json_stdlib(body_bytes)
        assert (fast_reason is None) == (slow_reason is None)
        assert repr(fast) == repr(slow)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": [], "a": [1]}',
        b'{"x": 1e400}',
        b'{"x": ' + b"1" * 4300 + b"}",
        b'{"x": ' + b"1" * 4301 + b"}",
        b'{"x": "\\ud800"}',
        b'{"x": -0}',
        b'{"x": 0.1, "y": 1E5, "z": -1.5e-7}',
        b'"\\u0000"',
    ],
)
def test_fast_decoder_edge_cases(raw):
    """Duplicate keys, numbers the decoders could treat differently, lone surrogates."""
    from rules.federation import _parse_json_stdlib

    assert repr(parse_json_body(raw)) == repr(_parse_json_stdlib(raw))


@pytest.mark.parametrize("raw", [b'"\x80"', b'{"a": "\xff"}', b'["\xc3"]'])
def test_invalid_utf8_inside_a_string_is_a_reason_not_an_exception(raw):
    """msgspec raises UnicodeDecodeError, not DecodeError, for invalid UTF-8 inside a
    string (found by fuzzing: it escaped parse_json_body, an internal error at the edge's
    request-signature check and a crash of the outbound watcher's pull check)."""
    assert parse_json_body(raw) == (None, "body is not UTF-8")


def test_sender_server_check_is_per_pdu_despite_the_per_transaction_memo():
    """The server-name memo must not let one PDU's malformed sender decide another's."""
    pdus = [pdu(sender="u:a.test"), pdu(sender="@u:a.test"), pdu(sender="@v"), pdu(sender="@")]
    txn = parse_transaction(body(pdus), "t", "a.test")
    assert [(p.position, p.sender_server) for p in txn.pdus] == [(1, "a.test")]
    assert len(txn.bad_pdus) == 3


def _summary(txn):
    return (
        txn.error.detail if txn.error else None,
        [
            (
                p.position,
                p.room_id,
                p.sender,
                p.event_type,
                p.state_key,
                p.content_hash,
                p.oversized,
                p.event,
            )
            for p in txn.pdus
        ],
        [f.detail for f in txn.bad_pdus],
        [(e.position, e.edu_type, e.content) for e in txn.edus],
        [f.detail for f in txn.bad_edus],
        [f.detail for f in txn.warnings],
    )


_pdu_like = st.fixed_dictionaries(
    {},
    optional={
        "room_id": st.sampled_from(["!r:x", 5, None]),
        "sender": st.sampled_from(["@u:a.test", "@v:b.test", "nobody", "@x:[::1]:80", "@y"]),
        "type": st.sampled_from(["m.room.message", "m.room.create", ["x"]]),
        "state_key": st.sampled_from(["", "@u:a.test", 1]),
        "content": json_values,
    },
)
_txn_like = st.fixed_dictionaries(
    {},
    optional={
        "origin": st.sampled_from(["a.test", "b.test", 3]),
        "pdus": st.lists(_pdu_like | json_values, max_size=4) | json_values,
        "edus": st.lists(
            st.fixed_dictionaries(
                {}, optional={"edu_type": st.sampled_from(["m.typing", 1]), "content": json_values}
            )
            | json_values,
            max_size=3,
        ),
    },
)
# Byte strings spliced into a PDU's content: what the two decoders could disagree on.
_splices = st.sampled_from(
    [b"1", b"NaN", b"1e400", b"-0", b"1" * 4301, b'"\xff"', b'"\\ud800"', b"[" * 2000, b"tru"]
)


@settings(max_examples=400, deadline=None)
@given(_txn_like | json_values, junk, _splices)
def test_fast_path_parses_transactions_exactly_like_the_stdlib_path(value, extra, splice):
    """The msgspec fast path and the stdlib reference path give the same transaction for
    any body: valid ones, wrong types, trailing junk, and values spliced into a PDU that the
    fast path skips over unread (invalid UTF-8, huge integers, NaN, deep nesting)."""
    from rules.federation import _parse_stdlib

    raw = json.dumps(value).encode()
    spliced = raw.replace(b'"content": ', b'"content": ' + splice + b', "_": ', 1)
    for body_bytes in (raw, raw + extra, spliced, raw.replace(b"a.test", b"a.t\xffst")):
        reference = _summary(_parse_stdlib(body_bytes, "t", "a.test"))
        assert _summary(parse_transaction(body_bytes, "t", "a.test")) == reference
        # The events taken from the body as decoded for its X-Matrix check are the same.
        decoded, _ = parse_json_body(body_bytes)
        shared = parse_transaction(body_bytes, "t", "a.test", decoded=decoded)
        assert _summary(shared) == reference


def test_fast_path_is_taken_and_leaves_pdus_undecoded():
    """A well-formed transaction goes through the fast path, and a PDU's event is decoded
    only when asked for, to the same dict the stdlib gives."""
    from rules.federation import _parse_fast

    raw = body([pdu(content={"n": 1}), pdu(sender="@v:a.test")])
    txn = _parse_fast(raw, "t", "a.test")
    assert txn is not None and len(txn.pdus) == 2
    assert all(p._event is None for p in txn.pdus)
    assert txn.pdus[0].event == json.loads(raw)["pdus"][0]
    assert _parse_fast(raw.replace(b'"n": 1', b'"n": ' + b"1" * 4301), "t", "a.test") is None


def test_digit_runs_are_found_wherever_they_sit():
    """The sampled scan for runs of more than 4,300 digits (which the fast path would skip
    over and the stdlib refuses) answers as a scan of the whole body does, for runs just
    under, at and over the limit, at every offset around the sampled positions, and for
    runs split by one non-digit."""
    from rules.federation import _DIGIT_RUNS, _TOO_MANY_DIGITS, _has_too_many_digits

    offsets = [*range(0, 60), *range(4240, 4360), *range(8540, 8660), 12_000]
    for length in (4300, 4301, 4302, 9000):
        for offset in offsets:
            text = b'{"a": "' + b"x" * offset + b'"' + b"1" * length + b"}"
            expected = _TOO_MANY_DIGITS in text.translate(_DIGIT_RUNS)
            assert _has_too_many_digits(text) is expected, (length, offset)
            assert expected is (length > 4300)
    split = b"1" * 4300 + b"," + b"1" * 4300
    assert not _has_too_many_digits(b"[" + split + b"]")


def test_bodies_over_the_pdu_limit_take_the_per_pdu_path_alike():
    """A transaction longer than the PDU size limit (here 40 PDUs of 2 KB, one of them
    over the limit) is cut into PDUs to check each one's size, and parses as the stdlib
    path does; a shorter one is read in one pass, its PDUs' bytes cut out only on demand."""
    from rules.federation import _parse_fast, _parse_stdlib

    pdus = [pdu(content={"body": f"{i} " + "x" * 2000}) for i in range(40)]
    pdus[7] = pdu(content={"big": "x" * MAX_PDU_BYTES})
    raw = body(pdus)
    fast = _parse_fast(raw, "t", "a.test")
    assert fast is not None and len(raw) > MAX_PDU_BYTES
    assert [p.oversized for p in fast.pdus] == [
        p.oversized for p in _parse_stdlib(raw, "t", "a.test").pdus
    ]
    assert [p.position for p in fast.pdus if p.oversized] == [7]
    assert _summary(fast) == _summary(_parse_stdlib(raw, "t", "a.test"))
    shared = parse_transaction(raw, "t", "a.test", decoded=parse_json_body(raw)[0])
    assert _summary(shared) == _summary(fast)
    assert all(p._event is not None for p in shared.pdus)  # events taken, not decoded
    small = _parse_fast(body(pdus[:3]), "t", "a.test")
    assert small is not None and all(p._raw is None for p in small.pdus)
    assert [p.event for p in small.pdus] == pdus[:3]


def test_a_v12_create_event_gets_its_room_id_on_every_path():
    """Room v12's m.room.create has no room_id: its room ID is derived from its own hash,
    and the one-decode path (PDU bytes cut out on demand) derives the same one as the
    per-PDU and stdlib paths."""
    from rules.federation import _parse_fast, _parse_stdlib

    create = {"sender": "@u:a.test", "type": "m.room.create", "content": {"room_version": "12"}}
    small = body([create])
    big = body([create, pdu(content={"pad": "x" * MAX_PDU_BYTES})])
    reference = _parse_stdlib(small, "t", "a.test").pdus[0].room_id
    assert reference.startswith("!")
    assert _parse_fast(small, "t", "a.test").pdus[0].room_id == reference
    assert _parse_fast(big, "t", "a.test").pdus[0].room_id == reference


def test_events_come_from_the_body_already_decoded():
    """Given the body as decoded for the request's signature check, a PDU's event is that
    very dict (not decoded again)."""
    raw = body([pdu(content={"n": i}) for i in range(3)] + [pdu(room_id=5)])
    decoded, _ = parse_json_body(raw)
    txn = parse_transaction(raw, "t", "a.test", decoded=decoded)
    assert [p.event is decoded["pdus"][p.position] for p in txn.pdus] == [True] * 3
    assert len(txn.bad_pdus) == 1
