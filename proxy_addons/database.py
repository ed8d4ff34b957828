"""modgud's database: one interface, two engines.

`database:` in modgud.yaml is a path (SQLite, the embedded default: one modgud, or the
edge and the Synapse module on one machine) or a `postgresql://` URL (replicas of modgud
and every Synapse worker's module sharing one database). Everything that reads or writes
the database goes through `open_db(target).connect()`:

- statements are written once, in SQLite's spelling with `?` parameters; a PostgreSQL
  connection respells the handful of differences (`_respell`: parameters, `instr`,
  `GROUP_CONCAT`, `rowid`) — the tests run the store's statements on both engines;
- the schema is a list of versioned, forward-only migrations (`MIGRATIONS`), each spelt
  for both engines, recorded in `modgud_schema`. `Database.migrate()` applies what is
  missing at start, under a lock (SQLite: an immediate transaction; PostgreSQL: an
  advisory lock), so processes starting together apply each migration once. A database
  written before versions existed holds version 1's tables: its statements are all
  IF NOT EXISTS, so it upgrades in place. A database newer than this modgud is refused;
- errors come as the engine's DB-API classes, sorted for the store's writer into those
  worth retrying (locked, disk full, connection lost) and those that are not
  (`DatabaseErrors`).

psycopg (3) is imported only for a PostgreSQL URL: SQLite needs nothing beyond the
standard library, which matters inside Synapse's process (the module writes here too).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "Connection",
    "Database",
    "DatabaseError",
    "DatabaseErrors",
    "Migration",
    "NewsWaiter",
    "PostgresDatabase",
    "SqliteDatabase",
    "is_postgres",
    "open_db",
    "reading",
    "writing",
]

POSTGRES_SCHEMES = ("postgresql", "postgres")


class DatabaseError(ValueError):
    """The database cannot be used as it is (unreachable, newer than this modgud, not a
    database): says which and why, for `check-config` and for the log at start."""


def is_postgres(target: str) -> bool:
    return urlsplit(target).scheme in POSTGRES_SCHEMES if "://" in target else False


@dataclass(frozen=True, slots=True)
class DatabaseErrors:
    """The engine's exception classes, for code that must tell them apart."""

    any: tuple[type[BaseException], ...]  # everything the engine raises
    # Text the engine cannot store as it is (lone surrogates; NUL in PostgreSQL): the
    # rows are worth one retry with their text escaped (eventindex.storable).
    unstorable: tuple[type[BaseException], ...]
    # Not the disk's or the network's fault: retrying the same rows cannot help.
    permanent: tuple[type[BaseException], ...]


# -- the schema ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


def _tables(integer_key: str, real: str) -> tuple[str, ...]:
    """Version 1's tables, as the store has had them since before versions."""
    return (
        f"CREATE TABLE IF NOT EXISTS findings (id {integer_key}, ts {real}, rule TEXT, "
        "action TEXT, severity TEXT, direction TEXT, room_id TEXT, event_id TEXT, "
        "event_type TEXT, sender TEXT, sender_server TEXT, origin TEXT, attributed_to TEXT, "
        "confidence TEXT, endpoint TEXT, txn_id TEXT, detail TEXT)",
        # The index names sqlite-utils gave them, which databases of earlier versions have.
        "CREATE INDEX IF NOT EXISTS idx_findings_ts ON findings (ts)",
        "CREATE INDEX IF NOT EXISTS idx_findings_rule_ts ON findings (rule, ts)",
        "CREATE INDEX IF NOT EXISTS idx_findings_room_id_ts ON findings (room_id, ts)",
        "CREATE INDEX IF NOT EXISTS idx_findings_event_id ON findings (event_id)",
        "CREATE TABLE IF NOT EXISTS knocks (room_id TEXT NOT NULL, server TEXT NOT NULL, "
        f"first_seen {real}, last_seen {real}, count INTEGER DEFAULT 0, "
        "status TEXT DEFAULT 'pending', policy_match TEXT, decided_at "
        f"{real}, reason TEXT, PRIMARY KEY (room_id, server))",
        f"CREATE TABLE IF NOT EXISTS state_changes (id {integer_key}, ts {real}, "
        "room_id TEXT NOT NULL, event_type TEXT, state_key TEXT, event_id TEXT)",
        "CREATE TABLE IF NOT EXISTS events (room_id TEXT NOT NULL, content_hash TEXT NOT NULL, "
        "event_id TEXT, author TEXT, first_origin TEXT, delivered_by TEXT, direction TEXT, "
        f"endpoint TEXT, first_seen {real}, last_seen {real}, deliveries INTEGER DEFAULT 1, "
        "PRIMARY KEY (room_id, content_hash))",
        "CREATE INDEX IF NOT EXISTS events_by_id ON events (event_id)",
    )


