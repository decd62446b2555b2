"""Automatic composition as a PEFT merging user runs it: members with and without a task head, a DoRA
candidate beside several strategies, and the uniform-average row of the report.

A tiny BERT sentiment classifier (built from a config, word tokenizer) and adapter folders made on it:
``a`` and ``b`` (LoRA, each with its own copy of the classification head, perturbed apart so that
their heads predict differently), ``plain`` (a LoRA folder without a head, as PEFT writes one with
``task_type=None``) and ``dora`` (LoRA with DoRA). Candidates are given as folders (no hub needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.auto_compose_report import AutoComposeResult
from tests.hub_helpers import hub_env  # noqa: F401 - fixture
from tests.test_auto_compose import MOODS, bert
from tests.train_helpers import sentiment_rows, torch_threads, word_tokenizer, write_jsonl


def perturb_head(model: peftkit.AdaptedModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.named_parameters():
            if f".copies.{name}." in key:
                value.add_(torch.randn(value.shape, generator=gen))


def _without_head(folder: Path, out: Path) -> Path:
    """A copy of an adapter folder with no task head, as PEFT saves a LoRA made with task_type=None."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(modules_to_save=None, task_type=None)
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("walk")
    base = root / "base"
    bert(MOODS).save_pretrained(base)
    word_tokenizer("bert").save_pretrained(base)
    folders = {"base": base}
    with torch_threads(1):
        torch.manual_seed(0)
        model = peftkit.adapt(bert(MOODS), "lora[r=4,init_weights=false]", "a")
        model.base_model.config._name_or_path = str(base)
        model.add_adapter("b", "lora[r=4,init_weights=false]")
        model.add_adapter("dora", "lora[r=4,use_dora=true,init_weights=false]")
        perturb_head(model, "a", 1)
        perturb_head(model, "b", 2)
        for name in ("a", "b", "dora"):
            folders[name] = root / name
            model.save_adapter(str(folders[name]), name)
    folders["plain"] = _without_head(folders["b"], root / "plain")
    folders["few"] = write_jsonl(root / "few.jsonl", sentiment_rows(12, seed=1))
    folders["heldout"] = write_jsonl(root / "heldout.jsonl", sentiment_rows(12, seed=2))
    return folders


def _run(world: dict[str, Path], names: list[str], strategy: str) -> AutoComposeResult:
    with torch_threads(1):
        return peftkit.auto_compose(str(world["base"]), [str(world[n]) for n in names], examples=world["few"],
                                    eval_examples=world["heldout"], strategy=strategy, budget=3, steps=2,
                                    progress=False)


def _uniform(result: AutoComposeResult) -> tuple[float, float | None]:
    row = next(r for r in result.rows if r.kind == "uniform")
    return row.loss, row.accuracy


def test_a_member_without_a_head_is_weighed_with_the_base_models_head(world: dict[str, Path]) -> None:
    """A LoRA folder without a task head beside one with a head: the base model's head (same labels)
    stands for it (this raised TypeError: 'list' object is not callable)."""
    result = _run(world, ["a", "plain"], "weights")
    assert [m.name for m in result.members] == ["a", "plain"]
    assert not result.left_out


def test_a_dora_candidate_is_told_which_strategy_keeps_it_out(world: dict[str, Path]) -> None:
    """With mixture already asked for, the reason must not tell the user to ask for mixture."""
    result = _run(world, ["a", "b", "dora"], "mixture,weights")
    (left,) = result.left_out
    assert left.name == "dora"
    assert "(--strategy mixture or fusion takes it)" not in left.left_out
    assert "without weights in --strategy, mixture takes it" in left.left_out


def test_the_uniform_average_row_combines_as_the_saved_strategy(world: dict[str, Path]) -> None:
    """mixture first: the uniform row is average(a, b) (a's head predicts), the same whether weights is
    also asked for; weights first: the merge with both heads averaged, as the weights strategy saves it."""
    mixture_only = _uniform(_run(world, ["a", "b"], "mixture"))
    mixture_then_weights = _uniform(_run(world, ["a", "b"], "mixture,weights"))
    weights_only = _uniform(_run(world, ["a", "b"], "weights"))
    weights_then_mixture = _uniform(_run(world, ["a", "b"], "weights,mixture"))
    assert mixture_then_weights == pytest.approx(mixture_only, abs=1e-6)
    assert weights_then_mixture == pytest.approx(weights_only, abs=1e-6)
    assert mixture_only[0] != pytest.approx(weights_only[0], abs=1e-4)  # the heads differ, so the rows do


def test_a_fusions_reported_attention_shares_are_the_same_every_run(world: dict[str, Path]) -> None:
    """The shares are read in eval mode, as the fusion was trained and is scored (dropout made them differ
    from run to run while the saved fusion was bit for bit the same)."""
    first = _run(world, ["a", "b"], "fusion").weights
    second = _run(world, ["a", "b"], "fusion").weights
    assert first == second


@pytest.mark.parametrize("ref, what", [("./missing", "no such folder"), ("few", "a file")])
def test_a_candidate_path_that_is_no_adapter_folder_is_named(world: dict[str, Path], ref: str, what: str) -> None:
    """A mistyped folder was read as a hub id ("invalid namespace '.'")."""
    ref = str(world["few"]) if ref == "few" else ref
    with pytest.raises(peftkit.PeftkitError, match=f"candidate '{ref}' is not an adapter folder \\({what}\\)"):
        peftkit.auto_compose(str(world["base"]), [str(world["a"]), ref], examples=world["few"], progress=False)


def test_candidates_keep_the_order_given_whether_folder_or_hub_id(world: dict[str, Path],
                                                                   hub_env: Path) -> None:  # noqa: F811
    """The members (and so the head an average predicts with: the first member's) follow the order of the
    candidates; folders were put before hub ids."""
    hub = f"local:{hub_env / 'hub'}"
    peftkit.hub.push(str(world["b"]), "alice/b", hub=hub, base_model="peftkit-tests/tiny-bert",
                     task="text-classification", progress=False)
    with torch_threads(1):
        result = peftkit.auto_compose(str(world["base"]), ["alice/b", str(world["a"])], examples=world["few"],
                                      eval_examples=world["heldout"], hub=hub, strategy="mixture", steps=1,
                                      progress=False)
    assert [m.name for m in result.members] == ["b", "a"]
    assert list(result.weights) == ["b", "a"]
