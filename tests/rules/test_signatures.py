"""Signatures (spec: Appendices, "Signing JSON" test vectors; Server-Server API,
"Validating hashes and signatures on received events")."""

from __future__ import annotations

import pytest
from signedjson.key import decode_signing_key_base64, generate_signing_key, get_verify_key
from signedjson.sign import sign_json

from rules.roomversion import get_room_version
from rules.signatures import ServerKey, required_signers, sign_event, verify_event_signatures

# Spec: Appendices, "Signing JSON" — the test key and its expected signatures.
SPEC_KEY = decode_signing_key_base64("ed25519", "1", "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1")


def test_spec_vector_minimal_object():
    """Signing {} with the spec's key gives the spec's signature."""
    assert sign_json({}, "domain", SPEC_KEY)["signatures"]["domain"]["ed25519:1"] == (
        "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
    )


def test_spec_vector_object_with_data():
    """Signing {"one": 1, "two": "Two"} gives the spec's signature."""
    signed = sign_json({"one": 1, "two": "Two"}, "domain", SPEC_KEY)
    assert signed["signatures"]["domain"]["ed25519:1"] == (
        "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
    )


SPEC_EVENT = {
    "auth_events": [],
    "content": {},
    "depth": 3,
    "origin": "domain",
    "origin_server_ts": 1000000,
    "prev_events": [],
    "room_id": "!x:domain",
    "sender": "@a:domain",
    "type": "X",
    "unsigned": {"age_ts": 1000000},
}


def test_spec_vector_event_signing():
    """The spec's event signing example: exact content hash and signature."""
    signed = sign_event(SPEC_EVENT, get_room_version("1"), "domain", SPEC_KEY)
    assert signed["hashes"] == {"sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"}
    assert signed["signatures"] == {
        "domain": {
            "ed25519:1": "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
        }
    }
    assert "signatures" not in SPEC_EVENT  # input untouched


KEY = generate_signing_key("k1")
OTHER = generate_signing_key("k1")


def lookup_for(server, signing_key, valid_until=None):
    def lookup(name, key_id):
        if name == server and key_id == f"ed25519:{signing_key.version}":
            return ServerKey(name, key_id, get_verify_key(signing_key), valid_until)
        return None

    return lookup


def event(version="10", **extra):
    base = {
        "room_id": "!r:a.test",
        "sender": "@u:a.test",
        "type": "m.room.message",
        "content": {"body": "hi"},
        "origin_server_ts": 5000,
        "depth": 2,
        "prev_events": [],
        "auth_events": [],
    }
    base.update(extra)
    return sign_event(base, get_room_version(version), "a.test", KEY)


def test_valid_signature_verifies():
    """An event signed by its sender's server verifies, and names the server verified."""
    check = verify_event_signatures(
        event(), get_room_version("10"), lookup_for("a.test", KEY, 10**13)
    )
    assert check.ok and check.verified_servers == {"a.test"}


def test_changed_content_still_verifies_but_changed_redacted_field_does_not():
    """Signatures cover the redacted form: a body edit keeps the signature valid (the
    content hash catches it), a changed sender or type does not."""
    rv = get_room_version("10")
    lookup = lookup_for("a.test", KEY, 10**13)
    edited = event()
    edited["content"] = {"body": "changed"}
    assert verify_event_signatures(edited, rv, lookup).ok
    forged = event()
    forged["origin_server_ts"] = 6000
    check = verify_event_signatures(forged, rv, lookup)
    assert not check.ok and not check.missing_keys


def test_wrong_key_fails_and_missing_key_is_reported():
    """Signed with another key under the same key ID: fails; unknown key: listed as missing."""
    rv = get_room_version("10")
    assert not verify_event_signatures(event(), rv, lookup_for("a.test", OTHER, 10**13)).ok
    check = verify_event_signatures(event(), rv, lambda s, k: None)
    assert not check.ok and check.missing_keys == (("a.test", "ed25519:k1"),)


@pytest.mark.parametrize(("version", "ok"), [("4", True), ("5", False), ("12", False)])
def test_key_validity_enforced_from_v5(version, ok):
    """From room v5 a key whose valid_until_ts is before origin_server_ts is refused."""
    check = verify_event_signatures(
        event(version), get_room_version(version), lookup_for("a.test", KEY, 1000)
    )
    assert check.ok is ok


@pytest.mark.parametrize(
    ("version", "extra", "signers"),
    [
        ("10", {}, {"a.test"}),
        ("1", {"event_id": "$x:b.test"}, {"a.test", "b.test"}),
        ("3", {"event_id": "$x:b.test"}, {"a.test"}),
        (
            "8",
            {
                "type": "m.room.member",
                "state_key": "@u:a.test",
                "content": {"membership": "join", "join_authorised_via_users_server": "@m:c.test"},
            },
            {"a.test", "c.test"},
        ),
        (
            "7",
            {
                "type": "m.room.member",
                "state_key": "@u:a.test",
                "content": {"membership": "join", "join_authorised_via_users_server": "@m:c.test"},
            },
            {"a.test"},
        ),
        (
            "10",
            {
                "type": "m.room.member",
                "content": {"membership": "invite", "third_party_invite": {}},
            },
            set(),
        ),
        ("10", {"sender": "not-a-user"}, set()),
    ],
)
def test_required_signers(version, extra, signers):
    """Who must sign: the sender's server; the event ID's domain in v1/v2; the authorising
    server of a restricted join from v8; not the sender for 3pid-invite members (Synapse)."""
    ev = {"sender": "@u:a.test", "type": "m.room.message", "content": {}, **extra}
    assert required_signers(ev, get_room_version(version)) == signers


@pytest.mark.parametrize(
    "hostile",
    [
        {},
        {"sender": 5},
        {"sender": "@u:a.test", "signatures": "x"},
        {"sender": "@u:a.test", "signatures": {"a.test": {"ed25519:k1": "!!notbase64"}}},
        {"sender": "@u:a.test", "signatures": {"a.test": {"rsa:1": "x"}}},
    ],
)
def test_hostile_events_never_raise(hostile):
    """Malformed events fail verification with a reason instead of raising."""
    check = verify_event_signatures(
        hostile, get_room_version("10"), lookup_for("a.test", KEY, 10**13)
    )
    assert not check.ok and check.reason
