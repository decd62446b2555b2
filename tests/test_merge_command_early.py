"""``peftkit merge`` refuses a member that cannot be merged before the base model loads.

The base model given is a folder holding only the tiny BERT's ``config.json``: reading its config works,
loading it fails ("cannot load the base model ... no file named model.safetensors"). A refusal that
names the member instead therefore came before the load, from the members' folders and BASE's config.
Two kinds: a method merge_adapters always refuses (prompt, P- and prefix tuning, bottleneck adapters,
ReFT), and a member made for another model (peftkit's record of its structure, or target modules the
base model lacks, as in a PEFT folder of a GPT-2 LoRA). A member recorded for another hub id whose
shapes fit is merged with a warning, as ``peftkit compose`` loads one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import peftkit
from peftkit.cli import run
from tests.hub_helpers import hub_env  # noqa: F401 - fixture
from tests.test_auto_compose import MOODS, bert
from tests.test_merge_command import world  # noqa: F401 - fixture
from tests.train_helpers import torch_threads

REPO = Path(__file__).resolve().parents[1]
UNLOADABLE = "cannot load the base model"


@pytest.fixture(scope="module")
def config_only(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The base model's folder without its weights."""
    folder = tmp_path_factory.mktemp("config-only")
    shutil.copy(world["base"] / "config.json", folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def others(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters on the tiny BERT that weight-space merging refuses, one made for a wider BERT (peftkit's
    record says hidden_size=48) and a PEFT folder of a GPT-2 LoRA (no record: only its targets tell)."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    root = tmp_path_factory.mktemp("others")
    model = peftkit.adapt(bert(MOODS), "prefix_tuning", "prefix")
    for name, spec in {"ptune": "p_tuning", "bottleneck": "seq_bn", "reft": "loreft"}.items():
        model.add_adapter(name, spec)
    for name in ("prefix", "ptune", "bottleneck", "reft"):
        model.save_adapter(str(root / name), name)
    wide = BertForSequenceClassification(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=99, num_labels=2))
    wide.config._name_or_path = "google-bert/bert-base-uncased"
    peftkit.adapt(wide, "lora[r=4]", "wide").save_adapter(str(root / "wide"), "wide")
    _save_peft_gpt2_lora(GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99,
                                                                   num_labels=2)), root / "gpt2")
    return {name: root / name for name in ("prefix", "ptune", "bottleneck", "reft", "wide", "gpt2")}


def _save_peft_gpt2_lora(model: object, folder: Path) -> None:
    import peft

    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], task_type="SEQ_CLS")
                        ).save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "openai-community/gpt2"  # what PEFT records for a hub model
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _merge(base: Path | str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with torch_threads(1):
        code = run(["merge", str(base), *args, "--quiet"])
    return code, " ".join(capsys.readouterr().err.split())


def test_members_that_fit_get_past_the_checks_to_the_load(
        world: dict[str, Path], config_only: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """The control: with this BASE, a merge the checks let through fails at the load, writing nothing."""
    code, err = _merge(config_only, capsys, str(world["a"]), str(world["b"]), "-o", str(tmp_path / "o"),
                       "--head", "a")
    assert code == 1 and UNLOADABLE in err and "no file named" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("member, method, why", [
    ("p", "prompt_tuning", "changes the model's inputs and has no layer weights to merge"),
    ("prefix", "prefix_tuning", "changes the model's inputs and has no layer weights to merge"),
    ("ptune", "p_tuning", "changes the model's inputs and has no layer weights to merge"),
    ("bottleneck", "seq_bn", "does not change the layers' weights"),
    ("reft", "loreft", "does not change the layers' weights"),
])
def test_a_method_that_cannot_merge_is_refused_before_the_base_model_loads(
        world: dict[str, Path], others: dict[str, Path], config_only: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str], member: str, method: str, why: str) -> None:
    folder = {**world, **others}[member]
    code, err = _merge(config_only, capsys, str(world["a"]), str(folder), "-o", str(tmp_path / "o"))
    assert code == 1 and UNLOADABLE not in err, err
    assert (f"member '{folder}' is a {method} adapter, which {why}" in err
            and "so it cannot be merged in weight space; leave it out, or compose it with the others instead: "
                f"push it (peftkit hub push {folder} NAMESPACE/NAME), then peftkit compose {config_only} "
                f"'stack(NAMESPACE/NAME, ...)' -o OUT" in err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec, why", [
    ("lora[r=4,lora_bias=true]", "has lora_bias=true: it changes its layers' biases as well as their weights"),
    ("lora[r=4,trainable_token_indices=[3]]", "has trainable_token_indices: it replaces embedding rows as well as "
                                              "changing weights"),
])
def test_a_lora_changing_more_than_weights_is_refused_before_the_base_model_loads(
        world: dict[str, Path], config_only: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str], spec: str, why: str) -> None:
    folder = tmp_path / "member"
    peftkit.adapt(bert(MOODS), spec, "m").save_adapter(str(folder), "m")
    code, err = _merge(config_only, capsys, str(world["a"]), str(folder), "-o", str(tmp_path / "o"))
    assert code == 1 and UNLOADABLE not in err, err
    assert (f"member '{folder}' {why}, and a merged adapter holds weight changes only; leave it out, or compose it "
            f"with the others instead" in err and "(add --merge to fold it into the base model)" in err), err
    assert not (tmp_path / "o").exists()