# A finding about an event is recorded once: the edge's once per rule and blamed server
# (a transaction retried through another replica, or by nginx after a replica died with
# it in flight, is judged again there), the homeserver's judges' (hook, module) once per
# rule (Synapse asks again about an event it pulls again, from any of its processes).
# Concurrent writers (replicas, Synapse workers) on PostgreSQL cannot check for each
# other's rows before inserting: unique indexes do (store.INSERT_FINDING*).
_EDGE_FINDING = "event_id IS NOT NULL AND endpoint NOT IN ('hook', 'module')"
_JUDGED_FINDING = "event_id IS NOT NULL AND endpoint IN ('hook', 'module')"
_FINDINGS_ONCE = (
    "DELETE FROM findings WHERE " + _EDGE_FINDING + " AND id NOT IN "  # noqa: S608 - constants
    "(SELECT MIN(id) FROM findings WHERE " + _EDGE_FINDING + " "
    "GROUP BY event_id, rule, COALESCE(attributed_to, ''))",
    "DELETE FROM findings WHERE " + _JUDGED_FINDING + " AND id NOT IN "  # noqa: S608
    "(SELECT MIN(id) FROM findings WHERE " + _JUDGED_FINDING + " GROUP BY event_id, rule)",
    "CREATE UNIQUE INDEX IF NOT EXISTS findings_once_per_edge ON findings "  # noqa: S608
    "(event_id, rule, COALESCE(attributed_to, '')) WHERE " + _EDGE_FINDING,
    "CREATE UNIQUE INDEX IF NOT EXISTS findings_once_per_judge ON findings "  # noqa: S608
    "(event_id, rule) WHERE " + _JUDGED_FINDING,
)


def _management_tables(real: str) -> tuple[str, ...]:
    """The management room's memory (proxy_addons/management.py), so that a restart neither
    repeats nor loses a message or a command: the outbox (every message, written before it
    is sent and sent with its own transaction ID, so sending again after a crash is
    idempotent), the commands and reactions acted on, the leak groups' rate limits, and
    cursors (the sync token, the last finding read, the bot's leader lease)."""
    return (
        "CREATE TABLE IF NOT EXISTS management_outbox (txn_id TEXT PRIMARY KEY, "
        "kind TEXT NOT NULL, item TEXT NOT NULL, content TEXT NOT NULL, "
        f"created {real}, sent_at {real}, event_id TEXT)",
        "CREATE INDEX IF NOT EXISTS management_outbox_item ON management_outbox (kind, item)",
        "CREATE INDEX IF NOT EXISTS management_outbox_event ON management_outbox (event_id)",
        "CREATE TABLE IF NOT EXISTS management_acted (event_id TEXT PRIMARY KEY, "
        f"kind TEXT, sender TEXT, ts {real}, done INTEGER DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS management_groups (group_key TEXT PRIMARY KEY, "
        "room_id TEXT, blamed TEXT, rule TEXT, first_txn TEXT, "
        f"last_posted {real}, unposted INTEGER DEFAULT 0, total INTEGER DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS management_cursors (name TEXT PRIMARY KEY, value TEXT, "
        f"holder TEXT, expires {real})",
    )


