"""Server authorisation beyond the room's ACL: policy lists (spec: "Moderation policy
lists"), server participation (MSC4099/MSC4124) and the operator's own scopes.

One function, `authorise_server`, answers "may this server take part in this room?" the
same way for the server that delivered an event and for the server that wrote it, at the
edge and in the hook.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from rules.acl import GlobSet, check_server_acl
from rules.roomstate import RoomPolicy
from rules.servername import strip_port

__all__ = [
    "ACTIONS",
    "BAN_RECOMMENDATIONS",
    "CHECKS",
    "SEVERITIES",
    "CheckActions",
    "CheckSetting",
    "NO_POLICY",
    "SERVER_RULE_TYPES",
    "USER_RULE_TYPES",
    "BanList",
    "Barrier",
    "OperatorPolicy",
    "Refusal",
    "authorise_server",
]

# Spec: "Moderation policy lists"; the legacy names are Mjolnir's, still in wide use.
SERVER_RULE_TYPES = frozenset(
    {"m.policy.rule.server", "org.matrix.mjolnir.rule.server", "m.room.rule.server"}
)
USER_RULE_TYPES = frozenset(
    {"m.policy.rule.user", "org.matrix.mjolnir.rule.user", "m.room.rule.user"}
)
BAN_RECOMMENDATIONS = frozenset({"m.ban", "org.matrix.mjolnir.ban"})


class Barrier(enum.Enum):
    ACL = "acl"
    POLICY = "policy"
    PARTICIPATION = "participation"


@dataclass(frozen=True, slots=True)
class Refusal:
    barrier: Barrier
    reason: str


class BanList:
    """The m.ban rules of the subscribed policy rooms, compiled: matching costs the same
    with 10 or 100,000 entries for exact names and `*.suffix` globs (see GlobSet)."""

    __slots__ = ("_decided", "_servers", "_users", "servers", "users")

    # Decisions are remembered per server name, like the ACL's: the federation a
    # homeserver sees is a few thousand servers, and a new one costs about ten microseconds
    # against 100,000 entries (docs/BENCHMARKS.md), a known one a dict lookup.
    CACHE_SIZE = 8192

    def __init__(self, servers: Iterable[str] = (), users: Iterable[str] = ()) -> None:
        self.servers = tuple(servers)
        self.users = tuple(users)
        self._servers = GlobSet(e.lower() for e in self.servers)
        self._users = GlobSet(e.lower() for e in self.users)
        self._decided: dict[str, bool] = {}

    @classmethod
    def from_state(cls, events: Iterable[object]) -> BanList:
        """Rules from policy rooms' state; a rule without entity or recommendation counts
        as removed (spec)."""
        servers: list[str] = []
        users: list[str] = []
        for event in events:
            if not isinstance(event, Mapping):
                continue
            content = event.get("content")
            if not isinstance(content, Mapping):
                continue
            entity = content.get("entity")
            recommendation = content.get("recommendation")
            event_type = event.get("type")
            # Strings first: a list or an object is unhashable, and the sets would raise.
            if not isinstance(entity, str) or not isinstance(recommendation, str):
                continue
            if not isinstance(event_type, str) or recommendation not in BAN_RECOMMENDATIONS:
                continue
            if event_type in SERVER_RULE_TYPES:
                servers.append(entity)
            elif event_type in USER_RULE_TYPES:
                users.append(entity)
        return cls(servers, users)

    def __len__(self) -> int:
        return self._servers.size + self._users.size

    def bans_server(self, server_name: str) -> bool:
        banned = self._decided.get(server_name)
        if banned is None:
            if len(self._decided) >= self.CACHE_SIZE:
                self._decided.clear()
            banned = self._servers.matches(strip_port(server_name).lower())
            self._decided[server_name] = banned
        return banned

    def bans_user(self, user_id: str) -> bool:
        return self._users.matches(user_id.lower())


# Checks the operator can set an action for, and the finding rules each covers (by the
# rule's family, the part before the dot). Malformed input and unavailable state are not
# configurable: they are protocol violations and on_error's business.
CHECKS: Mapping[str, tuple[str, ...]] = {
    "acl": ("acl",),
    "participation": ("participation",),
    "policy_list": ("policy",),
    "restricted_join": ("join",),
    "signature": ("signature", "hash"),
    "edu_impersonation": ("edu",),
    "leaks": ("leak",),
    # our own homeserver sending a room's events to a server refused in it (the outbound
    # listener): refused by default, unlike the other leaks, which are evidence only
    "outbound": ("leak.outbound",),
}
ACTIONS = ("drop", "flag", "off")
SEVERITIES = ("info", "warning", "high")


@dataclass(frozen=True, slots=True)
class CheckSetting:
    action: str = "drop"  # drop: refuse and record; flag: record only; off: neither
    severity: str | None = None  # overrides the finding's own severity


@dataclass(frozen=True, slots=True)
class CheckActions:
    """Per-check settings, server-wide, per space and per room (room wins over space,
    space over server-wide)."""

    server: Mapping[str, CheckSetting] = field(default_factory=dict)
    spaces: Mapping[str, Mapping[str, CheckSetting]] = field(default_factory=dict)
    rooms: Mapping[str, Mapping[str, CheckSetting]] = field(default_factory=dict)

    def setting(self, check: str, room_id: str | None, spaces: Iterable[str]) -> CheckSetting:
        if room_id is not None and check in self.rooms.get(room_id, {}):
            return self.rooms[room_id][check]
        for space_id in spaces:
            if check in self.spaces.get(space_id, {}):
                return self.spaces[space_id][check]
        return self.server.get(check) or DEFAULT_SETTINGS.get(check, DEFAULT_SETTING)


DEFAULT_SETTING = CheckSetting()
# Building on a refused event is evidence against its author, but the event itself may be
# fine: recorded, not refused, unless the operator says drop.
DEFAULT_SETTINGS: Mapping[str, CheckSetting] = {"leaks": CheckSetting("flag")}
_FAMILY_TO_CHECK = {family: check for check, families in CHECKS.items() for family in families}


def check_of_rule(rule: str) -> str | None:
    """The check behind a rule: by its full name first (leak.outbound), else its family."""
    return _FAMILY_TO_CHECK.get(rule) or _FAMILY_TO_CHECK.get(rule.split(".", 1)[0])


@dataclass(frozen=True, slots=True)
class OperatorPolicy:
    """What the operator configured, on top of each room's own state."""

    local_server: str = ""
    participation_rooms: frozenset[str] = frozenset()  # rooms where participation applies
    bans: BanList = field(default_factory=BanList)
    # room → the state of the spaces it belongs to (MSC3216: a space's policy binds its
    # rooms): their ACL and participation apply in the room too.
    spaces: Mapping[str, tuple[RoomPolicy, ...]] = field(default_factory=dict)
    actions: CheckActions = field(default_factory=CheckActions)

    def setting(self, rule: str, room_id: str | None) -> CheckSetting | None:
        """The operator's setting for the check behind `rule`; None: not configurable."""
        check = check_of_rule(rule)
        if check is None:
            return None
        spaces = (s.room_id for s in self.spaces_of(room_id)) if room_id else ()
        return self.actions.setting(check, room_id, spaces)

    def spaces_of(self, room_id: str) -> tuple[RoomPolicy, ...]:
        return self.spaces.get(room_id, ())

    def participation_applies(self, room: RoomPolicy) -> bool:
        return (
            room.participation_enforced
            or room.room_id in self.participation_rooms
            or any(s.participation_enforced for s in self.spaces_of(room.room_id))
        )


