"""What other parts of modgud learnt, read back from the shared database by the edge.

The Synapse module judges events inside Synapse, where the edge cannot see them: local
users' state events (a moderator's new ACL, an approved knock's participation) and the
events Synapse pulls itself. The module records two kinds of news in the database —
relevant state changes (table `state_changes`) and its refusals (findings) — and the edge
reads them every `FOLLOW_SECONDS`: a changed room is refetched (now, and again shortly
after, as for a change the hook hears of), a policy-list room or space refreshes the
operator's policy, and an event refused for who wrote it joins the refused-event memory
behind `leak.reference`. With the HTTP hook the edge hears of these itself; reading them
again changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy_addons.database import DatabaseError
from proxy_addons.leaks import AUTHOR_REFUSED
from proxy_addons.runtime import Runtime
from proxy_addons.store import latest_ids, news_after

__all__ = ["FOLLOW_SECONDS", "ChangeFollower"]

logger = logging.getLogger(__name__)

FOLLOW_SECONDS = 0.5


class ChangeFollower:
    def __init__(self, runtime: Runtime, interval: float = FOLLOW_SECONDS) -> None:
        self.runtime = runtime
        self.interval = interval
        self.last_change = self.last_finding = 0
        self._rules = [str(r) for r in AUTHOR_REFUSED]

    def start_at_the_end(self) -> None:
        """Begin with what is recorded from now on (what came before is in the state
        modgud fetches anyway, and the refused events reloaded at start)."""
        try:
            self.last_change, self.last_finding = latest_ids(self.runtime.config.database)
        except DatabaseError as e:
            logger.warning("the database's news cannot be read yet: %s", e)

    def read(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """What was recorded since the last poll: state changes and refusals."""
        return news_after(
            self.runtime.config.database, self.last_change, self.last_finding, self._rules
        )

    def apply(self, changes: list[tuple[Any, ...]], refusals: list[tuple[Any, ...]]) -> None:
        runtime = self.runtime
        for row_id, room_id, event_type, _state_key in changes:
            self.last_change = row_id
            runtime.mark_stale(room_id)
            if runtime.policy.watches(room_id, event_type):
                runtime.policy.mark_stale()
        for row_id, room_id, event_id, author in refusals:
            self.last_finding = row_id
            runtime.refused.add(room_id, event_id, author)

    def poll(self) -> int:
        """Read and apply what was recorded since the last poll; how many rows."""
        changes, refusals = self.read()
        self.apply(changes, refusals)
        return len(changes) + len(refusals)

    async def run(self) -> None:
        """Poll until cancelled; the reads run on a thread (SQLite never waits for a
        writer in WAL mode, but the disk or PostgreSQL's connection might)."""
        await asyncio.to_thread(self.start_at_the_end)
        while True:
            await asyncio.sleep(self.interval)
            try:
                changes, refusals = await asyncio.to_thread(self.read)
            except DatabaseError as e:
                logger.debug("reading the database's news failed, will try again: %s", e)
                continue
            except Exception:  # noqa: BLE001 - the follower must never die
                logger.exception("reading the database's news failed")
                continue
            self.apply(changes, refusals)