def _history_tables(real: str) -> tuple[str, ...]:
    """Where each room's history audit is (proxy_addons/history.py): the admin API's
    pagination token after the last event judged, its position, and the audit's state
    there (JSON), so that an audit stopped halfway resumes, and a finished one goes on
    with the events stored since."""
    return (
        "CREATE TABLE IF NOT EXISTS history_cursors (room_id TEXT PRIMARY KEY, token TEXT, "
        f"position INTEGER DEFAULT 0, snapshot TEXT, updated {real}, finished INTEGER DEFAULT 0)",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "findings, knocks, state changes and the event index",
        # FLOAT and REAL: the spellings databases of earlier versions have.
        _tables("INTEGER PRIMARY KEY", "REAL"),
        _tables("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION"),
    ),
    Migration(2, "a finding about an event once", _FINDINGS_ONCE, _FINDINGS_ONCE),
    Migration(
        3,
        "the management room: what was posted and acted on",
        _management_tables("REAL"),
        _management_tables("DOUBLE PRECISION"),
    ),
    Migration(
        4,
        "the history audit's cursors",
        _history_tables("REAL"),
        _history_tables("DOUBLE PRECISION"),
    ),
)
LATEST_VERSION = MIGRATIONS[-1].version
_VERSIONS = (
    "CREATE TABLE IF NOT EXISTS modgud_schema (version INTEGER NOT NULL, "
    "applied_at DOUBLE PRECISION, description TEXT)"
)
# Any constant: the key of the PostgreSQL advisory lock migrations take.
_MIGRATION_LOCK = 0x6D6F64677564


# -- connections -------------------------------------------------------------------------------


class Connection:
    """One connection, either engine: statements in SQLite's spelling, `?` parameters."""

    def __init__(self, opener: Callable[[], Any], respell: bool) -> None:
        self._open = opener
        self.raw = opener()
        self._respell = respell

    def reopen(self) -> None:
        """A new connection in place of a lost one (raises the engine's error if none)."""
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001, S110 - it is being replaced
            pass
        self.raw = self._open()

    def _sql(self, sql: str) -> str:
        return _respell(sql) if self._respell else sql

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; the rows it changed."""
        cursor = self.raw.execute(self._sql(sql), params)
        return int(cursor.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        cursor = self.raw.cursor()
        try:
            cursor.executemany(self._sql(sql), rows)
        finally:
            cursor.close()

    def tuples(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        cursor = self.raw.execute(self._sql(sql), params)
        return [tuple(row) for row in cursor.fetchall()]

    def dicts(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        cursor = self.raw.execute(self._sql(sql), params)
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def one(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        row = self.raw.execute(self._sql(sql), params).fetchone()
        return tuple(row) if row is not None else None

    @contextmanager
    def transaction(self, *, exclusive: bool = False) -> Iterator[None]:
        """Everything inside commits together or not at all. `exclusive`: no other
        writer until the end (SQLite: BEGIN IMMEDIATE)."""
        if self._respell:
            with self.raw.transaction():
                yield
            return
        if exclusive:
            self.raw.execute("BEGIN IMMEDIATE")
        else:
            self.raw.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.raw.execute("ROLLBACK")
            raise
        self.raw.execute("COMMIT")

    @property
    def broken(self) -> bool:
        """The connection is lost (PostgreSQL restarted, network): open another."""
        return bool(getattr(self.raw, "broken", False))

    def close(self) -> None:
        self.raw.close()


@lru_cache(maxsize=512)
def _respell(sql: str) -> str:
    """A statement in SQLite's spelling, in PostgreSQL's (psycopg's `%s` parameters, a
    literal `%` doubled). The statements are modgud's own and hold no `?` inside string
    literals."""
    sql = sql.replace("%", "%%").replace("?", "%s")
    sql = re.sub(r"\binstr\(", "strpos(", sql)
    sql = re.sub(r"GROUP_CONCAT\(DISTINCT ([\w.]+)\)", r"string_agg(DISTINCT \1, ',')", sql)
    return re.sub(r"\browid\b", "ctid", sql)


# -- news: commits other processes should hear of at once -----------------------------------------


class NewsWaiter:
    """Waits for news (SQLite: only the time; its followers poll)."""

    def wait(self, timeout: float) -> bool:
        """Until news arrive or `timeout` passes; whether news arrived."""
        time.sleep(timeout)
        return False

    def close(self) -> None:
        pass


class PostgresNews(NewsWaiter):
    """A connection LISTENing for modgud_news: a replica hears of another's refusal or a
    module's state change as it commits, not at its next poll. Lost connections are
    opened again at the next wait (meanwhile it waits out the timeout: a poll)."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self._conn: Connection | None = None

    def wait(self, timeout: float) -> bool:
        conn = self._conn
        if conn is None or conn.broken:
            try:
                conn = self._conn = self.database.connect(timeout=max(1.0, timeout))
                conn.execute("LISTEN modgud_news")
            except self.database.errors.any:
                self._conn = None
                time.sleep(timeout)
                return False
        try:
            heard = any(True for _ in conn.raw.notifies(timeout=timeout, stop_after=1))
            if heard:  # take what else is queued: one read covers all of it
                for _ in conn.raw.notifies(timeout=0.001):
                    pass
            return heard
        except self.database.errors.any:
            self.close()
            return False

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


