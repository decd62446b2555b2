"""`peftkit registry fsck` on a real data folder filled through the server by huggingface_hub, then damaged."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.registry_conftest_helpers import (  # noqa: F401
    hf_online,
    running_registry,
    subprocess_env,
    write_adapter_folder,
)
from tests.registry_pg_helpers import pg_server, pg_url  # noqa: F401
from tests.registry_s3_helpers import moto_endpoint, s3_blobs  # noqa: F401

from peftkit.registry import RegistryStore
from peftkit.registry.cli import registry_group

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi  # noqa: E402


def _fsck(data: Path, *extra: str):
    result = CliRunner().invoke(registry_group, ["fsck", "--data", str(data), *extra], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def data(tmp_path: Path, hf_online) -> Path:  # noqa: F811
    root = tmp_path / "reg"
    with running_registry(root, users={"alice": True}) as (store, server, tokens):
        api = HfApi(endpoint=server.url, token=tokens["alice"])
        for name in ("one", "two"):
            api.create_repo(f"alice/{name}")
            api.upload_folder(folder_path=write_adapter_folder(tmp_path / name, weights=name.encode() * 100),
                              repo_id=f"alice/{name}")
        api.create_tag("alice/one", tag="v1")
        code, out = _fsck(root, "--json")  # read-only: fine while the server runs
        report = json.loads(out)
        assert code == 0 and report["ok"] and report["problems"] == []
        assert report["repos"] == 2 and report["blobs"] == 4 and report["bytes_hashed"] > 0
    return root


def _blob(data: Path, repo_id: str, path: str) -> tuple[str, Path]:
    with RegistryStore(data) as store:
        sha = store.file_entry(repo_id, path)[1].sha256
        return sha, store.blobs.path(sha)


def test_clean_registry_and_usage_errors(data: Path, tmp_path: Path) -> None:
    code, out = _fsck(data)
    assert code == 0 and "ok: the registry is intact" in out and "checked 2 repo(s)" in out
    code, out = _fsck(tmp_path / "nothing-here")
    assert code == 2 and "holds no registry" in out
    assert not (tmp_path / "nothing-here").exists()  # fsck creates nothing
    code, _ = _fsck(data, "--no-such-flag")
    assert code == 2


def test_corrupt_and_missing_blobs(data: Path) -> None:
    sha, path = _blob(data, "alice/one", "adapter_model.safetensors")
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF  # same size, other content
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    gone_sha, gone = _blob(data, "alice/two", "adapter_model.safetensors")
    gone.unlink()
    code, out = _fsck(data)
    assert code == 1
    assert f"corrupt blob {sha}" in out and f"missing blob {gone_sha}" in out and "2 problem(s) found" in out
    report = json.loads(_fsck(data, "--json")[1])
    assert not report["ok"] and report["problem_count"] == 2


def test_damaged_database_rows(data: Path) -> None:
    conn = sqlite3.connect(data / "registry.db")
    with conn:
        conn.execute("UPDATE tree_entries SET oid = ? WHERE path = 'README.md'", ("0" * 40,))
        conn.execute("UPDATE tags SET commit_sha = ?", ("f" * 40,))
    conn.close()
    code, out = _fsck(data)
    assert code == 1
    assert "tag 'v1' of alice/one points to missing commit" in out
    assert "does not match its entries" in out and "recorded with git oid 0000" in out


def test_corrupt_database_file(data: Path) -> None:
    db = data / "registry.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    raw = bytearray(db.read_bytes())
    for offset in range(2 * page, len(raw) - page, page):  # scribble over every page but the header
        raw[offset + 8 : offset + 64] = b"\xa5" * 56
    db.write_bytes(bytes(raw))
    code, out = _fsck(data)
    assert code == 1 and "database" in out


def test_reindex_picks_up_new_indexing_rules(data: Path) -> None:
    with RegistryStore(data) as store:  # as an older peftkit indexed it: the card's library only
        with store.db.write() as conn:
            conn.execute("DELETE FROM facets WHERE kind = 'library'")
        assert store.search(library="peft") == []
    result = CliRunner().invoke(registry_group, ["reindex", "--data", str(data)], catch_exceptions=False)
    assert result.exit_code == 0 and "reindexed 2 repo(s)" in result.output
    with RegistryStore(data) as store:
        assert sorted(r.repo_id for r in store.search(library="peft")) == ["alice/one", "alice/two"]


def _peftkit(*args: str) -> subprocess.CompletedProcess:
    """The installed ``peftkit`` command, as a user or a cron job runs it (its exit status is the point)."""
    script = Path(sys.executable).with_name("peftkit")
    if not script.is_file():
        pytest.skip(f"no peftkit console script next to {sys.executable}")
    return subprocess.run([str(script), *args], env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_the_peftkit_command_exits_1_when_fsck_or_migrate_finds_problems(data: Path, pg_url: str) -> None:  # noqa: F811
    """``peftkit registry fsck`` printed "1 problem(s) found" and exited 0 (so did a migration whose
    check failed): the ``peftkit`` entry point dropped click's ``ctx.exit(1)`` status."""
    assert _peftkit("registry", "fsck", "--data", str(data)).returncode == 0
    gone_sha, gone = _blob(data, "alice/two", "adapter_model.safetensors")
    gone.unlink()
    run = _peftkit("registry", "fsck", "--data", str(data))
    assert run.returncode == 1 and f"missing blob {gone_sha}" in run.stdout, run
    run = _peftkit("registry", "fsck", "--data", str(data), "--json")
    assert run.returncode == 1 and not json.loads(run.stdout)["ok"]
    run = _peftkit("registry", "migrate", "--data", str(data), "--to", pg_url)
    assert run.returncode == 1 and f"missing blob {gone_sha}" in run.stdout and "serve it with" not in run.stdout


