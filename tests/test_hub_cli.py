"""`peftkit hub ...` and `peftkit compose`: output, exit codes, and tokens that never show."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli import run
from peftkit.core.composition import Stack
from tests.hub_helpers import BASE_ID, HubUnderTest, any_hub, hub_env, save_task_adapters, tiny_base  # noqa: F401
from tests.registry_conftest_helpers import running_registry
from tests.tiny_models import build_tiny, sample_inputs


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_task_adapters(tmp_path_factory.mktemp("adapters"))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = run(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**sample_inputs("llama")).logits


def test_push_search_json_info_pull(hub_env: Path, folders: dict[str, Path], capsys) -> None:  # noqa: F811
    h = f"local:{hub_env / 'hub'}"
    code, out, _ = _cli(capsys, "hub", "push", str(folders["lang"]), "alice/lang", "--hub", h, "--task",
                        "translation", "--metric", "bleu=21.5", "--tag", "german", "--dataset", "wmt19", "--json", "-q")
    assert code == 0
    pushed = json.loads(out)
    assert pushed["repo_id"] == "alice/lang" and len(pushed["commit"]) == 40 and pushed["created"]
    assert _cli(capsys, "hub", "push", str(folders["ner"]), "alice/ner", "--hub", h, "-q")[0] == 0

    code, out, _ = _cli(capsys, "hub", "search", "--hub", h, "--base-model", BASE_ID, "--json")
    assert code == 0
    hits = {hit["repo_id"]: hit for hit in json.loads(out)}
    assert set(hits) == {"alice/lang", "alice/ner"}
    assert hits["alice/lang"]["method"] == "lora" and hits["alice/lang"]["task"] == "translation"
    assert hits["alice/ner"]["method"] == "seq_bn" and hits["alice/lang"]["base_model"] == BASE_ID
    assert hits["alice/lang"]["sha"] == pushed["commit"] and hits["alice/lang"]["last_modified"]

    code, out, _ = _cli(capsys, "hub", "search", "german", "--hub", h)
    assert code == 0
    header, row = out.strip().splitlines()
    assert header.split()[:3] == ["REPO", "METHOD", "BASE"] and row.split()[:4] == ["alice/lang", "lora", BASE_ID,
                                                                                     "translation"]
    assert _cli(capsys, "hub", "search", "nothing-like-this", "--hub", h)[2].strip() == "No adapter matches."
    code, out, _ = _cli(capsys, "hub", "search", "--hub", h, "--dataset", "wmt19", "--json")
    assert code == 0 and [hit["repo_id"] for hit in json.loads(out)] == ["alice/lang"]

    code, out, _ = _cli(capsys, "hub", "info", "alice/lang", "--hub", h)
    assert code == 0 and "method: lora" in out and f"main -> {pushed['commit']}" in out

    code, out, err = _cli(capsys, "hub", "pull", "alice/lang", "--hub", h, "--out", str(hub_env / "copy"))
    assert code == 0 and out.strip() == str(hub_env / "copy") and pushed["commit"] in err
    assert sorted(p.name for p in (hub_env / "copy").iterdir()) == ["README.md", "adapter_config.json",
                                                                     "adapter_model.safetensors", "peftkit.json"]

    code, _, err = _cli(capsys, "hub", "pull", "alice/lang@nope", "--hub", h)
    assert code == 1 and "revision 'nope' not found" in err and "Traceback" not in err
    assert "its branches: main" in err  # what to pull instead
    code, out, err = _cli(capsys, "hub", "delete", "alice/ner", "--hub", h, "--yes")
    assert code == 0 and out.strip() == "Deleted alice/ner."
    code, out, err = _cli(capsys, "hub", "delete", "alice/ner", "--hub", h, "--yes", "--missing-ok")
    assert code == 0 and out.strip() == "alice/ner does not exist; nothing was deleted."
    code, _, err = _cli(capsys, "hub", "info", "alice/ner", "--hub", h)
    assert code == 1 and "alice/ner" in err and "not found" in err


def test_compose_writes_a_composition_or_a_merged_model(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                                        capsys) -> None:
    h = f"local:{hub_env / 'hub'}"
    for name in ("lang", "ner", "summ"):
        peftkit.hub.push(folders[name], f"alice/{name}", hub=h, progress=False)
    base_dir = hub_env / "tiny-llama"
    tiny_base().save_pretrained(str(base_dir))

    out = hub_env / "composed"
    code, stdout, err = _cli(capsys, "compose", str(base_dir), "stack(alice/lang, alice/ner)", "--out", str(out),
                             "--hub", h, "-q")
    assert code == 0, err
    assert "lang <- alice/lang@" in stdout and (out / "composition.json").is_file()
    # BASE is a local folder: the composition records the hub id its members were made for, not the folder.
    assert json.loads((out / "composition.json").read_text())["base_model_name_or_path"] == BASE_ID
    composed = peftkit.AdaptedModel.load_composition(tiny_base(), out)
    reference = peftkit.load(tiny_base(), "stack(alice/lang, alice/ner)", hub=h, progress=False)
    assert composed.active_composition == Stack("lang", "ner")
    assert torch.allclose(_logits(composed), _logits(reference), atol=1e-6)

    code, _, err = _cli(capsys, "compose", str(base_dir), "stack(alice/lang, alice/ner)", "--out",
                        str(hub_env / "merged"), "--merge", "--hub", h, "-q")
    assert code == 1 and "cannot merge ner (seq_bn)" in err and not (hub_env / "merged").exists()
    code, _, err = _cli(capsys, "compose", str(base_dir), "stack(alice/lang, alice/summ)", "--out", str(out),
                        "--hub", h, "-q")
    assert code == 1 and "--overwrite" in err

    code, stdout, err = _cli(capsys, "compose", str(base_dir), "stack(alice/lang, alice/summ)", "--out",
                             str(hub_env / "merged"), "--merge", "--hub", h, "-q")
    assert code == 0, err
    assert "Loading weights" not in err and "Writing model shards" not in err  # --quiet: no transformers bars
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(str(hub_env / "merged")).eval()
    unmerged = peftkit.load(tiny_base(), "stack(alice/lang, alice/summ)", hub=h, progress=False)
    assert torch.allclose(_logits(merged), _logits(unmerged), atol=1e-4)
    assert not any("lora" in name or "ia3" in name for name, _ in merged.named_parameters())


def test_compose_errors_use_the_users_words_and_refuse_another_architecture_early(
        hub_env: Path, folders: dict[str, Path], capsys) -> None:  # noqa: F811
    h = f"local:{hub_env / 'hub'}"
    peftkit.hub.push(folders["lang"], "alice/lang", hub=h, progress=False)
    code, _, err = _cli(capsys, "compose", "unused", "stack(alice/lang, ", "--out", str(hub_env / "c"), "--hub", h)
    assert code == 1 and "'stack(alice/lang,'" in err and "__hubref" not in err

    bert_dir = hub_env / "tiny-bert"  # another architecture: refused from its config, before weights load
    build_tiny("bert").save_pretrained(str(bert_dir))
    code, _, err = _cli(capsys, "compose", str(bert_dir), "alice/lang", "--out", str(hub_env / "c"), "--hub", h, "-q")
    assert code == 1 and "model_type='llama'" in err and "model_type='bert'" in err
    assert "random" not in err and "Traceback" not in err and not (hub_env / "c").exists()


def test_tokens_login_and_errors_never_show_the_token(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                                      capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_registry(hub_env / "registry", users={"alice": True}) as (store, server, tokens):
        url, secret = server.url, tokens["alice"]
        seen = []

        def cli(*argv: str) -> tuple[int, str, str]:
            result = _cli(capsys, *argv)
            seen.append(result[1] + result[2])
            return result

        code, _, err = cli("hub", "push", str(folders["lang"]), "alice/lang", "--hub", url)
        assert code == 1 and "needs a token" in err and f"peftkit hub login --hub {url}" in err
        assert "Traceback" not in err

        for empty in ("", "   \n"):  # checked before the hub is asked (huggingface_hub reads "" as no token)
            monkeypatch.setattr(sys, "stdin", io.StringIO(empty))
            code, _, err = cli("hub", "login", "--hub", url, "--token-stdin")
            assert code == 1 and "the token is empty" in err and "Traceback" not in err, err
        monkeypatch.setattr(sys, "stdin", io.StringIO("pkr_wrong_token_0000\n"))
        code, _, err = cli("hub", "login", "--hub", url, "--token-stdin")
        assert code == 1 and "refused the token" in err and "The token was not saved." in err
        # a registry knows the tokens of its own data folder only: the likely mistake, and the fix
        assert "If the hub is a peftkit registry, the token may have been made in another data folder" in err
        assert "`peftkit registry token create USER --write --data DIR`" in err
        assert not (hub_env / "home" / "hub_tokens.json").exists()

        monkeypatch.setattr(sys, "stdin", io.StringIO(secret + "\n"))
        code, out, _ = cli("hub", "login", "--hub", url, "--token-stdin")
        assert code == 0 and "as alice" in out
        token_file = hub_env / "home" / "hub_tokens.json"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert cli("hub", "whoami", "--hub", url)[1].strip() == "alice"
        code, out, err = cli("hub", "push", str(folders["lang"]), "alice/lang", "--hub", url, "--private")
        assert code == 0, err
        assert cli("hub", "search", "--hub", url, "--json")[1].count('"alice/lang"') == 1
        code, out, _ = cli("hub", "delete", "alice/never", "--hub", url, "--yes", "--missing-ok")
        assert code == 0 and out.strip() == "alice/never does not exist; nothing was deleted."
        assert cli("hub", "delete", "alice/never", "--hub", url, "--yes")[0] == 1

        (hub_env / "bad-token").write_text("pkr_also_wrong_1234\n")
        code, _, err = cli("hub", "push", str(folders["ner"]), "alice/ner", "--hub", url, "--token-file",
                           str(hub_env / "bad-token"))
        assert code == 1 and "refused the token" in err and "pkr_also_wrong_1234" not in err

        assert cli("hub", "logout", "--hub", url)[0] == 0
        code, out, _ = cli("hub", "search", "--hub", url, "--json")
        assert json.loads(out) == []  # private, and no token any more
    assert not any(secret in text for text in seen), "a token was printed"
    assert all("pkr_wrong_token_0000" not in text for text in seen)


def test_a_token_refused_by_the_hugging_face_hub_is_not_blamed_on_a_data_folder(
        hub_env: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """huggingface.co cannot be reached from the tests: HF_ENDPOINT points `--hub hf` at a registry."""
    with running_registry(hub_env / "registry") as (_, server, _):
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(sys, "stdin", io.StringIO("hf_not_a_real_token_0000\n"))
        code, _, err = _cli(capsys, "hub", "login", "--hub", "hf", "--token-stdin")
    assert code == 1 and "the hub at hf refused the token" in err
    assert "https://huggingface.co/settings/tokens" in err
    assert "data folder" not in err and "peftkit registry" not in err


def test_unreachable_hub_is_one_clear_line(hub_env: Path, capsys) -> None:  # noqa: F811
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = _cli(capsys, "hub", "search", "--hub", f"http://127.0.0.1:{port}")
    assert code == 1
    assert err.strip().startswith(f"Error: cannot reach hub at http://127.0.0.1:{port}:")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_host_name_that_does_not_resolve_says_to_check_the_address(hub_env: Path, capsys) -> None:  # noqa: F811
    """A DNS failure is a wrong address, not a server that is down (*.invalid resolves nowhere, RFC 2606)."""
    code, _, err = _cli(capsys, "hub", "search", "--hub", "http://no-such-host.invalid:8080")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("Error: cannot reach hub at http://no-such-host.invalid:8080: the name "
                          "'no-such-host.invalid' does not resolve")
    assert err.strip().endswith(". Check the address (--hub / PEFTKIT_HUB)")
    assert "could not be resolved" not in err  # said once, in the probe's words
    assert "Is the server running" not in err
    with socket.socket() as sock:  # a refused connection keeps asking whether the server runs
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    err = _cli(capsys, "hub", "search", "--hub", f"http://127.0.0.1:{port}")[2]
    assert "refused. Is the server running and the address right?" in err and "DNS" not in err


def test_a_failed_name_lookup_is_told_apart_in_a_request_error_chain() -> None:
    """A request that fails after the probe passed (DNS failing meanwhile): huggingface_hub raises its HTTP
    stack's error (httpx's ConnectError, or another client's), caused by socket.gaierror."""
    from peftkit.hub_client.http import is_name_lookup_error

    class ConnectError(Exception):
        pass

    def chained(cause: BaseException) -> BaseException:
        try:
            try:
                raise cause
            except OSError as exc:
                raise ConnectError(str(exc)) from exc
        except ConnectError as outer:
            return outer

    assert is_name_lookup_error(chained(socket.gaierror(-2, "Name or service not known")))
    assert not is_name_lookup_error(chained(ConnectionRefusedError(111, "Connection refused")))


