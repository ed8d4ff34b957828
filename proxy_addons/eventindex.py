"""The event index: every PDU modgud sees, by room and content hash — its author server,
the first server that delivered it and every server that did, the direction and endpoint,
first and last seen, and its event ID when modgud computed one.

Keyed by the sender-claimed content hash (`hashes.sha256`), not the event ID: the edge
decides most PDUs without computing event IDs (that costs more than all its checks), and
an event met again later — served by a server in answer to the homeserver's pull, say —
carries the same hash, so "who delivered this first?" is one lookup. A bounded in-memory
set in front skips deliveries already recorded; rows are written in batches by the
store's writer thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from proxy_addons.database import reading
from rules.federation import Pdu

__all__ = ["EVENT_COLUMNS", "PRUNE", "EventIndex", "IndexBatch", "lookup_events", "storable"]

EVENT_COLUMNS = (
    "room_id",
    "content_hash",
    "event_id",
    "author",
    "first_origin",
    "delivered_by",
    "direction",
    "endpoint",
    "first_seen",
    "last_seen",
    "deliveries",
)

UPSERT = (
    "INSERT INTO events (room_id, content_hash, event_id, author, first_origin, delivered_by, "
    "direction, endpoint, first_seen, last_seen, deliveries) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) "
    "ON CONFLICT (room_id, content_hash) DO UPDATE SET "
    # Replicas write their rows in batches, in any order: the first delivery is the
    # earliest by time, whichever replica's row reached the database first.
    "first_origin = CASE WHEN excluded.first_seen < events.first_seen "
    "THEN excluded.first_origin ELSE events.first_origin END, "
    "direction = CASE WHEN excluded.first_seen < events.first_seen "
    "THEN excluded.direction ELSE events.direction END, "
    "endpoint = CASE WHEN excluded.first_seen < events.first_seen "
    "THEN excluded.endpoint ELSE events.endpoint END, "
    "first_seen = CASE WHEN excluded.first_seen < events.first_seen "
    "THEN excluded.first_seen ELSE events.first_seen END, "
    "last_seen = CASE WHEN excluded.last_seen > events.last_seen "
    "THEN excluded.last_seen ELSE events.last_seen END, "
    "deliveries = events.deliveries + 1, "
    "event_id = COALESCE(events.event_id, excluded.event_id), "
    "delivered_by = CASE WHEN instr(',' || events.delivered_by || ',', "
    "',' || excluded.first_origin || ',') > 0 THEN events.delivered_by "
    "ELSE substr(events.delivered_by || ',' || excluded.first_origin, 1, 2000) END"
)


# Rows not seen since a cutoff, a chunk at a time (rowid order: the oldest first, found
# without an index on last_seen, which every re-delivery would have to update; on
# PostgreSQL, ctid: physical order, roughly the oldest first).
PRUNE = (
    "DELETE FROM events WHERE rowid IN "
    "(SELECT rowid FROM events WHERE last_seen < ? ORDER BY rowid LIMIT ?)"
)


def storable(text: str) -> str:
    """`text` as both engines can store it (UTF-8, no NUL). Text from traffic can hold
    lone surrogates — a JSON string may escape one (`"\\ud800"`), mitmproxy decodes a
    path's invalid bytes to them — and one such string makes sqlite3 and psycopg raise
    UnicodeEncodeError; PostgreSQL's text cannot hold NUL (a JSON `"\\u0000"`). They are
    kept as their escapes (by the store's writer, when a batch fails so)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class IndexBatch:
    """The index rows of one transaction, queued to the writer as one item (a row is the
    UPSERT's parameters: one tuple per PDU, cheaper than an object per PDU)."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[tuple[object, ...]]) -> None:
        self.rows = rows


class EventIndex:
    def __init__(self, record: Any, max_seen: int = 200_000) -> None:
        self._record = record  # FindingStore.record
        self.max_seen = max_seen
        # Deliveries already recorded, as hashes of (room, content hash, origin) — an int
        # per delivery, not a tuple of three strings (a collision, about 1 in 10^13 here,
        # skips one row). Two generations of sets, the older dropped whole when the newer
        # is full: between max_seen/2 and max_seen of the latest deliveries, and memory
        # that stays put (evicting one by one from a set leaves it resizing forever).
        self._current: set[int] = set()
        self._previous: set[int] = set()

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def see(
        self,
        pdus: Iterable[Pdu],
        origin: str,
        *,
        direction: str = "inbound",
        endpoint: str = "send",
        event_ids: Mapping[int, str] | None = None,
    ) -> int:
        """Queue the PDUs not yet recorded as delivered by `origin`; returns how many."""
        now = time.time()
        rows: list[tuple[object, ...]] = []
        current, half = self._current, max(1, self.max_seen // 2)
        for pdu in pdus:
            content_hash = pdu.content_hash
            if content_hash is None:
                continue
            key = hash((pdu.room_id, content_hash, origin))
            if key in current or key in self._previous:
                continue
            current.add(key)
            if len(current) >= half:
                self._previous, self._current = current, set()
                current = self._current
            event_id = event_ids.get(pdu.position) if event_ids else None
            rows.append(
                (
                    pdu.room_id,
                    content_hash,
                    event_id,
                    pdu.sender_server,
                    origin,
                    origin,
                    direction,
                    endpoint,
                    now,
                    now,
                )
            )
        if rows:
            self._record([IndexBatch(rows)])
        return len(rows)


def lookup_events(
    path: str, room_id: str, content_hashes: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """Index rows of a room by content hash."""
    hashes = list(content_hashes)[:1000]
    if not hashes:
        return {}
    marks = ", ".join("?" for _ in hashes)
    sql = (
        f"SELECT {', '.join(EVENT_COLUMNS)} FROM events "  # noqa: S608 - fixed names
        f"WHERE room_id = ? AND content_hash IN ({marks})"
    )
    with reading(path) as conn:
        return {r["content_hash"]: r for r in conn.dicts(sql, [room_id, *hashes])}
