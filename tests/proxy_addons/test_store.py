"""The findings store: batched writes, WAL, queries across replicas."""

import sqlite3

from proxy_addons.store import FindingRecord, FindingStore, query_findings


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


def test_records_are_committed_and_queryable(tmp_path):
    """Recorded findings are in SQLite after flush, in WAL mode, filterable by room/rule/time."""
    db = str(tmp_path / "m.db")
    store = FindingStore(db, flush_interval=0.05)
    store.record([record(1.0), record(2.0, rule="acl.origin"), record(3.0, room="!other:x")])
    assert store.flush(5)
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = list(query_findings([db]))
    assert [r["ts"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["ts"] for r in query_findings([db], room="!other:x")] == [3.0]
    assert [r["ts"] for r in query_findings([db], rule="acl.origin")] == [2.0]
    assert [r["ts"] for r in query_findings([db], rule="acl")] == [1.0, 2.0, 3.0]
    assert [r["ts"] for r in query_findings([db], since=2.0)] == [2.0, 3.0]
    store.close()


def test_close_writes_everything_queued(tmp_path):
    """close() commits what is still queued: nothing recorded is lost on a clean stop."""
    db = str(tmp_path / "m.db")
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


def test_sql_values_are_parameters(tmp_path):
    """A hostile room filter is a value, not SQL."""
    db = str(tmp_path / "m.db")
    store = FindingStore(db)
    store.record([record(1.0)])
    store.close()
    assert list(query_findings([db], room="x' OR '1'='1")) == []
    assert len(list(query_findings([db]))) == 1
