"""``peftkit merge`` walked through as a PEFT user would: what such a user gets wrong, and adapter folders named
the way training runs name them (``run1/final``, ``sst2.v2``, ``.``).

Uses the tiny BERT classifier and adapters of tests/test_merge_command.py (the ``world`` fixture).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.cli import run
from tests.hub_helpers import hub_env  # noqa: F401 - fixture
from tests.test_auto_compose import MOODS, bert
from tests.test_merge_command import world  # noqa: F401 - fixture
from tests.train_helpers import torch_threads


def _merge(base: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with torch_threads(1):
        code = run(["merge", str(base), *args, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def test_folders_sharing_a_name_merge_under_their_parents_names(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """run1/final and run2/final used to collide ("an adapter named 'final' already exists")."""
    for run_name, member in (("run1", "a"), ("run2", "b")):
        shutil.copytree(world[member], tmp_path / run_name / "final")
    first, second = str(tmp_path / "run1" / "final"), str(tmp_path / "run2" / "final")
    code, _, err = _merge(world["base"], capsys, first, second, "-o", str(tmp_path / "m"), "--head", "final")
    assert code == 1 and (f"head 'final' names both '{first}' and '{second}'; choose one by its adapter name: "
                          f"average, run1__final, run2__final") in err
    assert not (tmp_path / "m").exists()
    code, stdout, err = _merge(world["base"], capsys, first, second, "-o", str(tmp_path / "m"), "--head", "run1__final")
    assert code == 0, err
    assert "of run1__final (1), run2__final (1)" in stdout
    names = [m["name"] for m in json.loads((tmp_path / "m" / "merge.json").read_text())["members"]]
    assert names == ["run1__final", "run2__final"]


def test_folder_names_that_are_no_adapter_names_are_made_into_ones(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """'sst2.v2' (a dot), 'train' (an nn.Module attribute) and '.' used to be refused as adapter names."""
    shutil.copytree(world["a"], tmp_path / "sst2.v2")
    shutil.copytree(world["b"], tmp_path / "train")
    code, stdout, err = _merge(world["base"], capsys, str(tmp_path / "sst2.v2"), str(tmp_path / "train"),
                               "-o", str(tmp_path / "m"), "--head", "train")
    assert code == 0, err
    assert "of sst2_v2 (1), train_adapter (1) by svd, head train_adapter" in stdout
    monkeypatch.chdir(world["a"])
    code, stdout, err = _merge(world["base"], capsys, ".", str(world["b"]), "-o", str(tmp_path / "dot"),
                               "--head", "average")
    assert code == 0, err
    assert "of a (1), b (1)" in stdout


def test_one_adapter_given_as_its_folder_and_as_its_hub_repo_is_refused(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        hub_env: Path) -> None:  # noqa: F811
    """It used to be merged with itself under two names (a and alice__a), doubling its change silently."""
    hub = f"local:{tmp_path / 'hub'}"
    peftkit.hub.push(str(world["a"]), "alice/a", hub=hub, base_model="tests/tiny-bert", progress=False)
    out = tmp_path / "m"
    code, _, err = _merge(world["base"], capsys, str(world["a"]), "alice/a", "-o", str(out), "--hub", hub)
    assert code == 1 and (f"'{world['a']}' and 'alice/a' are the same adapter (identical weights); give it once "
                          f"and weigh it with --weights") in err
    code, _, err = _merge(world["base"], capsys, "alice/a", "alice/a@main", "-o", str(out), "--hub", hub)
    assert code == 1 and "'alice/a' and 'alice/a@main' are the same adapter" in err
    assert not out.exists()


def test_a_classifiers_adapter_and_a_bare_encoders_are_refused_before_the_base_model_loads(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """Their weights sit at bert.encoder... and encoder...; the message used to say 'pass the model object',
    which the command cannot do and which would not help."""
    encoder = peftkit.adapt(bert(MOODS).bert, "lora[r=4,init_weights=false]", "feat")
    encoder.save_adapter(str(tmp_path / "feat"), "feat")
    code, _, err = _merge(tmp_path / "no-base", capsys, str(world["a"]), str(tmp_path / "feat"),
                          "-o", str(tmp_path / "m"))
    assert code == 1 and ("the adapters were trained on different model classes (a: BertForSequenceClassification, "
                          "feat: BertModel), so their weights sit at different places in the model and cannot be "
                          "merged") in err, err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("out", ["parent", "member"])
def test_overwrite_never_replaces_a_folder_holding_a_member(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str) -> None:  # noqa: F811
    """`-o runs --overwrite` with members runs/a and runs/b used to delete both adapters."""
    runs = tmp_path / "runs"
    for member in ("a", "b"):
        shutil.copytree(world[member], runs / member)
    target = runs if out == "parent" else runs / "b"
    code, _, err = _merge(world["base"], capsys, str(runs / "a"), str(runs / "b"), "-o", str(target), "--overwrite",
                          "--head", "a")
    how = "holds" if out == "parent" else "is"
    assert code == 1 and (f"'{target}' {how} the folder of '{runs / ('a' if out == 'parent' else 'b')}', which is "
                          f"being merged: replacing it would delete that adapter") in err, err
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b"]
    assert (runs / "b" / "adapter_model.safetensors").read_bytes() == \
        (world["b"] / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--strategy", "ties"], "strategy 'ties' needs density=<fraction of entries to keep>, e.g. density=0.5 "
                             "(peftkit merge: --density 0.5)"),
    (["--strategy", "cat", "--rank", "2", "--head", "a"],
     "use strategy='svd' with rank=2 to truncate (peftkit merge: --strategy svd --rank 2)"),
])
def test_a_refused_option_names_the_command_line_option_to_use(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],  # noqa: F811
        message: str) -> None:
    code, _, err = _merge(world["base"], capsys, str(world["a"]), str(world["b"]), "-o", str(tmp_path / "m"), *args)
    assert code == 1 and message in err, err
    assert not (tmp_path / "m").exists()


def test_heads_average_by_the_size_of_their_weights_and_all_zero_is_refused(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """`--weights 1,-1 --head average` was refused ('sum to 0') and `1,-0.5` gave the head 2a - b: a negative
    weight now counts by its size, as automatic composition averages heads (a -1 b: each head half)."""
    code, _, err = _merge(world["base"], capsys, str(world["a"]), str(world["b"]), "-o", str(tmp_path / "m"),
                          "--weights", "1,-1", "--strategy", "linear", "--head", "average")
    assert code == 0, err
    heads = {n: {k: v for k, v in load_file(str(world[n] / "adapter_model.safetensors")).items() if "classifier" in k}
             for n in ("a", "b")}
    saved = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    merged = {k: v for k, v in saved.items() if "classifier" in k}
    assert merged and all(torch.allclose(merged[k], (heads["a"][k] + heads["b"][k]) / 2) for k in merged)
    code, _, err = _merge(world["base"], capsys, str(world["a"]), str(world["b"]), "-o", str(tmp_path / "z"),
                          "--weights", "0,0", "--strategy", "linear", "--head", "average")
    assert code == 1 and ("the adapters holding copies of 'classifier' (a 0, b 0) all have weight 0, so they have no "
                          "weighted average; pass the name of the adapter whose copy the merged adapter keeps "
                          "(peftkit merge: --head NAME)") in err, err
    assert not (tmp_path / "z").exists()
