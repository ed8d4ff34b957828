"""Following what other processes record in the shared database, by row ID.

The edge (proxy_addons/changes.py) and the Synapse module in every Synapse process read
the state changes (and the edge the refusals) other processes commit. On PostgreSQL
several writers commit concurrently, so a row may become visible after one with a higher
ID: each read looks LOOKBACK_IDS back, and a cursor skips the rows it has applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy_addons.database import NewsWaiter, is_postgres, open_db
from proxy_addons.store import latest_ids, news_after, state_changes_after

__all__ = ["FOLLOW_SECONDS", "LOOKBACK_IDS", "NewsCursor", "NewsReader"]

LOOKBACK_IDS = 5000
# Followers read when news is announced (PostgreSQL), else this often.
FOLLOW_SECONDS = 0.5


class NewsCursor:
    """IDs applied, the newest, and how far back they are remembered; nothing at or below
    `start` (what was recorded before the follower began) counts as news. `lookback` 0:
    IDs become visible in order (SQLite's one writer at a time)."""

    def __init__(self, lookback: int = LOOKBACK_IDS) -> None:
        self.lookback = lookback
        self.last = self.start = 0
        self.ids: set[int] = set()

    def begin_at(self, row_id: int) -> None:
        self.last = self.start = row_id

    def since(self) -> int:
        """Read the rows after this ID."""
        return max(self.start, self.last - self.lookback)

    def first_time(self, row_id: int) -> bool:
        """Whether a row read is news (and from now on, not)."""
        if row_id in self.ids or row_id <= self.since():
            return False
        self.ids.add(row_id)
        if row_id > self.last:
            self.last = row_id
            if len(self.ids) > 2 * self.lookback:
                floor = self.since()
                self.ids = {i for i in self.ids if i > floor}
        return True


class NewsReader:
    """What other processes record in the database `target` from when this reader began:
    state changes, and with `rules` the findings with one of those rules and an event —
    each row once (the cursors), read as soon as a commit announces news (the engine's
    NewsWaiter: PostgreSQL's LISTEN) or at the next poll. The edge (changes.py) and the
    Synapse module in each Synapse process follow the database through one of these."""

    def __init__(self, target: str, rules: Iterable[str] = ()) -> None:
        self.target = target
        self.rules = list(rules)
        lookback = LOOKBACK_IDS if is_postgres(target) else 0
        self.changes = NewsCursor(lookback)
        self.findings = NewsCursor(lookback)
        self._news: NewsWaiter | None = None

    def begin(self) -> None:
        """From what is recorded now on (raises DatabaseError)."""
        last_change, last_finding = latest_ids(self.target)
        self.changes.begin_at(last_change)
        self.findings.begin_at(last_finding)

    def wait(self, timeout: float) -> None:
        """Until news are announced or `timeout` passes."""
        if self._news is None:
            self._news = open_db(self.target).news()
        self._news.wait(timeout)

    def read(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The rows not read before: state changes (id, room_id, event_type, state_key,
        event_id) and findings (id, room_id, event_id, sender_server). Raises
        DatabaseError."""
        if self.rules:
            changes, findings = news_after(
                self.target, self.changes.since(), self.findings.since(), self.rules
            )
        else:
            changes, findings = state_changes_after(self.target, self.changes.since()), []
        return (
            [row for row in changes if self.changes.first_time(int(row[0]))],
            [row for row in findings if self.findings.first_time(int(row[0]))],
        )

    def close(self) -> None:
        if self._news is not None:
            self._news.close()
            self._news = None
