"""The findings store: batched writes, WAL, queries across replicas. The tests that take
`target` run on both engines: an SQLite file and a database on a real PostgreSQL
(tests/pg.py); those about SQLite's own failures (a lock, a full disk, old files) on
SQLite only."""

import sqlite3
import time
from dataclasses import replace

import pytest

from proxy_addons.database import open_db, writing
from proxy_addons.store import FINDING_COLUMNS, FindingRecord, FindingStore, query_findings


def record(ts, rule="acl.sender", room="!r:x", action="dropped"):
    return FindingRecord(
        ts=ts,
        rule=rule,
        action=action,
        severity="high",
        direction="inbound",
        room_id=room,
        event_id=f"$e{ts}",
        event_type="m.room.message",
        sender="@u:denied.test",
        sender_server="denied.test",
        origin="relay.test",
        attributed_to="relay.test",
        confidence="high",
        endpoint="send",
        txn_id="t1",
        detail="d",
    )


def test_records_are_committed_and_queryable(target):
    """Recorded findings are in SQLite after flush, in WAL mode, filterable by room/rule/time."""
    db = target
    store = FindingStore(db, flush_interval=0.05)
    store.record([record(1.0), record(2.0, rule="acl.origin"), record(3.0, room="!other:x")])
    assert store.flush(5)
    if store.db.engine == "sqlite":
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = list(query_findings([db]))
    assert [r["ts"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["ts"] for r in query_findings([db], room="!other:x")] == [3.0]
    assert [r["ts"] for r in query_findings([db], rule="acl.origin")] == [2.0]
    assert [r["ts"] for r in query_findings([db], rule="acl")] == [1.0, 2.0, 3.0]
    assert [r["ts"] for r in query_findings([db], since=2.0)] == [2.0, 3.0]
    store.close()


def test_close_writes_everything_queued(target):
    """close() commits what is still queued: nothing recorded is lost on a clean stop."""
    db = target
    store = FindingStore(db, flush_interval=10)
    store.record([record(float(i)) for i in range(500)])
    store.close()
    assert len(list(query_findings([db]))) == 500


def test_several_replica_databases_merge_in_time_order(tmp_path):
    """`modgud findings` can read one database per replica, merged by time."""
    a, b = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    for path, stamps in ((a, [1.0, 4.0]), (b, [2.0, 3.0])):
        store = FindingStore(path)
        store.record([record(t) for t in stamps])
        store.close()
    assert [r["ts"] for r in query_findings([a, b])] == [1.0, 2.0, 3.0, 4.0]
    assert [r["ts"] for r in query_findings([a, b], limit=2)] == [3.0, 4.0]


def test_sql_values_are_parameters(target):
    """A hostile room filter is a value, not SQL."""
    db = target
    store = FindingStore(db)
    store.record([record(1.0)])
    store.close()
    assert list(query_findings([db], room="x' OR '1'='1")) == []
    assert len(list(query_findings([db]))) == 1


def test_records_wait_out_a_locked_database_and_are_written_after(tmp_path):
    """Another process's write lock (here: another connection holding BEGIN EXCLUSIVE)
    stops the writer; it keeps the records, retries, and writes every one once the lock
    is gone — nothing is dropped."""
    db = str(tmp_path / "m.db")
    store = FindingStore(db, flush_interval=0.02, busy_timeout=0.05, retry_max_seconds=0.1)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        store.record([record(float(i)) for i in range(50)])
        assert not store.flush(0.6)
        assert store.write_errors >= 1
        assert store.pending == 50
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.flush(10)
    assert len(list(query_findings([db]))) == 50
    assert store.dropped == 0
    store.close()


def test_records_wait_out_a_full_disk_and_are_written_after(tmp_path):
    """A real full filesystem (a 2 MiB tmpfs filled up): SQLite fails with "database or
    disk is full"; the records are kept and written once space is freed. Needs root to
    mount the tmpfs (CI on this machine type runs as root); skipped otherwise."""
    import os
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        db = str(mount / "m.db")
        store = FindingStore(db, flush_interval=0.02, retry_max_seconds=0.1)
        store.record([record(0.0)])
        assert store.flush(5)
        filler = mount / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass  # full
        big = [replace(record(float(i)), detail="x" * 1000) for i in range(1, 201)]
        store.record(big)
        assert not store.flush(0.6)
        assert store.write_errors >= 1
        filler.unlink()
        assert store.flush(10)
        assert len(list(query_findings([db]))) == 201
        assert store.dropped == 0
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_beyond_max_pending_index_rows_yield_first_and_are_counted(tmp_path):
    """While the database cannot be written, memory is bounded: past `max_pending`
    records, event-index rows are refused before findings, and each is counted."""
    from proxy_addons.eventindex import IndexBatch

    db = str(tmp_path / "m.db")
    store = FindingStore(
        db, flush_interval=0.02, busy_timeout=0.05, retry_max_seconds=0.1, max_pending=10
    )
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        store.record([record(float(i)) for i in range(8)])
        store.record(
            [IndexBatch([("!r:x", "h", None, "a", "b", "b", "inbound", "send", 1, 1)] * 3)]
        )
        store.record([record(8.0), record(9.0), record(10.0)])
        assert store.dropped == 4  # the three index rows, then the eleventh finding
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.flush(10)
    assert len(list(query_findings([db]))) == 10
    store.close()


def test_a_record_sqlite_cannot_take_is_dropped_and_the_writer_lives_on(target):
    """A record SQLite refuses (a value it cannot bind, which no code path should make)
    costs its batch, counted in `dropped`, and never the writer thread: the next records
    are written."""
    db = target
    store = FindingStore(db, flush_interval=0.02)
    store.record([replace(record(1.0), detail=object())])
    assert store.flush(5)
    assert store.dropped == 1
    store.record([record(2.0)])
    assert store.flush(5)
    assert [r["ts"] for r in query_findings([db])] == [2.0]
    store.close()


def test_text_with_lone_surrogates_is_stored_escaped(target):
    """Text from traffic may hold lone surrogates, which SQLite (UTF-8) cannot take: the
    writer escapes the batch that failed and writes it, findings and index rows alike."""
    from proxy_addons.eventindex import IndexBatch, lookup_events

    db = target
    store = FindingStore(db, flush_interval=0.02)
    row = ("!\ud800:x", "h\udcff", "$\ud800", "a", "b", "b", "inbound", "send", 1.0, 1.0)
    store.record([replace(record(1.0), detail="d \ud800"), IndexBatch([row])])
    assert store.flush(5)
    assert [r["detail"] for r in query_findings([db])] == ["d \\ud800"]
    assert lookup_events(db, "!\\ud800:x", ["h\\udcff"])["h\\udcff"]["event_id"] == "$\\ud800"
    assert store.dropped == 0
    store.close()


def index_rows(db, rows):
    """Event-index rows (room, content hash, last seen) written straight into the table."""
    from proxy_addons.eventindex import UPSERT

    with writing(db) as conn:
        conn.executemany(
            UPSERT,
            [
                (room, h, None, "a.test", "a.test", "a.test", "inbound", "send", seen, seen)
                for room, h, seen in rows
            ],
        )


def index_hashes(db):
    conn = open_db(db).connect(read_only=True)
    try:
        return sorted(h for (h,) in conn.tuples("SELECT content_hash FROM events"))
    finally:
        conn.close()


def test_index_rows_older_than_the_retention_are_pruned_at_start_and_counted(target):
    """Rows last seen before the retention window go (also those that aged while modgud
    was down: the first pass runs at start); rows seen since stay, whenever first seen."""
    import time

    db = target
    now = time.time()
    day = 86_400
    index_rows(db, [("!r:x", "old", now - 31 * day), ("!r:x", "older", now - 400 * day)])
    index_rows(db, [("!r:x", "recent", now - 29 * day), ("!s:x", "new", now)])
    store = FindingStore(db, flush_interval=0.02, index_retention_seconds=30 * day)
    try:
        deadline = time.monotonic() + 10
        while store.pruned < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.pruned == 2
        assert index_hashes(db) == ["new", "recent"]
    finally:
        store.close()


def test_no_retention_keeps_every_index_row(target):
    import time

    db = target
    index_rows(db, [("!r:x", "ancient", 1.0)])
    store = FindingStore(db, flush_interval=0.02)  # index_retention_seconds=0: for ever
    store.record([record(1.0)])
    assert store.flush(10)
    time.sleep(0.1)
    store.close()
    assert store.pruned == 0 and index_hashes(db) == ["ancient"]


def test_a_long_prune_lets_queued_records_in_between_its_passes(target, monkeypatch):
    """Pruning goes a chunk per commit and a few chunks per pass: records queued meanwhile
    are written between passes, and the passes go on until nothing old is left."""
    import time

    import proxy_addons.store as store_module

    monkeypatch.setattr(store_module, "PRUNE_CHUNK", 3)
    monkeypatch.setattr(store_module, "PRUNE_CHUNKS", 2)
    db = target
    index_rows(
        db, [("!r:x", f"old{i:02}", 1.0) for i in range(20)] + [("!r:x", "kept", time.time())]
    )
    passes = []
    real = FindingStore._prune

    def counting(self, database):
        more = real(self, database)
        passes.append((self.pruned, more))
        return more

    monkeypatch.setattr(FindingStore, "_prune", counting)
    store = FindingStore(db, flush_interval=0.02, index_retention_seconds=3600)
    try:
        store.record([record(1.0)])
        assert store.flush(10)
        deadline = time.monotonic() + 10
        while store.pruned < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert index_hashes(db) == ["kept"]
        assert passes[0] == (6, True)  # two chunks of three, more left
        assert [p for p in passes if not p[1]][0][0] == 20
        assert len(list(query_findings([db]))) == 1
    finally:
        store.close()


def test_one_finding_per_event_and_rule_the_edges_kept(target):
    """The edge and the homeserver's judges (hook, Synapse module) may each record the same
    event and rule: one row stays, the edge's (it names who delivered the event), whichever
    was written first — the writers are separate processes, so either order happens."""
    db = target
    edge = replace(record(1.0), event_id="$a")
    module = replace(record(2.0), event_id="$a", endpoint="module", attributed_to=None)
    store = FindingStore(db, flush_interval=0.02)
    store.record([module])  # the module first, then the edge
    assert store.flush(5)
    store.record([edge])
    store.record([replace(edge, event_id="$b")])
    store.record([replace(module, event_id="$b")])  # the edge first, then the module
    store.record([replace(module, event_id="$b", endpoint="hook")])
    # another rule for the same event is another finding
    store.record([replace(module, event_id="$a", rule="policy.user")])
    # without an event ID there is nothing to merge
    store.record([replace(module, event_id=None), replace(module, event_id=None)])
    assert store.flush(5)
    rows = [(r["event_id"], r["rule"], r["endpoint"]) for r in query_findings([db])]
    assert sorted(rows, key=str) == sorted(
        [
            ("$a", "acl.sender", "send"),
            ("$b", "acl.sender", "send"),
            ("$a", "policy.user", "module"),
            (None, "acl.sender", "module"),
            (None, "acl.sender", "module"),
        ],
        key=str,
    )
    store.close()


def test_homeserver_judges_record_an_event_once(target):
    """Synapse asks about an event again when it pulls it again: one finding stays, also
    within one batch and from several Synapse processes."""
    db = target
    module = replace(record(1.0), event_id="$a", endpoint="module", attributed_to=None)
    first, second = FindingStore(db, flush_interval=0.02), FindingStore(db, flush_interval=0.02)
    first.record([module, module])
    second.record([module])
    assert first.flush(5) and second.flush(5)
    assert len(list(query_findings([db]))) == 1
    first.close()
    second.close()


def test_a_judges_refusal_replaces_another_judges_flag(target):
    """The module in audit beside the enforcing hook: the hook's `dropped` is what stays
    (whichever is written first), and a later flag does not replace it."""
    db = target
    flagged = replace(record(1.0), event_id="$a", endpoint="module", action="flagged")
    dropped = replace(record(1.0), event_id="$a", endpoint="hook", action="dropped")
    store = FindingStore(db, flush_interval=0.02)
    for batch in ([flagged], [dropped], [flagged]):
        store.record(batch)
        assert store.flush(5)
    assert [(f["endpoint"], f["action"]) for f in query_findings([db])] == [("hook", "dropped")]
    store.close()


def test_lazy_writer_starts_with_the_first_record_and_after_a_fork(target):
    """start=False: no thread until something is recorded (a process that forks after
    building the store keeps a working writer); what is recorded is written."""
    import os

    db = target
    store = FindingStore(db, flush_interval=0.02, start=False)
    assert store._thread is None
    pid = os.fork()
    if pid == 0:  # the child: as Synapse after daemonizing
        store.record([record(1.0)])
        os._exit(0 if store.flush(5) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.record([record(2.0)])
    assert store.flush(5)
    assert [r["ts"] for r in query_findings([db])] == [1.0, 2.0]
    store.close()


def test_a_database_of_an_earlier_version_opens_and_gains_the_new_index(tmp_path):
    """A findings database written by earlier modgud (sqlite-utils' schema) is used as it
    is; the event-ID index the merge needs is added."""
    db = str(tmp_path / "old.db")
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE [findings] ([id] INTEGER PRIMARY KEY, [ts] FLOAT, "
        + ", ".join(f"[{c}] TEXT" for c in FINDING_COLUMNS if c != "ts")
        + ")"
    )
    conn.execute("CREATE INDEX [idx_findings_ts] ON [findings] ([ts])")
    conn.execute("INSERT INTO findings (ts, rule) VALUES (1.0, 'acl.origin')")
    conn.commit()
    conn.close()
    store = FindingStore(db, flush_interval=0.02)
    store.record([record(2.0)])
    assert store.flush(5)
    store.close()
    assert [r["rule"] for r in query_findings([db])] == ["acl.origin", "acl.sender"]
    indexes = {r[1] for r in sqlite3.connect(db).execute("PRAGMA index_list(findings)")}
    assert {"idx_findings_ts", "idx_findings_event_id"} <= indexes


def test_the_findings_table_has_every_column(target):
    """The schema's CREATE TABLE is spelled out; it names every column records carry."""
    database = open_db(target)
    database.migrate()
    conn = database.connect()
    try:
        cursor = conn.raw.execute("SELECT * FROM findings WHERE 1 = 0")
        assert [d[0] for d in cursor.description] == ["id", *FINDING_COLUMNS]
    finally:
        conn.close()


def test_index_rows_wait_for_the_interval_and_findings_wake_the_writer(target):
    """Every transaction brings index rows: they do not wake the writer (each wake cost
    the event loop a thread hand-over); a finding, which people and other processes wait
    for, is written at once, with the rows queued before it."""
    from proxy_addons.eventindex import IndexBatch

    store = FindingStore(target, flush_interval=30.0)
    try:
        row = ("!r:x", "h", None, "a", "b", "b", "inbound", "send", 1, 1)
        time.sleep(0.2)  # the writer is waiting
        store.record([IndexBatch([row])])
        time.sleep(0.5)
        assert store.pending == 1
        store.record([record(1.0)])
        deadline = time.monotonic() + 5
        while store.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.pending == 0
        assert len(list(query_findings([target]))) == 1
    finally:
        store.close()


def test_the_first_delivery_across_replicas_is_the_earliest(target):
    """Replicas batch their index rows and write them in any order: the event's first
    deliverer is the earliest delivery by time, and every deliverer is listed once."""
    from proxy_addons.eventindex import IndexBatch, lookup_events

    def delivery(origin, seen):
        return ("!r:x", "h", None, "a.test", origin, origin, "inbound", "send", seen, seen)

    late, early = FindingStore(target), FindingStore(target)
    late.record([IndexBatch([delivery("late.test", 20.0)])])
    late.close()
    early.record([IndexBatch([delivery("early.test", 10.0)])])
    early.close()
    row = lookup_events(target, "!r:x", ["h"])["h"]
    assert row["first_origin"] == "early.test"
    assert (row["first_seen"], row["last_seen"], row["deliveries"]) == (10.0, 20.0, 2)
    assert row["delivered_by"] == "late.test,early.test"


def test_an_edge_finding_is_recorded_once_per_event_rule_and_blamed_server(target):
    """A transaction retried through another replica is judged again there: its findings
    are not doubled. Another blamed server for the same event is another finding."""
    first, retry = FindingStore(target), FindingStore(target)
    first.record([record(1.0)])
    first.close()
    again = replace(record(1.0), ts=2.0, detail="judged again")
    other = replace(record(1.0), ts=3.0, attributed_to="other-relay.test")
    retry.record([again, other])
    retry.close()
    rows = list(query_findings([target]))
    assert [(r["ts"], r["attributed_to"]) for r in rows] == [
        (1.0, "relay.test"),
        (3.0, "other-relay.test"),
    ]
