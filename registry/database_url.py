"""Which database a registry keeps its metadata in: the data folder's SQLite file, or PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .db import Database
from .pg_db import PostgresDatabase

AnyDatabase = Union[Database, PostgresDatabase]

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(database: str | None) -> bool:
    return bool(database) and database.lower().startswith(POSTGRES_SCHEMES)  # type: ignore[union-attr]


def check_database_url(database: str) -> str:
    """``database`` if it is a PostgreSQL URL, else a ValueError saying what is accepted."""
    if not is_postgres_url(database):
        raise ValueError(
            f"unsupported database {database!r}: pass a PostgreSQL URL such as "
            "postgresql://user@host:5432/registry (leave --database out for the data folder's SQLite file)"
        )
    return database


def open_database(database: str | None, data_dir: Path) -> AnyDatabase:
    """The database at ``database`` (a PostgreSQL URL), or by default ``data_dir/registry.db`` (SQLite)."""
    if database is None:
        return Database(data_dir / "registry.db")
    return PostgresDatabase(check_database_url(database))
