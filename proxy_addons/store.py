"""Findings, knocks, state changes and the event index, written in batches by one writer
thread into the database `database:` names — SQLite (WAL) or PostgreSQL, through
proxy_addons/database.py, which holds the schema and speaks to both engines.

The event loop never waits on the database: `record()` only queues; the writer commits every
`flush_interval` seconds or `batch_size` rows, and on `close()`. Event-index rows, which
every transaction brings, wait for that; findings, knocks and state changes, which are
rare and which other processes wait for, wake the writer at once, and their commit is
announced to the processes following the database (PostgreSQL NOTIFY). (Waking the
writer for every transaction cost the proxy's event loop a futex call and a GIL
hand-over per request: a tenth of its time on a 1-PDU /send.) With `start=False` the
writer thread starts with the first record instead of at once (and starts again in a
process forked since), so a process that forks after building the store — Synapse with
`daemonize` — still has it.

SQLite needs nothing beyond the standard library, and PostgreSQL only psycopg: the same
code runs inside Synapse's process (the Synapse module writes here too), where
sqlite-utils' command-line dependencies have no business.

Several processes write one database: modgud's edge, the event hook and the Synapse module
in every Synapse process, and on PostgreSQL every replica of modgud. A finding judged
inside the homeserver (the hook's or the module's, which cannot know who delivered an
event) and the edge's finding for the same event and rule are one finding: the edge's is
kept, since it names the delivering server (see `_write`); and a finding about an event
is recorded once however many processes record it (database.py, schema version 2).

When the database cannot be written (locked by another process, disk full, I/O error,
PostgreSQL unreachable), the writer keeps the records and retries with a growing pause
(up to `retry_max_seconds`, on a new connection when PostgreSQL dropped it) until it
can: findings are written after recovery, not dropped. Only beyond `max_pending`
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
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from proxy_addons.database import (
    Connection,
    Database,
    DatabaseError,
    open_db,
    reading,
    writing,
)
from proxy_addons.eventindex import EVENT_COLUMNS, IndexBatch, storable
from proxy_addons.eventindex import PRUNE as EVENT_PRUNE
from proxy_addons.eventindex import UPSERT as EVENT_UPSERT

__all__ = [
    "FINDING_COLUMNS",
    "KNOCK_COLUMNS",
    "FindingRecord",
    "FindingStore",
    "KnockRecord",
    "StateChange",
    "copy_records",
    "decide_knock",
    "insert_findings",
    "query_findings",
    "query_knocks",
    "state_changes_after",
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

    def as_tuple(self) -> tuple[object, ...]:
        return tuple(getattr(self, c) for c in FINDING_COLUMNS)


@dataclass(frozen=True, slots=True)
class KnockRecord:
    """A server asking to take part in a room (m.server.knock EDU or state event)."""

    ts: float
    room_id: str
    server: str
    policy_match: str | None = None  # what modgud's policy lists say of the server


@dataclass(frozen=True, slots=True)
class StateChange:
    """A room's state changing in a way modgud's checks read, seen by one part of modgud
    (the Synapse module sees local users' state events, and those Synapse pulls, which
    the edge never does): the others refetch the room (see proxy_addons/changes.py)."""

    ts: float
    room_id: str
    event_type: str
    state_key: str
    event_id: str | None


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


# Endpoints whose findings are judged inside the homeserver, without knowing who delivered
# the event: the edge's finding for the same event and rule supersedes theirs.
IN_HOMESERVER_ENDPOINTS = ("hook", "module")
_JUDGES = ", ".join(f"'{e}'" for e in IN_HOMESERVER_ENDPOINTS)  # for the SQL below

INSERT_STATE_CHANGE = (
    "INSERT INTO state_changes (ts, room_id, event_type, state_key, event_id) "
    "VALUES (?, ?, ?, ?, ?)"
)
# State changes are news for a moment only: kept an hour.
STATE_CHANGES_KEPT_SECONDS = 3600.0
PRUNE_STATE_CHANGES = "DELETE FROM state_changes WHERE ts < ?"

_FINDING_VALUES = ", ".join("?" for _ in FINDING_COLUMNS)
# An edge finding already recorded for the same event, rule and blamed server (a retry
# through another replica) is not recorded again (the database's findings_once_per_edge).
INSERT_FINDING = f"INSERT INTO findings ({', '.join(FINDING_COLUMNS)}) VALUES ({_FINDING_VALUES}) ON CONFLICT DO NOTHING"  # noqa: S608, E501 - fixed names
# A finding judged inside the homeserver, unless the same event and rule is recorded already.
# (Another Synapse process's row for it, committed meanwhile: the database's
# findings_once_per_judge.)
INSERT_FINDING_ONCE = (
    f"INSERT INTO findings ({', '.join(FINDING_COLUMNS)}) SELECT {_FINDING_VALUES} "  # noqa: S608 - fixed names
    "WHERE NOT EXISTS (SELECT 1 FROM findings WHERE event_id = ? AND rule = ?) "
    "ON CONFLICT DO NOTHING"
)
# The edge's finding replaces one the hook or the module recorded for the same event and rule.
DELETE_SUPERSEDED = (
    f"DELETE FROM findings WHERE event_id = ? AND rule = ? AND endpoint IN ({_JUDGES})"  # noqa: S608 - fixed names
)
# A judge that refused an event replaces another judge's flag for it (the module in audit
# beside the enforcing hook, while an operator trials it): the row says what was done.
DELETE_JUDGED_FLAG = (
    "DELETE FROM findings WHERE event_id = ? AND rule = ? AND action = 'flagged' "  # noqa: S608 - fixed names
    f"AND endpoint IN ({_JUDGES})"
)
UPSERT_KNOCK = (
    "INSERT INTO knocks (room_id, server, first_seen, last_seen, count, "
    "policy_match) VALUES (?, ?, ?, ?, 1, ?) "
    "ON CONFLICT (room_id, server) DO UPDATE SET "
    "last_seen = excluded.last_seen, count = knocks.count + 1, "
    "policy_match = excluded.policy_match"
)


Record = FindingRecord | KnockRecord | IndexBatch | StateChange

PRUNE_CHUNK = 5_000
PRUNE_CHUNKS = 20


def _size(record: Record) -> int:
    return len(record.rows) if isinstance(record, IndexBatch) else 1


class FindingStore:
    def __init__(
        self,
        target: str,
        *,
        batch_size: int = 2000,
        flush_interval: float = 0.5,
        max_pending: int = 500_000,
        retry_max_seconds: float = 5.0,
        busy_timeout: float = 5.0,
        index_retention_seconds: float = 0.0,
        prune_interval: float = 600.0,
        start: bool = True,
    ) -> None:
        self.db: Database = open_db(target)
        self.path = target
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
        self._wake = threading.Event()
        self.db.migrate()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._closed = False
        if start:
            self._ensure_writer()

    def _ensure_writer(self) -> None:
        """Start the writer thread, or start it again in a process forked since."""
        thread = self._thread
        if thread is not None and thread.is_alive() or self._closed:
            return
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
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
        if accepted:
            self._ensure_writer()
            if self._pending >= self.batch_size or not all(
                isinstance(r, IndexBatch) for r in accepted
            ):
                self._wake.set()

    @property
    def pending(self) -> int:
        """Records queued and not yet committed."""
        return self._pending

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything recorded so far is committed."""
        if self._pending:
            self._ensure_writer()
            self._wake.set()
        with self._flushed:
            return self._flushed.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and stop; while the database stays unwritable, give up
        after `timeout` (what was left is logged)."""
        if self._pending:
            self._ensure_writer()
        self._closed = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._queue.put(None)
        self._wake.set()
        thread.join(timeout=timeout)
        if thread.is_alive():
            self._stop.set()
            thread.join(timeout=self.retry_max_seconds + self.busy_timeout + 1)

    def _connect(self) -> Connection | None:
        """The writer's connection; None while the database cannot be reached (the
        records wait, and it is tried again)."""
        try:
            return self.db.connect(timeout=self.busy_timeout)
        except self.db.errors.any as e:
            self.write_errors += 1
            logger.error("store: cannot connect to %s, will retry: %s", self.db.describe(), e)
            return None

    def _run(self) -> None:
        db = self._connect()
        stop = False
        next_prune = time.monotonic()  # at start too: rows may have aged while modgud was down
        while not stop:
            if db is None:  # not reached at start (a connection lost later: _write)
                db = self._connect()
                if db is None:
                    if self._stop.wait(self.retry_max_seconds):
                        break
                    continue
            if self.index_retention_seconds and time.monotonic() >= next_prune:
                more = self._prune(db)
                next_prune = time.monotonic() + (0.0 if more else self.prune_interval)
            # Woken by record() for what others wait for, else every flush_interval.
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            batch: list[Record] = []
            try:
                item = self._queue.get_nowait()
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
            if len(batch) >= self.batch_size:
                self._wake.set()  # a full batch: more may be queued
            if batch:
                self._write(db, batch)
        if db is not None:
            db.close()

    def _prune(self, db: Connection) -> bool:
        """Delete index rows last seen before the retention window; True if some may be
        left (the pass stopped after PRUNE_CHUNKS chunks, so queued records are written
        before the next). A failure is logged and the pass tried again later."""
        cutoff = time.time() - self.index_retention_seconds
        try:
            with db.transaction():
                db.execute(PRUNE_STATE_CHANGES, (time.time() - STATE_CHANGES_KEPT_SECONDS,))
            for _ in range(PRUNE_CHUNKS):
                with db.transaction():
                    deleted = db.execute(EVENT_PRUNE, (cutoff, PRUNE_CHUNK))
                self.pruned += deleted
                if deleted < PRUNE_CHUNK or self._stop.is_set():
                    return False
        except self.db.errors.any as e:
            logger.warning("store: pruning the event index failed, will try again: %s", e)
            return False
        return True

    def _write(self, db: Connection, batch: list[Record]) -> None:
        findings = [r.as_tuple() for r in batch if isinstance(r, FindingRecord)]
        knocks = [r for r in batch if isinstance(r, KnockRecord)]
        changes: list[tuple[object, ...]] = [
            (c.ts, c.room_id, c.event_type, c.state_key, c.event_id)
            for c in batch
            if isinstance(c, StateChange)
        ]
        index = [row for r in batch if isinstance(r, IndexBatch) for row in r.rows]
        size = sum(_size(r) for r in batch)
        attempt = 0
        escaped = False
        while True:
            try:
                with db.transaction():
                    insert_findings(db, findings)
                    if index:
                        db.executemany(EVENT_UPSERT, index)
                    for k in knocks:
                        db.execute(UPSERT_KNOCK, [k.room_id, k.server, k.ts, k.ts, k.policy_match])
                    if changes:
                        db.executemany(INSERT_STATE_CHANGE, changes)
                    if findings or knocks or changes:
                        self.db.announce(db)
                if attempt:
                    logger.warning("store: wrote %d records after %d failures", size, attempt)
                break
            except self.db.errors.unstorable:
                if escaped:
                    logger.exception("store: %d records cannot be written; dropped", size)
                    self.dropped += size
                    break
                # Text from traffic with lone surrogates (a JSON "\ud800", a path's
                # undecodable bytes; both engines take UTF-8 only) or NUL (PostgreSQL).
                # Rare, so the batch is escaped only when it failed, off the event loop.
                findings = [tuple(_escaped(v) for v in row) for row in findings]
                index = [tuple(_escaped(v) for v in row) for row in index]
                knocks = [
                    KnockRecord(k.ts, storable(k.room_id), storable(k.server), k.policy_match)
                    for k in knocks
                ]
                changes = [tuple(_escaped(v) for v in row) for row in changes]
                escaped = True
            except self.db.errors.permanent:
                # Not the disk's fault: retrying would wedge the writer on this batch.
                logger.exception("store: %d records cannot be written; dropped", size)
                self.dropped += size
                break
            except self.db.errors.any as e:  # locked, disk full, I/O, connection: retry
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
                if db.broken:  # PostgreSQL restarted, the network: a new connection
                    try:
                        db.reopen()
                    except self.db.errors.any as again:
                        logger.debug("store: reconnecting failed: %s", again)
        with self._flushed:
            self._pending -= size
            self._flushed.notify_all()


_EVENT_ID = FINDING_COLUMNS.index("event_id")
_RULE = FINDING_COLUMNS.index("rule")
_ENDPOINT = FINDING_COLUMNS.index("endpoint")
_ACTION = FINDING_COLUMNS.index("action")


def insert_findings(db: Connection, rows: list[tuple[object, ...]]) -> None:
    """One finding per event and rule between the edge and the homeserver's judges: an
    edge finding (it knows the delivering server) replaces theirs, and theirs is left out
    when one is recorded already (Synapse also asks again about an event it pulls) — but
    a judge's refusal replaces a judge's mere flag."""
    edge: list[tuple[object, ...]] = []
    judged: list[tuple[object, ...]] = []
    # The deletes of a batch go together (one round trip for all on PostgreSQL), before
    # the inserts, as they did one by one.
    superseded: list[tuple[object, ...]] = []
    flags: list[tuple[object, ...]] = []
    for row in rows:
        if row[_EVENT_ID] is not None and row[_ENDPOINT] in IN_HOMESERVER_ENDPOINTS:
            judged.append((*row, row[_EVENT_ID], row[_RULE]))
            if row[_ACTION] != "flagged":
                flags.append((row[_EVENT_ID], row[_RULE]))
        else:
            edge.append(row)
            if row[_EVENT_ID] is not None:
                superseded.append((row[_EVENT_ID], row[_RULE]))
    if flags:
        db.executemany(DELETE_JUDGED_FLAG, flags)
    if superseded:
        db.executemany(DELETE_SUPERSEDED, superseded)
    if edge:
        db.executemany(INSERT_FINDING, edge)
    for row in judged:  # one at a time: each must see the ones before it
        db.execute(INSERT_FINDING_ONCE, row)


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
        with reading(path) as conn:
            rows.extend(conn.dicts(sql, params))
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
    with reading(path) as conn:
        return conn.dicts(sql, params)


def decide_knock(path: str, room_id: str, server: str, status: str, reason: str | None) -> None:
    """Record an approval or denial (a server never seen knocking gets a row too)."""
    now = time.time()
    with writing(path) as db:
        db.execute(
            "INSERT INTO knocks (room_id, server, first_seen, last_seen, count, status, "
            "decided_at, reason) VALUES (?, ?, ?, ?, 0, ?, ?, ?) "
            "ON CONFLICT (room_id, server) DO UPDATE SET status = excluded.status, "
            "decided_at = excluded.decided_at, reason = excluded.reason",
            [room_id, server, now, now, status, now, reason],
        )


def latest_ids(path: str) -> tuple[int, int]:
    """The newest state change's and finding's row IDs (0 when none)."""
    with reading(path, timeout=1) as conn:
        (change,) = conn.one("SELECT COALESCE(MAX(id), 0) FROM state_changes") or (0,)
        (finding,) = conn.one("SELECT COALESCE(MAX(id), 0) FROM findings") or (0,)
    return int(change), int(finding)


def news_after(
    path: str, last_change: int, last_finding: int, rules: Iterable[str], limit: int = 10_000
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What was recorded after the given rows, in one read: state changes (id, room_id,
    event_type, state_key, event_id), and the findings with one of `rules` and an event ID, whoever
    recorded them — the homeserver's judges (hook, module) or any replica's edge — as
    (id, room_id, event_id, sender_server)."""
    wanted = list(rules)
    marks = ", ".join("?" for _ in wanted)
    refusals = (
        "SELECT id, room_id, event_id, sender_server FROM findings "  # noqa: S608 - marks only
        f"WHERE id > ? AND rule IN ({marks}) "
        "AND event_id IS NOT NULL AND room_id IS NOT NULL AND sender_server IS NOT NULL "
        "ORDER BY id LIMIT ?"
    )
    with reading(path, timeout=1) as conn:
        return _changes_after(conn, last_change, limit), conn.tuples(
            refusals, (last_finding, *wanted, limit)
        )