def test_pushing_the_same_files_again_says_up_to_date(any_hub: HubUnderTest, folders: dict[str, Path],  # noqa: F811
                                                      capsys, caplog: pytest.LogCaptureFixture) -> None:
    h = any_hub.address
    code, out, _ = _cli(capsys, "hub", "push", str(folders["lang"]), "alice/x", "--hub", h, "--json", "-q")
    first = json.loads(out)
    assert code == 0 and first["changed"] is True
    code, out, err = _cli(capsys, "hub", "push", str(folders["lang"]), "alice/x", "--hub", h)  # bars on
    assert code == 0
    assert out.strip() == (f"alice/x is already up to date at main on {h} (commit {first['commit']}); "
                           f"nothing was committed")
    assert "Uploading" not in err and "No files have been modified" not in err + caplog.text
    code, out, _ = _cli(capsys, "hub", "push", str(folders["lang"]), "alice/x", "--hub", h, "--json")
    assert code == 0 and json.loads(out)["changed"] is False and json.loads(out)["commit"] == first["commit"]


def test_offline_mode_refuses_a_registry_in_one_line(hub_env: Path, folders: dict[str, Path], capsys,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens: a request would fail differently
    monkeypatch.setenv("PEFTKIT_OFFLINE", "1")
    monkeypatch.setenv("PEFTKIT_HUB_TOKEN", "pkr_not_needed_offline")
    for argv in (["search", "lora"], ["info", "alice/x"], ["push", str(folders["lang"]), "alice/x"]):
        code, _, err = _cli(capsys, "hub", *argv, "--hub", url)
        assert code == 1 and err.startswith("Error: offline mode is on (PEFTKIT_OFFLINE=1): "), err
        assert f"{url} needs the network; unset PEFTKIT_OFFLINE to " in err and len(err.strip().splitlines()) == 1
        assert "cannot reach" not in err
    code, out, _ = _cli(capsys, "hub", "search", "--hub", f"local:{hub_env / 'hub'}", "--json")
    assert code == 0 and json.loads(out) == []


def test_search_for_a_method_no_plugin_has_hints_the_closest(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                                             capsys) -> None:
    h = f"local:{hub_env / 'hub'}"
    assert _cli(capsys, "hub", "push", str(folders["lang"]), "alice/lang", "--hub", h, "-q")[0] == 0
    code, out, err = _cli(capsys, "hub", "search", "--method", "lroa", "--hub", h)
    assert code == 0 and out == ""
    first, hint = err.strip().splitlines()
    assert first == "No adapter matches."
    assert hint.startswith("Hint: unknown tuning method 'lroa'; installed methods: ") and "lora" in hint
    assert "Did you mean 'lora'?" in hint
    code, out, err = _cli(capsys, "hub", "search", "--method", "lroa", "--hub", h, "--json")
    assert code == 0 and json.loads(out) == [] and "Did you mean 'lora'?" in err
    # An installed method without hits, or a known method with hits: no hint.
    assert "Hint" not in _cli(capsys, "hub", "search", "--method", "ia3", "--hub", h)[2]
    code, out, err = _cli(capsys, "hub", "search", "--method", "LoRA", "--hub", h)
    assert code == 0 and "alice/lang" in out and "Hint" not in err


def test_push_and_search_of_a_folder_import_no_torch(hub_env: Path, folders: dict[str, Path]) -> None:  # noqa: F811
    code = (f"import sys; from peftkit.cli import run; "
            f"assert run(['hub', 'push', {str(folders['summ'])!r}, 'alice/summ', '-q']) == 0; "
            f"assert run(['hub', 'search', '--method', 'ia3', '--json']) == 0; "
            f"heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]; "
            f"assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PEFTKIT_HOME": str(hub_env / "home")})
    assert result.returncode == 0, result.stderr
    assert '"repo_id": "alice/summ"' in result.stdout


