"""`peftkit train --push` checks, before training, what would make the push at the end fail: the hub
answers, the token is valid and may write, and the namespace is the user's or one of their
organizations'. Against a real `peftkit registry serve` process on 127.0.0.1; each refused run must
leave no output folder behind (nothing was trained)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import peftkit
from peftkit.cli import run
from peftkit.hub_client.token_rights import TokenRights, push_refusal
from peftkit.registry import RegistryStore
from tests.hub_helpers import hub_env  # noqa: F401
from tests.registry_conftest_helpers import start_cli_server, stop_process
from tests.tiny_models import build_tiny
from tests.train_helpers import model_folder, rows_for, torch_threads, write_jsonl


class Registry:
    def __init__(self, data: Path, url: str, tokens: dict[str, str]) -> None:
        self.data, self.url, self.tokens = data, url, tokens


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """alice (a write and a read-only token) is a member of acme, not of globex; bob has a write token."""
    data = tmp_path_factory.mktemp("push-access") / "registry"
    tokens = {}
    with RegistryStore(data) as store:
        for user in ("alice", "bob", "carol"):
            store.accounts.add_user(user)
        store.accounts.add_org("acme", ["alice"])
        store.accounts.add_org("globex", ["carol"])
        tokens["alice"] = store.accounts.create_token("alice", write=True)[1]
        tokens["alice-read"] = store.accounts.create_token("alice", write=False)[1]
        tokens["bob"] = store.accounts.create_token("bob", write=True)[1]
    proc, url, _ = start_cli_server(data)
    try:
        yield Registry(data, url, tokens)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_folder(tmp_path_factory.mktemp("push-access-model") / "bert", "bert", "bert")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _train(tmp_path: Path, bert_folder: Path, capsys, *argv: str) -> tuple[int, str, str]:
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "out"),
                "--max-steps", "1", "--save-steps", "0", "--base-model", "tiny/bert", "--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused_before_training(tmp_path: Path, bert_folder: Path, capsys, *argv: str) -> str:
    code, out, err = _train(tmp_path, bert_folder, capsys, *argv)
    assert code == 1 and out == "", err
    assert not (tmp_path / "out").exists(), "training started"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_a_read_only_token_is_refused_before_training(tmp_path, bert_folder, capsys, registry, hub_env,  # noqa: F811
                                                      monkeypatch):
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", registry.tokens["alice-read"])
    err = _refused_before_training(tmp_path, bert_folder, capsys, "--push", "alice/x", "--hub", registry.url)
    assert f"pushing alice/x to {registry.url}: the token of user 'alice' is read-only" in err
    assert "`peftkit registry token create alice --write --data DIR`" in err
    assert registry.tokens["alice-read"] not in err


@pytest.mark.parametrize("namespace", ["bob", "globex"])
def test_a_namespace_of_another_user_or_org_is_refused_before_training(tmp_path, bert_folder, capsys, registry,
                                                                       hub_env, monkeypatch, namespace):  # noqa: F811
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", registry.tokens["alice"])
    err = _refused_before_training(tmp_path, bert_folder, capsys, "--push", f"{namespace}/x", "--hub", registry.url)
    assert f"the token of user 'alice' may not write to the namespace '{namespace}'" in err
    assert "only to 'alice' and to their organizations (acme); push to one of those (e.g. alice/x)" in err


def test_a_token_the_server_does_not_know_is_refused_before_training(tmp_path, bert_folder, capsys, registry,
                                                                     hub_env, monkeypatch):  # noqa: F811
    """A token made in another data folder than the server's: the message says that this may be why."""
    with RegistryStore(tmp_path / "another-folder") as other:
        other.accounts.add_user("alice")
        stray = other.accounts.create_token("alice", write=True)[1]
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", stray)
    err = _refused_before_training(tmp_path, bert_folder, capsys, "--push", "alice/x", "--hub", registry.url)
    assert "refused the token from PEFTKIT_HUB_TOKEN" in err
    assert "may have been made in another data folder than the server's" in err
    assert "--data DIR" in err and stray not in err


