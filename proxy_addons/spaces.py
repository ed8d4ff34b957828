"""One policy for a whole space (MSC3216): what `modgud spaces drift` and `modgud spaces
sync` do.

The space room's own m.room.server_acl and m.server.participation events are the space's
policy. modgud enforces it at the edge in every room of the space (see operatorpolicy);
`drift` lists the rooms whose own state differs from it, and `sync` writes it into them
through the Client-Server API as the configured room admin, so that every homeserver in
those rooms enforces it too. `sync` is atomic by default: it checks the room admin's power
in every room first and changes nothing if any room would fail, except rooms the operator
explicitly allows to fail.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy_addons.config import Config
from proxy_addons.operatorpolicy import walk_space
from proxy_addons.participation import ParticipationError
from proxy_addons.statesource import StateError, SynapseAdminStateSource
from rules.roomstate import PARTICIPATION_TYPES

__all__ = ["Change", "RoomPlan", "plan_space", "write_plan"]

ACL = "m.room.server_acl"


@dataclass(frozen=True)
class Change:
    event_type: str
    state_key: str
    content: dict[str, Any]
    why: str


@dataclass
class RoomPlan:
    room_id: str
    changes: list[Change] = field(default_factory=list)
    problem: str | None = None  # why the room admin could not write the changes


def _acl_key(content: object) -> tuple[object, ...] | None:
    if not isinstance(content, dict):
        return None
    return (
        sorted(x for x in content.get("allow", []) if isinstance(x, str)),
        sorted(x for x in content.get("deny", []) if isinstance(x, str)),
        content.get("allow_ip_literals", True) is not False,
    )


def _state_map(state: list[object]) -> dict[tuple[str, str], dict[str, Any]]:
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


def _creators(state: list[object]) -> set[object]:
    """v12 (MSC4289): the create event's sender and additional_creators outrank all."""
    for e in state:
        if isinstance(e, dict) and e.get("type") == "m.room.create":
            content = e.get("content")
            if not isinstance(content, dict) or content.get("room_version") != "12":
                return set()
            extra = content.get("additional_creators")
            return {e.get("sender"), *(extra if isinstance(extra, list) else [])}
    return set()


def _power(
    state: dict[tuple[str, str], dict[str, Any]],
    creators: set[object],
    user_id: str,
    event_type: str,
) -> tuple[float, int]:
    """(the user's level, the level `event_type` needs), per the room's power levels."""
    levels = state.get(("m.room.power_levels", ""), {})
    if user_id in creators:
        return float("inf"), 0
    users = levels.get("users", {}) if isinstance(levels.get("users"), dict) else {}
    have = users.get(user_id, levels.get("users_default", 0))
    events = levels.get("events", {}) if isinstance(levels.get("events"), dict) else {}
    need = events.get(event_type, levels.get("state_default", 50))
    return float(have if isinstance(have, int) else 0), int(need if isinstance(need, int) else 50)


async def plan_space(
    config: Config, space_id: str, admin_user: str | None
) -> tuple[list[RoomPlan], str | None]:
    """For every room of the space: the changes that would make it follow the space's
    ACL and participation, and (given the room admin) why they could not be made."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        source = SynapseAdminStateSource(config.admin_api, config.admin_token, lambda: session)
        try:
            walked = await walk_space(space_id, source.fetch_state)
            space_state = await source.fetch_state(space_id)
        except StateError as e:
            return [], f"cannot read the space: {e}"
        if walked is None or space_state is None:
            return [], f"unknown space {space_id}: the homeserver is not in it"
        rooms = walked[1]
        wanted = _state_map(space_state)
        plans = []
        for room_id in rooms:
            plan = RoomPlan(room_id)
            plans.append(plan)
            try:
                state = await source.fetch_state(room_id)
            except StateError as e:
                plan.problem = f"cannot read the room: {e}"
                continue
            if state is None:
                plan.problem = "the homeserver is not in this room"
                continue
            have = _state_map(state)
            acl = wanted.get((ACL, ""))
            if acl is not None and _acl_key(acl) != _acl_key(have.get((ACL, ""))):
                plan.changes.append(Change(ACL, "", acl, "server ACL differs from the space's"))
            for (event_type, server), content in wanted.items():
                if event_type not in PARTICIPATION_TYPES:
                    continue
                mine = have.get((event_type, server), {}).get("participation")
                if mine != content.get("participation"):
                    why = f"participation of {server}: {mine or 'unset'}, space says {content.get('participation')}"
                    plan.changes.append(Change(event_type, server, content, why))
            if admin_user and plan.changes:
                for change in plan.changes:
                    level, need = _power(have, _creators(state), admin_user, change.event_type)
                    if level < need:
                        plan.problem = f"no power: {admin_user} has {level:g}, {change.event_type} needs {need}"
                        break
        return plans, None


def whoami(config: Config) -> str:
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
    for change in plan.changes:
        url = (
            f"{config.client_api}/_matrix/client/v3/rooms/{quote(plan.room_id, safe='')}"
            f"/state/{quote(change.event_type, safe='')}/{quote(change.state_key, safe='')}"
        )
        request = urllib.request.Request(
            url,
            data=json.dumps(change.content).encode(),
            method="PUT",
            headers={
                "Authorization": f"Bearer {config.room_admin_token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=15):
                pass
        except urllib.error.HTTPError as e:
            raise ParticipationError(
                f"{plan.room_id}: {change.event_type} refused: {e.code} {e.read()[:200]!r}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise ParticipationError(
                f"homeserver unreachable at {config.client_api}: {e}"
            ) from None


def run_plan(config: Config, space_id: str, with_power: bool) -> tuple[list[RoomPlan], str | None]:
    admin = whoami(config) if with_power else None
    return asyncio.run(plan_space(config, space_id, admin))