def test_pushed_metrics_make_a_model_index_huggingface_hub_reads(hub_env: Path, folders: dict[str, Path],  # noqa: F811
                                                                capsys, tmp_path: Path) -> None:
    """The Hub's model-index needs a dataset in every result (huggingface_hub drops the whole index,
    huggingface.co refuses the card): --metric without --dataset takes the folder card's datasets,
    and with none at all the result names its dataset 'unspecified'."""
    import shutil

    from huggingface_hub import ModelCard

    h = f"local:{hub_env / 'hub'}"
    trained = tmp_path / "trained"
    shutil.copytree(folders["lang"], trained)
    (trained / "README.md").write_text("---\nlibrary_name: peft\ndatasets:\n- reviews.jsonl\n---\n\n# lang\n")
    for folder, repo, dataset in ((trained, "alice/with-card", "reviews.jsonl"), (folders["lang"], "alice/bare", None)):
        assert _cli(capsys, "hub", "push", str(folder), repo, "--hub", h, "--metric", "accuracy=0.5", "-q")[0] == 0
        code, out, _ = _cli(capsys, "hub", "pull", repo, "--hub", h, "--out", str(tmp_path / repo))
        card = ModelCard.load(tmp_path / repo / "README.md", ignore_metadata_errors=False)
        (result,) = card.data.eval_results
        assert (result.dataset_name, result.metric_type, result.metric_value) == (dataset or "unspecified",
                                                                                 "accuracy", 0.5)
        assert card.data.model_name == repo  # the results are the repo's, not the base model's


