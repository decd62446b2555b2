"""A PostgreSQL server for the registry's PostgreSQL tests (imported by tests/test_registry_pg_*.py,
and by bench/bench_registry_cluster.py through :func:`start_postgres` and :func:`create_database`).

The server comes from the ``pgserver`` package (PostgreSQL's own binaries in a wheel, in the
test extra) and listens on a unix socket in a temporary folder. PostgreSQL refuses to run as
root; pgserver then runs it as a dedicated unprivileged system user (``pgserver``) that it
creates. One server per test session; each test gets its own fresh database.
"""

from __future__ import annotations

import functools
import itertools
import tempfile
from pathlib import Path

import pytest

_counter = itertools.count()


def start_postgres(folder: str | Path) -> object:
    """A PostgreSQL server (pgserver's ``PostgresServer``) with its data in ``folder``; pgserver
    stops it and deletes the folder when this process exits (or on its ``cleanup()``)."""
    import pgserver

    return pgserver.get_server(folder, cleanup_mode="delete")


def create_database(server: object, name: str) -> str:
    """Create the empty database ``name`` on ``server``; returns its ``postgresql://`` URL."""
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.get_uri(name)


@functools.cache
def _shared_server() -> object:
    """The session's one PostgreSQL server, whichever test module asks first (each module that
    imports the fixture gets its own fixture definition; they all share this server)."""
    return start_postgres(tempfile.mkdtemp(prefix="peftkit-pg-"))


@pytest.fixture(scope="session")
def pg_server() -> object:
    try:
        import pgserver  # noqa: F401 - the packaged PostgreSQL
        import psycopg  # noqa: F401 - the driver the registry uses
    except ImportError as exc:  # pragma: no cover - the test extra installs both
        pytest.skip(f"PostgreSQL tests need the test and registry extras (pgserver, psycopg): {exc}")
    try:
        return _shared_server()
    except Exception as exc:  # noqa: BLE001 - the packaged PostgreSQL cannot run on this machine at all
        pytest.skip(f"the packaged PostgreSQL (pgserver) cannot run on this machine: {exc}")


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a new, empty database on the session's server."""
    return create_database(pg_server, f"reg_{next(_counter)}")
