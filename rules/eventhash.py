"""Content hashes, reference hashes, event IDs and v12 room IDs.

Spec: Server-Server API, "Calculating the content hash for an event" and "Calculating the
reference hash for an event"; room versions v3 (event IDs), v4 (URL-safe), v12 (room IDs).
"""

from __future__ import annotations

import hashlib
from base64 import b64decode, b64encode, urlsafe_b64encode
from collections.abc import Mapping

from rules.canonical import encode_canonical_json
from rules.redaction import redact_event
from rules.roomversion import KNOWN_ROOM_VERSIONS, EventFormat, RoomVersion

__all__ = [
    "check_content_hash",
    "compute_content_hash",
    "compute_event_id",
    "compute_reference_hash",
    "compute_room_id_v12",
    "decode_unpadded_base64",
    "encode_unpadded_base64",
    "event_id_from_reference_hash",
]

# Besides unsigned, signatures and hashes (the spec's list), Synapse also drops these
# legacy top-level keys before hashing content; real events are hashed that way.
_CONTENT_HASH_DROP = ("unsigned", "signatures", "hashes", "age_ts", "outlier", "destinations")


def encode_unpadded_base64(data: bytes, urlsafe: bool = False) -> str:
    encoded = urlsafe_b64encode(data) if urlsafe else b64encode(data)
    return encoded.decode("ascii").rstrip("=")


def decode_unpadded_base64(text: str) -> bytes:
    """Decode standard or URL-safe base64 with or without padding; ValueError if invalid."""
    text = text.replace("-", "+").replace("_", "/")
    return b64decode(text + "=" * (-len(text) % 4), validate=True)


def compute_content_hash(event: Mapping[str, object]) -> bytes:
    stripped = {k: v for k, v in event.items() if k not in _CONTENT_HASH_DROP}
    return hashlib.sha256(encode_canonical_json(stripped)).digest()


def check_content_hash(event: Mapping[str, object]) -> bool:
    """Whether `hashes.sha256` matches the event's content hash; False if malformed."""
    hashes = event.get("hashes")
    expected = hashes.get("sha256") if isinstance(hashes, Mapping) else None
    if not isinstance(expected, str):
        return False
    try:
        return decode_unpadded_base64(expected) == compute_content_hash(event)
    except (ValueError, TypeError, RecursionError):
        return False


def compute_reference_hash(event: Mapping[str, object], room_version: RoomVersion) -> bytes:
    redacted = redact_event(event, room_version)
    redacted.pop("signatures", None)
    redacted.pop("unsigned", None)
    return hashlib.sha256(encode_canonical_json(redacted)).digest()


def compute_event_id(event: Mapping[str, object], room_version: RoomVersion) -> str | None:
    """The event's ID: carried in the PDU for v1/v2, the reference hash from v3."""
    if room_version.event_format is EventFormat.V1:
        event_id = event.get("event_id")
        return event_id if isinstance(event_id, str) else None
    return event_id_from_reference_hash(
        compute_reference_hash(event, room_version), event, room_version
    )


def event_id_from_reference_hash(
    digest: bytes, event: Mapping[str, object], room_version: RoomVersion
) -> str | None:
    """The event ID, given the event's reference hash (already at hand when its
    signatures were verified: they sign the same bytes)."""
    if room_version.event_format is EventFormat.V1:
        event_id = event.get("event_id")
        return event_id if isinstance(event_id, str) else None
    return "$" + encode_unpadded_base64(
        digest, urlsafe=room_version.event_format is not EventFormat.V2
    )


def compute_room_id_v12(create_event: Mapping[str, object]) -> str:
    """Room v12 (MSC4291): "!" + URL-safe unpadded base64 of the create event's reference hash."""
    digest = compute_reference_hash(create_event, KNOWN_ROOM_VERSIONS["12"])
    return "!" + encode_unpadded_base64(digest, urlsafe=True)
