"""Versioning and housekeeping through the stock clients: tags, move_repo, super_squash_history,
PEFT adapters indexed as ``library: peft`` whatever their card says, and the `hf` CLI's probes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import hf_online, running_registry, subprocess_env, write_adapter_folder  # noqa: F401

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, hf_hub_download  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError  # noqa: E402


@pytest.fixture
def reg(tmp_path: Path, hf_online):  # noqa: F811
    with running_registry(tmp_path / "reg", users={"alice": True, "bob": True}) as (store, server, tokens):
        store.accounts.add_org("acme", ["alice"])
        yield store, server, tokens


def _api(server, tokens, user: str | None = "alice") -> HfApi:
    return HfApi(endpoint=server.url, token=tokens[user] if user else False)


def test_tags_are_revisions_everywhere(reg, tmp_path: Path) -> None:
    store, server, tokens = reg
    api = _api(server, tokens)
    api.create_repo("alice/tagged")
    first = api.upload_file(path_or_fileobj=b"one", path_in_repo="sub/w.txt", repo_id="alice/tagged").oid
    api.create_tag("alice/tagged", tag="v1.0", tag_message="first release")
    api.upload_file(path_or_fileobj=b"two", path_in_repo="sub/w.txt", repo_id="alice/tagged")
    api.create_tag("alice/tagged", tag="old", revision=first)

    refs = api.list_repo_refs("alice/tagged")
    assert {t.name: t.target_commit for t in refs.tags} == {"old": first, "v1.0": first}
    assert [t.ref for t in refs.tags] == ["refs/tags/old", "refs/tags/v1.0"]
    assert [b.name for b in refs.branches] == ["main"]

    anon = _api(server, tokens, None)
    for revision in ("v1.0", "refs/tags/v1.0"):
        path = hf_hub_download("alice/tagged", "sub/w.txt", revision=revision, endpoint=server.url, token=False,
                               cache_dir=tmp_path / "c")
        assert Path(path).read_bytes() == b"one"
        assert anon.model_info("alice/tagged", revision=revision).sha == first
    assert [e.path for e in anon.list_repo_tree("alice/tagged", revision="v1.0", recursive=True)] == [
        "sub", "sub/w.txt"
    ]
    (info,) = anon.get_paths_info("alice/tagged", ["sub/w.txt"], revision="v1.0")
    assert info.size == 3
    assert [c.commit_id for c in anon.list_repo_commits("alice/tagged", revision="v1.0")][0] == first

    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag("alice/tagged", tag="v1.0")
    assert err.value.response.status_code == 409
    api.create_tag("alice/tagged", tag="v1.0", exist_ok=True)
    with pytest.raises(HfHubHTTPError, match="is a branch"):
        api.create_tag("alice/tagged", tag="main")
    with pytest.raises(HfHubHTTPError, match="tags do not move"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/tagged", revision="v1.0")
    with pytest.raises(HfHubHTTPError) as err:
        _api(server, tokens, "bob").create_tag("alice/tagged", tag="bobs")
    assert err.value.response.status_code == 403

    api.delete_tag("alice/tagged", tag="v1.0")
    assert [t.name for t in api.list_repo_refs("alice/tagged").tags] == ["old"]
    with pytest.raises(RevisionNotFoundError):
        anon.model_info("alice/tagged", revision="v1.0")
    with pytest.raises(HfHubHTTPError):
        api.delete_tag("alice/tagged", tag="v1.0")

    # A name spelled like a revision would be read as another ref (refs/heads/main as main): refused
    for create, name in ((api.create_branch, "refs/heads/x1"), (api.create_branch, "refs/heads/main"),
                         (api.create_tag, "refs/tags/v2")):
        with pytest.raises(HfHubHTTPError, match="cannot begin with 'refs/'") as err:
            create("alice/tagged", **{"branch" if create == api.create_branch else "tag": name})
        assert err.value.response.status_code == 400
    assert [b.name for b in api.list_repo_refs("alice/tagged").branches] == ["main"]


@pytest.mark.skipif(shutil.which("hf", path=os.path.dirname(sys.executable)) is None, reason="no hf CLI")
def test_hf_cli_tags_and_probes(reg, tmp_path: Path) -> None:
    store, server, tokens = reg
    _api(server, tokens).create_repo("alice/cli")
    hf = shutil.which("hf", path=os.path.dirname(sys.executable))
    env = subprocess_env(hf_home=tmp_path / "hf", endpoint=server.url, HF_TOKEN=tokens["alice"])

    def run(*args: str) -> str:
        done = subprocess.run([hf, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("repos", "tag", "create", "alice/cli", "v2")
    assert "v2" in run("repos", "tag", "list", "alice/cli")
    run("repos", "tag", "delete", "alice/cli", "v2", "-y")
    assert store.list_tags("alice/cli") == {}
    # The CLI asks for the agent-harness list on each run; it gets an answer, not a 404.
    from urllib.request import urlopen

    with urlopen(server.url + "/api/agent-harnesses") as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"standardEnvVars": [], "harnesses": {}}


def test_move_repo_rename_and_to_an_org(reg, tmp_path: Path) -> None:
    store, server, tokens = reg
    api = _api(server, tokens)
    api.create_repo("alice/old-name")
    sha = api.upload_file(path_or_fileobj=b"w", path_in_repo="w.txt", repo_id="alice/old-name").oid
    api.create_tag("alice/old-name", tag="v1")
    api.move_repo("alice/old-name", "alice/new-name")
    assert api.model_info("alice/new-name").sha == sha
    assert [m.id for m in api.list_models(search="new-name")] == ["alice/new-name"]
    assert not list(api.list_models(search="old-name"))
    # Reads of the old name follow a same-host redirect; huggingface_hub follows it.
    assert _api(server, tokens, None).model_info("alice/old-name").id == "alice/new-name"
    path = hf_hub_download("alice/old-name", "w.txt", revision="v1", endpoint=server.url, token=False,
                           cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == b"w"
    # Writes to the old name are refused, naming the new one.
    with pytest.raises(RepositoryNotFoundError, match="moved to 'alice/new-name'"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/old-name")

    api.move_repo("alice/new-name", "acme/shared")  # an org alice belongs to
    assert api.model_info("acme/shared").sha == sha
    assert store.list_tags("acme/shared") == {"v1": sha}
    with pytest.raises(HfHubHTTPError) as err:
        api.move_repo("acme/shared", "bob/stolen")  # bob's namespace: not alice's to write
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        _api(server, tokens, "bob").move_repo("acme/shared", "bob/stolen")
    assert err.value.response.status_code == 403
    api.create_repo("alice/taken")
    with pytest.raises(HfHubHTTPError) as err:
        api.move_repo("acme/shared", "alice/taken")
    assert err.value.response.status_code == 409

    # A new repo under an old name ends its redirect; a private move target is not revealed.
    api.create_repo("alice/old-name")
    assert api.model_info("alice/old-name").id == "alice/old-name"
    api.update_repo_settings("acme/shared", private=True)
    with pytest.raises(RepositoryNotFoundError):
        _api(server, tokens, "bob").model_info("alice/new-name")
    assert api.model_info("alice/new-name").id == "acme/shared"


def test_super_squash_history_frees_old_blobs(reg) -> None:
    store, server, tokens = reg
    api = _api(server, tokens)
    api.create_repo("alice/squash")
    api.upload_file(path_or_fileobj=b"gone soon", path_in_repo="tmp.bin", repo_id="alice/squash")
    kept = api.upload_file(path_or_fileobj=b"kept", path_in_repo="keep.txt", repo_id="alice/squash").oid
    api.create_tag("alice/squash", tag="v1", revision=kept)
    api.delete_file("tmp.bin", repo_id="alice/squash")
    api.upload_file(path_or_fileobj=b"later", path_in_repo="late.txt", repo_id="alice/squash")
    files = sorted(api.list_repo_files("alice/squash"))
    assert len(api.list_repo_commits("alice/squash")) == 5

    api.super_squash_history("alice/squash", commit_message="squashed")
    (commit,) = api.list_repo_commits("alice/squash")
    assert commit.title == "squashed" and sorted(api.list_repo_files("alice/squash")) == files
    # The tag still holds its commit (and so tmp.bin's blob); deleting it frees the blob.
    assert api.model_info("alice/squash", revision="v1").sha == kept
    gone_blob = store.blobs.path(store.file_entry("alice/squash", "tmp.bin", kept)[1].sha256)
    assert gone_blob.is_file()
    api.delete_tag("alice/squash", tag="v1")
    api.super_squash_history("alice/squash")
    assert not gone_blob.exists() and store.fsck() == []
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/squash", revision=kept)


def test_peft_adapter_indexed_as_peft_whatever_the_card_says(reg, tmp_path: Path) -> None:
    store, server, tokens = reg
    api = _api(server, tokens)
    folder = write_adapter_folder(tmp_path / "a", method="LORA")
    card = (folder / "README.md").read_text().replace("library_name: peft", "library_name: transformers")
    (folder / "README.md").write_text(card)
    api.create_repo("alice/overwritten-card")
    api.upload_folder(folder_path=folder, repo_id="alice/overwritten-card")
    info = api.model_info("alice/overwritten-card")
    assert info.library_name == "peft" and {"peft", "lora", "transformers"} <= set(info.tags)
    assert [m.id for m in api.list_models(filter=["peft", "lora"])] == ["alice/overwritten-card"]
    assert [m.id for m in api.list_models(filter="library:peft")] == ["alice/overwritten-card"]
