"""Findings in SQLite (sqlite-utils), written in batches by one writer thread, WAL mode.

The event loop never waits on the disk: `record()` only queues; the writer commits every
`flush_interval` seconds or `batch_size` rows, and on `close()`.

When the database cannot be written (locked by another process, disk full, I/O error),
the writer keeps the records and retries with a growing pause (up to `retry_max_seconds`)
until it can: findings are written after recovery, not dropped. Only beyond `max_pending`
records held in memory are new records refused — event-index rows first, and every one
counted (`dropped`) and logged.

Event-index rows not seen for `index_retention_seconds` are pruned by the same thread,
at start and every `prune_interval` seconds, `PRUNE_CHUNK` rows per commit and at most
`PRUNE_CHUNKS` commits before queued records are written again.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from proxy_addons.eventindex import PRUNE as EVENT_PRUNE
from proxy_addons.eventindex import SCHEMA as EVENT_SCHEMA
from proxy_addons.eventindex import UPSERT as EVENT_UPSERT
from proxy_addons.eventindex import IndexBatch, storable

__all__ = [
    "FINDING_COLUMNS",
    "KNOCK_COLUMNS",
    "FindingRecord",
    "FindingStore",
    "KnockRecord",
    "decide_knock",
    "query_findings",
    "query_knocks",
]

logger = logging.getLogger(__name__)

FINDING_COLUMNS = (
    "ts",
    "rule",
    "action",
    "severity",
    "direction",
    "room_id",
    "event_id",
    "event_type",
    "sender",
    "sender_server",
    "origin",
    "attributed_to",
    "confidence",
    "endpoint",
    "txn_id",
    "detail",
)


@dataclass(frozen=True, slots=True)
class FindingRecord:
    """A finding as stored: the rule's finding plus what was done and where."""

    ts: float
    rule: str
    action: str  # dropped | flagged | rejected
    severity: str
    direction: str  # inbound | outbound
    room_id: str | None
    event_id: str | None
    event_type: str | None
    sender: str | None
    sender_server: str | None
    origin: str | None
    attributed_to: str | None
    confidence: str
    endpoint: str
    txn_id: str | None
    detail: str

    def as_row(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in FINDING_COLUMNS}


@dataclass(frozen=True, slots=True)
class KnockRecord:
    """A server asking to take part in a room (m.server.knock EDU or state event)."""

    ts: float
    room_id: str
    server: str
    policy_match: str | None = None  # what modgud's policy lists say of the server


KNOCK_COLUMNS = (
    "room_id",
    "server",
    "first_seen",
    "last_seen",
    "count",
    "status",
    "policy_match",
    "decided_at",
    "reason",
)


