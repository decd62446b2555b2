"""Saved files get the permissions a plain write would (the umask's), so teammates and services can
read them; the registry's token database and blobs stay readable by their owner only."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

import peftkit
from peftkit.cli import run
from peftkit.hub_client.auth import save_token
from peftkit.registry.store import RegistryStore
from tests.hub_helpers import hub_env, tiny_base  # noqa: F401
from tests.train_helpers import model_folder, rows_for, torch_threads, write_jsonl


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_normal_modes(root: Path, umask: int) -> None:
    """Every folder is 0o777 and every file 0o666, less the umask."""
    entries = [root, *root.rglob("*")]
    wrong = [f"{p.relative_to(root.parent)}: {oct(_mode(p))}" for p in entries
             if _mode(p) != (0o777 if p.is_dir() else 0o666) & ~umask]
    assert not wrong, f"umask {oct(umask)}: {wrong}"
    assert len(entries) > 1


def _adapted() -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(tiny_base())
    model.add_adapter("default", "lora[r=4]")
    model.add_adapter("other", "ia3")
    return model


def test_adapter_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = _adapted()
    model.save_adapter(str(tmp_path / "new"), "default")
    assert_normal_modes(tmp_path / "new", umask)
    (tmp_path / "existing").mkdir()
    model.save_adapter(str(tmp_path / "existing"), "default")  # files replaced one by one
    assert_normal_modes(tmp_path / "existing", umask)
    model.save_pretrained(str(tmp_path / "all"))  # the second adapter in a subfolder
    assert (tmp_path / "all" / "other").is_dir()
    assert_normal_modes(tmp_path / "all", umask)
    model.save_pretrained(str(tmp_path / "all"))  # replaced whole
    assert_normal_modes(tmp_path / "all", umask)


def test_composition_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    model = _adapted()
    model.save_composition(str(tmp_path / "composed"), peftkit.Stack("default", "other"))
    assert_normal_modes(tmp_path / "composed", umask)


def test_pulled_and_merged_folders_follow_the_umask(hub_env: Path, umask: int, capsys) -> None:  # noqa: F811
    hub = f"local:{hub_env / 'hub'}"
    model = _adapted()
    model.save_adapter(str(hub_env / "lora"), "default")
    assert run(["hub", "push", str(hub_env / "lora"), "alice/lora", "--hub", hub, "-q"]) == 0
    assert run(["hub", "pull", "alice/lora", "--hub", hub, "--out", str(hub_env / "pulled"), "-q"]) == 0
    assert_normal_modes(hub_env / "pulled", umask)
    base_dir = hub_env / "base"
    tiny_base().save_pretrained(str(base_dir))
    assert run(["compose", str(base_dir), "alice/lora", "--out", str(hub_env / "merged"), "--merge", "--hub", hub,
                "-q"]) == 0, capsys.readouterr().err
    assert_normal_modes(hub_env / "merged", umask)
    assert run(["compose", str(base_dir), "alice/lora", "--out", str(hub_env / "composed"), "--hub", hub, "-q"]) == 0
    assert_normal_modes(hub_env / "composed", umask)


def test_train_output_follows_the_umask(tmp_path: Path, umask: int) -> None:
    base = model_folder(tmp_path / "base", "bert", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    with torch_threads(1):
        peftkit.train(str(base), "lora[r=2]", data, task="seq-cls", out=tmp_path / "out", max_steps=2,
                      save_steps=1, quiet=True, base_model="tiny/bert")
    assert (tmp_path / "out" / "checkpoints").is_dir()
    assert_normal_modes(tmp_path / "out", umask)


def test_registry_database_and_blobs_stay_private(tmp_path: Path, umask: int) -> None:
    store = RegistryStore(tmp_path / "registry", fsync=False)
    try:
        store.accounts.add_user("alice")
        store.accounts.create_token("alice", write=True)
        store.create_repo("alice/a")
        store.commit("alice/a", {"adapter_config.json": b"{}"}, message="one file")
        store.db.backup(tmp_path / "backup.db")
        files = [p for p in (tmp_path / "registry").rglob("*") if p.is_file()]
        database = [p for p in files if p.name.startswith("registry.db")]
        blobs = [p for p in files if "blobs" in p.parts]
        assert database and blobs
        assert {p.name: oct(_mode(p)) for p in database + blobs} == {p.name: "0o600" for p in database + blobs}
        assert _mode(tmp_path / "backup.db") == 0o600
        assert _mode(tmp_path / "registry") == 0o700
    finally:
        store.close()


def test_hub_token_file_stays_private(hub_env: Path, umask: int) -> None:  # noqa: F811
    assert _mode(save_token("local", "pkr_" + "x" * 20)) == 0o600
