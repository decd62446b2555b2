"""Which registry a blob store belongs to: the id in the database and the marker beside the blobs.

Two registries (each its own database) pointed at one blob store by mistake never lack their own files,
so `gc`'s check for missing files let `gc` of one delete every file of the other. Now a store carries a
marker naming its registry: another registry's open is refused before any work, an older unmarked store
is marked when that is safe, `registry migrate` carries the id, and `registry adopt-blobs` moves a store
on purpose. Real stores throughout: folders, moto's S3 server, the packaged PostgreSQL, served registries.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.registry_conftest_helpers import (  # noqa: F401 - hf_online is a fixture
    hf_online,
    start_cli_server,
    stop_process,
    write_adapter_folder,
)
from tests.registry_pg_helpers import create_database, pg_server, pg_url  # noqa: F401 - fixtures
from tests.registry_s3_helpers import moto_endpoint, s3_blobs  # noqa: F401 - fixtures

from peftkit.registry import RegistryStore
from peftkit.registry.cli import registry_group
from peftkit.registry.identity import MARKER_NAME, ForeignBlobStore


def _team_a(data: Path, blobs: str | Path | None, database: str | None = None) -> tuple[str, set[str], str]:
    """Registry A: a commit and an unreferenced blob (a failed commit's) in ``blobs``; returns its id,
    every blob it put there, and the unreferenced one."""
    with RegistryStore(data, fsync=False, blobs=blobs, database=database) as store:
        store.create_repo("alice/a")
        store.commit("alice/a", {"weights.bin": b"A's weights" * 100, "README.md": b"A's card"})
        staged = store.blobs.stage_bytes(b"A's failed commit")
        store.blobs.publish(staged)
        return store.registry_id, set(store.blobs.iter_all()), staged.sha256


def _blobs_in(data: Path, blobs: str | Path | None, database: str | None = None) -> set[str]:
    with RegistryStore(data, fsync=False, blobs=blobs, database=database) as store:
        return set(store.blobs.iter_all())


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(registry_group, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def _refused_for_both(code: int, out: str, own: str, other: str) -> None:
    assert code == 1, out
    assert "belongs to another registry" in out and f"registry {other}" in out and f"registry {own}" in out, out
    assert f"adopt-blobs --replacing {other}" in out and "point --blobs at this registry's own store" in out.lower()


def _registry_id_of(data: Path, database: str | None = None) -> str:
    if database is None:
        with sqlite3.connect(data / "registry.db") as conn:
            return conn.execute("SELECT registry_id FROM registry_identity").fetchone()[0]
    from peftkit.registry.pg_db import PostgresDatabase

    db = PostgresDatabase(database)
    try:
        return db.registry_id
    finally:
        db.close()


# ------------------------------------------------------- two registries, one store
@pytest.mark.parametrize("kind", ["folder", "s3"])
def test_a_second_registry_on_a_store_is_refused_and_its_gc_deletes_nothing(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    shared = request.getfixturevalue("s3_blobs") if kind == "s3" else str(tmp_path / "shared")
    a_id, a_blobs, a_stray = _team_a(tmp_path / "a", shared)
    # Team B's new registry, its files in its own data folder, then pointed at A's store by mistake.
    with RegistryStore(tmp_path / "b", fsync=False) as b:
        b.create_repo("bob/b")
        b.commit("bob/b", {"bob.bin": b"B's own"})
        b_id = b.registry_id
    assert a_id != b_id
    with pytest.raises(ForeignBlobStore) as refused:
        RegistryStore(tmp_path / "b-new", fsync=False, blobs=shared)  # a new registry on A's store
    assert "belongs to another registry" in str(refused.value)
    for command in ("gc", "reindex", "fsck"):  # B's database with A's store: refused before any work
        code, out = _invoke(command, "--data", tmp_path / "b", "--blobs", shared)
        _refused_for_both(code, out, b_id, a_id)
    code, out = _invoke("gc", "--data", tmp_path / "b-new", "--blobs", shared)  # refers to nothing: all A's
    assert code == 1 and "belongs to another registry" in out, out
    assert _blobs_in(tmp_path / "a", shared) == a_blobs

    # A's own gc deletes only A's failed commit; B's files are untouched in B's store.
    code, out = _invoke("gc", "--data", tmp_path / "a", "--blobs", shared)
    assert code == 0 and "removed 1 unreferenced blob(s)" in out, out
    assert _blobs_in(tmp_path / "a", shared) == a_blobs - {a_stray}
    with RegistryStore(tmp_path / "b", fsync=False) as b:
        assert b.read_file("bob/b", "bob.bin") == b"B's own" and b.fsck() == []


def test_serve_of_another_registry_on_a_store_stops_at_startup(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    a_id, a_blobs, _ = _team_a(tmp_path / "a", shared)
    with RegistryStore(tmp_path / "b", fsync=False):
        pass
    with pytest.raises(AssertionError, match="belongs to another registry") as refused:
        proc, _, _ = start_cli_server(tmp_path / "b", "--blobs", str(shared))
        stop_process(proc)  # only when the old code served it
    assert f"registry {a_id}" in str(refused.value)
    assert _blobs_in(tmp_path / "a", shared) == a_blobs


def test_a_postgresql_registry_and_a_sqlite_one_on_one_store(
    tmp_path: Path, pg_server, pg_url: str  # noqa: F811
) -> None:
    shared = tmp_path / "shared"
    a_id, a_blobs, _ = _team_a(tmp_path / "a", shared, database=pg_url)
    assert a_id == _registry_id_of(tmp_path / "a", pg_url)
    with RegistryStore(tmp_path / "b", fsync=False):
        b_id = _registry_id_of(tmp_path / "b")
    code, out = _invoke("gc", "--data", tmp_path / "b", "--blobs", shared)
    _refused_for_both(code, out, b_id, a_id)
    other_pg = create_database(pg_server, "identity_other")  # a second PostgreSQL registry on A's store
    code, out = _invoke("gc", "--data", tmp_path / "c", "--database", other_pg, "--blobs", shared)
    _refused_for_both(code, out, _registry_id_of(tmp_path / "c", other_pg), a_id)
    assert _blobs_in(tmp_path / "a2", shared, pg_url) == a_blobs
    code, out = _invoke("fsck", "--data", tmp_path / "a2", "--database", pg_url, "--blobs", shared)
    assert code == 0, out


# ------------------------------------------------------------ older stores
def _make_older(data: Path, blobs: Path) -> None:
    """What a registry of before markers looks like: no identity in its database, no marker in its store."""
    (blobs / MARKER_NAME).unlink()
    with sqlite3.connect(data / "registry.db") as conn:
        conn.execute("DROP TABLE registry_identity")
        conn.execute("PRAGMA user_version = 2")


def test_an_older_unmarked_store_is_marked_and_keeps_working(tmp_path: Path) -> None:
    data = tmp_path / "reg"
    _, blobs, _ = _team_a(data, None)
    _make_older(data, data)
    with RegistryStore(data, fsync=False) as store:
        assert (data / MARKER_NAME).read_text().strip() == store.registry_id
        assert store.read_file("alice/a", "README.md") == b"A's card" and store.fsck() == []
        registry_id = store.registry_id
    with RegistryStore(data, fsync=False) as store:  # the same id on every later open
        assert store.registry_id == registry_id and set(store.blobs.iter_all()) == blobs
    code, out = _invoke("fsck", "--data", data)
    assert code == 0, out


def test_an_older_data_folder_whose_repos_were_all_deleted_is_marked(tmp_path: Path) -> None:
    """Its blobs and its database share the folder, so a crash's leftover blob does not make it look like
    another registry's store (the embedded hub opens such folders)."""
    data = tmp_path / "hub"
    _, _, stray = _team_a(data, None)
    with RegistryStore(data, fsync=False) as store:
        store.delete_repo("alice/a")
        assert set(store.blobs.iter_all()) == {stray}
    _make_older(data, data)
    with RegistryStore(data, fsync=False) as store:
        assert (data / MARKER_NAME).read_text().strip() == store.registry_id and store.gc() == 1


def test_an_unmarked_store_holding_only_others_files_is_not_taken(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    _, a_blobs, _ = _team_a(tmp_path / "a", shared)
    _make_older(tmp_path / "a", shared)
    # A new registry (no files yet), and one whose files are elsewhere: neither takes A's old store.
    with RegistryStore(tmp_path / "c", fsync=False) as c:
        c.create_repo("carol/c")
        c.commit("carol/c", {"c.bin": b"C's"})
    for data in (tmp_path / "b", tmp_path / "c"):
        code, out = _invoke("gc", "--data", data, "--blobs", shared)
        assert code == 1 and "has no registry marker" in out and "adopt-blobs --replacing unmarked" in out, out
    assert not (shared / MARKER_NAME).exists()
    with RegistryStore(tmp_path / "a", fsync=False, blobs=shared) as a:  # its own registry takes it
        assert (shared / MARKER_NAME).read_text().strip() == a.registry_id
        assert set(a.blobs.iter_all()) == a_blobs and a.fsck() == []


def test_two_servers_of_one_registry_on_an_older_shared_store(
    tmp_path: Path, pg_url: str, hf_online  # noqa: F811
) -> None:
    """The cluster setup, upgraded: two servers on one PostgreSQL database and an unmarked shared folder
    with files start together; the store gets the database's id, and both serve it."""
    from huggingface_hub import HfApi, hf_hub_download

    shared = tmp_path / "shared"
    with RegistryStore(tmp_path / "admin", fsync=False, database=pg_url, blobs=shared) as store:
        store.accounts.add_user("alice")
        token = store.accounts.create_token("alice", write=True)[1]
        store.create_repo("alice/old")
        store.commit("alice/old", {"old.txt": b"before markers"})
        registry_id = store.registry_id
    (shared / MARKER_NAME).unlink()
    common = ("--database", pg_url, "--blobs", str(shared))
    proc_a, url_a, _ = start_cli_server(tmp_path / "host-a", *common)
    try:
        proc_b, url_b, _ = start_cli_server(tmp_path / "host-b", *common)
        try:
            assert (shared / MARKER_NAME).read_text().strip() == registry_id
            api_a = HfApi(endpoint=url_a, token=token)
            api_a.upload_file(path_or_fileobj=b"after markers", path_in_repo="new.txt", repo_id="alice/old")
            for name, content in (("old.txt", b"before markers"), ("new.txt", b"after markers")):
                got = hf_hub_download("alice/old", name, endpoint=url_b, token=token, cache_dir=tmp_path / "cache")
                assert Path(got).read_bytes() == content
        finally:
            stop_process(proc_b)
    finally:
        stop_process(proc_a)
    code, out = _invoke("gc", "--data", tmp_path / "admin", *common)
    assert code == 0 and "removed 0 unreferenced blob(s)" in out, out


# ------------------------------------------------------------- migrate, adopt
def test_migrate_carries_the_id_to_postgresql_and_the_marker_to_the_new_store(
    tmp_path: Path, pg_url: str  # noqa: F811
) -> None:
    data = tmp_path / "old"
    registry_id, blobs, stray = _team_a(data, None)
    new_store = tmp_path / "new-store"
    code, out = _invoke("migrate", "--data", data, "--to", pg_url, "--blobs", new_store, "--json")
    assert code == 0, out
    assert json.loads(out)["fsck"]["ok"]
    assert _registry_id_of(data, pg_url) == registry_id
    assert (new_store / MARKER_NAME).read_text().strip() == registry_id
    with RegistryStore(tmp_path / "host", fsync=False, database=pg_url, blobs=new_store) as store:
        assert store.read_file("alice/a", "README.md") == b"A's card"
        assert store.gc() == 1 and set(store.blobs.iter_all()) == blobs - {stray}


def test_migrate_into_another_registrys_store_copies_nothing(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    shared = tmp_path / "shared"
    a_id, a_blobs, _ = _team_a(tmp_path / "a", shared)
    b_id, _, _ = _team_a(tmp_path / "b", None)
    code, out = _invoke("migrate", "--data", tmp_path / "b", "--to", pg_url, "--blobs", shared)
    _refused_for_both(code, out, b_id, a_id)
    assert _blobs_in(tmp_path / "a", shared) == a_blobs  # none of B's blobs reached A's store
    from peftkit.registry.pg_db import PostgresDatabase

    db = PostgresDatabase(pg_url)
    try:
        with db.read() as conn:
            assert conn.execute("SELECT COUNT(*) FROM repos").fetchone()[0] == 0
    finally:
        db.close()


def test_adopting_a_store_on_purpose(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    a_id, a_blobs, a_stray = _team_a(tmp_path / "a", shared)
    with RegistryStore(tmp_path / "b", fsync=False) as b:
        b_id = b.registry_id
    adopt = ("adopt-blobs", "--data", tmp_path / "b", "--blobs", shared)
    code, out = _invoke(*adopt, "--replacing", "0" * 32)  # not the registry the marker names
    assert code == 1 and f"names registry {a_id}" in out and f"--replacing {a_id}" in out, out
    code, out = _invoke(*adopt, "--replacing", "not-an-id")
    assert code == 2 and "is not a registry id" in out, out
    code, out = _invoke(*adopt)
    assert code == 2 and "--replacing" in out, out
    assert (shared / MARKER_NAME).read_text().strip() == a_id  # nothing changed so far

    code, out = _invoke(*adopt, "--replacing", a_id)
    assert code == 0 and f"now belongs to registry {b_id}" in out and a_id in out, out
    code, out = _invoke(*adopt, "--replacing", a_id)
    assert code == 0 and "already belongs to registry" in out, out
    with RegistryStore(tmp_path / "b", fsync=False, blobs=shared) as b:  # B opens it now, A is refused
        assert b.registry_id == b_id and set(b.blobs.iter_all()) == a_blobs
    code, out = _invoke("gc", "--data", tmp_path / "a", "--blobs", shared)
    _refused_for_both(code, out, a_id, b_id)
    assert a_stray in _blobs_in(tmp_path / "b", shared)


def test_adopting_an_unmarked_store(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    _, a_blobs, _ = _team_a(tmp_path / "a", shared)
    _make_older(tmp_path / "a", shared)
    with RegistryStore(tmp_path / "b", fsync=False) as b:
        b_id = b.registry_id
    code, out = _invoke("adopt-blobs", "--data", tmp_path / "b", "--blobs", shared, "--replacing", "unmarked")
    assert code == 0 and f"now belongs to registry {b_id}" in out, out
    assert (shared / MARKER_NAME).read_text().strip() == b_id and _blobs_in(tmp_path / "b", shared) == a_blobs


def test_fsck_of_a_data_folder_reports_a_marker_of_another_registry(tmp_path: Path) -> None:
    _team_a(tmp_path / "a", None)
    (tmp_path / "a" / MARKER_NAME).write_text("f" * 32 + "\n")  # e.g. another registry's folder copied over
    code, out = _invoke("fsck", "--data", tmp_path / "a")
    assert code == 1 and f"belongs to registry {'f' * 32}" in out, out
    (tmp_path / "a" / MARKER_NAME).write_text("not an id\n")
    code, out = _invoke("fsck", "--data", tmp_path / "a")
    assert code == 1 and "does not hold a registry id" in out, out


def test_the_embedded_hub_on_a_folder_marked_by_another_registry_says_so(tmp_path: Path, capsys) -> None:
    """``peftkit hub`` commands on such a local hub fail with the refusal as a hub error (exit 1), not a
    traceback."""
    from peftkit.cli import run

    hub = tmp_path / "hub"
    with RegistryStore(hub, fsync=False) as store:
        store.create_repo("alice/a", owner="alice")
    (hub / MARKER_NAME).write_text("f" * 32 + "\n")
    assert run(["hub", "search", "--hub", f"local:{hub}"]) == 1
    err = capsys.readouterr().err
    assert "cannot open the local hub in" in err and f"names registry {'f' * 32}" in err, err
    assert "Traceback" not in err