def test_reindex_names_a_missing_file_instead_of_a_traceback(data: Path) -> None:
    """reindex stopped with a FileNotFoundError traceback at the first missing card or config."""
    _, gone = _blob(data, "alice/two", "README.md")
    gone.unlink()
    result = CliRunner().invoke(registry_group, ["reindex", "--data", str(data)])
    assert result.exit_code == 1 and not isinstance(result.exception, FileNotFoundError), result.exception
    assert "cannot reindex alice/" in result.output and "peftkit registry fsck" in result.output


def _other_registry(root: Path, blobs: str | None = None) -> set[str]:
    """A second registry (its own files, one shared with ``data``'s); returns its blobs' sha256s."""
    with RegistryStore(root, fsync=False, blobs=blobs) as store:
        store.create_repo("bob/own", owner="bob")
        store.commit("bob/own", {"weights.bin": b"bob's own weights" * 50, "adapter_config.json": b"{}"})
        return {entry.sha256 for entry in store.list_files("bob/own")}


def test_gc_against_another_registrys_blob_store_deletes_nothing(data: Path, tmp_path: Path) -> None:
    """``gc --data A --blobs B`` (or a --database and --blobs that do not belong together) deleted every
    blob of B that A's database did not refer to: the other registry's files."""
    other = tmp_path / "other"
    kept = _other_registry(other)
    result = CliRunner().invoke(registry_group, ["gc", "--data", str(data), "--blobs", str(other)])
    # Refused at open: the store's marker names the other registry (tests/test_registry_blob_identity.py).
    assert result.exit_code == 1 and "belongs to another registry" in result.output
    assert "pass the --blobs and --database pair its servers use" in result.output
    with RegistryStore(other) as store:
        assert {sha for sha in store.blobs.iter_all()} >= kept and store.fsck() == []
    code, out = _fsck(data)
    assert code == 0, out
    result = CliRunner().invoke(registry_group, ["gc", "--data", str(data)])  # its own store: gc works
    assert result.exit_code == 0 and "removed 0 unreferenced blob(s)" in result.output
    _, gone = _blob(data, "alice/two", "adapter_model.safetensors")
    gone.unlink()  # a file lost: gc refuses until it is restored, unless told its own store lost it
    assert CliRunner().invoke(registry_group, ["gc", "--data", str(data)]).exit_code == 1
    with RegistryStore(data) as store:
        assert store.gc(allow_missing=True) == 0


def test_gc_against_another_registrys_bucket_deletes_nothing(data: Path, tmp_path: Path,
                                                            s3_blobs: str) -> None:  # noqa: F811
    kept = _other_registry(tmp_path / "other-s3", blobs=s3_blobs)
    result = CliRunner().invoke(registry_group, ["gc", "--data", str(data), "--blobs", s3_blobs])
    assert result.exit_code == 1 and "belongs to another registry" in result.output
    with RegistryStore(tmp_path / "other-s3", blobs=s3_blobs) as store:
        assert set(store.blobs.iter_all()) >= kept and store.fsck() == []
