"""Automatic composition's gradient-trained strategies (mixture, fusion) and fresh heads, end to end.

The world of tests/test_auto_compose.py: a tiny BERT sentiment classifier, a LoRA ``t`` trained on
the task (its encoder change carries it), ``noise`` (a loud random LoRA with t's head), an IA3
adapter ``scaler`` (no low-rank change, but an output at a layer: mixture and fusion take it), and
``topics`` (a LoRA whose head predicts three other labels). Here ``t`` is the answer: the learned
mixture must find it (weight near 1 on t, near 0 on noise), where the uniform average drowns it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import peftkit
from tests.hub_helpers import hub_env  # noqa: F401 - fixture
from tests.test_auto_compose import MOODS, bert, world  # noqa: F401 - world is a fixture
from tests.train_helpers import sentiment_rows, torch_threads, word_tokenizer, write_jsonl

CHEERS = {"neg": "boo", "pos": "yay"}


def rows(result: Any) -> dict[str, Any]:
    return {row.name: row for row in result.rows}


def loaded_score(base: Path, folder: Path, examples: Path, labels: list[str]) -> tuple[float, float, list[str]]:
    """Held-out loss and accuracy of a saved composition folder loaded the ordinary way, and the labels the
    loaded model's config names."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.core.merge_search import score_batches

    model = peftkit.load_composition(AutoModelForSequenceClassification.from_pretrained(base), str(folder))
    data = [json.loads(line) for line in examples.read_text().splitlines()]
    batch = dict(word_tokenizer("bert")([r["text"] for r in data], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([labels.index(r["label"]) for r in data])
    score = score_batches(model, [batch], classification=True)
    config = model.base_model.config
    return score.loss, score.accuracy, [config.id2label[i] for i in range(len(config.id2label))]


def merged_score(folder: Path, examples: Path, labels: list[str]) -> tuple[float, float]:
    """Held-out loss and accuracy of a merged model folder loaded by transformers alone, which must name the
    examples' labels."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.core.merge_search import score_batches

    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.config.id2label == dict(enumerate(labels))
    data = [json.loads(line) for line in examples.read_text().splitlines()]
    batch = dict(word_tokenizer("bert")([r["text"] for r in data], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([labels.index(r["label"]) for r in data])
    score = score_batches(model, [batch], classification=True)
    return score.loss, score.accuracy


def test_the_learned_mixture_finds_the_member_that_is_the_answer_and_saves_a_composition(
        world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811 - the fixture imported above
    from peftkit.auto_compose_report import format_report

    prompt = peftkit.adapt(bert(MOODS), "prompt_tuning[num_virtual_tokens=2]", "prompt")
    prompt.save_adapter(str(tmp_path / "prompt"), "prompt")
    out = tmp_path / "mixed"
    with torch_threads(1):
        result = peftkit.auto_compose(
            str(world["base"]), [str(world[n]) for n in ("t", "noise", "scaler", "topics")] + [str(tmp_path / "prompt")],
            examples=world["few"], eval_examples=world["heldout"], strategy="mixture,fusion", steps=60, lr=0.05,
            l1=0.01, out=out, progress=False)
    # IA3 takes part in a mixture and a fusion; a prompt (no output at a layer) and other labels do not.
    assert [c.name for c in result.members] == ["t", "noise", "scaler"]
    reasons = {c.name: c.left_out for c in result.left_out}
    assert "changes the model's inputs" in reasons["prompt"] and "food, sports, tech" in reasons["topics"]
    by_name = rows(result)
    assert [r.kind for r in result.rows] == ["single"] * 3 + ["uniform", "learned", "learned"]
    mixture, fusion, uniform = by_name["learned mixture"], by_name["learned fusion"], by_name["uniform average"]
    # The value check: t alone is the answer; the mixture puts its weight there and beats the uniform average.
    weights = result.combinations["mixture"]
    assert weights["t"] > 0.6 and abs(weights["noise"]) < 0.15, weights
    assert mixture.loss < uniform.loss and mixture.accuracy >= uniform.accuracy
    assert mixture.loss <= by_name["t"].loss + 0.05 and mixture.accuracy >= by_name["t"].accuracy - 0.05
    assert fusion.accuracy is not None and sum(result.combinations["fusion"].values()) == pytest.approx(1.0)
    assert result.weights == weights and result.strategy == "mixture" and result.learned is mixture
    assert all(r.seconds > 0 for r in result.rows if r.kind == "learned")
    table = format_report(result)
    assert "learned mixture" in table and "learned fusion" in table and "mixture weights: t +" in table
    assert "\nfusion attention: " in table
    # The folder is a composition: loaded the ordinary way it scores what the report said.
    data = json.loads((out / "composition.json").read_text())
    assert data["composition_string"].startswith("average(t, noise, scaler, __base__, weights=[")
    loss, accuracy, _ = loaded_score(world["base"], out, world["heldout"], MOODS)
    assert loss == pytest.approx(mixture.loss, abs=1e-4) and accuracy == mixture.accuracy
    record = json.loads((out / "auto_compose.json").read_text())
    assert record["weights"] == weights and record["examples"] == 96 and record["strategy"] == "mixture"
    card = (out / "README.md").read_text()
    assert "learned mixture of the outputs of 3 adapters" in card and "on 48 examples" in card
    assert f"| `{world['t']}` | {weights['t']:+.4f} |" in card and "heldout_accuracy" in card


def test_the_fusion_trains_at_fusion_lr_and_the_mixture_at_lr(world: dict[str, Path]) -> None:  # noqa: F811
    """A fusion's d x d projections take their own rate: changing fusion_lr changes the fusion alone."""
    runs = []
    with torch_threads(1):
        for fusion_lr in (1e-3, 3e-2):
            runs.append(peftkit.auto_compose(
                str(world["base"]), [str(world[n]) for n in ("t", "noise")], examples=world["few"],
                eval_examples=world["heldout"], strategy="mixture,fusion", steps=4, lr=0.05, fusion_lr=fusion_lr,
                progress=False))
    slow, fast = runs
    assert slow.combinations["mixture"] == fast.combinations["mixture"]
    assert slow.combinations["fusion"] != fast.combinations["fusion"]
    assert (slow.settings["fusion_lr"], fast.settings["fusion_lr"]) == (1e-3, 3e-2)


def test_a_new_label_set_gets_a_fresh_head_trained_with_the_combination(
        world: dict[str, Path], hub_env: Path, tmp_path: Path,  # noqa: F811 - fixtures imported above
        capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import run

    files = {}
    for split, seed in (("few", 1), ("heldout", 2)):
        data = [{"text": r["text"], "label": CHEERS[r["label"]]} for r in sentiment_rows(48, seed=seed)]
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", data)
    out, hub = tmp_path / "fresh", f"local:{hub_env / 'hub'}"
    with torch_threads(1):
        code = run(["compose", str(world["base"]), "--auto", "--examples", str(files["few"]), "--eval",
                    str(files["heldout"]), "--candidates", f"{world['t']}, {world['topics']}",
                    "--strategy", "mixture,fusion", "--steps", "80", "--lr", "0.05", "--out", str(out), "--json",
                    "--hub", hub, "--push", "alice/cheers"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    # No member predicts boo / yay: a fresh head is trained, so members of any label set take part.
    assert result["fresh_head_labels"] == ["boo", "yay"] and result["left_out"] == []
    by_name = {row["name"]: row for row in result["rows"]}
    assert set(by_name) == {"t", "topics", "uniform average", "learned mixture", "learned fusion"}
    # The fusion fuses t and topics although their own heads predict different labels: the fresh head predicts.
    assert by_name["learned fusion"]["accuracy"] >= 0.6 and set(result["combinations"]["fusion"]) == {"t", "topics"}
    learned = by_name["learned mixture"]
    assert learned["loss"] < by_name["uniform average"]["loss"] and learned["accuracy"] >= 0.75
    assert learned["accuracy"] >= by_name["uniform average"]["accuracy"]
    assert learned["weights"]["t"] > 0.6 and abs(learned["weights"]["topics"]) < 0.1  # t carries the task
    assert by_name["t"]["accuracy"] > by_name["topics"]["accuracy"]  # every row trained the same fresh head
    loss, accuracy, labels = loaded_score(world["base"], out, files["heldout"], ["boo", "yay"])
    assert labels == ["boo", "yay"] and accuracy == learned["accuracy"] and loss == pytest.approx(learned["loss"],
                                                                                                abs=1e-4)
    assert json.loads((out / "adapters" / "fresh_head" / "labels.json").read_text())["labels"] == ["boo", "yay"]
    assert "fresh classification head for the labels boo, yay" in (out / "README.md").read_text()
    # Pushed as a composition repo whose card says how it was made; it loads from the hub.
    pulled = Path(peftkit.hub.pull("alice/cheers", hub=hub, progress=False))
    card = (pulled / "README.md").read_text()
    assert "learned mixture of the outputs of 2 adapters" in card and f"{learned['weights']['t']:+.4f}" in card
    assert json.loads((pulled / "auto_compose.json").read_text())["fresh_head_labels"] == ["boo", "yay"]
    assert loaded_score(world["base"], pulled, files["heldout"], ["boo", "yay"])[1] == learned["accuracy"]
    # The plain hub load: the composition repo stands for its composition, the fresh head predicting.
    model = peftkit.load(str(world["base"]), "alice/cheers", hub=hub, progress=False)
    assert model.active_composition == peftkit.load_composition(bert(MOODS), str(out)).active_composition
    assert model.base_model.config.id2label == {0: "boo", 1: "yay"}
    # peftkit compose --merge folds the pushed mixture (its average of LoRA members) and the fresh head into a
    # plain transformers model that predicts what the composition did, with the labels.
    merged = tmp_path / "merged"
    assert run(["compose", str(world["base"]), "alice/cheers", "--out", str(merged), "--merge", "--hub", hub,
                "-q"]) == 0
    assert merged_score(merged, files["heldout"], ["boo", "yay"]) == pytest.approx((learned["loss"],
                                                                                    learned["accuracy"]), abs=1e-4)
    # compose (without --auto) reports what it composed as JSON: the member with the commit it pulled, the
    # adapters it brought with their methods, the labels, what --merge folded in (the fresh head last).
    capsys.readouterr()
    assert run(["compose", str(world["base"]), "alice/cheers", "--out", str(tmp_path / "m2"), "--merge", "--hub",
                hub, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [member] = report["members"]
    assert member["repo_id"] == "alice/cheers" and member["revision"] is None and member["kind"] == "composition"
    assert len(member["commit"]) == 40 and report["merged"] and report["merged_adapters"][-1] == "fresh_head"
    assert report["adapters"] == {"t": "lora", "topics": "lora", "fresh_head": "lora"}
    assert report["labels"] == ["boo", "yay"] and report["out"] == str(tmp_path / "m2")
    assert run(["compose", str(world["base"]), f"alice/cheers@{member['commit']}", "--out", str(tmp_path / "c"),
                "--hub", hub, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["members"] == [{**member, "revision": member["commit"]}] and not plain["merged"]
    assert plain["merged_adapters"] is None and plain["composition"] == str(model.active_composition)
    assert (tmp_path / "c" / "composition.json").is_file()


def test_a_named_head_lets_a_stack_average_members_whose_heads_differ(tmp_path: Path) -> None:
    """What a saved fresh-head mixture relies on: inside stack(..., head=h), averaged members' heads never run."""
    from peftkit.core.errors import CompositionError

    model = peftkit.adapt(bert(MOODS), "lora[r=2]", "two")
    three = peftkit.adapt(bert(["a", "b", "c"]), "lora[r=2]", "three")
    folder = tmp_path / "three"
    three.save_adapter(str(folder), "three")
    model.load_adapter(str(folder), "three", activate=False)
    model.add_adapter("h", "lora[r=2]")
    with pytest.raises(CompositionError, match="predict different labels"):
        model.set_active("average(two, three)")
    model.set_active('stack(average(two, three), h, head=h)')
    assert model.base_model.config.id2label == {0: "neg", 1: "pos"}  # h's head (a copy of the base's)
    with pytest.raises(CompositionError, match="predict different labels"):
        model.set_active('stack(average(two, three), h, head=two)')  # two's head runs: the average is checked


def test_the_weights_strategy_cannot_train_a_head_and_other_refusals(
        world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from peftkit.cli import run
    from peftkit.learned_composition import AutoComposeError

    data = [{"text": r["text"], "label": CHEERS[r["label"]]} for r in sentiment_rows(8, seed=1)]
    few = write_jsonl(tmp_path / "few.jsonl", data)
    with torch_threads(1):
        with pytest.raises(AutoComposeError, match="fresh classification head .* use --strategy mixture or fusion"):
            peftkit.auto_compose(str(world["base"]), [str(world["t"])], examples=few, progress=False)
    with pytest.raises(AutoComposeError, match="strategy must be one or more of weights, mixture, fusion"):
        peftkit.auto_compose(str(world["base"]), [str(world["t"])], examples=few, strategy="magic")
    with pytest.raises(AutoComposeError, match="merge folds a weight change"):
        peftkit.auto_compose(str(world["base"]), [str(world["t"])], examples=few, strategy="fusion", merge=True,
                             out=tmp_path / "o")
    assert run(["compose", str(world["base"]), "alice/t", "--strategy", "mixture", "--out", str(tmp_path / "o")]) == 2
    assert "--strategy only works with --auto" in capsys.readouterr().err


def test_a_mixture_with_a_fresh_head_merges_into_a_plain_transformers_model_with_its_labels(
        world: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811 - the fixture imported above
    """--merge folds a mixture of LoRA members into the weights (the exact weighted sum) and the fresh head's
    head-only adapter in as the model's head: transformers alone predicts what the composition predicted."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    files = {}
    for split, seed in (("few", 1), ("heldout", 2)):
        data = [{"text": r["text"], "label": CHEERS[r["label"]]} for r in sentiment_rows(24, seed=seed)]
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", data)
    candidates = [str(world[n]) for n in ("t", "noise", "scaler")]
    with torch_threads(1):
        mixed = peftkit.auto_compose(str(world["base"]), candidates, examples=files["few"],
                                     eval_examples=files["heldout"], strategy="mixture", steps=30, lr=0.05,
                                     out=tmp_path / "mixed", progress=False)
        merged = peftkit.auto_compose(str(world["base"]), candidates, examples=files["few"],
                                      eval_examples=files["heldout"], strategy="mixture", steps=30, lr=0.05,
                                      out=tmp_path / "merged", merge=True, progress=False)
    # Without --merge the IA3 member takes part in the mixture; with it, only members with a low-rank change.
    assert set(mixed.weights) == {"t", "noise", "scaler"} and mixed.left_out == []
    assert [c.name for c in merged.left_out] == ["scaler"] and "--merge folds the mixture" in merged.left_out[0].left_out
    assert merged.fresh_head_labels == ["boo", "yay"] and set(merged.weights) == {"t", "noise"}
    assert merged_score(tmp_path / "merged", files["heldout"], ["boo", "yay"]) == pytest.approx(
        (merged.learned.loss, merged.learned.accuracy), abs=1e-4)
    # The unmerged composition keeps the fresh head as a head-only adapter folder that peft loads too.
    head = tmp_path / "mixed" / "adapters" / "fresh_head"
    assert json.loads((head / "adapter_config.json").read_text())["target_modules"] == "dummy-target-modules"
    peft_model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(world["base"]),
                                           str(head)).eval()
    fresh = peftkit.AdaptedModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(world["base"]),
                                                 str(head), "fresh_head")
    inputs = dict(word_tokenizer("bert")(["so good", "awful day"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, fresh(**inputs).logits)
