"""Room versions 1–12 and the properties of each that modgud's checks depend on.

Spec: "Room Versions" (content/rooms/v1.md … v12.md). Flag names follow Synapse's
`synapse/api/room_versions.py` so the two can be compared line by line.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

__all__ = [
    "KNOWN_ROOM_VERSIONS",
    "EventFormat",
    "RoomVersion",
    "get_room_version",
    "room_version_of_create",
]


class EventFormat(enum.Enum):
    V1 = 1  # v1, v2: event_id in the PDU; prev/auth events are [id, hashes] pairs
    V2 = 2  # v3: event ID = "$" + standard unpadded base64 of the reference hash
    V3 = 3  # v4–v11: URL-safe unpadded base64
    V4 = 4  # v12: as V3; the create event has no room_id, the room ID derives from it


@dataclass(frozen=True, slots=True)
class RoomVersion:
    identifier: str
    event_format: EventFormat
    enforce_key_validity: bool = False  # v5+: key valid_until_ts must cover the event
    special_case_aliases_auth: bool = True  # until v5: m.room.aliases content survives redaction
    strict_canonicaljson: bool = False  # v6+: integers in ±(2^53−1), no floats
    knock_join_rule: bool = False  # v7+
    restricted_join_rule: bool = False  # v8+: MSC3083; join_rules `allow` survives redaction
    restricted_join_rule_fix: bool = False  # v9+: join_authorised_via_users_server survives
    knock_restricted_join_rule: bool = False  # v10+
    enforce_int_power_levels: bool = False  # v10+
    implicit_room_creator: bool = False  # v11+: MSC2175, no `creator` in create content
    updated_redaction_rules: bool = False  # v11+: MSC2176/MSC3821/MSC3989
    room_ids_as_hashes: bool = False  # v12: MSC4291

    @property
    def event_ids_are_hashes(self) -> bool:
        return self.event_format is not EventFormat.V1


_V1 = RoomVersion("1", EventFormat.V1)
_V2 = replace(_V1, identifier="2")
_V3 = replace(_V2, identifier="3", event_format=EventFormat.V2)
_V4 = replace(_V3, identifier="4", event_format=EventFormat.V3)
_V5 = replace(_V4, identifier="5", enforce_key_validity=True)
_V6 = replace(_V5, identifier="6", special_case_aliases_auth=False, strict_canonicaljson=True)
_V7 = replace(_V6, identifier="7", knock_join_rule=True)
_V8 = replace(_V7, identifier="8", restricted_join_rule=True)
_V9 = replace(_V8, identifier="9", restricted_join_rule_fix=True)
_V10 = replace(_V9, identifier="10", knock_restricted_join_rule=True, enforce_int_power_levels=True)
_V11 = replace(_V10, identifier="11", implicit_room_creator=True, updated_redaction_rules=True)
_V12 = replace(_V11, identifier="12", event_format=EventFormat.V4, room_ids_as_hashes=True)

KNOWN_ROOM_VERSIONS: Mapping[str, RoomVersion] = MappingProxyType(
    {v.identifier: v for v in (_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10, _V11, _V12)}
)


def get_room_version(identifier: object) -> RoomVersion | None:
    """The room version with this identifier; None when unknown or not a string."""
    if not isinstance(identifier, str):
        return None
    return KNOWN_ROOM_VERSIONS.get(identifier)


def room_version_of_create(content: object) -> str:
    """`content.room_version` of an m.room.create event; "1" when absent (spec: m.room.create)."""
    if isinstance(content, Mapping):
        version = content.get("room_version", "1")
        if isinstance(version, str):
            return version
    return "1"
