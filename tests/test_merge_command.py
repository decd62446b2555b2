"""``peftkit merge``: adapters (folders and hub ids) merged in weight space into one adapter folder.

A tiny BERT sentiment classifier (built from a config, saved as a folder) and adapters made on it: LoRA
``a`` and ``b`` (each with its own head, perturbed apart), IA3 ``i1``/``i2``, LoKr ``k1``/``k2`` and a
prompt-tuning ``p``. The merged folders are checked against the formula (linear), against the
in-process ``merge_adapters`` (the options reach it), and loaded back by peftkit and by the real peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli import run
from tests.hub_helpers import HubUnderTest, any_hub, hub_env  # noqa: F401 - fixtures
from tests.test_auto_compose import MOODS, bert
from tests.test_walkthrough_merge_auto import perturb_head
from tests.train_helpers import torch_threads


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    base = root / "base"
    bert(MOODS).save_pretrained(base)
    folders = {"base": base}
    torch.manual_seed(0)
    model = peftkit.adapt(bert(MOODS), "lora[r=4,init_weights=false]", "a")
    model.base_model.config._name_or_path = str(base)
    specs = {"b": "lora[r=4,init_weights=false]", "i1": "ia3[init_weights=false]", "i2": "ia3[init_weights=false]",
             "k1": "lokr[r=4,init_weights=false]", "k2": "lokr[r=4,init_weights=false]", "p": "prompt_tuning"}
    for name, spec in specs.items():
        model.add_adapter(name, spec)
    for seed, name in enumerate(("a", "b", "i1", "i2", "k1", "k2")):
        perturb_head(model, name, seed)
    for name in ("a", *specs):
        folders[name] = root / name
        model.save_adapter(str(folders[name]), name)
    return folders


def _merge(world: dict[str, Path], capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with torch_threads(1):
        code = run(["merge", str(world["base"]), *args, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _loaded(world: dict[str, Path], folders: dict[str, Path]) -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(bert(MOODS))
    for name, folder in folders.items():
        model.load_adapter(str(folder), name, activate=False)
    return model


def _deltas(model: peftkit.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    return {site: layer.adapters[name].delta_weight(layer.base_layer).detach()
            for site, layer in model.tuner_layers() if name in layer.adapters}


def _head(model: peftkit.AdaptedModel, name: str) -> dict[str, torch.Tensor]:
    return {key.replace(f".copies.{name}.", "."): value.detach() for key, value in model.named_parameters()
            if f".copies.{name}." in key}


def test_a_linear_merge_of_two_folders_is_the_weighted_sum_with_the_named_head(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    code, stdout, err = _merge(world, capsys, str(world["a"]), str(world["b"]), "-o", str(out),
                               "--weights", "0.7,-0.3", "--strategy", "linear", "--head", str(world["b"]))
    assert code == 0, err
    assert f"Wrote the merged adapter 'merged' (lora, rank 8) of a (0.7), b (-0.3) by linear, head b to {out}" in stdout
    model = _loaded(world, {"a": world["a"], "b": world["b"], "m": out})
    a, b, merged = _deltas(model, "a"), _deltas(model, "b"), _deltas(model, "m")
    assert set(merged) == set(a) and len(merged) == 4
    for site, delta in merged.items():
        torch.testing.assert_close(delta, 0.7 * a[site] - 0.3 * b[site], atol=1e-6, rtol=1e-5)
    head, b_head = _head(model, "m"), _head(model, "b")
    assert head and all(torch.equal(head[k], b_head[k]) for k in b_head)
    a_head = _head(model, "a")
    assert not all(torch.equal(head[k], a_head[k]) for k in a_head)
    record = json.loads((out / "merge.json").read_text())
    assert record["strategy"] == "linear" and record["options"] == {"head": "b"}
    assert [(m["name"], m["weight"], m["method"]) for m in record["members"]] == [("a", 0.7, "lora"),
                                                                                   ("b", -0.3, "lora")]
    assert record["labels"] == MOODS
    card = (out / "README.md").read_text()
    assert "by `linear` (head b), made with `peftkit merge`" in card and "weight -0.3" in card


def test_ties_options_reach_the_merge(world: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The folder holds exactly what merge_adapters makes in process with the same options."""
    out = tmp_path / "ties"
    code, stdout, err = _merge(world, capsys, str(world["a"]), str(world["b"]), "-o", str(out), "--weights", "0.6,0.4",
                               "--strategy", "ties", "--density", "0.5", "--majority-sign", "frequency",
                               "--rank", "3", "--head", "average", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["rank"] == 3 and report["options"] == {"density": 0.5, "rank": 3,
                                                         "majority_sign_method": "frequency", "head": "average"}
    model = _loaded(world, {"a": world["a"], "b": world["b"], "saved": out})
    with torch_threads(1):
        model.merge_adapters(["a", "b"], [0.6, 0.4], name="here", strategy="ties", density=0.5, rank=3,
                             majority_sign_method="frequency", modules_to_save="average")
    saved, here = _deltas(model, "saved"), _deltas(model, "here")
    for site in here:
        torch.testing.assert_close(saved[site], here[site], atol=1e-6, rtol=1e-5)
    assert all(torch.equal(_head(model, "saved")[k], v) for k, v in _head(model, "here").items())


def test_ia3_members_merge_elementwise_and_lokr_members_densely_with_the_energy_kept(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = _merge(world, capsys, str(world["i1"]), str(world["i2"]), "-o", str(tmp_path / "ia3"),
                               "--strategy", "linear", "--head", "i1")
    assert code == 0, err
    assert "'merged' (ia3) of i1 (1), i2 (1)" in stdout
    assert json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    code, stdout, err = _merge(world, capsys, str(world["k1"]), str(world["k2"]), "-o", str(tmp_path / "lokr"),
                               "--rank", "2", "--head", "k2")
    assert code == 0, err
    assert "(lora, rank 2)" in stdout and "of the merged change at every site" in stdout
    energy = json.loads((tmp_path / "lokr" / "merge.json").read_text())["energy_kept"]
    assert len(energy) == 4 and all(0 < share < 1 for share in energy.values())


def test_head_by_adapter_name_wins_over_a_hub_members_repo_name(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder ``a`` (adapter name ``a``) and the hub repo ``alice/a`` (adapter name ``alice__a``): ``--head a``
    is the folder's, the name the refusal of an ambiguous head offers; the repo is chosen by its id."""
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    hub = f"local:{tmp_path / 'hub'}"
    peftkit.hub.push(world["b"], "alice/a", hub=hub, progress=False)
    names = {}
    for head in ("a", "alice/a"):
        out = tmp_path / f"m{len(names)}"
        code, _, err = _merge(world, capsys, str(world["a"]), "alice/a", "-o", str(out), "--strategy", "linear",
                              "--head", head, "--hub", hub)
        assert code == 0, err
        names[head] = json.loads((out / "merge.json").read_text())["options"]["head"]
    assert names == {"a": "a", "alice/a": "alice__a"}


def test_the_merged_folder_loads_in_peft_with_the_same_logits(world: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel

    out = tmp_path / "m"
    code, _, err = _merge(world, capsys, str(world["a"]), str(world["b"]), "-o", str(out), "--head", "a")
    assert code == 0, err
    ids = torch.tensor([[2, 7, 9, 4, 3]])
    ours = peftkit.from_pretrained(bert(MOODS), str(out))
    theirs = PeftModel.from_pretrained(bert(MOODS), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(ours(input_ids=ids).logits, bert(MOODS)(input_ids=ids).logits, atol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--density", "0.5"], "density=0.5 has no effect on strategy 'svd'"),
    (["--strategy", "tie"], "unknown merge strategy 'tie'; did you mean 'ties'?"),
    (["--weights", "1"], "1 weight(s) for 2 adapter(s); give one weight per adapter"),
    (["--weights", "1,nan"], "weights must be finite numbers, got nan"),
    (["--head", "zz"], "head 'zz' is not one of the adapters merged; choose one of: average, a, b"),
])
def test_bad_options_are_refused_before_the_base_model_loads(world: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str], args: list[str],
                                                             message: str) -> None:
    """The base model named does not exist: the options are checked first, and nothing is written."""
    with torch_threads(1):
        code = run(["merge", str(tmp_path / "no-base"), str(world["a"]), str(world["b"]), "-o", str(tmp_path / "o"),
                    *args])
    err = capsys.readouterr().err
    assert code == 1 and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("members, message", [
    (["a", "a"], "'{a}' is named twice"),
    (["a", "missing"], "member '{missing}' is not an adapter folder (no such folder)"),
    (["a", "p"], "member '{p}' is a prompt_tuning adapter, which changes the model's inputs and has no layer "
                 "weights to merge"),
    (["a", "b"], "adapters a, b each keep their own copy of 'classifier'; pass modules_to_save='average' or the name "
                 "of the adapter whose copy the merged adapter keeps (peftkit merge: --head average or --head NAME)"),
])
def test_a_merge_that_cannot_be_made_leaves_the_old_folder_as_it_was(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], members: list[str],
        message: str) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    paths = {name: str(world.get(name, tmp_path / name)) for name in members}
    code, _, err = _merge(world, capsys, *[paths[name] for name in members], "-o", str(out), "--overwrite")
    assert code == 1 and " ".join(message.format(**paths).split()) in " ".join(err.split()), err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_existing_folder_needs_overwrite_and_a_member_name_is_not_the_merged_name(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, _, err = _merge(world, capsys, str(world["a"]), str(world["b"]), "-o", str(out))
    assert code == 1 and "exists and is not empty; pass --overwrite to replace it" in err
    code, _, err = _merge(world, capsys, str(world["a"]), str(world["b"]), "-o", str(out), "--overwrite",
                          "--head", "a", "--name", "a")
    assert code == 1 and "the merged adapter's name 'a' is a member's; pick another name (--name)" in err
    code, _, err = _merge(world, capsys, str(world["a"]), str(world["b"]), "-o", str(out), "--overwrite",
                          "--head", "a")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "labels.json", "merge.json", "peftkit.json"]


def test_hub_members_are_pulled_recorded_by_commit_and_the_merge_is_published(
        world: dict[str, Path], any_hub: HubUnderTest, tmp_path: Path,  # noqa: F811 - fixture
        capsys: pytest.CaptureFixture[str]) -> None:
    """A hub id and a folder merged together; the merged folder pushed and loaded back by hub id."""
    pushed = peftkit.hub.push(str(world["a"]), "alice/sst2", hub=any_hub.address, base_model="tests/tiny-bert",
                              progress=False)
    out = tmp_path / "m"
    code, stdout, err = _merge(world, capsys, "alice/sst2", str(world["b"]), "-o", str(out), "--hub", any_hub.address,
                               "--strategy", "dare_linear", "--density", "0.5", "--seed", "3", "--head", "alice/sst2")
    assert code == 0, err
    assert "of sst2 (1), b (1) by dare_linear, density 0.5, seed 3, head sst2" in stdout
    members = json.loads((out / "merge.json").read_text())["members"]
    assert members[0]["source"] == "alice/sst2" and members[0]["commit"] == pushed.commit
    assert members[1]["commit"] is None
    assert "`alice/sst2` at commit" in (out / "README.md").read_text()
    code = run(["hub", "push", str(out), "alice/merged", "--hub", any_hub.address, "--quiet"])
    assert code == 0, capsys.readouterr().err
    ids = torch.tensor([[2, 7, 9, 4, 3]])
    from_hub = peftkit.load(bert(MOODS), "alice/merged", hub=any_hub.address, progress=False)
    from_folder = peftkit.from_pretrained(bert(MOODS), str(out))
    with torch.no_grad():
        torch.testing.assert_close(from_hub(input_ids=ids).logits, from_folder(input_ids=ids).logits)
