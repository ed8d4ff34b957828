"""The policy-relevant view of a room's current state, as the homeserver reports it.

The homeserver is the authority for room state, never the traffic: a remote server can send
any state event it likes. This module only turns state the homeserver returned into a
`RoomPolicy`; fetching it is proxy_addons' job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from rules.acl import ServerAcl
from rules.roomversion import RoomVersion, get_room_version, room_version_of_create

__all__ = ["RELEVANT_STATE_TYPES", "RoomPolicy", "room_policy_from_state"]

# State events whose arrival makes a cached RoomPolicy stale.
RELEVANT_STATE_TYPES = frozenset({"m.room.create", "m.room.server_acl"})


@dataclass(frozen=True, slots=True)
class RoomPolicy:
    room_id: str
    room_version_id: str
    room_version: RoomVersion | None  # None: a version modgud does not know
    acl: ServerAcl | None  # None: the room has no m.room.server_acl
    acl_event_id: str | None = None


def room_policy_from_state(room_id: str, state: Iterable[object]) -> RoomPolicy:
    """Build a RoomPolicy from state events (client or federation format)."""
    version_id = "1"
    acl: ServerAcl | None = None
    acl_event_id: str | None = None
    for event in state:
        if not isinstance(event, Mapping) or event.get("state_key") != "":
            continue
        event_type = event.get("type")
        if event_type == "m.room.create":
            version_id = room_version_of_create(event.get("content"))
        elif event_type == "m.room.server_acl":
            acl = ServerAcl.from_content(event.get("content"))
            eid = event.get("event_id")
            acl_event_id = eid if isinstance(eid, str) else None
    return RoomPolicy(room_id, version_id, get_room_version(version_id), acl, acl_event_id)
