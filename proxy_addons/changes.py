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

Replicas of modgud on one PostgreSQL database follow each other the same way: an event
one replica's edge refused for who wrote it joins every replica's refused-event memory,
and a state change recorded by any Synapse worker's module reaches every replica as it
commits: the writer commits findings and state changes at once and announces them
(NOTIFY), the followers LISTEN. Without a notification (SQLite) they poll every
FOLLOW_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy_addons.database import DatabaseError
from proxy_addons.leaks import AUTHOR_REFUSED
from proxy_addons.news import FOLLOW_SECONDS, NewsReader
from proxy_addons.runtime import Runtime

__all__ = ["ChangeFollower"]

logger = logging.getLogger(__name__)


class ChangeFollower:
    def __init__(self, runtime: Runtime, interval: float = FOLLOW_SECONDS) -> None:
        self.runtime = runtime
        self.interval = interval
        self.reader = NewsReader(runtime.config.database, [str(r) for r in AUTHOR_REFUSED])

    def start_at_the_end(self) -> None:
        """Begin with what is recorded from now on (what came before is in the state
        modgud fetches anyway, and the refused events reloaded at start)."""
        try:
            self.reader.begin()
        except DatabaseError as e:
            logger.warning("the database's news cannot be read yet: %s", e)

    def read(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """What was recorded since the last read: state changes and refusals."""
        return self.reader.read()

    def apply(self, changes: list[tuple[Any, ...]], refusals: list[tuple[Any, ...]]) -> int:
        """Act on what was read; how many rows."""
        runtime = self.runtime
        for _row_id, room_id, event_type, _state_key, _event_id in changes:
            runtime.mark_stale(room_id)
            if runtime.policy.watches(room_id, event_type):
                runtime.policy.mark_stale()
        for _row_id, room_id, event_id, author in refusals:
            runtime.refused.add(room_id, event_id, author)
        return len(changes) + len(refusals)

    def poll(self) -> int:
        """Read and apply what was recorded since the last poll; how many rows were news."""
        changes, refusals = self.read()
        return self.apply(changes, refusals)

    async def run(self) -> None:
        """Follow until cancelled: read as soon as another process announces news
        (PostgreSQL's LISTEN), or every `interval` (SQLite, or when nothing is heard);
        the waits and reads run on a thread (SQLite never waits for a writer in WAL mode,
        but the disk or PostgreSQL's connection might)."""
        await asyncio.to_thread(self.start_at_the_end)
        try:
            while True:
                await asyncio.to_thread(self.reader.wait, self.interval)
                try:
                    changes, refusals = await asyncio.to_thread(self.read)
                except DatabaseError as e:
                    logger.debug("reading the database's news failed, will try again: %s", e)
                    continue
                except Exception:  # noqa: BLE001 - the follower must never die
                    logger.exception("reading the database's news failed")
                    continue
                self.apply(changes, refusals)
        finally:
            self.reader.close()
