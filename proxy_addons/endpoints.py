"""Federation endpoints: which class a request path belongs to and which room it names.

Spec: Server-Server API. The "room-data" class is the list of endpoints that MUST answer
403 M_FORBIDDEN to a server the room's ACL denies (Server-Server API, "Server Access
Control Lists"), plus /timestamp_to_event and /hierarchy, which also carry room data.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["ROOM_DATA", "Endpoint", "EndpointClass", "classify_path"]


class EndpointClass(enum.StrEnum):
    SEND = "send"
    ROOM_DATA = "room_data"
    EVENT = "event"  # /v1/event/{eventId}: the room is only known from the answer
    KEYS = "keys"
    OTHER = "other"
    NOT_FEDERATION = "not_federation"


@dataclass(frozen=True, slots=True)
class Endpoint:
    cls: EndpointClass
    name: str  # e.g. "send", "make_join", "state_ids"
    room_id: str | None = None
    txn_id: str | None = None
    event_id: str | None = None


_FED = re.compile(r"^/_matrix/federation/(v1|v2)/([a-z_]+)(?:/([^?]*))?")
# Room-data endpoints: an ACL-denied origin is refused on these (spec: Server ACLs).
ROOM_DATA = frozenset(
    {
        "make_join",
        "send_join",
        "make_leave",
        "send_leave",
        "invite",
        "make_knock",
        "send_knock",
        "state",
        "state_ids",
        "backfill",
        "event_auth",
        "get_missing_events",
        "timestamp_to_event",
        "hierarchy",
    }
)


def classify_path(path: str) -> Endpoint:
    """Classify a request path (with or without query). Never raises."""
    if path.startswith("/_matrix/key/"):
        return Endpoint(EndpointClass.KEYS, "keys")
    m = _FED.match(path)
    if not m:
        return Endpoint(EndpointClass.NOT_FEDERATION, "other")
    name = m.group(2)
    rest = (m.group(3) or "").split("?", 1)[0]
    parts = [unquote(p) for p in rest.split("/")] if rest else []
    if name == "send" and len(parts) == 1:
        return Endpoint(EndpointClass.SEND, "send", txn_id=parts[0])
    if name in ROOM_DATA and parts:
        event_id = parts[1] if len(parts) > 1 and parts[1].startswith("$") else None
        return Endpoint(EndpointClass.ROOM_DATA, name, room_id=parts[0], event_id=event_id)
    if name == "event" and len(parts) == 1:
        return Endpoint(EndpointClass.EVENT, "event", event_id=parts[0])
    return Endpoint(EndpointClass.OTHER, name)
