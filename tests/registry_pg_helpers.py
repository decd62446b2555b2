"""A PostgreSQL server for the registry's PostgreSQL tests (imported by tests/test_registry_pg_*.py).

The server comes from the ``pgserver`` package (PostgreSQL's own binaries in a wheel, in the
test extra) and listens on a unix socket in a temporary folder. PostgreSQL refuses to run as
root; pgserver then runs it as a dedicated unprivileged system user (``pgserver``) that it
creates. One server per test session; each test gets its own fresh database.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator

import pytest

_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    try:
        import pgserver
        import psycopg  # noqa: F401 - the driver the registry uses
    except ImportError as exc:  # pragma: no cover - the test extra installs both
        pytest.skip(f"PostgreSQL tests need the test and registry extras (pgserver, psycopg): {exc}")
    folder = tempfile.mkdtemp(prefix="peftkit-pg-")
    try:
        server = pgserver.get_server(folder, cleanup_mode="delete")
    except Exception as exc:  # noqa: BLE001 - the packaged PostgreSQL cannot run on this machine at all
        pytest.skip(f"the packaged PostgreSQL (pgserver) cannot run on this machine: {exc}")
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a new, empty database on the session's server."""
    import psycopg

    name = f"reg_{next(_counter)}"
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return pg_server.get_uri(name)