def test_a_push_over_the_quota_is_quota_exceeded_on_either_hub(any_hub: HubUnderTest,  # noqa: F811
                                                               folders: dict[str, Path], capsys) -> None:
    from peftkit.hub_client import QuotaExceeded
    from peftkit.registry import RegistryStore

    if any_hub.store is not None:
        any_hub.store.quotas.set("alice", 1000)
    else:
        with RegistryStore(Path(any_hub.address[len("local:"):]), fsync=False) as store:
            store.quotas.set("alice", 1000)
    with pytest.raises(QuotaExceeded, match="quota"):
        peftkit.hub.push(folders["lang"], "alice/lang", hub=any_hub.address, progress=False)
    code, out, _ = _cli(capsys, "hub", "push", str(folders["lang"]), "alice/lang", "--hub", any_hub.address, "--json")
    error = json.loads(out)["error"]
    assert (code, error["type"], error["exit_code"]) == (1, "QuotaExceeded", 1) and "quota" in error["message"]


def test_a_missing_repo_is_repo_not_found_when_loading_and_composing(
        hub_env: Path, folders: dict[str, Path], capsys) -> None:  # noqa: F811
    from peftkit.hub_client import RepoNotFound

    h = f"local:{hub_env / 'hub'}"
    peftkit.hub.push(folders["lang"], "alice/lang", hub=h, progress=False)
    with pytest.raises(RepoNotFound, match="alice/nothing"):
        peftkit.load(tiny_base(), "stack(alice/lang, alice/nothing)", hub=h, progress=False)
    base_dir = hub_env / "tiny-llama"
    tiny_base().save_pretrained(str(base_dir))
    for argv in (["compose", str(base_dir), "alice/nothing", "--out", str(hub_env / "c")],
                 ["merge", str(base_dir), "alice/nothing", "alice/lang", "--out", str(hub_env / "m")]):
        code, out, _ = _cli(capsys, *argv, "--hub", h, "--json", "-q")
        assert (code, json.loads(out)["error"]["type"]) == (1, "RepoNotFound"), argv


