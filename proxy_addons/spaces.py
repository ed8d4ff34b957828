"""One policy for a whole space (MSC3216): what `modgud spaces drift` and `modgud spaces
sync` do, and what a bot calls to do the same.

What the space holds, and what each child room gets (rooms found by walk_space through
m.space.child, nested):

- policy: the space room's own m.room.server_acl and m.server.participation events. modgud
  enforces them at the edge in every room of the space (see operatorpolicy); `sync` also
  writes them into the rooms, so that every homeserver in those rooms enforces them too.
- powerlevels: the space's `m.space.power_levels` (state key "", same content shape as
  m.room.power_levels) is the space-wide set of roles and permissions. It is merged into
  each room's m.room.power_levels (`merge_power_levels`): what the space sets wins, the
  room's own other users, events and levels stay.
- bans: every m.room.member with membership "ban" in the space becomes a ban of that user,
  with the space's reason, in each room where the user is not banned yet. Unbans are not
  replicated: a user missing from the space's bans may have been banned in one room for
  that room's own reasons, and modgud cannot tell the two apart.

How this reads MSC3216 (an unmerged proposal, text of 2021):

- The MSC replicates the space's levels into a new `space_defaults` key of each room's
  m.room.power_levels and changes the auth rules to fall back to it, the room's explicit
  keys taking precedence. That needs a new room version, which no homeserver has; the auth
  rules of every room version in use read only the explicit keys. modgud therefore merges
  into the explicit keys, and the space's keys win where both set one (the operator asked
  for space-wide levels; a room-local exception is a key the space does not set).
- In the MSC, `m.space.power_levels` "stores the most recent replicated powerlevels
  directly into the Space" and serves clients only for display; the set to apply is the
  body of a `set_power_levels` request. modgud has no such request: the operator (or a
  client) writes the set into m.space.power_levels and modgud replicates it, so after a
  sync that event already holds the last replicated set. The MSC suggests nothing else to
  record there (which rooms failed is the answer to the request, not state), so modgud
  never writes to the space.
- Replication is "atomic unless an allow-partial flag is set"; modgud's flag is a list of
  rooms allowed to fail (`--allow-fail ROOM`), per the operator's choice, and it covers all
  kinds together: if any other room would fail for any kind, nothing changes. The MSC's
  M_ALL_FORBIDDEN (a partial update where no room can be updated fails) is not copied:
  modgud's sync converges and is run again and again, so a run where only rooms allowed
  to fail still differ did what it was asked and says so.
- Before anything is written, every change is checked against the room's auth rules as
  the room admin would meet them (`check_power_levels_change`, `check_state_change`,
  `check_ban`; spec "Authorization rules", rules 5.6, 6, 8 and 10, v12's creators from
  MSC4289), so that a sync fails before it starts rather than halfway through.

`plan_space` (async) reads; `apply_plan` (blocking urllib; run it with asyncio.to_thread
inside an event loop) writes; `sync_space` (async) does both as the room admin;
`format_drift` and `format_sync` turn the results into the lines the CLI prints.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy_addons.config import Config
from proxy_addons.operatorpolicy import walk_space
from proxy_addons.participation import ParticipationError
from proxy_addons.statesource import StateError, SynapseAdminStateSource
from rules.roomstate import PARTICIPATION_TYPES
from rules.roomversion import get_room_version, room_version_of_create

__all__ = [
    "KINDS",
    "Change",
    "RoomAuth",
    "RoomPlan",
    "SpacePlan",
    "SpaceWanted",
    "SyncResult",
    "apply_plan",
    "check_ban",
    "check_power_levels_change",
    "check_state_change",
    "diff_power_levels",
    "format_drift",
    "format_sync",
    "merge_power_levels",
    "plan_room",
    "plan_space",
    "run_for_bot",
    "sanitize_power_levels",
    "space_wanted_from_state",
    "sync_space",
    "whoami",
]

ACL = "m.room.server_acl"
POWER_LEVELS = "m.room.power_levels"
SPACE_POWER_LEVELS = "m.space.power_levels"
MEMBER = "m.room.member"

# What a sync can replicate; `policy` is the ACL and server participation.
KINDS = ("policy", "powerlevels", "bans")

# m.room.power_levels: the single levels and the maps of levels (spec, m.room.power_levels).
LEVEL_KEYS = ("users_default", "events_default", "state_default", "ban", "kick", "redact", "invite")
MAP_KEYS = ("users", "events", "notifications")
_MAX_INT = 2**53 - 1  # canonical JSON's integer range (room v6+)
# MSC2209 (room v6+): the auth rules check changes to `notifications` too.
_NO_NOTIFICATION_RULES = frozenset({"1", "2", "3", "4", "5"})


# -- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One write into one room. `kind` is one of KINDS; `why` says what differs (one
    line), `details` the differing entries of a power-levels change."""

    kind: str
    event_type: str
    state_key: str
    content: dict[str, Any]
    why: str
    details: tuple[str, ...] = ()