# -- engines -----------------------------------------------------------------------------------


class Database:
    """Where modgud's records live: `open_db(target)` picks the engine."""

    engine = ""
    errors: DatabaseErrors

    def __init__(self, target: str) -> None:
        self.target = target

    def connect(self, *, read_only: bool = False, timeout: float = 30.0) -> Connection:
        raise NotImplementedError

    @contextmanager
    def reader(self, timeout: float = 5.0) -> Iterator[Connection]:
        """A connection for a few reads, given back after (SQLite: a new read-only one,
        cheap; PostgreSQL: one of a small pool, since the edge reads every half second)."""
        conn = self.connect(read_only=True, timeout=timeout)
        try:
            yield conn
        finally:
            conn.close()

    def describe(self) -> str:
        raise NotImplementedError

    def size_bytes(self) -> int | None:
        """The database's size on disk (None: unknown)."""
        raise NotImplementedError

    def _lock_for_migration(self, conn: Connection) -> None:
        """Inside the migration's transaction: hold off other processes' migrations."""

    def announce(self, conn: Connection) -> None:
        """Inside a transaction that records news (findings, state changes, knocks): wake
        the processes following the database when it commits (PostgreSQL's NOTIFY; on
        SQLite, one machine's processes poll)."""

    def news(self) -> NewsWaiter:
        """Something to wait on for the next commit that `announce`d news."""
        return NewsWaiter()

    def check(self) -> str:
        """What `check-config` says of the database after opening it (without changing
        it): its engine, where, and its schema. Raises DatabaseError when `run` could not
        use it."""
        new = self._not_there_yet()
        if new is not None:
            return f"{self.describe()}: {new}"
        try:
            conn = self.connect(read_only=True, timeout=5.0)
            try:
                server = self._server(conn)
                tables = self._has_table(conn, "findings")
                version = self._version(conn) if self._has_table(conn, "modgud_schema") else 0
            finally:
                conn.close()
        except self.errors.any as e:
            raise DatabaseError(f"{self.describe()}: {str(e).strip()}") from None
        if version > LATEST_VERSION:
            raise self._too_new(version)
        if version == 0:
            schema = (
                f"tables from before schema versions, upgraded to {LATEST_VERSION} at start"
                if tables
                else "no modgud tables yet (created at start)"
            )
        elif version < LATEST_VERSION:
            schema = f"schema version {version}, upgraded to {LATEST_VERSION} at start"
        else:
            schema = f"schema version {version}"
        return f"{self.describe()}{server}: {schema}"

    def _not_there_yet(self) -> str | None:
        """What check() says of a database `run` will create (None: it exists); raises
        DatabaseError when `run` could not create it."""
        return None

    def _server(self, conn: Connection) -> str:
        """The server's release, as check() shows it after the name ("" for none)."""
        return ""

    def _has_table(self, conn: Connection, name: str) -> bool:
        raise NotImplementedError

    @staticmethod
    def _version(conn: Connection) -> int:
        row = conn.one("SELECT COALESCE(MAX(version), 0) FROM modgud_schema")
        return int(row[0]) if row else 0

    def _too_new(self, version: int) -> DatabaseError:
        return DatabaseError(
            f"{self.describe()} has schema version {version}, newer than this modgud's "
            f"{LATEST_VERSION}: upgrade modgud"
        )

    def version(self) -> int:
        """The schema version the database has (0: none, or not created yet)."""
        try:
            with self.reader() as conn:
                return self._version(conn) if self._has_table(conn, "modgud_schema") else 0
        except self.errors.any:
            return 0  # no database yet

    def migrate(self) -> int:
        """Apply the migrations the database lacks; the version it has now. Raises
        DatabaseError when it cannot be opened or is newer than this modgud."""
        try:
            conn = self.connect()
        except self.errors.any as e:
            raise DatabaseError(f"cannot open {self.describe()}: {e}") from None
        try:
            with conn.transaction(exclusive=True):
                self._lock_for_migration(conn)
                conn.execute(_VERSIONS)
                current = self._version(conn)
                if current > LATEST_VERSION:
                    raise self._too_new(current)
                for migration in MIGRATIONS[current:]:
                    for statement in getattr(migration, self.engine):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO modgud_schema (version, applied_at, description) "
                        "VALUES (?, ?, ?)",
                        (migration.version, time.time(), migration.description),
                    )
            return max(current, LATEST_VERSION)
        except self.errors.any as e:
            raise DatabaseError(f"cannot set up {self.describe()}: {e}") from None
        finally:
            conn.close()