def test_an_unresolvable_hub_name_is_refused_before_training(tmp_path, bert_folder, capsys, hub_env,  # noqa: F811
                                                             monkeypatch):
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", "pkr_some_token_0000")
    err = _refused_before_training(tmp_path, bert_folder, capsys, "--push", "alice/x",
                                   "--hub", "http://no-such-host.invalid")
    assert "cannot reach hub at http://no-such-host.invalid:" in err
    assert "does not resolve" in err and "Check the address (--hub / PEFTKIT_HUB)" in err
    assert "Is the server running" not in err


def test_offline_mode_is_refused_before_training(tmp_path, bert_folder, capsys, registry, hub_env,  # noqa: F811
                                                monkeypatch):
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", registry.tokens["alice"])
    monkeypatch.setenv("PEFTKIT_OFFLINE", "1")
    err = _refused_before_training(tmp_path, bert_folder, capsys, "--push", "alice/x", "--hub", registry.url)
    assert f"offline mode is on (PEFTKIT_OFFLINE=1): --push alice/x: pushing to {registry.url} needs the network" \
        in err


def test_the_hugging_face_path_is_checked_too(tmp_path, bert_folder, capsys, registry, hub_env,  # noqa: F811
                                              monkeypatch):
    """huggingface.co cannot be reached from the tests: HF_ENDPOINT points `--hub hf` at the registry, which
    answers whoami as the Hub does. The fix names the Hub's token page, not `peftkit registry`."""
    monkeypatch.setenv("HF_ENDPOINT", registry.url)
    monkeypatch.setenv("HF_TOKEN", registry.tokens["alice-read"])
    err = _refused_before_training(tmp_path, bert_folder, capsys, "--push", "alice/x", "--hub", "hf")
    assert "pushing alice/x to hf: the token of user 'alice' is read-only" in err
    assert "https://huggingface.co/settings/tokens" in err and "peftkit registry" not in err


def test_an_organization_of_the_user_trains_and_pushes(tmp_path, bert_folder, capsys, registry, hub_env,  # noqa: F811
                                                       monkeypatch):
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", registry.tokens["alice"])
    code, out, err = _train(tmp_path, bert_folder, capsys, "--push", "acme/toy", "--hub", registry.url)
    assert code == 0, err
    assert "pushed: acme/toy" in out
    assert peftkit.hub.info("acme/toy", hub=registry.url).sha


def test_pushes_that_work_are_not_refused(registry, hub_env, monkeypatch, tmp_path):  # noqa: F811
    """The user's own namespace (also a repo that exists), an organization's, any case of the name."""
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", registry.tokens["bob"])
    peftkit.adapt(build_tiny("llama"), "lora[r=2]").save_adapter(tmp_path / "a")
    peftkit.hub.push(tmp_path / "a", "bob/exists", hub=registry.url, base_model="tiny/llama", progress=False)
    with peftkit.hub_client.open_hub(registry.url) as backend:
        for repo_id in ("bob/exists", "bob/new", "Bob/new"):
            backend.check_push_access(repo_id)
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", registry.tokens["alice"])
    with peftkit.hub_client.open_hub(registry.url) as backend:
        backend.check_push_access("ACME/new")


def test_rights_lost_during_training_fail_at_the_push_saying_the_adapter_is_saved(
        tmp_path, bert_folder, registry, hub_env, monkeypatch):  # noqa: F811
    """The check before training cannot see the future: a token revoked while the run trains is refused
    at the push, whose message still says where the trained adapter is."""
    from transformers import TrainerCallback

    with RegistryStore(registry.data) as store:
        info, secret = store.accounts.create_token("alice", write=True, name="revoked-mid-run")
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", secret)

    class RevokeAtTheEnd(TrainerCallback):
        def on_train_end(self, *args, **kwargs):
            subprocess.run([*_registry_cli(), "token", "revoke", info.id, "--data", str(registry.data)],
                           check=True, capture_output=True)

    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    out = tmp_path / "out"
    with pytest.raises(peftkit.PeftkitError) as caught:
        peftkit.train(bert_folder, "lora[r=2]", data, task="seq-cls", out=out, max_steps=1, save_steps=0,
                      quiet=True, base_model="tiny/bert", push="alice/late", hub=registry.url,
                      callbacks=[RevokeAtTheEnd()])
    message = str(caught.value)
    assert message.startswith(f"the adapter is trained and saved in {out}, but pushing it to alice/late failed:")
    assert "refused the token" in message and (out / "adapter_model.safetensors").is_file()


