"""Room state from the homeserver, cached per room, with one request per cold room.

The homeserver is the authority for room state. Source: Synapse's admin API
(`GET /_synapse/admin/v1/rooms/{roomId}/state`) with an admin token read from a file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import aiohttp

from proxy_addons.sources import StateError
from rules.checks import UNAVAILABLE, StateUnavailable
from rules.roomstate import RoomPolicy, room_policy_from_state

__all__ = ["RoomStateCache", "RoomStateSource", "StateError", "SynapseAdminStateSource"]

logger = logging.getLogger(__name__)


class RoomStateSource(Protocol):
    async def fetch(self, room_id: str) -> RoomPolicy | None:
        """The room's policy, None when the homeserver does not know the room."""
        ...

    async def fetch_state(self, room_id: str) -> list[object] | None:
        """The room's state events (for policy rooms), None when unknown."""
        ...


class SynapseAdminStateSource:
    def __init__(
        self, base_url: str, token: str | None, session: Callable[[], aiohttp.ClientSession]
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = session

    async def fetch(self, room_id: str) -> RoomPolicy | None:
        state = await self.fetch_state(room_id)
        return None if state is None else room_policy_from_state(room_id, state)

    async def fetch_state(self, room_id: str) -> list[object] | None:
        """The room's current state events; None when the homeserver does not know it."""
        url = f"{self.base_url}/_synapse/admin/v1/rooms/{quote(room_id, safe='')}/state"
        try:
            async with self._session().get(url, headers=self._headers) as resp:
                if resp.status in (400, 404):
                    return None
                if resp.status != 200:
                    raise StateError(f"state request for {room_id} answered {resp.status}")
                body = await resp.json(content_type=None)
        except TimeoutError:  # the session's total timeout: not an aiohttp.ClientError
            raise StateError(f"state request for {room_id} timed out") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise StateError(
                f"state request for {room_id} failed: {e.__class__.__name__}: {e}"
            ) from e
        state = body.get("state") if isinstance(body, dict) else None
        if not isinstance(state, list):
            raise StateError(f"state answer for {room_id} has no state list")
        return state


@dataclass(slots=True)
class _Entry:
    policy: RoomPolicy | None
    fetched_at: float
    stale: bool = False


class RoomStateCache:
    """Bounded LRU of room policies with single-flight fetches.

    Concurrent lookups of a cold room share one request (no thundering herd); a room
    marked stale is refetched on its next lookup; entries expire after `ttl`. A room the
    homeserver does not know expires after `unknown_ttl` only: it is usually one the
    homeserver is joining right now, and the events it pulls while joining must be judged
    on the room's state as soon as it has one.
    """

    def __init__(
        self,
        source: RoomStateSource,
        *,
        ttl: float = 300.0,
        unknown_ttl: float = 2.0,
        max_rooms: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[str, float], None] | None = None,
    ) -> None:
        self.source = source
        self.ttl = ttl
        self.unknown_ttl = unknown_ttl
        self.max_rooms = max_rooms
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[RoomPolicy | None]] = {}
        self._on_fetch = on_fetch

    def __len__(self) -> int:
        return len(self._entries)

    def policies(self) -> list[RoomPolicy]:
        """The cached rooms' policies (a copy: read from the metrics thread at scrape)."""
        return [e.policy for e in list(self._entries.values()) if e.policy is not None]

    def mark_stale(self, room_id: str) -> None:
        entry = self._entries.get(room_id)
        if entry is not None:
            entry.stale = True

    def peek(self, room_id: str) -> RoomPolicy | None | StateUnavailable:
        """The cached policy if fresh, without fetching; UNAVAILABLE when not cached."""
        entry = self._entries.get(room_id)
        if entry is None or entry.stale:
            return UNAVAILABLE
        ttl = self.ttl if entry.policy is not None else min(self.ttl, self.unknown_ttl)
        if self._clock() - entry.fetched_at > ttl:
            return UNAVAILABLE
        return entry.policy

    def _hit(self, room_id: str) -> RoomPolicy | None | StateUnavailable:
        """peek(), and a fresh entry counts as used (the least used rooms are evicted)."""
        cached = self.peek(room_id)
        if not isinstance(cached, StateUnavailable):
            self._entries.move_to_end(room_id)
        return cached

    async def get(self, room_id: str, timeout: float) -> RoomPolicy | None | StateUnavailable:
        """The room's policy; UNAVAILABLE when it cannot be had within `timeout`."""
        cached = self._hit(room_id)
        if not isinstance(cached, StateUnavailable):
            return cached
        future = self._inflight.get(room_id)
        if future is None:
            future = asyncio.ensure_future(self._fetch(room_id))
            self._inflight[room_id] = future
            future.add_done_callback(lambda f: self._fetch_done(room_id, f))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except (TimeoutError, StateError):
            return UNAVAILABLE

    async def get_many(
        self, room_ids: set[str], timeout: float
    ) -> dict[str, RoomPolicy | None | StateUnavailable]:
        # Cached rooms are answered on the spot: a transaction of known rooms never
        # yields to the event loop (gathering costs a task and a loop pass per call).
        found: dict[str, RoomPolicy | None | StateUnavailable] = {}
        missing = []
        for room_id in room_ids:
            cached = self._hit(room_id)
            if isinstance(cached, StateUnavailable):
                missing.append(room_id)
            else:
                found[room_id] = cached
        if missing:
            results = await asyncio.gather(*(self.get(r, timeout) for r in missing))
            found.update(zip(missing, results, strict=True))
        return found

    def _fetch_done(self, room_id: str, future: asyncio.Future[RoomPolicy | None]) -> None:
        self._inflight.pop(room_id, None)
        if not future.cancelled():
            future.exception()  # retrieved here, so a timed-out waiter leaves no warning

    async def _fetch(self, room_id: str) -> RoomPolicy | None:
        started = self._clock()
        try:
            policy = await self.source.fetch(room_id)
        except StateError as e:
            logger.warning("room state unavailable for %s: %s", room_id, e)
            if self._on_fetch:
                self._on_fetch("error", self._clock() - started)
            raise
        if self._on_fetch:
            self._on_fetch("ok", self._clock() - started)
        old = self._entries.get(room_id)
        if old is not None and old.policy is not None and policy is not None:
            if policy.same_state(old.policy):
                # Nothing relevant changed: keep the very object, so what was decided
                # under it (the edge's allows, for the hook) stays valid.
                policy = old.policy
        self._entries[room_id] = _Entry(policy, self._clock())
        self._entries.move_to_end(room_id)
        while len(self._entries) > self.max_rooms:
            self._entries.popitem(last=False)
        return policy
