"""m.room.power_levels as the authorization rules read it: a space's levels made fit to
replicate, merged into a room's and compared with them, and the room admin's writes checked
against the room's auth rules before anything is sent.

Spec sections pinned here:

- Client-Server API, "m.room.power_levels": the single levels (LEVEL_KEYS), the maps of
  levels (MAP_KEYS), their defaults, and a user's level (`users`, else `users_default`; with
  no power-levels event the room's creator has 100, everyone else 0).
- Room versions, "Authorization rules" (v11/v12): rule 5.6 (ban), rule 6 (the sender must be
  joined), rule 8 (a state event needs its `events` level, else `state_default`) and rule
  10 (m.room.power_levels: 10.1-10.3 integers only, 10.4 no creator in `users`, 10.5 the
  first power-levels event, 10.6-10.10 what a changed entry may be).
- Room version 10: power levels must be integers; before it, "stringy" levels (a string of
  digits) are read as integers. Room v6 (MSC2209): changes to `notifications` are checked too.
- Room version 12 (MSC4289): the create event's sender and its `additional_creators` are
  the room's creators, with a power level above any other; they may not be listed in `users`.

`rules.roomstate.PowerLevels` is the checks' lenient view of the same event (a malformed
entry counts as 0, no implicit 100 for a creator); `RoomAuth` is the auth rules' exact one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rules.roomversion import get_room_version, room_version_of_create

__all__ = [
    "LEVEL_KEYS",
    "MAP_KEYS",
    "RoomAuth",
    "check_ban",
    "check_power_levels_change",
    "check_state_change",
    "diff_power_levels",
    "format_level",
    "merge_power_levels",
    "sanitize_power_levels",
]

POWER_LEVELS = "m.room.power_levels"

# m.room.power_levels: the single levels and the maps of levels (spec, m.room.power_levels).
LEVEL_KEYS = ("users_default", "events_default", "state_default", "ban", "kick", "redact", "invite")
MAP_KEYS = ("users", "events", "notifications")
_MAX_INT = 2**53 - 1  # canonical JSON's integer range (room v6+)
# MSC2209 (room v6+): the auth rules check changes to `notifications` too.
_NO_NOTIFICATION_RULES = frozenset({"1", "2", "3", "4", "5"})


def _is_level(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_INT


def _level(value: object) -> int | None:
    """A level as the auth rules read the room's current one: an integer, or (room
    versions before 10, spec "stringy power levels") a string of digits; None when
    absent or malformed."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) <= _MAX_INT else None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def format_level(level: float | None) -> str:
    """A level as the CLI prints it: "unset", "infinite (creator)" or the number."""
    if level is None:
        return "unset"
    if level == float("inf"):
        return "infinite (creator)"
    return f"{level:g}"


# -- replicating a space's levels: sanitize, merge, diff ----------------------------------


def sanitize_power_levels(content: object) -> tuple[dict[str, Any], list[str]]:
    """The levels of an m.space.power_levels content that can be replicated, and what was
    ignored: only integers are (room v10+ rejects anything else, rule 10.1-10.3); other
    keys (e.g. MSC3216's `space_defaults`) are not power levels of a room."""
    levels: dict[str, Any] = {}
    ignored: list[str] = []
    if not isinstance(content, Mapping):
        return levels, ["its content is not an object"]
    for key in LEVEL_KEYS:
        if key in content:
            if _is_level(content[key]):
                levels[key] = content[key]
            else:
                ignored.append(f"{key}: not an integer")
    for key in MAP_KEYS:
        if key not in content:
            continue
        entries = content[key]
        if not isinstance(entries, Mapping):
            ignored.append(f"{key}: not an object")
            continue
        kept: dict[str, Any] = {}
        for name, value in entries.items():
            if isinstance(name, str) and _is_level(value):
                kept[name] = value
            else:
                ignored.append(f"{key} {name}: not an integer")
        levels[key] = kept
    return levels, ignored