def open_database(path: str, timeout: float = 30.0) -> sqlite_utils.Database:
    conn = sqlite3.connect(path, timeout=timeout, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def ensure_schema(db: sqlite_utils.Database) -> None:
    findings = db.table("findings")
    if not findings.exists():
        findings.create(
            {
                "id": int,
                "ts": float,
                **{c: str for c in FINDING_COLUMNS if c != "ts"},
            },
            pk="id",
        )
        findings.create_index(["ts"])
        findings.create_index(["rule", "ts"])
        findings.create_index(["room_id", "ts"])
    for statement in EVENT_SCHEMA:
        db.execute(statement)
    db.execute(
        "CREATE TABLE IF NOT EXISTS knocks (room_id TEXT NOT NULL, server TEXT NOT NULL, "
        "first_seen REAL, last_seen REAL, count INTEGER DEFAULT 0, "
        "status TEXT DEFAULT 'pending', policy_match TEXT, decided_at REAL, reason TEXT, "
        "PRIMARY KEY (room_id, server))"
    )


Record = FindingRecord | KnockRecord | IndexBatch

PRUNE_CHUNK = 5_000
PRUNE_CHUNKS = 20


def _size(record: Record) -> int:
    return len(record.rows) if isinstance(record, IndexBatch) else 1


class FindingStore:
    def __init__(
        self,
        path: str,
        *,
        batch_size: int = 2000,
        flush_interval: float = 0.5,
        max_pending: int = 500_000,
        retry_max_seconds: float = 5.0,
        busy_timeout: float = 5.0,
        index_retention_seconds: float = 0.0,
        prune_interval: float = 600.0,
    ) -> None:
        self.path = path
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.retry_max_seconds = retry_max_seconds
        self.busy_timeout = busy_timeout
        self._queue: queue.Queue[Record | None] = queue.Queue()
        self._flushed = threading.Condition()
        self._pending = 0
        self.write_errors = 0  # failed write attempts (each retried)
        self.dropped = 0  # records refused because max_pending were held already
        self.index_retention_seconds = index_retention_seconds  # 0: kept for ever
        self.prune_interval = prune_interval
        self.pruned = 0  # event-index rows deleted as older than the retention
        self._stop = threading.Event()
        db = open_database(path)
        ensure_schema(db)
        db.conn.close()
        self._thread = threading.Thread(target=self._run, name="modgud-store", daemon=True)
        self._thread.start()

    def record(self, records: Iterable[Record]) -> None:
        accepted: list[Record] = []
        with self._flushed:
            for record in records:
                size = _size(record)
                full = self._pending + size > self.max_pending
                # Index rows yield first; findings and knocks get the whole margin.
                if full and (isinstance(record, IndexBatch) or self._pending >= self.max_pending):
                    self.dropped += size
                    logger.error(
                        "store: %d records held unwritten already; dropped a %s",
                        self._pending,
                        type(record).__name__,
                    )
                    continue
                self._pending += size
                accepted.append(record)
        for record in accepted:
            self._queue.put(record)

    @property
    def pending(self) -> int:
        """Records queued and not yet committed."""
        return self._pending

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything recorded so far is committed."""
        with self._flushed:
            return self._flushed.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and stop; while the database stays unwritable, give up
        after `timeout` (what was left is logged)."""
        self._queue.put(None)
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=self.retry_max_seconds + self.busy_timeout + 1)

    def _run(self) -> None:
        db = open_database(self.path, timeout=self.busy_timeout)
        table = db.table("findings")
        stop = False
        next_prune = time.monotonic()  # at start too: rows may have aged while modgud was down
        while not stop:
            if self.index_retention_seconds and time.monotonic() >= next_prune:
                more = self._prune(db)
                next_prune = time.monotonic() + (0.0 if more else self.prune_interval)
            batch: list[Record] = []
            try:
                item = self._queue.get(timeout=self.flush_interval)
            except queue.Empty:
                continue
            while item is not None:
                batch.append(item)
                if len(batch) >= self.batch_size:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stop = item is None
            if batch:
                self._write(db, table, batch)
        db.conn.close()

    def _prune(self, db: sqlite_utils.Database) -> bool:
        """Delete index rows last seen before the retention window; True if some may be
        left (the pass stopped after PRUNE_CHUNKS chunks, so queued records are written
        before the next). A failure is logged and the pass tried again later."""
        cutoff = time.time() - self.index_retention_seconds
        try:
            for _ in range(PRUNE_CHUNKS):
                with db.conn:
                    deleted = db.conn.execute(EVENT_PRUNE, (cutoff, PRUNE_CHUNK)).rowcount
                self.pruned += deleted
                if deleted < PRUNE_CHUNK or self._stop.is_set():
                    return False
        except sqlite3.Error as e:
            logger.warning("store: pruning the event index failed, will try again: %s", e)
            return False
        return True

    def _write(self, db: sqlite_utils.Database, table: Any, batch: list[Record]) -> None:
        findings = [r.as_row() for r in batch if isinstance(r, FindingRecord)]
        knocks = [r for r in batch if isinstance(r, KnockRecord)]
        index = [row for r in batch if isinstance(r, IndexBatch) for row in r.rows]
        size = sum(_size(r) for r in batch)
        attempt = 0
        escaped = False
        while True:
            try:
                with db.conn:
                    if findings:
                        table.insert_all(findings)
                    if index:
                        db.conn.executemany(EVENT_UPSERT, index)
                    for k in knocks:
                        db.execute(
                            "INSERT INTO knocks (room_id, server, first_seen, last_seen, count, "
                            "policy_match) VALUES (?, ?, ?, ?, 1, ?) "
                            "ON CONFLICT (room_id, server) DO UPDATE SET "
                            "last_seen = excluded.last_seen, count = count + 1, "
                            "policy_match = excluded.policy_match",
                            [k.room_id, k.server, k.ts, k.ts, k.policy_match],
                        )
                if attempt:
                    logger.warning("store: wrote %d records after %d failures", size, attempt)
                break
            except UnicodeEncodeError:
                if escaped:
                    logger.exception("store: %d records cannot be written; dropped", size)
                    self.dropped += size
                    break
                # Text from traffic with lone surrogates (a JSON "\ud800", a path's
                # undecodable bytes): SQLite takes UTF-8 only. Rare, so the batch is
                # escaped only when it failed, off the event loop.
                findings = [{k: _escaped(v) for k, v in row.items()} for row in findings]
                index = [tuple(_escaped(v) for v in row) for row in index]
                knocks = [
                    KnockRecord(k.ts, storable(k.room_id), storable(k.server), k.policy_match)
                    for k in knocks
                ]
                escaped = True
            except (
                sqlite3.IntegrityError,
                sqlite3.InterfaceError,
                sqlite3.ProgrammingError,
                ValueError,
                TypeError,
            ):
                # Not the disk's fault: retrying would wedge the writer on this batch.
                logger.exception("store: %d records cannot be written; dropped", size)
                self.dropped += size
                break
            except sqlite3.Error as e:  # locked, disk full, I/O error: keep them, retry
                attempt += 1
                self.write_errors += 1
                log = logger.error if attempt in (1, 10) or attempt % 100 == 0 else logger.debug
                log(
                    "store: writing %d records failed (attempt %d), will retry: %s",
                    size,
                    attempt,
                    e,
                )
                if self._stop.wait(min(self.retry_max_seconds, 0.1 * 2**attempt)):
                    logger.error("store: stopping with %d records unwritten: %s", size, e)
                    break
        with self._flushed:
            self._pending -= size
            self._flushed.notify_all()


