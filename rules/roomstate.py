"""The policy-relevant view of a room's current state, as the homeserver reports it.

The homeserver is the authority for room state, never the traffic: a remote server can send
any state event it likes. This module only turns state the homeserver returned into a
`RoomPolicy`; fetching it is proxy_addons' job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rules.acl import ServerAcl
from rules.canonical import encode_canonical_json
from rules.roomversion import RoomVersion, get_room_version, room_version_of_create

__all__ = [
    "KNOCK_RULE_TYPES",
    "KNOCK_TYPES",
    "PARTICIPATION_TYPES",
    "RELEVANT_STATE_TYPES",
    "SPACE_STATE_TYPES",
    "PowerLevels",
    "RoomPolicy",
    "room_policy_from_state",
]

# MSC4099/MSC4124 server participation, with MSC4124's unstable prefix (`me.marewolf.msc4124.`
# in place of `m.`).
PARTICIPATION_TYPES = frozenset(
    {"m.server.participation", "me.marewolf.msc4124.server.participation"}
)
KNOCK_RULE_TYPES = frozenset({"m.server.knock_rule", "me.marewolf.msc4124.server.knock_rule"})
KNOCK_TYPES = frozenset({"m.server.knock", "me.marewolf.msc4124.server.knock"})

# A space's state that binds its rooms (MSC3216): its children, its ACL, participation.
SPACE_STATE_TYPES = (
    frozenset({"m.space.child", "m.room.server_acl"}) | PARTICIPATION_TYPES | KNOCK_RULE_TYPES
)
# State events whose arrival makes a cached RoomPolicy stale.
RELEVANT_STATE_TYPES = frozenset(
    {
        "m.room.create",
        "m.room.server_acl",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.member",
        "m.space.child",
    }
    | PARTICIPATION_TYPES
    | KNOCK_RULE_TYPES
)


@dataclass(frozen=True, slots=True)
class PowerLevels:
    """What the checks need of m.room.power_levels (spec defaults when absent)."""

    users: Mapping[str, int] = field(default_factory=dict)
    users_default: int = 0
    invite: int = 0
    creators: frozenset[str] = frozenset()  # v12 (MSC4289): creators outrank everyone

    def of(self, user_id: str) -> float:
        if user_id in self.creators:
            return float("inf")
        return self.users.get(user_id, self.users_default)

    @classmethod
    def from_content(cls, content: object, creators: frozenset[str]) -> PowerLevels:
        c = content if isinstance(content, Mapping) else {}
        users = c.get("users")
        return cls(
            {u: _int(v, 0) for u, v in users.items() if isinstance(u, str)}
            if isinstance(users, Mapping)
            else {},
            _int(c.get("users_default"), 0),
            _int(c.get("invite"), 0),
            creators,
        )


def _int(value: object, default: int) -> int:
    """Power levels may be strings of digits in old room versions (spec, v1-v9)."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return default