def merge_power_levels(
    room: Mapping[str, Any] | None, space: Mapping[str, Any], creators: Collection[str] = ()
) -> dict[str, Any]:
    """The room's m.room.power_levels content with the space's levels merged in.

    Every single level (`ban`, `state_default`, …) the space sets replaces the room's;
    `users`, `events` and `notifications` are merged entry by entry, the space's entries
    winning; everything else of the room's content stays as it is. An entry whose level
    already equals the space's keeps the room's own spelling (an old room's "50").
    `creators` (room v12, MSC4289) are never written into `users`: the auth rules reject
    a power-levels event that lists one (rule 10.4), and their power is infinite anyway.
    Invalid levels in `space` are skipped (see sanitize_power_levels). Inputs are not
    mutated.
    """
    merged: dict[str, Any] = {
        k: (dict(v) if isinstance(v, Mapping) else v) for k, v in (room or {}).items()
    }
    for key in LEVEL_KEYS:
        value = space.get(key)
        if _is_level(value) and _level(merged.get(key)) != value:
            merged[key] = value
    for key in MAP_KEYS:
        entries = space.get(key)
        if not isinstance(entries, Mapping):
            continue
        own = merged.get(key)
        own = own if isinstance(own, dict) else {}
        for name, value in entries.items():
            if not isinstance(name, str) or not _is_level(value):
                continue
            if key == "users" and name in creators:
                continue
            if _level(own.get(name)) != value:
                own[name] = value
        merged[key] = own
    users = merged.get("users")
    if isinstance(users, dict) and creators:
        merged["users"] = {u: v for u, v in users.items() if u not in creators}
    return merged


def diff_power_levels(
    old: Mapping[str, Any] | None, new: Mapping[str, Any], *, notifications: bool = True
) -> list[tuple[str, int | None, int | None]]:
    """The entries that differ between two power-levels contents, as the auth rules
    compare them (rule 10.6-10.10): (entry, old level, new level), None = absent. An
    entry is a single key (`ban`) or a map key and a name (`users @bob:hs`)."""
    old = old or {}
    out: list[tuple[str, int | None, int | None]] = []
    for key in LEVEL_KEYS:
        a, b = _level(old.get(key)), _level(new.get(key))
        if a != b:
            out.append((key, a, b))
    for key in MAP_KEYS:
        if key == "notifications" and not notifications:
            continue
        olds, news = old.get(key), new.get(key)
        olds = olds if isinstance(olds, Mapping) else {}
        news = news if isinstance(news, Mapping) else {}
        for name in sorted(set(olds) | set(news)):
            a, b = _level(olds.get(name)), _level(news.get(name))
            if a != b:
                out.append((f"{key} {name}", a, b))
    return out


# -- the room's auth view and the pre-checks ----------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomAuth:
    """What the auth rules need of a room's current state to judge the room admin's
    writes: version, creators, power levels, memberships."""

    room_version: str = "1"
    creators: frozenset[str] = frozenset()  # v12 (MSC4289): infinite power
    creator: str | None = None  # the create event's sender
    power_levels: Mapping[str, Any] | None = None  # None: the room has none
    membership: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_state(cls, state: Iterable[object]) -> RoomAuth:
        """The view of a room's state events (client or federation format); malformed
        events are skipped. Creators count only in v12 (MSC4289)."""
        version: str = "1"
        creator: str | None = None
        extra: list[str] = []
        power_levels: Mapping[str, Any] | None = None
        membership: dict[str, str] = {}
        for e in state:
            if not isinstance(e, dict) or not isinstance(e.get("state_key"), str):
                continue
            content = e.get("content")
            content = content if isinstance(content, dict) else {}
            if e.get("type") == "m.room.create" and e["state_key"] == "":
                version = room_version_of_create(content)
                sender = e.get("sender")
                creator = sender if isinstance(sender, str) else None
                more = content.get("additional_creators")
                extra = [u for u in more if isinstance(u, str)] if isinstance(more, list) else []
            elif e.get("type") == POWER_LEVELS and e["state_key"] == "":
                power_levels = content
            elif e.get("type") == "m.room.member" and isinstance(content.get("membership"), str):
                membership[e["state_key"]] = content["membership"]
        known = get_room_version(version)
        v12 = known is not None and known.room_ids_as_hashes
        creators = frozenset([*([creator] if creator else []), *extra]) if v12 else frozenset()
        return cls(version, creators, creator, power_levels, membership)

    def level_of(self, user_id: str) -> float:
        """The user's power level (spec, m.room.power_levels; v12 creators infinite)."""
        if user_id in self.creators:
            return float("inf")
        if self.power_levels is None:
            return 100 if user_id == self.creator else 0
        users = self.power_levels.get("users")
        mine = _level(users.get(user_id)) if isinstance(users, Mapping) else None
        if mine is not None:
            return mine
        default = _level(self.power_levels.get("users_default"))
        return default if default is not None else 0

    def required(self, key: str, default: int) -> int:
        """The level a single key (`ban`, `state_default`, …) asks for; `default` when the
        room does not set it (spec, m.room.power_levels)."""
        found = _level((self.power_levels or {}).get(key))
        return found if found is not None else default

    def state_level(self, event_type: str) -> int:
        """The level a state event of this type needs (rule 8)."""
        events = (self.power_levels or {}).get("events")
        found = _level(events.get(event_type)) if isinstance(events, Mapping) else None
        return found if found is not None else self.required("state_default", 50)


