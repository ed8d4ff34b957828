"""Following what other processes record in the shared database, by row ID.

The edge (proxy_addons/changes.py) and the Synapse module in every Synapse process read
the state changes (and the edge the refusals) other processes commit. On PostgreSQL
several writers commit concurrently, so a row may become visible after one with a higher
ID: each read looks LOOKBACK_IDS back, and a cursor skips the rows it has applied.
"""

from __future__ import annotations

__all__ = ["LOOKBACK_IDS", "NewsCursor"]

LOOKBACK_IDS = 5000


class NewsCursor:
    """IDs applied, the newest, and how far back they are remembered; nothing at or below
    `start` (what was recorded before the follower began) counts as news."""

    def __init__(self) -> None:
        self.last = self.start = 0
        self.ids: set[int] = set()

    def begin_at(self, row_id: int) -> None:
        self.last = self.start = row_id

    def since(self) -> int:
        """Read the rows after this ID."""
        return max(self.start, self.last - LOOKBACK_IDS)

    def first_time(self, row_id: int) -> bool:
        """Whether a row read is news (and from now on, not)."""
        if row_id in self.ids or row_id <= self.since():
            return False
        self.ids.add(row_id)
        if row_id > self.last:
            self.last = row_id
            if len(self.ids) > 2 * LOOKBACK_IDS:
                floor = self.since()
                self.ids = {i for i in self.ids if i > floor}
        return True
