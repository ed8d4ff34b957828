"""The database layer (proxy_addons/database.py) on both engines: an SQLite file and a
database on a real PostgreSQL server (tests/pg.py) — migrations, what check-config says,
the copy into PostgreSQL, and the writer outliving a lost connection."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import replace

import pytest

from proxy_addons.cli import main
from proxy_addons.database import (
    LATEST_VERSION,
    MIGRATIONS,
    DatabaseError,
    _respell,
    open_db,
    reading,
)
from proxy_addons.eventindex import IndexBatch
from proxy_addons.store import (
    FindingStore,
    KnockRecord,
    StateChange,
    decide_knock,
    query_findings,
    query_knocks,
)
from tests.proxy_addons.test_store import record


def versions(target: str) -> list[int]:
    with reading(target) as conn:
        return [v for (v,) in conn.tuples("SELECT version FROM modgud_schema ORDER BY version")]


def test_statements_are_respelt_for_postgresql():
    assert _respell("SELECT a FROM t WHERE b = ? AND c LIKE ?") == (
        "SELECT a FROM t WHERE b = %s AND c LIKE %s"
    )
    assert _respell("SELECT instr(',' || x || ',', ?) FROM t") == (
        "SELECT strpos(',' || x || ',', %s) FROM t"
    )
    assert _respell("SELECT GROUP_CONCAT(DISTINCT f.rule) FROM f") == (
        "SELECT string_agg(DISTINCT f.rule, ',') FROM f"
    )
    assert _respell("DELETE FROM e WHERE rowid IN (SELECT rowid FROM e)") == (
        "DELETE FROM e WHERE ctid IN (SELECT ctid FROM e)"
    )
    assert _respell("SELECT '100%'") == "SELECT '100%%'"


def test_a_new_database_gets_each_migration_once(target):
    database = open_db(target)
    assert database.version() == 0
    assert database.migrate() == LATEST_VERSION
    assert database.migrate() == LATEST_VERSION
    assert versions(target) == list(range(1, LATEST_VERSION + 1))
    assert database.version() == LATEST_VERSION


def migrate_together(target: str, processes: int = 6) -> list[BaseException]:
    """`processes` connections migrating `target` at once; what they raised."""
    errors: list[BaseException] = []

    def start() -> None:
        try:
            open_db(target).migrate()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_processes_starting_together_migrate_once(target):
    """Replicas and Synapse workers start at once: each migration runs once, none fails."""
    assert migrate_together(target) == []
    assert versions(target) == list(range(1, LATEST_VERSION + 1))


def test_a_database_newer_than_this_modgud_is_refused(target):
    database = open_db(target)
    database.migrate()
    conn = database.connect()
    with conn.transaction():
        conn.execute(
            "INSERT INTO modgud_schema (version, applied_at, description) VALUES (?, ?, ?)",
            (LATEST_VERSION + 1, time.time(), "from the future"),
        )
    conn.close()
    for attempt in (database.migrate, database.check, lambda: FindingStore(target)):
        with pytest.raises(DatabaseError, match="newer than this modgud's.*upgrade modgud"):
            attempt()


def test_an_sqlite_database_from_before_versions_upgrades_in_place(tmp_path):
    """Databases written before versions existed hold version 1's tables: opening one
    records the version and keeps every row."""
    path = str(tmp_path / "old.db")
    store = FindingStore(path)
    store.record([record(1.0), record(2.0)])
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE modgud_schema")
    conn.commit()
    conn.close()
    assert open_db(path).version() == 0
    assert "upgraded to" in open_db(path).check()
    FindingStore(path).close()
    assert versions(path) == list(range(1, LATEST_VERSION + 1))
    assert [r["ts"] for r in query_findings([path])] == [1.0, 2.0]


def test_check_says_which_engine_and_what_schema(tmp_path, pg_url, postgres):
    new = tmp_path / "new.db"
    assert open_db(str(new)).check() == f"SQLite database {new}: new, created at start"
    with pytest.raises(DatabaseError, match="does not exist"):
        open_db(str(tmp_path / "missing" / "m.db")).check()
    (tmp_path / "junk.db").write_bytes(b"not a database at all, " * 100)
    with pytest.raises(DatabaseError, match="not a database"):
        open_db(str(tmp_path / "junk.db")).check()
    said = open_db(pg_url).check()
    assert said.startswith(f"PostgreSQL database postgres@127.0.0.1:{postgres.port}/")
    assert "(server 1" in said and said.endswith("no modgud tables yet (created at start)")
    open_db(pg_url).migrate()
    assert open_db(pg_url).check().endswith(f"schema version {LATEST_VERSION}")
    secret = pg_url.replace("postgres@", "postgres:hunter2@")
    assert "hunter2" not in open_db(secret).describe()
    closed = f"postgresql://postgres@127.0.0.1:{postgres.port + 1}/nothing"
    with pytest.raises(DatabaseError, match="PostgreSQL database postgres@127.0.0.1"):
        open_db(closed).check()


def test_check_config_opens_the_database(tmp_path, pg_url, postgres, capsys):
    """check-config says which engine, and fails on a database `run` could not open."""
    config = tmp_path / "modgud.yaml"
    base = "server_name: hs.test\nupstream: http://127.0.0.1:8008\n"
    config.write_text(base + f"database: {pg_url}\n")
    assert main(["check-config", str(config)]) == 0
    assert "database     PostgreSQL database postgres@127.0.0.1" in capsys.readouterr().out
    config.write_text(base + f"database: postgresql://postgres@127.0.0.1:{postgres.port + 1}/x\n")
    assert main(["check-config", str(config)]) == 1
    assert f"{config}: database: PostgreSQL database" in capsys.readouterr().err
    config.write_text(base + "database: nowhere/m.db\n")
    assert main(["check-config", str(config)]) == 1
    assert "does not exist" in capsys.readouterr().err


def fill(path: str) -> None:
    """A database with every kind of record, as a running modgud leaves it."""
    store = FindingStore(path, flush_interval=0.02)
    row = ("!r:x", "h1", "$e1", "a.test", "a.test", "a.test", "inbound", "send", 1.0, 1.0)
    store.record(
        [
            *(record(float(i)) for i in range(1, 121)),
            replace(record(200.0), detail="ünïcode ✓", room_id="!ß:x"),
            KnockRecord(5.0, "!r:x", "knocker.test", "ban: spam"),
            StateChange(6.0, "!r:x", "m.room.server_acl", "", "$acl"),
            IndexBatch([row, (*row[:1], "h2", *row[2:])]),
        ]
    )
    store.close()
    decide_knock(path, "!r:x", "other.test", "approved", "known")
    # The management room's memory and a history audit's cursor, by their own writers.
    from proxy_addons.history import _checkpoint
    from proxy_addons.management import LeakGroup, Memory, Post
    from rules.history import HistoryAudit

    memory = Memory(path)
    memory.record(
        [Post("t1", "knock", "!r:x knocker.test", {"body": "knock"})],
        7.0,
        cursors={"since": "s1"},
        groups=[LeakGroup("g1", "!r:x", "relay.test", "leak.relay", "t1", 7.0, 0, 3)],
    )
    memory.begin("$cmd", "command", "@mod:x", 8.0)
    audit = HistoryAudit("!r:x", "x")
    audit.judge({"event_id": "$c", "type": "m.room.create", "sender": "@a:x", "prev_events": []})
    _checkpoint(path, "!r:x", "t5-9", audit, [], False)


def test_migrate_to_copies_every_record_and_compares_the_counts(tmp_path, pg_url, capsys):
    source = str(tmp_path / "m.db")
    fill(source)
    assert main(["db", "migrate-to", pg_url, "--db", source]) == 0
    out = capsys.readouterr().out
    for table, count in (
        ("findings", 121),
        ("knocks", 2),
        ("state_changes", 1),
        ("events", 2),
        ("management_outbox", 1),
        ("management_acted", 1),
        ("management_groups", 1),
        ("management_cursors", 1),
        ("history_cursors", 1),
    ):
        assert f"{table:<14} {count:>10} copied, {count:>10} there ok" in out
    from proxy_addons.history import _load_cursor
    from proxy_addons.management import Memory

    assert _load_cursor(pg_url, "!r:x") == _load_cursor(source, "!r:x")
    assert _load_cursor(pg_url, "!r:x")[0] == "t5-9"
    assert Memory(pg_url).cursor("since") == "s1"
    assert Memory(pg_url).groups() == Memory(source).groups()
    assert Memory(pg_url).unsent() == Memory(source).unsent() != []
    with reading(pg_url) as conn:
        acted = conn.one("SELECT sender, done FROM management_acted WHERE event_id = '$cmd'")
    assert acted == ("@mod:x", 0)
    assert list(query_findings([pg_url])) == list(query_findings([source]))
    assert query_knocks(pg_url) == query_knocks(source)
    # New records go on after the copied IDs (the edge follows findings by ID).
    with reading(source) as conn:
        (last,) = conn.one("SELECT MAX(id) FROM findings") or (0,)
    store = FindingStore(pg_url, flush_interval=0.02)
    store.record([record(300.0)])
    store.close()
    with reading(pg_url) as conn:
        assert conn.one("SELECT id FROM findings WHERE ts = 300.0") == (last + 1,)
    # Into a database that holds records already: refused, nothing doubled.
    assert main(["db", "migrate-to", pg_url, "--db", source]) == 2
    assert "already holds findings" in capsys.readouterr().err
    assert len(list(query_findings([pg_url]))) == 122


def test_migrate_to_needs_an_sqlite_database(tmp_path, pg_url, capsys):
    assert main(["db", "migrate-to", pg_url, "--db", str(tmp_path / "none.db")]) == 2
    assert "no SQLite database at" in capsys.readouterr().err


def test_the_writer_outlives_a_lost_postgresql_connection(pg_url):
    """PostgreSQL restarted or the network cut: the writer's connection is gone. The
    records wait, the writer connects again and writes them; none is lost."""
    store = FindingStore(pg_url, flush_interval=0.02, retry_max_seconds=0.2)
    try:
        store.record([record(1.0)])
        assert store.flush(10)
        with reading(pg_url) as conn:
            killed = conn.tuples(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert killed  # the writer's connection
        store.record([record(float(i)) for i in range(2, 12)])
        assert store.flush(10)
        assert [r["ts"] for r in query_findings([pg_url])] == [float(i) for i in range(1, 12)]
        assert store.dropped == 0
    finally:
        store.close()


def test_text_with_nul_is_stored_escaped_in_postgresql(pg_url):
    """PostgreSQL's text cannot hold NUL (a JSON "\\u0000" in traffic): the batch is
    written with it escaped, as lone surrogates are."""
    store = FindingStore(pg_url, flush_interval=0.02)
    store.record([replace(record(1.0), detail="a\x00b")])
    store.close()
    assert [r["detail"] for r in query_findings([pg_url])] == ["a\\x00b"]
    assert store.dropped == 0


def test_migration_2_keeps_the_first_of_doubled_findings(target):
    """A database from before version 2 may hold a finding twice (a retried transaction
    through another replica; a judge's, from two Synapse processes at once): the first
    is kept, the indexes that prevent it from now on made."""
    database = open_db(target)
    conn = database.connect()
    try:
        with conn.transaction(exclusive=True):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS modgud_schema (version INTEGER NOT NULL, "
                "applied_at DOUBLE PRECISION, description TEXT)"
            )
            for statement in getattr(MIGRATIONS[0], database.engine):
                conn.execute(statement)
            conn.execute("INSERT INTO modgud_schema (version) VALUES (1)")
        insert = (
            "INSERT INTO findings (ts, rule, event_id, attributed_to, endpoint, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)"
        )
        with conn.transaction():
            for ts, endpoint, detail in (
                (1.0, "send", "first"),
                (2.0, "send", "retry"),
                (3.0, "module", "judged"),
                (4.0, "module", "judged"),
            ):
                conn.execute(insert, (ts, "acl.sender", "$e", "relay.test", endpoint, detail))
    finally:
        conn.close()
    assert database.migrate() == LATEST_VERSION
    with reading(target) as read:
        rows = read.tuples("SELECT ts, endpoint FROM findings ORDER BY ts")
    assert rows == [(1.0, "send"), (3.0, "module")]


def test_sqlite_processes_starting_together_again_and_again(tmp_path):
    """Six connections opening a new SQLite database at once: switching it to WAL could
    answer "database is locked" at once (SQLite's deadlock escape skips the busy wait),
    about one round in 40 on this machine before the opener waited for it itself."""
    for n in range(40):
        assert migrate_together(str(tmp_path / f"m{n}.db")) == [], n