def state_changes_after(path: str, last: int, limit: int = 10_000) -> list[tuple[Any, ...]]:
    """State changes recorded after row `last`: (id, room_id, event_type, state_key,
    event_id) — what the Synapse module in each Synapse process follows."""
    with reading(path, timeout=1) as conn:
        return _changes_after(conn, last, limit)


def _changes_after(conn: Connection, last: int, limit: int) -> list[tuple[Any, ...]]:
    return conn.tuples(
        "SELECT id, room_id, event_type, state_key, event_id FROM state_changes "
        "WHERE id > ? ORDER BY id LIMIT ?",
        (last, limit),
    )


# What `modgud db migrate-to` copies, in this order: every table of the schema but its
# version — the records, the management room's memory and the history audit's cursors
# (without them, an audit run again after the move would record every finding a second
# time) — each with its columns, and the order of its key. The SQL is spelled out per
# table, from constants only (tests/proxy_addons/test_security.py checks it).
_COPIED_COLUMNS = {
    "findings": "id, " + ", ".join(FINDING_COLUMNS),
    "knocks": ", ".join(KNOCK_COLUMNS),
    "state_changes": "id, ts, room_id, event_type, state_key, event_id",
    "events": ", ".join(EVENT_COLUMNS),
    "management_outbox": "txn_id, kind, item, content, created, sent_at, event_id",
    "management_acted": "event_id, kind, sender, ts, done",
    "management_groups": (
        "group_key, room_id, blamed, rule, first_txn, last_posted, unposted, total"
    ),
    "management_cursors": "name, value, holder, expires",
    "history_cursors": "room_id, token, position, snapshot, updated, finished",
}
_COPIED_ORDER = {
    "findings": "id",
    "knocks": "room_id, server",
    "state_changes": "id",
    "events": "room_id, content_hash",
    "management_outbox": "txn_id",
    "management_acted": "event_id",
    "management_groups": "group_key",
    "management_cursors": "name",
    "history_cursors": "room_id",
}
COPIED_TABLES = tuple(_COPIED_COLUMNS)
_COUNT = {t: f"SELECT COUNT(*) FROM {t}" for t in _COPIED_COLUMNS}  # noqa: S608
_COPY = {
    t: f"SELECT {_COPIED_COLUMNS[t]} FROM {t} ORDER BY {_COPIED_ORDER[t]}"  # noqa: S608
    for t in _COPIED_COLUMNS
}
_PASTE = {
    t: f"INSERT INTO {t} ({_COPIED_COLUMNS[t]}) VALUES ("  # noqa: S608
    + ", ".join("?" for _ in _COPIED_COLUMNS[t].split(", "))
    + ")"
    for t in _COPIED_COLUMNS
}
# Identity columns given explicitly: on PostgreSQL the next generated ID must go on after
# the copied ones (the edge follows findings and state changes by ID).
_RESEQUENCE = {
    t: f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "  # noqa: S608
    f"(SELECT COALESCE(MAX(id), 0) + 1 FROM {t}), false)"
    for t in ("findings", "state_changes")
}
COPY_CHUNK = 5_000


