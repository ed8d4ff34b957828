"""Content hashes, reference hashes, event IDs (spec: Server-Server API, "Calculating the
reference hash for an event"; room versions 3, 4 and 12 for the ID encodings)."""

from __future__ import annotations

import hashlib

import pytest

from rules.canonical import check_canonical_json, encode_canonical_json
from rules.eventhash import (
    check_content_hash,
    compute_content_hash,
    compute_event_id,
    compute_reference_hash,
    compute_room_id_v12,
    decode_unpadded_base64,
    encode_unpadded_base64,
)
from rules.redaction import redact_event
from rules.roomversion import get_room_version

EVENT = {
    "room_id": "!r:x",
    "sender": "@u:x",
    "type": "m.room.message",
    "content": {"body": "hé"},
    "origin_server_ts": 1,
    "depth": 1,
    "prev_events": [],
    "auth_events": [],
    "hashes": {"sha256": "ignored"},
    "signatures": {"x": {"ed25519:1": "s"}},
    "unsigned": {"age": 4},
}


def test_content_hash_is_sha256_of_canonical_json_without_unsigned_signatures_hashes():
    """Spec: drop unsigned, signatures and hashes, then SHA-256 of canonical JSON."""
    stripped = {k: v for k, v in EVENT.items() if k not in ("unsigned", "signatures", "hashes")}
    assert compute_content_hash(EVENT) == hashlib.sha256(encode_canonical_json(stripped)).digest()


def test_check_content_hash():
    """A correct hash passes; any content change or a malformed hash fails."""
    good = dict(EVENT, hashes={"sha256": encode_unpadded_base64(compute_content_hash(EVENT))})
    assert check_content_hash(good)
    assert not check_content_hash(dict(good, content={"body": "other"}))
    for bad in ({}, {"sha256": 5}, {"sha256": "!!"}, "x"):
        assert not check_content_hash(dict(EVENT, hashes=bad))


@pytest.mark.parametrize(
    ("version", "urlsafe"), [("3", False), ("4", True), ("10", True), ("12", True)]
)
def test_event_id_encoding(version, urlsafe):
    """v3: standard base64; v4+: URL-safe; both unpadded and prefixed with $."""
    rv = get_room_version(version)
    digest = compute_reference_hash(EVENT, rv)
    redacted = redact_event(EVENT, rv)
    redacted.pop("signatures")
    redacted.pop("unsigned")
    assert digest == hashlib.sha256(encode_canonical_json(redacted)).digest()
    expected = "$" + encode_unpadded_base64(digest, urlsafe=urlsafe)
    assert compute_event_id(EVENT, rv) == expected
    assert "=" not in expected


def test_event_id_v1_is_carried():
    """v1/v2 event IDs are in the PDU; a missing one is None, not an exception."""
    assert compute_event_id(dict(EVENT, event_id="$a:x"), get_room_version("1")) == "$a:x"
    assert compute_event_id(EVENT, get_room_version("2")) is None


def test_unsigned_and_signatures_do_not_change_the_event_id():
    """Re-signing or changing unsigned data never changes a v3+ event ID."""
    rv = get_room_version("11")
    changed = dict(EVENT, signatures={"y": {}}, unsigned={"age": 99})
    assert compute_event_id(changed, rv) == compute_event_id(EVENT, rv)


def test_room_id_v12_derives_from_the_create_event():
    """MSC4291: the room ID is ! + URL-safe unpadded reference hash of the create event."""
    create = {
        "type": "m.room.create",
        "sender": "@u:x",
        "state_key": "",
        "content": {"room_version": "12"},
        "origin_server_ts": 1,
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
        "hashes": {"sha256": "h"},
    }
    room_id = compute_room_id_v12(create)
    assert room_id == "!" + compute_event_id(create, get_room_version("12"))[1:]


@pytest.mark.parametrize("text", ["YQ", "YQ==", "-_8", "+/8"])
def test_unpadded_base64_decoding_accepts_both_alphabets(text):
    """Decoding tolerates padding and both alphabets, as Synapse does."""
    assert decode_unpadded_base64(text)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ({"a": [1, "x", None, True]}, True),
        ({"a": 2**53 - 1}, True),
        ({"a": -(2**53 - 1)}, True),
        ({"a": 2**53}, False),
        ({"a": 1.5}, False),
        ({1: "x"}, False),
        ({"a": {"b": {"c": set()}}}, False),
    ],
)
def test_strict_canonical_json(value, ok):
    """Room v6+: integers only within ±(2^53−1), no floats."""
    assert (check_canonical_json(value) is None) is ok


def test_deep_nesting_is_a_reason_not_a_crash():
    """Hostile nesting is reported, never a RecursionError."""
    value: object = 1
    for _ in range(100_000):
        value = [value]
    assert "nested" in check_canonical_json(value)