def _escaped(value: object) -> object:
    return storable(value) if isinstance(value, str) else value


def query_findings(
    paths: Iterable[str],
    *,
    room: str | None = None,
    rule: str | None = None,
    since: float | None = None,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Findings from one or more databases (one per replica), oldest first."""
    where: list[str] = []
    params: list[Any] = []
    if room:
        where.append("room_id = ?")
        params.append(room)
    if rule:
        where.append("(rule = ? OR rule LIKE ?)")
        params.extend([rule, rule + ".%"])
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    # Only fixed column names are joined in; every value is a parameter.
    sql = "SELECT " + ", ".join(FINDING_COLUMNS) + " FROM findings"  # noqa: S608
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY ts"
    rows: list[dict[str, Any]] = []
    for path in paths:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            conn.row_factory = sqlite3.Row
            rows.extend(dict(r) for r in conn.execute(sql, params))
        except sqlite3.OperationalError as e:
            raise ValueError(f"{path}: {e}") from None
        finally:
            conn.close()
    rows.sort(key=lambda r: r["ts"])
    if limit is not None:
        rows = rows[-limit:]
    yield from rows


def dumps_finding(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=False, ensure_ascii=False)


def query_knocks(
    path: str, *, room: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    """The approval queue, newest first, with what modgud knows of each server: how many
    findings blame it, and the rules of those findings."""
    where, params = [], []
    if room:
        where.append("k.room_id = ?")
        params.append(room)
    if status:
        where.append("k.status = ?")
        params.append(status)
    # Fixed column names only; every value is a parameter.
    sql = (
        "SELECT " + ", ".join(f"k.{c}" for c in KNOCK_COLUMNS) + ", "  # noqa: S608
        "(SELECT COUNT(*) FROM findings f WHERE f.attributed_to = k.server) AS findings, "
        "(SELECT GROUP_CONCAT(DISTINCT f.rule) FROM findings f "
        "WHERE f.attributed_to = k.server) AS finding_rules FROM knocks k"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY k.last_seen DESC"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, params)]
    except sqlite3.OperationalError as e:
        raise ValueError(f"{path}: {e}") from None
    finally:
        conn.close()


def decide_knock(path: str, room_id: str, server: str, status: str, reason: str | None) -> None:
    """Record an approval or denial (a server never seen knocking gets a row too)."""
    now = time.time()
    db = open_database(path)
    try:
        ensure_schema(db)
        with db.conn:
            db.execute(
                "INSERT INTO knocks (room_id, server, first_seen, last_seen, count, status, "
                "decided_at, reason) VALUES (?, ?, ?, ?, 0, ?, ?, ?) "
                "ON CONFLICT (room_id, server) DO UPDATE SET status = excluded.status, "
                "decided_at = excluded.decided_at, reason = excluded.reason",
                [room_id, server, now, now, status, now, reason],
            )
    finally:
        db.conn.close()