def test_pulling_an_empty_repo_fails_and_writes_nothing(any_hub: HubUnderTest, hub_env: Path,  # noqa: F811
                                                        capsys) -> None:
    from peftkit.registry import RegistryStore

    if any_hub.store is not None:
        any_hub.store.create_repo("alice/empty")
    else:
        with RegistryStore(Path(any_hub.address[len("local:"):]), fsync=False) as store:
            store.create_repo("alice/empty")
    code, out, err = _cli(capsys, "hub", "pull", "alice/empty", "--hub", any_hub.address, "--out",
                          str(hub_env / "copy"))
    assert code == 1 and "holds no files (an empty repo)" in err and "peftkit hub push FOLDER alice/empty" in err
    assert out == "" and not (hub_env / "copy").exists()


def test_compose_given_folders_says_it_reads_hub_repos_and_what_to_do(
        hub_env: Path, folders: dict[str, Path], capsys) -> None:  # noqa: F811
    base_dir = hub_env / "tiny-llama"
    tiny_base().save_pretrained(str(base_dir))
    for args in (["stack(./lang, ./ner)"], ["lang", "--adapter", "lang=./lang"]):
        code, _, err = _cli(capsys, "compose", str(base_dir), *args, "--out", str(hub_env / "c"), "-q")
        assert code == 1 and "'./lang' is a path: a composition here names hub repos" in err, err
        assert "peftkit hub push ./lang NAMESPACE/NAME" in err and not (hub_env / "c").exists()