NO_POLICY = OperatorPolicy()


def authorise_server(
    server_name: str,
    room: RoomPolicy | None,
    policy: OperatorPolicy = NO_POLICY,
    *,
    knocking: bool = False,
) -> Refusal | None:
    """None when `server_name` may take part in the room, else why not.

    Order: the room's ACL, the operator's policy lists, then participation: a server whose
    participation is `deny` is always refused; where participation applies (the room's
    MSC4124 knock rule is `active` or `deny`, or the operator listed the room) only
    `permitted` servers take part. The protected homeserver is always allowed by
    participation; `knocking` exempts a server's own knock from it.
    """
    spaces = policy.spaces_of(room.room_id) if room is not None else ()
    if room is not None:
        acl = check_server_acl(room.acl, server_name)
        if not acl.allowed:
            return Refusal(Barrier.ACL, acl.reason)
        for space in spaces:
            acl = check_server_acl(space.acl, server_name)
            if not acl.allowed:
                reason = acl.reason.replace("the room's", "the space's")
                return Refusal(Barrier.ACL, f"{reason} (space {space.room_id})")
    if len(policy.bans) and policy.bans.bans_server(server_name):
        return Refusal(Barrier.POLICY, "server is banned by a policy list")
    if room is None or server_name == policy.local_server:
        return None
    name = server_name.lower()
    decisions = [room.participation.get(name)] + [s.participation.get(name) for s in spaces]
    if "deny" in decisions:
        return Refusal(Barrier.PARTICIPATION, "server's participation in the room is deny")
    permitted = "permitted" in decisions
    if not permitted and not knocking and policy.participation_applies(room):
        return Refusal(
            Barrier.PARTICIPATION,
            "server is not permitted to participate in the room; "
            "knock first (an m.server.knock EDU with the room_id)",
        )
    return None