@dataclass
class RoomPlan:
    room_id: str
    changes: list[Change] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why the room admin could not write

    @property
    def problem(self) -> str | None:
        return "; ".join(self.problems) if self.problems else None


@dataclass
class SpacePlan:
    """What `plan_space` found: one RoomPlan per room of the space (in walk order),
    `notes` for the operator (e.g. the space sets no power levels), or `error` when the
    space itself could not be read (then `rooms` is empty)."""

    space_id: str
    kinds: tuple[str, ...]
    rooms: list[RoomPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def drifting(self) -> list[RoomPlan]:
        return [p for p in self.rooms if p.changes or p.problems]


@dataclass
class SyncResult:
    """What a sync did. `ok` is False when it refused to start (`error`, or `blocking`
    rooms: then nothing was written) or stopped on a write the homeserver refused
    (`failed`; `written` holds what was written before)."""

    plan: SpacePlan
    written: list[RoomPlan] = field(default_factory=list)
    skipped: list[RoomPlan] = field(default_factory=list)  # allowed to fail, and would
    blocking: list[RoomPlan] = field(default_factory=list)  # would fail, not allowed to
    failed: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.error or self.blocking or self.failed)


# -- what the space wants ----------------------------------------------------------------


@dataclass(frozen=True)
class SpaceWanted:
    """The space's policy, from its state: ACL content, participation events by server,
    its power levels (None: no m.space.power_levels) and its bans (user → reason)."""

    acl: dict[str, Any] | None = None
    participation: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    power_levels: dict[str, Any] | None = None
    bans: dict[str, str | None] = field(default_factory=dict)


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
        kept = {}
        for name, value in entries.items():
            if isinstance(name, str) and _is_level(value):
                kept[name] = value
            else:
                ignored.append(f"{key} {name}: not an integer")
        levels[key] = kept
    return levels, ignored


def space_wanted_from_state(state: Iterable[object]) -> tuple[SpaceWanted, list[str]]:
    """The space's policy from its state events, and notes for the operator."""
    have = _state_map(state)
    notes: list[str] = []
    participation = {k: v for k, v in have.items() if k[0] in PARTICIPATION_TYPES}
    power_levels = None
    if (SPACE_POWER_LEVELS, "") in have:
        power_levels, ignored = sanitize_power_levels(_raw_content(state, SPACE_POWER_LEVELS))
        if ignored:
            notes.append(f"{SPACE_POWER_LEVELS}: ignored {', '.join(ignored)}")
    else:
        notes.append(f"the space has no {SPACE_POWER_LEVELS}: no power levels to replicate")
    bans: dict[str, str | None] = {}
    for (event_type, user_id), content in have.items():
        if event_type == MEMBER and content.get("membership") == "ban":
            reason = content.get("reason")
            bans[user_id] = reason if isinstance(reason, str) and reason else None
    return SpaceWanted(have.get((ACL, "")), participation, power_levels, bans), notes


def _raw_content(state: Iterable[object], event_type: str) -> object:
    for e in state:
        if isinstance(e, dict) and e.get("type") == event_type and e.get("state_key") == "":
            return e.get("content")
    return None