class SqliteDatabase(Database):
    engine = "sqlite"
    errors = DatabaseErrors(
        any=(sqlite3.Error,),
        unstorable=(UnicodeEncodeError,),
        permanent=(
            sqlite3.IntegrityError,
            sqlite3.InterfaceError,
            sqlite3.ProgrammingError,
            ValueError,
            TypeError,
        ),
    )

    def connect(self, *, read_only: bool = False, timeout: float = 30.0) -> Connection:
        def opener() -> sqlite3.Connection:
            if read_only:
                return sqlite3.connect(
                    f"file:{self.target}?mode=ro", uri=True, timeout=timeout, isolation_level=None
                )
            raw = sqlite3.connect(
                self.target, timeout=timeout, check_same_thread=False, isolation_level=None
            )
            # Switching a new database to WAL answers "locked" at once, without waiting
            # as other statements do, while another connection holds it (processes
            # starting together): wait here as `timeout` says.
            deadline = time.monotonic() + timeout
            while True:
                try:
                    raw.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raw.close()
                        raise
                    time.sleep(0.02)
            raw.execute("PRAGMA synchronous=NORMAL")
            return raw

        return Connection(opener, respell=False)

    def describe(self) -> str:
        return f"SQLite database {self.target}"

    def _not_there_yet(self) -> str | None:
        path = self.target
        if os.path.exists(path):
            if not os.access(path, os.R_OK | os.W_OK):
                raise DatabaseError(f"{self.describe()}: not readable and writable by this user")
            return None
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise DatabaseError(f"{self.describe()}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise DatabaseError(f"{self.describe()}: directory {parent} is not writable")
        return "new, created at start"

    def _has_table(self, conn: Connection, name: str) -> bool:
        row = conn.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        return row is not None

    def size_bytes(self) -> int | None:
        paths = (self.target, self.target + "-wal")
        return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


class PostgresDatabase(Database):
    engine = "postgresql"

    def __init__(self, target: str) -> None:
        super().__init__(target)
        import psycopg  # noqa: PLC0415 - only for a PostgreSQL URL (not inside Synapse's SQLite)

        self._psycopg = psycopg
        self._pool: Any = None
        self._lock = threading.Lock()
        self.errors = DatabaseErrors(
            any=(psycopg.Error,),
            unstorable=(UnicodeEncodeError, psycopg.DataError),
            permanent=(
                psycopg.IntegrityError,
                psycopg.ProgrammingError,
                psycopg.DataError,
                ValueError,
                TypeError,
            ),
        )

    def connect(self, *, read_only: bool = False, timeout: float = 30.0) -> Connection:
        def opener() -> Any:
            raw = self._psycopg.connect(
                self.target, autocommit=True, connect_timeout=max(1, int(timeout))
            )
            if read_only:
                raw.read_only = True
            return raw

        return Connection(opener, respell=True)

    @contextmanager
    def reader(self, timeout: float = 5.0) -> Iterator[Connection]:
        with self._lock:
            if self._pool is None:
                from psycopg_pool import ConnectionPool  # noqa: PLC0415 - PostgreSQL only

                self._pool = ConnectionPool(
                    self.target,
                    min_size=1,
                    max_size=4,
                    kwargs={"autocommit": True},
                    # A connection PostgreSQL dropped (a restart) is replaced, not lent.
                    check=ConnectionPool.check_connection,
                    max_idle=60.0,
                    timeout=timeout,
                    name="modgud-readers",
                    open=True,
                )
            pool = self._pool
        with pool.connection(timeout=timeout) as raw:
            yield Connection(lambda: raw, respell=True)

    def describe(self) -> str:
        parts = urlsplit(self.target)
        host = parts.hostname or "localhost"
        where = f"{parts.username + '@' if parts.username else ''}{host}"
        where += f":{parts.port}" if parts.port else ""
        return f"PostgreSQL database {where}{parts.path or ''}"  # never the password

    def _server(self, conn: Connection) -> str:
        row = conn.one("SHOW server_version")
        return f" (server {row[0]})" if row else ""

    def _has_table(self, conn: Connection, name: str) -> bool:
        row = conn.one("SELECT to_regclass(?) IS NOT NULL", (name,))
        return bool(row and row[0])

    def size_bytes(self) -> int | None:
        try:
            with self.reader() as conn:
                row = conn.one("SELECT pg_database_size(current_database())")
        except self.errors.any:
            return None
        return int(row[0]) if row else None

    def _lock_for_migration(self, conn: Connection) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def announce(self, conn: Connection) -> None:
        conn.execute("NOTIFY modgud_news")

    def news(self) -> NewsWaiter:
        return PostgresNews(self)


@contextmanager
def reading(target: str, timeout: float = 5.0) -> Iterator[Connection]:
    """A read-only connection to `target` for a few queries, closed after; the engine's
    errors raised as DatabaseError naming the database."""
    db = open_db(target)
    try:
        with db.reader(timeout) as conn:
            yield conn
    except db.errors.any as e:
        raise DatabaseError(f"{db.describe()}: {e}") from None


@contextmanager
def writing(target: str, *, migrate: bool = True) -> Iterator[Connection]:
    """A connection to `target` (its schema brought up to date, unless the caller knows
    it is: `migrate=False`) with one transaction around what is done with it, closed
    after; the engine's errors raised as DatabaseError naming the database. For a
    command's single write (the store's writer keeps a connection of its own)."""
    db = open_db(target)
    if migrate:
        db.migrate()
    try:
        conn = db.connect()
        try:
            with conn.transaction():
                yield conn
        finally:
            conn.close()
    except db.errors.any as e:
        raise DatabaseError(f"{db.describe()}: {e}") from None


@lru_cache(maxsize=64)
def open_db(target: str) -> Database:
    """The database `target` names: a postgresql:// URL, else an SQLite path (one object
    per target in a process: it holds PostgreSQL's pool of readers). Raises DatabaseError
    for a PostgreSQL URL when psycopg is not installed."""
    if is_postgres(target):
        try:
            return PostgresDatabase(target)
        except ImportError:
            raise DatabaseError(
                "database is a PostgreSQL URL but psycopg is not installed "
                "(pip install 'psycopg[binary]' in this environment)"
            ) from None
    return SqliteDatabase(target)