def test_a_hub_that_cannot_say_whose_token_it_is_is_left_to_the_push(monkeypatch):
    """An answer other than a refusal (an older server without whoami, a rate limit): no verdict."""
    from peftkit.hub_client.errors import HubError
    from peftkit.hub_client.http import HttpBackend

    def no_whoami(self, where=None):
        raise HubError("the hub at http://h answered 404: not found")

    monkeypatch.setattr(HttpBackend, "token_rights", no_whoami)
    HttpBackend("http://h", token="pkr_some_token_0000").check_push_access("alice/x")


def _registry_cli() -> list[str]:
    return [sys.executable, "-m", "peftkit.registry"]


# ----------------------------------------------------------------- what the whoami answer rules out

def _whoami(role: str | None, *, kind: str = "user", orgs: tuple[str, ...] = ()) -> dict:
    access = {"displayName": "t"} if role is None else {"displayName": "t", "role": role}
    return {"type": kind, "name": "alice", "orgs": [{"name": o} for o in orgs],
            "auth": {"type": "access_token", "accessToken": access}}


@pytest.mark.parametrize("answer, repo_id", [
    (_whoami("write"), "alice/x"), (_whoami("admin"), "alice/x"), (_whoami("fineGrained"), "alice/x"),
    (_whoami(None), "alice/x"), (_whoami("write", orgs=("acme",)), "acme/x"),
    (_whoami("write", kind="app"), "acme/x"), ("not a dict", "acme/x"), ({}, "acme/x"),
])
def test_only_certain_refusals_count(answer, repo_id):
    """A push that may work is never refused: admin and fine-grained tokens, an answer without a role, one
    from an account that is not a user (its namespaces are not known), an odd answer."""
    assert push_refusal(TokenRights.from_whoami(answer), repo_id, "http://h", new_token_hint="h") is None


def test_read_only_and_foreign_namespaces_are_refused():
    rights = TokenRights.from_whoami(_whoami("read", orgs=("acme",)))
    assert "is read-only" in push_refusal(rights, "alice/x", "http://h", new_token_hint="HINT")
    rights = TokenRights.from_whoami(_whoami("write", orgs=("acme",)))
    assert "may not write to the namespace 'globex'" in push_refusal(rights, "globex/x", "http://h",
                                                                     new_token_hint="HINT")
    assert push_refusal(rights, "Acme/x", "http://h", new_token_hint="HINT") is None


def test_login_with_a_read_only_token_saves_it_and_says_pushes_will_be_refused(registry, hub_env, capsys,  # noqa: F811
                                                                                 monkeypatch) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(registry.tokens["alice-read"] + "\n"))
    assert run(["hub", "login", "--hub", registry.url, "--token-stdin"]) == 0
    captured = capsys.readouterr()
    assert f"Logged in to {registry.url} as alice" in captured.out
    assert captured.err.startswith("Warning: the token of alice is read-only: pulls, searches and private repos "
                                   "work, pushes will be refused; to push, a peftkit registry makes one with "
                                   "`peftkit registry token create alice --write --data DIR`")
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err
    assert registry.tokens["alice-read"] not in captured.out + captured.err
    assert peftkit.hub.whoami(registry.url) == "alice"  # saved: it reads
    # A write token logs in without a word more; the Python API says it with a ReadOnlyTokenWarning.
    monkeypatch.setattr(sys, "stdin", io.StringIO(registry.tokens["alice"] + "\n"))
    assert run(["hub", "login", "--hub", registry.url, "--token-stdin"]) == 0
    assert capsys.readouterr().err == ""
    from peftkit.hub_client.errors import ReadOnlyTokenWarning

    with pytest.warns(ReadOnlyTokenWarning, match="read-only"):
        assert peftkit.hub.login(registry.tokens["alice-read"], registry.url) == "alice"