def check_state_change(auth: RoomAuth, sender: str, event_type: str) -> list[str]:
    """Why `sender` may not send a state event of this type (rule 8); [] if they may."""
    have, need = auth.level_of(sender), auth.state_level(event_type)
    if have < need:
        return [f"no power: {sender} has {format_level(have)}, {event_type} needs {need}"]
    return []


def check_power_levels_change(auth: RoomAuth, sender: str, new: Mapping[str, Any]) -> list[str]:
    """Why `sender` may not replace the room's power levels with `new`; [] if they may.

    Spec "Authorization rules" for m.room.power_levels (v11/v12, rule 10), read as Synapse
    applies it: the sender needs the level of the power-levels event itself (rule 8); for
    each single level, event or notification entry that changes, neither its current nor
    its new value may be above the sender's level (an absent one is not compared); for
    each user entry that changes, the new value may not be above the sender's level and,
    for users other than the sender, the current value must be below it; in v12, no
    creator may be listed in `users` (10.4).
    """
    have = auth.level_of(sender)
    problems = check_state_change(auth, sender, POWER_LEVELS)
    if problems:
        return problems
    users = new.get("users")
    for creator in sorted(auth.creators):
        if isinstance(users, Mapping) and creator in users:
            problems.append(
                f"power levels: users {creator}: a creator of this v12 room may not be listed"
            )
    if auth.power_levels is None:
        # Rule 10.5 would allow any first power-levels event, but a first one takes the
        # implicit 100 away from the creator of an older room: modgud does not write one.
        return [*problems, "the room has no m.room.power_levels; modgud does not create one"]
    notifications = auth.room_version not in _NO_NOTIFICATION_RULES
    for entry, old, value in diff_power_levels(auth.power_levels, new, notifications=notifications):
        other_user = entry.startswith("users ") and entry != f"users {sender}"
        if other_user and old is not None and old >= have:
            problems.append(
                f"no power over {entry}: it is {format_level(old)}, "
                f"not below {sender}'s {format_level(have)}"
            )
        elif old is not None and old > have:
            problems.append(
                f"no power over {entry}: it is {format_level(old)}, "
                f"above {sender}'s {format_level(have)}"
            )
        if value is not None and value > have:
            problems.append(
                f"no power over {entry}: {format_level(value)} "
                f"would be above {sender}'s {format_level(have)}"
            )
    return problems


def check_ban(auth: RoomAuth, sender: str, target: str) -> list[str]:
    """Why `sender` may not ban `target` (rule 5.6.2): their level must reach the ban
    level and be above the target's; [] if they may."""
    have, need = auth.level_of(sender), auth.required("ban", 50)
    if have < need:
        return [f"no power to ban {target}: {sender} has {format_level(have)}, ban needs {need}"]
    theirs = auth.level_of(target)
    if theirs >= have:
        return [
            f"cannot ban {target}: their level {format_level(theirs)} "
            f"is not below {format_level(have)}"
        ]
    return []
