"""SQLite access: schema, a small connection pool, read and write transactions.

WAL mode lets readers run while one writer commits. Writes are serialised by a
process-wide lock (so in-process writers queue instead of spinning in SQLite's
busy handler) and ``BEGIN IMMEDIATE`` (so writers in other processes, e.g. the
CLI adding a token while the server runs, wait for the database lock).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .identity import ensure_registry_id
from .quotas import recount_all

# 2: storage accounting (repo_blobs, repo_storage) and quotas (namespace_quotas); a registry of
# version 1 is counted once when first opened (see peftkit.registry.quotas).
# 3: the registry's id (registry_identity), which its blob store's marker names (see
# peftkit.registry.identity); a registry of an older version gets one when first opened.
# 4: metadata counts against quotas (repo_storage.metadata_bytes, repo_trees); a registry of an older
# version is counted again once when first opened.
SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    id            INTEGER PRIMARY KEY,
    repo_id       TEXT NOT NULL UNIQUE COLLATE NOCASE,
    namespace     TEXT NOT NULL COLLATE NOCASE,
    name          TEXT NOT NULL,
    private       INTEGER NOT NULL DEFAULT 0,
    owner         TEXT,
    created_at    REAL NOT NULL,
    last_modified REAL NOT NULL,
    downloads     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS repos_namespace ON repos(namespace);
CREATE INDEX IF NOT EXISTS repos_downloads ON repos(downloads DESC, last_modified DESC);
CREATE INDEX IF NOT EXISTS repos_recent ON repos(last_modified DESC);
CREATE INDEX IF NOT EXISTS repos_created ON repos(created_at DESC);

-- Branch heads. Commits are immutable; only refs move.
CREATE TABLE IF NOT EXISTS refs (
    repo   INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    PRIMARY KEY (repo, name)
);

-- Tags: named, fixed pointers to a commit (refs/tags/<name>). Unlike a
-- branch, no commit moves a tag; a tag and a branch never share a name.
CREATE TABLE IF NOT EXISTS tags (
    repo       INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    message    TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (repo, name)
);

-- Old names of moved repos: reads of the old name are redirected to the new
-- one until a repo is created under the old name again.
CREATE TABLE IF NOT EXISTS repo_redirects (
    old_id TEXT PRIMARY KEY COLLATE NOCASE,
    repo   INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE
);

-- Which clients (a hash of their address) already counted a download of a
-- repo today: each counts once per repo per UTC day. Past days are pruned.
CREATE TABLE IF NOT EXISTS download_clients (
    day    INTEGER NOT NULL,
    repo   INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    client TEXT NOT NULL,
    PRIMARY KEY (day, repo, client)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS download_clients_repo ON download_clients(repo);

CREATE TABLE IF NOT EXISTS commits (
    sha         TEXT PRIMARY KEY,
    repo        INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    parent      TEXT,
    tree        TEXT NOT NULL,
    message     TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    author      TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS commits_repo ON commits(repo, created_at DESC);
CREATE INDEX IF NOT EXISTS commits_tree ON commits(tree);

-- Flat trees, shared by every commit with the same content.
CREATE TABLE IF NOT EXISTS tree_entries (
    tree    TEXT NOT NULL,
    path    TEXT NOT NULL,
    sha256  TEXT NOT NULL,
    oid     TEXT NOT NULL,
    size    INTEGER NOT NULL,
    PRIMARY KEY (tree, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tree_entries_blob ON tree_entries(sha256);

-- Search metadata of each repo's main branch head.
CREATE TABLE IF NOT EXISTS repo_meta (
    repo         INTEGER PRIMARY KEY REFERENCES repos(id) ON DELETE CASCADE,
    library_name TEXT,
    pipeline_tag TEXT,
    card_json    TEXT NOT NULL DEFAULT '{}',
    meta_json    TEXT NOT NULL DEFAULT '{}'
);

-- Facets: kind in ('tag', 'method', 'task', 'base_model', 'dataset', 'library').
CREATE TABLE IF NOT EXISTS facets (
    kind  TEXT NOT NULL,
    value TEXT NOT NULL COLLATE NOCASE,
    repo  INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    PRIMARY KEY (kind, value, repo)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS facets_repo ON facets(repo);

CREATE TABLE IF NOT EXISTS accounts (
    name       TEXT PRIMARY KEY COLLATE NOCASE,
    kind       TEXT NOT NULL CHECK (kind IN ('user', 'org')),
    created_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS org_members (
    org  TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE,
    user TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE,
    PRIMARY KEY (org, user)
);

CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL REFERENCES accounts(name) ON DELETE CASCADE,
    name        TEXT NOT NULL DEFAULT '',
    write       INTEGER NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    last_used   REAL,
    revoked_at  REAL
);

-- Browser sign-ins to the web pages (registry/web): the sha256 of the session
-- cookie's secret, and the token the user signed in with (revoking it, or
-- signing out, ends the session).
CREATE TABLE IF NOT EXISTS web_sessions (
    secret_hash TEXT PRIMARY KEY,
    token_id    TEXT NOT NULL REFERENCES tokens(id) ON DELETE CASCADE,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS web_sessions_expiry ON web_sessions(expires_at);

-- Storage accounting (registry/quotas.py): the distinct blobs and trees each repo's commits hold, the
-- bytes of its files and of its metadata (by quotas.py's cost model).
CREATE TABLE IF NOT EXISTS repo_blobs (
    repo   INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    size   INTEGER NOT NULL,
    PRIMARY KEY (repo, sha256)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repo_blobs_size ON repo_blobs(repo, size);
CREATE TABLE IF NOT EXISTS repo_trees (
    repo INTEGER NOT NULL REFERENCES repos(id) ON DELETE CASCADE,
    tree TEXT NOT NULL,
    PRIMARY KEY (repo, tree)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS repo_storage (
    repo           INTEGER PRIMARY KEY REFERENCES repos(id) ON DELETE CASCADE,
    bytes          INTEGER NOT NULL,
    metadata_bytes INTEGER NOT NULL DEFAULT 0
);

-- Per-namespace storage limits set by `peftkit registry quota set` (over the server's default).
CREATE TABLE IF NOT EXISTS namespace_quotas (
    namespace   TEXT PRIMARY KEY COLLATE NOCASE,
    quota_bytes INTEGER NOT NULL,
    set_at      REAL NOT NULL
);

-- One row: this registry's random id, which its blob store's marker names (registry/identity.py).
CREATE TABLE IF NOT EXISTS registry_identity (
    registry_id TEXT NOT NULL
);
"""

_FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS repo_search USING fts5(
    repo_words, body, tokenize = 'unicode61 remove_diacritics 2'
);
"""

# Used only where the sqlite3 build lacks FTS5: same columns, searched with LIKE.
_FALLBACK_SEARCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS repo_search (
    rowid INTEGER PRIMARY KEY, repo_words TEXT, body TEXT
);
"""


def _fts5_available() -> bool:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE VIRTUAL TABLE t USING fts5(a)")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def _add_metadata_column(conn: sqlite3.Connection) -> None:
    """Give ``repo_storage`` of a registry of schema 2 or 3 its ``metadata_bytes`` (a newer table has it)."""
    if "metadata_bytes" not in {row[1] for row in conn.execute("PRAGMA table_info(repo_storage)")}:
        conn.execute("ALTER TABLE repo_storage ADD COLUMN metadata_bytes INTEGER NOT NULL DEFAULT 0")


def create_private(path: Path) -> None:
    """Create the database file readable by its owner only (``0o600``), whatever the umask: it
    holds the access tokens' hashes. SQLite gives its ``-wal`` and ``-shm`` files the same mode.
    An existing file is left as it is."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


class Database:
    """A pool of connections to one SQLite file."""

    kind = "sqlite"

    def __init__(self, path: Path, *, busy_timeout_s: float = 60.0, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.synchronous = synchronous
        self._pool: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self.write_lock = threading.RLock()
        self._closed = False
        create_private(self.path)
        self.fts5 = _fts5_available()
        # executescript() runs in autocommit; every statement is idempotent.
        with self.write_lock, self.connection() as conn:
            conn.executescript(_SCHEMA)
            conn.executescript(_FTS_SCHEMA if self.fts5 else _FALLBACK_SEARCH_SCHEMA)
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} was written by a newer peftkit (schema {version} > {SCHEMA_VERSION}); "
                    "upgrade peftkit to open it"
                )
            if version < SCHEMA_VERSION:
                self._upgrade(conn)
            #: This registry's id (what its blob store's marker must name); fixed once created.
            self.registry_id: str = conn.execute("SELECT registry_id FROM registry_identity").fetchone()[0]

    @staticmethod
    def _upgrade(conn: sqlite3.Connection) -> None:
        """Bring a registry of an older schema (or a new, empty one) to this one, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()  # another process may have done it
            if version < 3:
                ensure_registry_id(conn)
            if version < 4:  # before 2 nothing was counted, before 4 no metadata: count everything once
                _add_metadata_column(conn)
                recount_all(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.rollback()
            raise
        conn.commit()

    def describe(self) -> str:
        """Where the metadata is, for messages."""
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
        return conn

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise RuntimeError("the registry store is closed")
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self._connect()
            with self._pool_lock:
                self._all.append(conn)
        try:
            yield conn
        finally:
            if conn.in_transaction:  # never hand back a connection mid-transaction
                conn.rollback()
            with self._pool_lock:
                self._pool.append(conn)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several SELECTs."""
        with self.connection() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.rollback()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything in the block commits, or nothing does."""
        with self.write_lock, self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    def backup(self, dest: Path) -> None:
        """Online, consistent copy of the database (sqlite's backup API)."""
        dest = Path(dest)
        with self.connection() as conn:
            create_private(dest)
            target = sqlite3.connect(dest)
            try:
                conn.backup(target)
            finally:
                target.close()

    def close(self) -> None:
        self._closed = True
        with self._pool_lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
            self._pool.clear()
