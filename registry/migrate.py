"""``peftkit registry migrate --to postgresql://...``: copy a SQLite registry's metadata to PostgreSQL.

Every row of every table is copied in one PostgreSQL transaction (all or nothing) from one
consistent snapshot of the SQLite file, then checked: each table's row count and an
order-independent digest of its rows must be equal on both sides. The free-text index is
rebuilt from the copied text with PostgreSQL's own. The registry's id goes with the rows, so the
blob store's marker (see :mod:`peftkit.registry.identity`) names the PostgreSQL registry too.
Blobs are not copied: they stay in
the data folder, which the servers then use with ``--blobs`` (or which is moved, as it is,
to the shared path they use). The target must be empty: nothing there is overwritten.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .db import Database
from .pg_db import PgConnection, PostgresDatabase
from .pg_schema import TABLES, document_of

_BATCH = 1000


class MigrationError(RuntimeError):
    """The registry could not be migrated; the target was left as it was."""


@dataclass
class MigrationReport:
    """What was copied: ``{table: rows}``, and the registry's id (the same on both sides)."""

    rows: dict[str, int] = field(default_factory=dict)
    registry_id: str = ""

    @property
    def total(self) -> int:
        return sum(self.rows.values())


def _digest(rows: Iterable[Iterable[Any]]) -> tuple[int, int]:
    """(count, sum of the rows' sha256 mod 2**256): equal for equal multisets of rows, in any order."""
    count, total = 0, 0
    for row in rows:
        count += 1
        total = (total + int.from_bytes(hashlib.sha256(repr(tuple(row)).encode()).digest(), "big")) % (1 << 256)
    return count, total


def _columns(src: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in src.execute(f"PRAGMA table_info({table})")]  # noqa: S608 - fixed table names


def _select(table: str, columns: list[str]) -> str:
    return f"SELECT {', '.join(f'{chr(34)}{c}{chr(34)}' for c in columns)} FROM {table}"  # noqa: S608


def _copy_table(src: sqlite3.Connection, dst: PgConnection, table: str) -> int:
    columns = _columns(src, table)
    insert = (f"INSERT INTO {table}({', '.join(chr(34) + c + chr(34) for c in columns)})"
              f" VALUES ({', '.join('?' * len(columns))})")
    cur = src.execute(_select(table, columns))
    copied = 0
    while batch := cur.fetchmany(_BATCH):
        dst.executemany(insert, [tuple(r) for r in batch])
        copied += len(batch)
    return copied


def _copy_search_index(src: sqlite3.Connection, dst: PgConnection) -> int:
    cur = src.execute("SELECT rowid, repo_words, body FROM repo_search")
    copied = 0
    while batch := cur.fetchmany(_BATCH):
        dst.executemany(
            "INSERT INTO repo_search(rowid, repo_words, body, doc) VALUES (?, ?, ?, to_tsvector('simple', ?))",
            [(rid, words or "", body or "", document_of(words or "", body or "")) for rid, words, body in batch],
        )
        copied += len(batch)
    return copied


def migrate_to_postgres(data_dir: Path, url: str) -> MigrationReport:
    """Copy the registry metadata in ``data_dir/registry.db`` into the empty PostgreSQL database ``url``."""
    path = Path(data_dir) / "registry.db"
    if not path.is_file():
        raise MigrationError(f"{data_dir} holds no registry (no registry.db); pass the data folder with --data DIR")
    Database(path).close()  # a registry of an older schema is upgraded first (its storage counted)
    src = sqlite3.connect(f"file:{path.as_posix()}?mode=ro", uri=True)
    target = PostgresDatabase(url)
    report = MigrationReport()
    try:
        src.execute("BEGIN")  # one snapshot, even while a server still writes
        with target.write() as dst:
            busy = [t for t in (*TABLES, "repo_search") if dst.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone()]  # noqa: S608
            if busy:
                raise MigrationError(
                    f"the target database already holds registry data (in {', '.join(busy)}); "
                    "migrate into a new, empty database"
                )
            for table in TABLES:
                report.rows[table] = _copy_table(src, dst, table)
            report.rows["repo_search"] = _copy_search_index(src, dst)
            # The copy is the same registry: its blob store's marker must name it alike.
            (report.registry_id,) = src.execute("SELECT registry_id FROM registry_identity").fetchone()
            dst.execute("UPDATE registry_identity SET registry_id = ?", (report.registry_id,))
            # New repos continue after the copied ids.
            dst.execute("SELECT setval(pg_get_serial_sequence('repos', 'id'), COALESCE(MAX(id), 0) + 1, false)"
                        " FROM repos")
            # Checked before the copy commits: a difference leaves the target empty.
            for table in TABLES:
                columns = _columns(src, table)
                if _digest(src.execute(_select(table, columns))) != _digest(dst.execute(_select(table, columns))):
                    raise MigrationError(f"table {table} differs after the copy; nothing was committed")
    finally:
        src.close()
        target.close()
    return report
