"""The operator's policy, kept current without restarts: subscribed policy lists and the
rooms of the spaces whose policy binds them.

Policy rooms (spec: "Moderation policy lists") named in `policy.policy_lists` and spaces
named in `policy.spaces` (MSC3216: the space's ACL and server participation apply in every
room reachable through `m.space.child` with a `via`, nested, cycle-safe) are read from the
homeserver every `policy.refresh_seconds`, and at once when the edge or the hook sees a
relevant event go by in one of them. A room that cannot be read keeps its last known
contribution; the checks always see one complete, immutable `OperatorPolicy`, swapped in
whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from proxy_addons.config import Config
from proxy_addons.sources import FetchState, StateError
from rules.policy import SERVER_RULE_TYPES, USER_RULE_TYPES, BanList, OperatorPolicy
from rules.roomstate import (
    SPACE_STATE_TYPES,
    RoomPolicy,
    room_policy_from_state,
)

__all__ = ["OperatorPolicySource", "walk_space"]

MAX_SPACE_ROOMS = 10_000
MAX_SPACE_DEPTH = 16

logger = logging.getLogger(__name__)

RULE_TYPES = SERVER_RULE_TYPES | USER_RULE_TYPES


async def walk_space(space_id: str, fetch_state: FetchState) -> tuple[RoomPolicy, list[str]] | None:
    """The space's own state and every room reachable from it through m.space.child
    events with a `via` (nested; each room once, so cycles end; bounded); None when the
    homeserver is not in the space."""
    state = await fetch_state(space_id)
    if state is None:
        return None
    space = room_policy_from_state(space_id, state)
    seen = {space_id}
    rooms: list[str] = []
    frontier = [(child, 1) for child in space.space_children]
    while frontier and len(rooms) < MAX_SPACE_ROOMS:
        room_id, depth = frontier.pop(0)
        if room_id in seen:
            continue
        seen.add(room_id)
        rooms.append(room_id)
        if depth >= MAX_SPACE_DEPTH:
            continue
        try:
            child_state = await fetch_state(room_id)
        except StateError:
            continue  # a child the homeserver cannot read still belongs to the space
        if child_state is not None:
            child = room_policy_from_state(room_id, child_state)
            frontier.extend((c, depth + 1) for c in child.space_children)
    return space, rooms


async def _read[T](what: str, room_id: str, read: Awaitable[T | None]) -> T | None:
    """A policy room's or space's state; None (logged) when it cannot be had, so the
    caller keeps what it last knew of that room."""
    try:
        value = await read
    except StateError as e:
        logger.warning("%s %s unreadable, keeping what was known of it: %s", what, room_id, e)
        return None
    if value is None:
        logger.warning("%s %s: the homeserver is not in this room", what, room_id)
    return value


class OperatorPolicySource:
    def __init__(self, config: Config, fetch_state: FetchState) -> None:
        self.rooms = tuple(config.policy_lists)
        self.space_ids = tuple(config.spaces)
        self._space_rooms: dict[str, tuple[RoomPolicy, list[str]]] = {}
        self.refresh_seconds = config.policy_refresh_seconds
        self._fetch_state = fetch_state
        self._base = OperatorPolicy(
            config.server_name,
            frozenset(config.participation_rooms),
            actions=config.check_actions,
        )
        self.current = self._base
        self._events: dict[str, list[object]] = {}
        self._wake: asyncio.Event | None = None

    def watches(self, room_id: str, event_type: object) -> bool:
        if not isinstance(event_type, str):  # the hook's events: any JSON, maybe unhashable
            return False
        if room_id in self.rooms and event_type in RULE_TYPES:
            return True
        return event_type in SPACE_STATE_TYPES and (
            room_id in self.space_ids
            or any(room_id in rooms for _, rooms in self._space_rooms.values())
        )

    @property
    def active(self) -> bool:
        return bool(self.rooms or self.space_ids)

    def mark_stale(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def refresh(self) -> OperatorPolicy:
        for room_id in self.rooms:
            state = await _read("policy list", room_id, self._fetch_state(room_id))
            if state is not None:
                self._events[room_id] = state
        bans = BanList.from_state(e for events in self._events.values() for e in events)
        for space_id in self.space_ids:
            walked = await _read("space", space_id, walk_space(space_id, self._fetch_state))
            if walked is not None:
                self._space_rooms[space_id] = walked
        spaces: dict[str, tuple[RoomPolicy, ...]] = {}
        for space, rooms in self._space_rooms.values():
            for room_id in rooms:
                spaces[room_id] = (*spaces.get(room_id, ()), space)
        self.current = OperatorPolicy(
            self._base.local_server,
            self._base.participation_rooms,
            bans,
            spaces,
            self._base.actions,
        )
        return self.current

    async def run(self) -> None:
        """Refresh now, then periodically and whenever a relevant event was seen."""
        if not self.active:
            return
        self._wake = asyncio.Event()
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the refresher must never die
                logger.exception("refreshing policy lists failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.refresh_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(0.5)  # let the homeserver persist the rule first