def _state_map(state: Iterable[object]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for e in state:
        if (
            isinstance(e, dict)
            and isinstance(e.get("type"), str)
            and isinstance(e.get("state_key"), str)
        ):
            content = e.get("content")
            out[(e["type"], e["state_key"])] = content if isinstance(content, dict) else {}
    return out


def _acl_key(content: object) -> tuple[object, ...] | None:
    if not isinstance(content, dict):
        return None
    return (
        sorted(x for x in content.get("allow", []) if isinstance(x, str)),
        sorted(x for x in content.get("deny", []) if isinstance(x, str)),
        content.get("allow_ip_literals", True) is not False,
    )


# -- power levels: merge and diff (pure) -------------------------------------------------


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


def _fmt(level: float | None) -> str:
    if level is None:
        return "unset"
    if level == float("inf"):
        return "infinite (creator)"
    return f"{level:g}"


# -- the room's auth view and the pre-checks (pure) ---------------------------------------


@dataclass(frozen=True)
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
        version, creator, extra = "1", None, []
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
            elif e.get("type") == MEMBER and isinstance(content.get("membership"), str):
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
        return [f"no power: {sender} has {_fmt(have)}, {event_type} needs {need}"]
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
                f"no power over {entry}: it is {_fmt(old)}, not below {sender}'s {_fmt(have)}"
            )
        elif old is not None and old > have:
            problems.append(
                f"no power over {entry}: it is {_fmt(old)}, above {sender}'s {_fmt(have)}"
            )
        if value is not None and value > have:
            problems.append(
                f"no power over {entry}: {_fmt(value)} would be above {sender}'s {_fmt(have)}"
            )
    return problems


def check_ban(auth: RoomAuth, sender: str, target: str) -> list[str]:
    """Why `sender` may not ban `target` (rule 5.6.2): their level must reach the ban
    level and be above the target's; [] if they may."""
    have, need = auth.level_of(sender), auth.required("ban", 50)
    if have < need:
        return [f"no power to ban {target}: {sender} has {_fmt(have)}, ban needs {need}"]
    theirs = auth.level_of(target)
    if theirs >= have:
        return [f"cannot ban {target}: their level {_fmt(theirs)} is not below {_fmt(have)}"]
    return []


# -- planning one room (pure) and the whole space (reads) --------------------------------


def plan_room(
    room_id: str,
    state: list[object],
    wanted: SpaceWanted,
    *,
    kinds: Collection[str] = KINDS,
    admin_user: str | None = None,
) -> RoomPlan:
    """The changes that make one room follow the space, for the given kinds, in the
    order they are to be written (policy, bans, power levels last: the earlier checks
    hold against the room's levels as they are now); with `admin_user`, why that user
    could not make them."""
    plan = RoomPlan(room_id)
    have = _state_map(state)
    auth = RoomAuth.from_state(state)
    if "policy" in kinds:
        acl = wanted.acl
        if acl is not None and _acl_key(acl) != _acl_key(have.get((ACL, ""))):
            plan.changes.append(
                Change("policy", ACL, "", acl, "server ACL differs from the space's")
            )
        for (event_type, server), content in wanted.participation.items():
            mine = have.get((event_type, server), {}).get("participation")
            if mine != content.get("participation"):
                why = f"participation of {server}: {mine or 'unset'}, space says {content.get('participation')}"
                plan.changes.append(Change("policy", event_type, server, content, why))
    if "bans" in kinds:
        for user_id, reason in wanted.bans.items():
            if auth.membership.get(user_id) == "ban":
                continue
            content = {"membership": "ban", **({"reason": reason} if reason else {})}
            why = f"{user_id} is not banned (space: {reason or 'no reason'})"
            plan.changes.append(Change("bans", MEMBER, user_id, content, why))
    if "powerlevels" in kinds and wanted.power_levels is not None:
        merged = merge_power_levels(auth.power_levels, wanted.power_levels, auth.creators)
        diff = diff_power_levels(auth.power_levels, merged)
        if diff:
            details = tuple(f"{entry}: {_fmt(a)} → {_fmt(b)}" for entry, a, b in diff)
            why = f"power levels differ from the space's in {len(diff)} entries"
            plan.changes.append(Change("powerlevels", POWER_LEVELS, "", merged, why, details))
    if admin_user and plan.changes:
        plan.problems = _check_room(auth, admin_user, plan.changes)
    return plan


def _check_room(auth: RoomAuth, sender: str, changes: list[Change]) -> list[str]:
    membership = auth.membership.get(sender)
    if membership != "join":  # rule 6 (and 5.6.1 for bans)
        return [f"{sender} is not joined ({membership or 'no membership'})"]
    problems: list[str] = []
    for change in changes:
        if change.kind == "bans":
            found = check_ban(auth, sender, change.state_key)
        elif change.event_type == POWER_LEVELS:
            found = check_power_levels_change(auth, sender, change.content)
        else:
            found = check_state_change(auth, sender, change.event_type)
        problems.extend(p for p in found if p not in problems)
    return problems