def test_a_hub_member_that_cannot_merge_is_refused_after_its_download_and_before_the_base_model_loads(
        world: dict[str, Path], config_only: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str], hub_env: Path) -> None:  # noqa: F811
    hub = f"local:{tmp_path / 'hub'}"
    peftkit.hub.push(str(world["p"]), "alice/prompt", hub=hub, base_model="tests/tiny-bert", progress=False)
    code, err = _merge(config_only, capsys, str(world["a"]), "alice/prompt", "-o", str(tmp_path / "o"),
                       "--hub", hub)
    assert code == 1 and UNLOADABLE not in err, err
    assert ("member 'alice/prompt' is a prompt_tuning adapter" in err
            and f"compose it with the others instead: peftkit compose {config_only} 'stack(alice/prompt, ...)' "
                f"-o OUT" in err), err
    assert not (tmp_path / "o").exists()


def test_a_member_recorded_for_a_model_of_another_shape_is_refused_before_the_base_model_loads(
        world: dict[str, Path], others: dict[str, Path], config_only: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _merge(config_only, capsys, str(world["a"]), str(others["wide"]), "-o", str(tmp_path / "o"))
    assert code == 1 and UNLOADABLE not in err, err
    assert (f"member '{others['wide']}': this adapter was made for a model with hidden_size=48 "
            f"(google-bert/bert-base-uncased), but this model has hidden_size=32" in err), err
    assert not (tmp_path / "o").exists()


def test_a_peft_folder_whose_targets_the_base_model_lacks_is_refused_before_the_base_model_loads(
        others: dict[str, Path], config_only: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _merge(config_only, capsys, str(others["gpt2"]), "-o", str(tmp_path / "o"))
    assert code == 1 and UNLOADABLE not in err, err
    assert (f"member '{others['gpt2']}' does not fit the base model '{config_only}': target_modules=['c_attn'] "
            f"of method 'lora' matched no module of this model" in err
            and "It was made for 'openai-community/gpt2'; pass the base model it was trained on, or leave this "
                "member out" in err), err
    assert not (tmp_path / "o").exists()


def _hub_cache_with(repo_id: str, files: list[Path], cache: Path) -> None:
    """``repo_id`` in a Hugging Face cache at ``cache`` holding ``files`` (read offline)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    for file in files:
        shutil.copy(file, repo / "snapshots" / "c0ffee" / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")


def _merge_in_child(home: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PEFTKIT_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "peftkit", "merge", *args, "--quiet"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_base_given_by_hub_id_is_checked_from_its_config_and_another_name_alone_only_warns(
        world: dict[str, Path], others: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    """BASE ``org/tiny-bert`` from the cache: a member recorded for another hub id with the same shapes is
    merged with a warning (the same model has many names); one of another shape is refused before the
    weights are read (the first cache holds only config.json)."""
    renamed = tmp_path / "renamed"
    shutil.copytree(world["a"], renamed)
    config = json.loads((renamed / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "google-bert/bert-base-uncased"
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    _hub_cache_with("org/tiny-bert", [world["base"] / "config.json"], tmp_path / "configs")
    refused = _merge_in_child(tmp_path / "home", tmp_path / "configs", "org/tiny-bert", str(others["wide"]),
                              "-o", str(tmp_path / "o"))
    assert refused.returncode == 1 and "this adapter was made for a model with hidden_size=48" in refused.stderr
    assert UNLOADABLE not in refused.stderr and not (tmp_path / "o").exists(), refused.stderr
    _hub_cache_with("org/tiny-bert", sorted(world["base"].iterdir()), tmp_path / "full")
    merged = _merge_in_child(tmp_path / "home", tmp_path / "full", "org/tiny-bert", str(renamed),
                             "-o", str(tmp_path / "o"))
    assert merged.returncode == 0, merged.stderr
    assert (f"Warning: member '{renamed}' was made for 'google-bert/bert-base-uncased'; the base model is "
            f"'org/tiny-bert'. Its shapes fit, so it is used; check that it is the same model"
            in " ".join(merged.stderr.split())), merged.stderr
    assert (tmp_path / "o" / "merge.json").is_file()


def test_a_member_of_a_method_not_installed_is_refused_before_the_base_model_loads(
        world: dict[str, Path], config_only: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    unknown = tmp_path / "unknown"
    shutil.copytree(world["a"], unknown)
    record = json.loads((unknown / "peftkit.json").read_text())
    record.update(method="foo", plugin="peftkit-foo")
    (unknown / "peftkit.json").write_text(json.dumps(record))
    code, err = _merge(config_only, capsys, str(world["a"]), str(unknown), "-o", str(tmp_path / "o"))
    assert code == 1 and UNLOADABLE not in err, err
    assert f"member '{unknown}': unknown tuning method 'foo'" in err and "pip install 'peftkit-foo'" in err, err
    assert not (tmp_path / "o").exists()
