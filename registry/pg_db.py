"""PostgreSQL access with the interface of :class:`peftkit.registry.db.Database`.

Several registry servers (on several hosts) share one PostgreSQL database. The
guarantees are those of the SQLite store:

* every write transaction first takes one transaction-level advisory lock, so
  writes are serialised across every server as SQLite serialises them on one
  host: a commit sees the branch head as the previous writer left it (one
  winner per ``parent_commit`` race), and ``gc`` scans with no writer running;
* writes run at READ COMMITTED, so a writer that waited for the lock reads
  what the previous one committed; reads run in a REPEATABLE READ, READ ONLY
  transaction: one consistent snapshot for several SELECTs.

The driver is psycopg 3 (the ``registry`` extra); statements are the store's
own, adapted by :func:`peftkit.registry.pg_schema.translate`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .identity import ensure_registry_id
from .pg_schema import SCHEMA, SCHEMA_VERSION, translate
from .quotas import recount_all

#: Connections one process keeps at most: size PostgreSQL's ``max_connections`` to this times the
#: number of server processes (plus the CLI's). A thread wanting more waits for one to be handed back.
MAX_CONNECTIONS = 16

# Any fixed 64-bit number: the lock every registry write takes.
_WRITE_LOCK_KEY = 0x7065_6674_6B69_7431


class Row(tuple):
    """A result row readable by position and by column name, like ``sqlite3.Row``."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], index: dict[str, int]) -> "Row":
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any):
    index = {col.name: i for i, col in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


class PgConnection:
    """One psycopg connection with sqlite3's ``execute``/``executemany`` calling convention."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cur = self.raw.cursor()
        cur.execute(translate(sql), tuple(params))
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cur = self.raw.cursor()
        rows = [tuple(r) for r in rows]
        if rows:
            cur.executemany(translate(sql), rows)
        return cur

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE


def _psycopg():
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "a postgresql:// database needs psycopg 3: pip install 'peftkit[registry]' (or 'psycopg[binary]')"
        ) from exc
    return psycopg


class PostgresDatabase:
    """A pool of connections to one PostgreSQL database (``postgresql://user@host/db``)."""

    kind = "postgresql"
    fts5 = False  # free text uses PostgreSQL's full-text search, not SQLite's FTS5

    def __init__(
        self, url: str, *, connect_timeout_s: float = 10.0, max_connections: int = MAX_CONNECTIONS,
        wait_timeout_s: float = 60.0,
    ) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.wait_timeout_s = wait_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        self._pool: list[PgConnection] = []
        self._all: list[PgConnection] = []
        self._pool_lock = threading.Lock()
        self.write_lock = threading.RLock()
        self._closed = False
        psycopg = _psycopg()
        try:
            probe = self._connect()
        except psycopg.OperationalError as exc:
            raise RuntimeError(f"cannot connect to the registry database {redact(url)}: {exc}".strip()) from None
        with self._pool_lock:
            self._all.append(probe)
            self._pool.append(probe)
        with self.write() as conn:  # the lock: servers starting together create the schema once
            conn.raw.execute(SCHEMA)
            row = conn.execute("SELECT version FROM registry_schema").fetchone()
            if row is None:
                conn.execute("INSERT INTO registry_schema(version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{redact(url)} was written by a newer peftkit (schema {row[0]} > {SCHEMA_VERSION}); "
                    "upgrade peftkit to open it"
                )
            elif row[0] < SCHEMA_VERSION:
                if row[0] < 4:  # made before quotas (2) or before metadata counted (4): count each repo once
                    conn.execute("ALTER TABLE repo_storage ADD COLUMN IF NOT EXISTS metadata_bytes BIGINT NOT NULL"
                                 " DEFAULT 0")
                    recount_all(conn)
                conn.execute("UPDATE registry_schema SET version = ?", (SCHEMA_VERSION,))
            #: This registry's id (what its blob store's marker must name): a new registry's, or one made
            #: before ids (schema < 3), is created here.
            self.registry_id: str = ensure_registry_id(conn)

    def describe(self) -> str:
        """Where the metadata is, for messages (the URL without its password)."""
        return redact(self.url)

    def _connect(self) -> PgConnection:
        psycopg = _psycopg()
        raw = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s)))
        raw.row_factory = _row_factory
        return PgConnection(raw)

    def _take(self) -> PgConnection:
        """A pooled connection, or a new one while fewer than ``max_connections`` are open."""
        if self._closed:
            raise RuntimeError("the registry store is closed")
        if not self._slots.acquire(timeout=self.wait_timeout_s):
            raise RuntimeError(
                f"every connection to the registry database was busy for {self.wait_timeout_s:.0f} s; "
                "is the database overloaded?"
            )
        try:
            with self._pool_lock:
                if self._pool:
                    return self._pool.pop()
            fresh = self._connect()
        except BaseException:
            self._slots.release()
            raise
        with self._pool_lock:
            self._all.append(fresh)
        return fresh

    @contextmanager
    def connection(self) -> Iterator[PgConnection]:
        conn = self._take()
        healthy = True
        try:
            yield conn
        finally:
            try:
                if conn.in_transaction:  # never hand back a connection mid-transaction
                    conn.raw.execute("ROLLBACK")
            except Exception:  # a broken connection (server restarted): drop it
                healthy = False
            healthy = healthy and not conn.raw.closed
            with self._pool_lock:
                if healthy:
                    self._pool.append(conn)
                else:
                    self._all.remove(conn)
            self._slots.release()
            if not healthy:
                _close_quietly(conn)

    @contextmanager
    def read(self) -> Iterator[PgConnection]:
        """A consistent snapshot for several SELECTs."""
        with self.connection() as conn:
            conn.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                yield conn
            finally:
                conn.raw.execute("ROLLBACK")

    @contextmanager
    def write(self) -> Iterator[PgConnection]:
        """One write transaction, serialised with every other registry writer on this database."""
        with self.write_lock, self.connection() as conn:
            conn.raw.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            try:
                conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK_KEY,))
                yield conn
            except BaseException:
                if not conn.raw.closed:
                    conn.raw.execute("ROLLBACK")
                raise
            conn.raw.execute("COMMIT")

    def close(self) -> None:
        self._closed = True
        with self._pool_lock:
            for conn in self._all:
                _close_quietly(conn)
            self._all.clear()
            self._pool.clear()


def _close_quietly(conn: PgConnection) -> None:
    try:
        conn.raw.close()
    except Exception:  # noqa: BLE001 - closing a broken connection
        pass


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, hostpart = rest.partition("@")
    user, colon, password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if password else colon}@{hostpart}"  # an empty password stays empty