def _kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    given = set(kinds)
    chosen = tuple(k for k in KINDS if k in given)
    unknown = given - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kind {sorted(unknown)[0]!r}; choose from {', '.join(KINDS)}")
    return chosen


async def plan_space(
    config: Config, space_id: str, admin_user: str | None, kinds: Iterable[str] = KINDS
) -> SpacePlan:
    """For every room of the space: the changes of the given kinds (see KINDS) that
    would make it follow the space, and (given the room admin's user ID) why they could
    not be made. Reads state through the homeserver's admin API; never raises for an
    unreadable space or room (see SpacePlan.error and RoomPlan.problems)."""
    chosen = _kinds(kinds)
    out = SpacePlan(space_id, chosen)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        source = SynapseAdminStateSource(config.admin_api, config.admin_token, lambda: session)
        try:
            walked = await walk_space(space_id, source.fetch_state)
            space_state = await source.fetch_state(space_id)
        except StateError as e:
            out.error = f"cannot read the space: {e}"
            return out
        if walked is None or space_state is None:
            out.error = f"unknown space {space_id}: the homeserver is not in it"
            return out
        wanted, notes = space_wanted_from_state(space_state)
        if "powerlevels" in chosen:
            out.notes.extend(notes)
        for room_id in walked[1]:
            try:
                state = await source.fetch_state(room_id)
            except StateError as e:
                out.rooms.append(RoomPlan(room_id, problems=[f"cannot read the room: {e}"]))
                continue
            if state is None:
                out.rooms.append(RoomPlan(room_id, problems=["the homeserver is not in this room"]))
                continue
            out.rooms.append(plan_room(room_id, state, wanted, kinds=chosen, admin_user=admin_user))
    return out


# -- writing (blocking) ------------------------------------------------------------------