@dataclass(frozen=True, slots=True)
class RoomPolicy:
    room_id: str
    room_version_id: str
    room_version: RoomVersion | None  # None: a version modgud does not know
    acl: ServerAcl | None  # None: the room has no m.room.server_acl
    acl_event_id: str | None = None
    # server name → "permitted" | "deny" (MSC4099's "denied" is read as "deny")
    participation: Mapping[str, str] = field(default_factory=dict)
    knock_rule: str | None = None  # MSC4124: "deny" | "passive" | "active"
    power: PowerLevels = field(default_factory=PowerLevels)
    joined: frozenset[str] = frozenset()
    space_children: tuple[str, ...] = ()  # m.space.child state keys whose content has `via`
    acl_bytes: int = 0  # the ACL content's canonical JSON size (an event is capped at 64 KiB)
    # (type, state_key) -> event ID of the relevant state it was built from, members aside
    # (they are `joined`); None when one came without an event ID (then never "the same").
    state_ids: Mapping[tuple[str, str], str] | None = None

    def same_state(self, other: RoomPolicy) -> bool:
        """Built from the same relevant state events, so equal in every respect."""
        return (
            self.state_ids is not None
            and self.room_id == other.room_id
            and self.state_ids == other.state_ids
            and self.joined == other.joined
        )

    def reflects(self, event: Mapping[str, object]) -> bool:
        """The state event `event` is already part of what this policy says: seeing it
        again (the homeserver re-checks events it pulls, its own old ones included)
        changes nothing. A member event counts as reflected when it agrees on whether
        its user is joined, the one thing a policy takes from members."""
        event_type, state_key = event.get("type"), event.get("state_key")
        if not isinstance(event_type, str) or not isinstance(state_key, str):
            return False
        if event_type == "m.room.member":
            content = event.get("content")
            membership = content.get("membership") if isinstance(content, Mapping) else None
            return (membership == "join") == (state_key in self.joined)
        return self.state_ids is not None and self.state_ids.get(
            (event_type, state_key)
        ) == event.get("event_id")

    @property
    def participation_enforced(self) -> bool:
        """The room opted in through its own state (MSC4124 knock rule active or deny)."""
        return self.knock_rule in ("active", "deny")


def room_policy_from_state(room_id: str, state: Iterable[object]) -> RoomPolicy:
    """Build a RoomPolicy from state events (client or federation format)."""
    version_id = "1"
    acl: ServerAcl | None = None
    acl_event_id: str | None = None
    acl_bytes = 0
    participation: dict[str, str] = {}
    knock_rule: str | None = None
    power_content: object = None
    joined: set[str] = set()
    children: list[str] = []
    creators: set[str] = set()
    state_ids: dict[tuple[str, str], str] | None = {}
    for event in state:
        if not isinstance(event, Mapping):
            continue
        event_type = event.get("type")
        state_key = event.get("state_key")
        content = event.get("content")
        content = content if isinstance(content, Mapping) else {}
        if not isinstance(state_key, str) or not isinstance(event_type, str):
            continue
        if event_type in RELEVANT_STATE_TYPES and event_type != "m.room.member":
            event_id = event.get("event_id")
            if isinstance(event_id, str) and state_ids is not None:
                state_ids[(event_type, state_key)] = event_id
            else:
                state_ids = None
        if event_type == "m.room.member":
            if content.get("membership") == "join":
                joined.add(state_key)
            continue
        if event_type in PARTICIPATION_TYPES:
            value = content.get("participation")
            if value == "denied":
                value = "deny"
            if value in ("permitted", "deny"):
                participation[state_key.lower()] = str(value)
            continue
        if event_type == "m.space.child":
            via = content.get("via")
            if isinstance(via, list) and via:
                children.append(state_key)
            continue
        if state_key != "":
            continue
        if event_type == "m.room.create":
            version_id = room_version_of_create(content)
            sender = event.get("sender")
            if isinstance(sender, str):
                creators.add(sender)
            extra = content.get("additional_creators")
            if isinstance(extra, list):
                creators.update(u for u in extra if isinstance(u, str))
        elif event_type == "m.room.server_acl":
            acl = ServerAcl.from_content(content)
            try:
                acl_bytes = len(encode_canonical_json(content))
            except (ValueError, TypeError, RecursionError):
                acl_bytes = 0
            eid = event.get("event_id")
            acl_event_id = eid if isinstance(eid, str) else None
        elif event_type == "m.room.power_levels":
            power_content = content
        elif event_type in KNOCK_RULE_TYPES:
            rule = content.get("rule")
            knock_rule = rule if isinstance(rule, str) else None
    version = get_room_version(version_id)
    # Only v12 (MSC4289) gives creators power above any level.
    room_creators = frozenset(creators) if version and version.room_ids_as_hashes else frozenset()
    return RoomPolicy(
        room_id,
        version_id,
        version,
        acl,
        acl_event_id,
        participation,
        knock_rule,
        PowerLevels.from_content(power_content, room_creators),
        frozenset(joined),
        tuple(children),
        acl_bytes,
        state_ids,
    )
