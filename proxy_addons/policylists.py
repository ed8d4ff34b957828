"""The operator's policy: subscribed policy lists, kept current without restarts.

Policy rooms (spec: "Moderation policy lists") named in `policy.policy_lists` are read from
the homeserver (which must be in them) every `policy.refresh_seconds`, and at once when
the edge or the hook sees a rule event go by in one of them. A policy room that cannot be
read keeps its last known rules; the checks always see one complete, immutable
`OperatorPolicy`, swapped in whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from proxy_addons.config import Config
from proxy_addons.statesource import StateError
from rules.policy import SERVER_RULE_TYPES, USER_RULE_TYPES, BanList, OperatorPolicy

__all__ = ["PolicyLists"]

logger = logging.getLogger(__name__)

RULE_TYPES = SERVER_RULE_TYPES | USER_RULE_TYPES


class PolicyLists:
    def __init__(
        self, config: Config, fetch_state: Callable[[str], Awaitable[list[object] | None]]
    ) -> None:
        self.rooms = tuple(config.policy_lists)
        self.refresh_seconds = config.policy_refresh_seconds
        self._fetch_state = fetch_state
        self._base = OperatorPolicy(config.server_name, frozenset(config.participation_rooms))
        self.current = self._base
        self._events: dict[str, list[object]] = {}
        self._wake: asyncio.Event | None = None
        self.refreshes = 0
        self.errors = 0

    def watches(self, room_id: str, event_type: object) -> bool:
        return room_id in self.rooms and event_type in RULE_TYPES

    def mark_stale(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def refresh(self) -> OperatorPolicy:
        for room_id in self.rooms:
            try:
                state = await self._fetch_state(room_id)
            except StateError as e:
                self.errors += 1
                logger.warning("policy list %s unreadable, keeping its last rules: %s", room_id, e)
                continue
            if state is None:
                self.errors += 1
                logger.warning("policy list %s: the homeserver is not in this room", room_id)
                continue
            self._events[room_id] = state
        bans = BanList.from_state(e for events in self._events.values() for e in events)
        self.current = OperatorPolicy(self._base.local_server, self._base.participation_rooms, bans)
        self.refreshes += 1
        return self.current

    async def run(self) -> None:
        """Refresh now, then periodically and whenever a rule event was seen."""
        if not self.rooms:
            return
        self._wake = asyncio.Event()
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the refresher must never die
                self.errors += 1
                logger.exception("refreshing policy lists failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.refresh_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(0.5)  # let the homeserver persist the rule first
