"""Fuzzing what is computed from events, for every known room version and for versions
modgud does not know (flag combinations no spec version has): redaction, content and
reference hashes, event and room IDs, required signers, signature checks.

Documented behaviour: redact_event returns a new dict and never raises; check_content_hash,
signing_bytes and verify_event_signatures never raise; the compute_* functions raise only
what canonical JSON encoding raises (ValueError, TypeError, RecursionError: rules.canonical).
"""

from __future__ import annotations

import copy
from dataclasses import replace

from hypothesis import strategies as st
from signedjson.key import get_verify_key

from rules.eventhash import (
    check_content_hash,
    compute_content_hash,
    compute_event_id,
    compute_reference_hash,
    compute_room_id_v12,
    decode_unpadded_base64,
)
from rules.redaction import redact_event
from rules.roomversion import KNOWN_ROOM_VERSIONS, EventFormat, RoomVersion
from rules.signatures import (
    ServerKey,
    required_signers,
    sign_event,
    signing_bytes,
    verify_event_signatures,
)
from tests.fuzz.harness import fuzz
from tests.fuzz.strategies import events, json_objects, mutated, strings, text
from tests.fuzz.world import SIGNING_KEYS

ENCODING_ERRORS = (ValueError, TypeError, RecursionError)

known_versions = st.sampled_from(sorted(KNOWN_ROOM_VERSIONS.values(), key=lambda v: v.identifier))


@st.composite
def invented_versions(draw: st.DrawFn) -> RoomVersion:
    """A room version no spec has: any event format and any combination of flags."""
    base = draw(known_versions)
    flags = {
        name: draw(st.booleans())
        for name in (
            "enforce_key_validity",
            "special_case_aliases_auth",
            "strict_canonicaljson",
            "knock_join_rule",
            "restricted_join_rule",
            "restricted_join_rule_fix",
            "knock_restricted_join_rule",
            "enforce_int_power_levels",
            "implicit_room_creator",
            "updated_redaction_rules",
            "room_ids_as_hashes",
        )
    }
    return replace(
        base, identifier=draw(text), event_format=draw(st.sampled_from(EventFormat)), **flags
    )


room_versions = known_versions | invented_versions()


@st.composite
def any_events(draw: st.DrawFn) -> dict[str, object]:
    """Near-valid events (signed or not, mutated or not) and arbitrary objects."""
    event = draw(events() | json_objects)
    if draw(st.booleans()):
        event = draw(mutated(event))
    return event if isinstance(event, dict) else {}


def _lookup(server: str, key_id: str) -> ServerKey | None:
    key = SIGNING_KEYS.get(server)
    if key is None or key_id != f"ed25519:{key.version}":
        return None
    return ServerKey(server, key_id, get_verify_key(key), None if server == "relay.test" else 2**62)


@fuzz(any_events(), room_versions)
def test_redact_hash_and_ids_of_any_event(event, room_version):
    """Every function of an event, on any event, under any room version."""
    original = copy.deepcopy(event)
    redacted = redact_event(event, room_version)
    assert isinstance(redacted, dict) and isinstance(redacted["content"], dict)
    assert redact_event(redacted, room_version) == redacted  # redaction is idempotent
    assert isinstance(check_content_hash(event), bool)
    signed = signing_bytes(event, room_version)
    assert signed is None or isinstance(signed, bytes)
    assert isinstance(required_signers(event, room_version), frozenset)
    check = verify_event_signatures(event, room_version, _lookup, signed=signed)
    assert isinstance(check.ok, bool)
    if check.ok:
        assert check.verified_servers >= required_signers(event, room_version)
    for compute in (compute_content_hash, compute_room_id_v12):
        try:
            compute(event)
        except ENCODING_ERRORS:
            pass
    try:
        assert len(compute_reference_hash(event, room_version)) == 32
        event_id = compute_event_id(event, room_version)
        assert event_id is None or isinstance(event_id, str)
    except ENCODING_ERRORS:
        assert signed is None  # the same encoding failed there
    assert event == original  # inputs are never mutated


@fuzz(events(sign=False), known_versions, st.sampled_from(sorted(SIGNING_KEYS)))
def test_signed_events_verify(event, room_version, server):
    """An event signed by its sender's server verifies and its content hash checks, unless
    it needs another server's signature too; a changed signature never verifies."""
    event["sender"] = f"@u:{server}"
    event["origin_server_ts"] = 1
    event.pop("event_id", None)
    try:
        signed = sign_event(event, room_version, server, SIGNING_KEYS[server])
    except ENCODING_ERRORS:
        return  # floats, NaN, lone surrogates: nothing to sign
    assert check_content_hash(signed)
    check = verify_event_signatures(signed, room_version, _lookup)
    needs = required_signers(signed, room_version)
    if needs == {server} and not (room_version.enforce_key_validity and server == "relay.test"):
        assert check.ok, check
    forged = copy.deepcopy(signed)
    sig = forged["signatures"][server]
    key_id = next(iter(sig))
    sig[key_id] = "A" + sig[key_id][1:] if sig[key_id][0] != "A" else "B" + sig[key_id][1:]
    assert not verify_event_signatures(forged, room_version, _lookup).ok


@fuzz(strings | st.text(alphabet="ABCabc019+/-_=", max_size=50))
def test_decode_unpadded_base64_raises_only_value_error(value):
    """Hashes are whatever the sender wrote: decoding one gives bytes or ValueError."""
    try:
        assert isinstance(decode_unpadded_base64(value), bytes)
    except ValueError:
        pass