def copy_records(source: str, target: str, chunk: int = COPY_CHUNK) -> list[tuple[str, int, int]]:
    """Copy every record of the database `source` into `target` (say an SQLite file into
    PostgreSQL, for replicas): `target` is brought to the latest schema first and must
    hold no records. Returns (table, rows in source, rows in target) once done; a failure
    leaves `target`'s copy of that table rolled back. Raises DatabaseError."""
    into = open_db(target)
    into.migrate()
    counts: list[tuple[str, int, int]] = []
    with reading(source, timeout=30) as src:
        dst = into.connect()
        try:
            for table in COPIED_TABLES:
                counts.append((table, *_copy_table(src, dst, into, table, chunk)))
        except into.errors.any as e:
            raise DatabaseError(f"{into.describe()}: {e}") from None
        finally:
            dst.close()
    return counts


def _copy_table(
    src: Connection, dst: Connection, into: Database, table: str, chunk: int
) -> tuple[int, int]:
    """One table: (rows in the source, rows in the target after)."""
    if (dst.one(_COUNT[table]) or (0,))[0]:
        raise DatabaseError(f"{into.describe()} already holds {table}: copy into an empty one")
    cursor = src.raw.execute(_COPY[table])
    copied = 0
    with dst.transaction():
        while rows := cursor.fetchmany(chunk):
            dst.executemany(_PASTE[table], rows)
            copied += len(rows)
        if table in _RESEQUENCE and into.engine == "postgresql":
            dst.one(_RESEQUENCE[table])
    return copied, int((dst.one(_COUNT[table]) or (0,))[0])
