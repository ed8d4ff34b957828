"""One policy for a whole space (MSC3216): what `modgud spaces drift` and `modgud spaces
sync` do, and what a bot calls to do the same.

What the space holds, and what each child room gets (rooms found by walk_space through
m.space.child, nested):

- policy: the space room's own m.room.server_acl and m.server.participation events. modgud
  enforces them at the edge in every room of the space (see operatorpolicy); `sync` also
  writes them into the rooms, so that every homeserver in those rooms enforces them too.
- powerlevels: the space's `m.space.power_levels` (state key "", same content shape as
  m.room.power_levels) is the space-wide set of roles and permissions. It is merged into
  each room's m.room.power_levels (`merge_power_levels`, in rules.powerlevels): what the
  space sets wins, the room's own other users, events and levels stay.
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
  `check_ban`, in rules.powerlevels; spec "Authorization rules", rules 5.6, 6, 8 and 10,
  v12's creators from MSC4289), so that a sync fails before it starts rather than halfway
  through.

`plan_space` (async) reads; `apply_plan` (blocking urllib; run it with asyncio.to_thread
inside an event loop) writes; `sync_space` (async) does both as the room admin;
`format_drift` and `format_sync` turn the results into the lines the CLI prints.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy_addons.config import Config
from proxy_addons.operatorpolicy import walk_space
from proxy_addons.participation import ParticipationError
from proxy_addons.statesource import StateError, SynapseAdminStateSource
from rules.powerlevels import (
    RoomAuth,
    check_ban,
    check_power_levels_change,
    check_state_change,
    diff_power_levels,
    format_level,
    merge_power_levels,
    sanitize_power_levels,
)
from rules.roomstate import PARTICIPATION_TYPES

__all__ = [
    "KINDS",
    "Change",
    "RoomPlan",
    "SpacePlan",
    "SpaceWanted",
    "SyncResult",
    "apply_plan",
    "format_drift",
    "format_sync",
    "plan_room",
    "plan_space",
    "run_for_bot",
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
            details = tuple(
                f"{entry}: {format_level(a)} → {format_level(b)}" for entry, a, b in diff
            )
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