def _call(config: Config, method: str, path: str, body: object, what: str) -> None:
    request = urllib.request.Request(
        f"{config.client_api.rstrip('/')}/_matrix/client/v3{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": f"Bearer {config.room_admin_token}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=15):
            pass
    except urllib.error.HTTPError as e:
        raise ParticipationError(f"{what} refused: {e.code} {e.read()[:200]!r}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ParticipationError(f"homeserver unreachable at {config.client_api}: {e}") from None


def whoami(config: Config) -> str:
    """The room admin's user ID (blocking); raises ParticipationError when the token is
    refused or the homeserver unreachable."""
    request = urllib.request.Request(
        f"{config.client_api}/_matrix/client/v3/account/whoami",
        headers={"Authorization": f"Bearer {config.room_admin_token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return str(json.loads(resp.read())["user_id"])
    except urllib.error.HTTPError as e:
        raise ParticipationError(f"the room admin token was refused ({e.code})") from None
    except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
        raise ParticipationError(f"homeserver unreachable at {config.client_api}: {e}") from None


def write_plan(config: Config, plan: RoomPlan) -> None:
    """Write one room's changes in order as the room admin (blocking); raises
    ParticipationError on the first the homeserver refuses."""
    room = quote(plan.room_id, safe="")
    for change in plan.changes:
        if change.kind == "bans":
            body: dict[str, Any] = {"user_id": change.state_key}
            if change.content.get("reason"):
                body["reason"] = change.content["reason"]
            what = f"{plan.room_id}: ban of {change.state_key}"
            _call(config, "POST", f"/rooms/{room}/ban", body, what)
        else:
            path = (
                f"/rooms/{room}/state/{quote(change.event_type, safe='')}"
                f"/{quote(change.state_key, safe='')}"
            )
            _call(config, "PUT", path, change.content, f"{plan.room_id}: {change.event_type}")


def apply_plan(config: Config, plan: SpacePlan, allow_fail: Iterable[str] = ()) -> SyncResult:
    """Carry out a plan made with the room admin's user ID (blocking: call it through
    asyncio.to_thread from an event loop). Atomic unless rooms are allowed to fail: if
    any room not in `allow_fail` has a problem, nothing is written; rooms in
    `allow_fail` with a problem are skipped whole. Give it a fresh plan: it does not
    re-read the rooms."""
    result = SyncResult(plan, error=plan.error)
    if plan.error:
        return result
    allowed = set(allow_fail)
    in_space = {p.room_id for p in plan.rooms}
    for room_id in sorted(allowed - in_space):
        plan.notes.append(f"--allow-fail {room_id}: not a room of this space")
    result.blocking = [p for p in plan.rooms if p.problems and p.room_id not in allowed]
    if result.blocking:
        return result
    for room in plan.rooms:
        if room.problems:
            result.skipped.append(room)
            continue
        if not room.changes:
            continue
        try:
            write_plan(config, room)
        except ParticipationError as e:
            result.failed = str(e)
            return result
        result.written.append(room)
    return result


async def sync_space(
    config: Config,
    space_id: str,
    *,
    kinds: Iterable[str] = KINDS,
    allow_fail: Iterable[str] = (),
) -> SyncResult:
    """Plan and carry out a sync of the space as the room admin: the entry point for
    the CLI and for a bot. Blocking HTTP runs in a worker thread, never on the loop.
    Never raises for a refused token, an unreadable space or a refused write: see
    SyncResult."""
    plan = SpacePlan(space_id, _kinds(kinds))
    if not config.room_admin_token:
        return SyncResult(plan, error="homeserver.room_admin_token_file is not set")
    try:
        admin = await asyncio.to_thread(whoami, config)
    except ParticipationError as e:
        return SyncResult(plan, error=str(e))
    plan = await plan_space(config, space_id, admin, plan.kinds)
    return await asyncio.to_thread(apply_plan, config, plan, tuple(allow_fail))


# -- what the CLI and a bot print ---------------------------------------------------------


def format_drift(plan: SpacePlan) -> list[str]:
    """`modgud spaces drift` as lines: a summary, notes, then per room what differs (and
    why a room could not be planned)."""
    if plan.error:
        return [plan.error]
    drifting = plan.drifting
    lines = [f"{len(plan.rooms)} rooms in {plan.space_id}; {len(drifting)} differ from its policy"]
    lines.extend(f"  note: {n}" for n in plan.notes)
    for room in drifting:
        for change in room.changes:
            lines.append(f"  {room.room_id}  {change.why}")
            lines.extend(f"      {d}" for d in change.details)
        if room.problems and not room.changes:
            lines.append(f"  {room.room_id}  {room.problem}")
    return lines


def _written(change: Change) -> str:
    if change.kind == "bans":
        return f"banned {change.state_key}"
    return f"wrote {change.event_type} {change.state_key}".rstrip()


def format_sync(result: SyncResult) -> list[str]:
    """`modgud spaces sync` as lines: what was written and skipped, or why nothing was."""
    if result.error:
        return [result.error]
    lines = [f"  note: {n}" for n in result.plan.notes]
    if result.blocking:
        lines.append("nothing changed; these rooms would fail:")
        lines.extend(f"  {p.room_id}  {p.problem}" for p in result.blocking)
        return lines
    for room in result.plan.rooms:
        if room in result.skipped:
            lines.append(f"  skipped {room.room_id} (allowed to fail): {room.problem}")
        elif room in result.written:
            lines.extend(f"  {room.room_id}  {_written(c)}" for c in room.changes)
    if result.failed:
        lines.append(f"stopped after {len(result.written)} rooms: {result.failed}")
    else:
        lines.append(f"synced {len(result.written)} rooms of {result.plan.space_id}")
    return lines


async def run_for_bot(
    config: Config,
    space_id: str,
    kind: str | Iterable[str],
    action: str,
    allow_fail: Iterable[str] = (),
) -> list[str]:
    """`drift` or `sync` of one kind (or several; see KINDS) as the lines the CLI prints,
    for a bot in an event loop. A bad kind or action comes back as a line too."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    try:
        _kinds(kinds)
    except ValueError as e:
        return [str(e)]
    if action == "drift":
        return format_drift(await plan_space(config, space_id, None, kinds))
    if action == "sync":
        return format_sync(await sync_space(config, space_id, kinds=kinds, allow_fail=allow_fail))
    return [f"unknown action {action!r}; choose drift or sync"]
