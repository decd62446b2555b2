"""Automatic composition (``peftkit compose BASE --auto``, ``peftkit.auto_compose``) finds a known best combination.

A tiny BERT sentiment classifier (built from a config, word tokenizer) gets a LoRA adapter T trained
for a few steps. Three hub members are constructed around it: ``plus`` = T + N and ``minus`` = T - N
(N a large random low-rank change, side by side in rank-8 factors) and ``noise`` (another random change),
all with T's head. So 0.5 plus + 0.5 minus = T exactly, while each member alone and the uniform average
carry noise. Two more candidates cannot take part: an IA3 adapter (no low-rank weight change) and a
LoRA whose head predicts other labels. Everything is pushed to an embedded hub in a temporary PEFTKIT_HOME.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import peftkit
from peftkit.auto_compose_report import format_report
from tests.hub_helpers import hub_env  # noqa: F401 - fixture
from tests.tiny_models import VOCAB
from tests.train_helpers import sentiment_rows, torch_threads, word_tokenizer, write_jsonl

BASE_ID = "peftkit-tests/tiny-bert-sentiment"
MOODS = ["neg", "pos"]
STEPS = 60
MEMBERS = ("plus", "minus", "noise")
LOUD = 5.0


def bert(labels: list[str]) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=VOCAB, max_position_embeddings=64, id2label=dict(enumerate(labels)),
                        label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def train_target(model: peftkit.AdaptedModel, tokenizer: Any) -> None:
    """Adapter "t": a few Adam steps on sentiment sentences, the head kept as it starts (random), so that the
    weight change in the encoder carries the task."""
    rows = sentiment_rows(64, seed=0)
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([MOODS.index(r["label"]) for r in rows])
    model.train_adapter("t")
    optimizer = torch.optim.Adam(list(model.adapter_parameters("t")), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(STEPS):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def set_members(model: peftkit.AdaptedModel) -> None:
    """plus = t + N, minus = t - N (rank 8: t's 4 and N's 4), noise = a large M; each with t's head."""
    gen = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in params.items():
            if ".adapters.t.lora_" not in key:
                continue
            a_side = key.endswith("lora_A")
            noise = torch.randn(t.shape, generator=gen) * (1.0 if a_side else 1.5)
            loud = torch.randn(t.shape, generator=gen) * (1.0 if a_side else LOUD)
            # A (r, in): t's rows, then N's; B (out, r): t's columns, then N's, signed. noise: M only.
            parts = {"plus": (t, noise), "minus": (t, -noise), "noise": (loud, loud)}
            for name, (own, extra) in parts.items():
                target = params[key.replace(".adapters.t.", f".adapters.{name}.")]
                target.copy_(torch.cat([own if name == "noise" else t, noise if name != "noise" else loud])
                             if a_side else torch.cat([own, extra], dim=1))
        for key, value in params.items():
            if ".copies.t." in key:
                for name in MEMBERS:
                    params[key.replace(".copies.t.", f".copies.{name}.")].copy_(value)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base model folder, the saved member folders, and example files."""
    root = tmp_path_factory.mktemp("auto")
    tokenizer = word_tokenizer("bert")
    base = root / "base"
    bert(MOODS).save_pretrained(base)
    tokenizer.save_pretrained(base)
    folders: dict[str, Path] = {}
    with torch_threads(1):
        model = peftkit.adapt(bert(MOODS), "lora[r=4,alpha=4]", "t")
        model.base_model.config._name_or_path = BASE_ID
        train_target(model, tokenizer)
        for name in MEMBERS:
            model.add_adapter(name, "lora[r=8,alpha=8]")
        set_members(model)
        for name in ("t", *MEMBERS):
            folders[name] = root / name
            model.save_adapter(str(folders[name]), name)
        model.add_adapter("scaler", "ia3")
        folders["scaler"] = root / "scaler"
        model.save_adapter(str(folders["scaler"]), "scaler")
        topics = peftkit.adapt(bert(["food", "sports", "tech"]), "lora[r=4]", "topics")
        topics.base_model.config._name_or_path = BASE_ID
        folders["topics"] = root / "topics"
        topics.save_adapter(str(folders["topics"]), "topics")
    folders["base"] = base
    folders["few"] = write_jsonl(root / "few.jsonl", sentiment_rows(48, seed=1))
    folders["heldout"] = write_jsonl(root / "heldout.jsonl", sentiment_rows(48, seed=2))
    return folders


@pytest.fixture
def hub(world: dict[str, Path], hub_env: Path) -> str:  # noqa: F811 - the fixture imported above
    address = f"local:{hub_env / 'hub'}"
    for name in (*MEMBERS, "scaler", "topics"):
        peftkit.hub.push(str(world[name]), f"alice/{name}", hub=address, base_model=BASE_ID,
                         task="text-classification", progress=False)
    return address


def rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in result["rows"]}


def held_out_score(base: Path, folder: Path | None, examples: Path) -> tuple[float, float]:
    """Loss and accuracy on held-out examples of a saved adapter folder loaded the ordinary way onto ``base``
    (or of the model folder ``base`` alone)."""
    from transformers import AutoModelForSequenceClassification

    from peftkit.core.merge_search import score_batches

    model = AutoModelForSequenceClassification.from_pretrained(base)
    if folder is not None:
        model = peftkit.AdaptedModel.from_pretrained(model, str(folder), "saved")
    rows_ = [json.loads(line) for line in examples.read_text().splitlines()]
    batch = dict(word_tokenizer("bert")([r["text"] for r in rows_], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([MOODS.index(r["label"]) for r in rows_])
    score = score_batches(model, [batch], classification=True)
    return score.loss, score.accuracy


def test_cli_searches_the_hub_learns_a_combination_better_than_the_uniform_average_and_pushes_it(
        world: dict[str, Path], hub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import run

    out = tmp_path / "combined"
    with torch_threads(1):
        code = run(["compose", str(world["base"]), "--auto", "--examples", str(world["few"]),
                    "--eval", str(world["heldout"]), "--search", f"base_model={BASE_ID} task=text-classification",
                    "--hub", hub, "--budget", "40", "--out", str(out), "--push", "alice/combined", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    # Members that cannot take part are left out, each with its reason (also said on stderr).
    reasons = {c["source"]: c["left_out"] for c in result["left_out"]}
    assert set(reasons) == {"alice/scaler", "alice/topics"}
    assert "no low-rank weight change" in reasons["alice/scaler"]
    assert "food, sports, tech" in reasons["alice/topics"] and "neg, pos" in reasons["alice/topics"]
    assert "left out alice/scaler" in captured.err and "left out alice/topics" in captured.err
    assert sorted(m["name"] for m in result["members"]) == sorted(MEMBERS)
    assert all(len(m["revision"]) == 40 for m in result["members"])
    # On held-out data the learned combination beats the uniform average and every member alone.
    by_name = rows(result)
    learned, uniform = by_name["learned weights"], by_name["uniform average"]
    singles = [by_name[name] for name in MEMBERS]
    assert learned["loss"] < uniform["loss"] and learned["accuracy"] > uniform["accuracy"]
    assert learned["accuracy"] >= max(s["accuracy"] for s in singles)
    assert learned["loss"] < min(s["loss"] for s in singles)
    # ... because it found the known answer: plus and minus in equal parts (their noise cancels), no noise.
    weights = result["weights"]
    assert 0.3 < weights["plus"] < 0.8 and 0.3 < weights["minus"] < 0.8 and abs(weights["noise"]) < 0.2
    assert result["evaluations"] == 40 and result["heldout_examples"] == 48 and result["search_examples"] == 48
    # The folder is an ordinary LoRA adapter that scores what the search reported.
    loss, accuracy = held_out_score(world["base"], out, world["heldout"])
    assert loss == pytest.approx(learned["loss"], abs=1e-4) and accuracy == learned["accuracy"]
    record = json.loads((out / "auto_compose.json").read_text())
    assert record["weights"] == result["weights"] and record["examples"] == 96
    # The pushed card records the members with their revisions, the weights, the examples and the metrics.
    pulled = Path(peftkit.hub.pull("alice/combined", hub=hub, progress=False))
    card = (pulled / "README.md").read_text()
    for member in result["members"]:
        assert f"`alice/{member['name']}@{member['revision']}` | {result['weights'][member['name']]:+.4f}" in card
    assert "on 48 examples" in card and "48 held-out examples" in card
    assert f"value: {learned['accuracy']}" in card.replace("'", "")
    assert "base_model: peftkit-tests/tiny-bert-sentiment" in card
    assert json.loads((pulled / "auto_compose.json").read_text())["weights"] == result["weights"]


def test_python_api_with_named_candidates_holds_out_part_of_the_examples(world: dict[str, Path], hub: str,
                                                                          tmp_path: Path) -> None:
    with torch_threads(1):
        result = peftkit.auto_compose(str(world["base"]), ["alice/plus", "alice/minus", str(world["noise"]),
                                                           "alice/scaler"],
                                      examples=world["heldout"], hub=hub, budget=30, holdout=0.25, seed=1,
                                      out=tmp_path / "merged", merge=True, progress=False)
    assert [c.source for c in result.left_out] == ["alice/scaler"]
    assert {c.name for c in result.members} == {"plus", "minus", "noise"}
    assert {c.name: c.revision is None for c in result.members} == {"plus": False, "minus": False, "noise": True}
    assert result.heldout_examples == 12 and result.search_examples == 36 and result.evaluations == 30
    assert [r.kind for r in result.rows] == ["single", "single", "single", "uniform", "learned"]
    uniform = next(r for r in result.rows if r.kind == "uniform")
    assert result.learned.accuracy > uniform.accuracy and result.learned.loss < uniform.loss
    table = format_report(result)
    assert "learned weights" in table and "uniform average" in table and "ACCURACY" in table
    assert "\nmerge weights: " in table and "weights weights" not in table
    assert "left out alice/scaler: ia3 has no low-rank weight change" in table
    # merge=True: the base model with the learned combination folded in, as a plain transformers model.
    loss, accuracy = held_out_score(tmp_path / "merged", None, world["heldout"])
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and (tmp_path / "merged" / "auto_compose.json").is_file()
    assert accuracy >= result.learned.accuracy - 0.1  # all 48 examples here, 12 held out in the report


def test_a_search_given_as_keywords_is_capped_at_max_candidates(world: dict[str, Path], hub: str) -> None:
    with torch_threads(1):
        result = peftkit.auto_compose(str(world["base"]), search={"base_model": BASE_ID, "method": "lora"},
                                      examples=world["few"], hub=hub, max_candidates=2, budget=3, progress=False)
    tried = result.members + result.left_out
    assert len(tried) == 2 and all(c.source.startswith("alice/") and c.revision for c in tried)
    assert result.evaluations == 3


def test_bad_requests_fail_with_a_clear_message(world: dict[str, Path], hub: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.learned_composition import AutoComposeError
    from peftkit.cli import run

    with pytest.raises(AutoComposeError, match="either candidates .* or a hub search"):
        peftkit.auto_compose(str(world["base"]), ["alice/plus"], search={"task": "x"}, examples=world["few"])
    with pytest.raises(AutoComposeError, match=r"no candidate can take part.*alice/scaler: ia3 has no low-rank"):
        peftkit.auto_compose(str(world["base"]), ["alice/scaler"], examples=world["few"], hub=hub, progress=False)
    with pytest.raises(AutoComposeError, match="base_model=ORG/NAME"):
        peftkit.auto_compose(str(world["base"]), search="task=text-classification", examples=world["few"], hub=hub)
    with pytest.raises(AutoComposeError, match="fusion_lr must be a number > 0, got 0"):
        peftkit.auto_compose(str(world["base"]), ["alice/plus"], examples=world["few"], hub=hub, fusion_lr=0)
    base, few = str(world["base"]), str(world["few"])
    for argv, message in [
        (["compose", base, "--out", str(tmp_path / "o")], "missing argument 'SPEC'"),
        (["compose", base, "alice/plus", "--auto", "--examples", few, "--out", str(tmp_path / "o")], "not SPEC"),
        (["compose", base, "--auto", "--candidates", "alice/plus", "--out", str(tmp_path / "o")], "--examples"),
        (["compose", base, "--auto", "--examples", few, "--out", str(tmp_path / "o")], "exactly one of"),
        (["compose", base, "alice/plus", "--budget", "5", "--out", str(tmp_path / "o")], "--budget only works"),
    ]:
        assert run(argv) == 2
        assert message in capsys.readouterr().err


def test_search_weights_finds_negative_weights_within_its_budget() -> None:
    from peftkit.core.weight_search import SearchError, search_weights

    target = [0.8, -0.6, 0.1]
    calls: list[list[float]] = []

    def objective(w: list[float]) -> float:
        calls.append(w)
        return sum((a - b) ** 2 for a, b in zip(w, target))

    found = search_weights(objective, [1 / 3] * 3, budget=150, progress=False)
    assert len(calls) == found.evaluations == 150 and calls[0] == [1 / 3] * 3
    assert found.value == min(found.history) and found.value < 1e-3
    assert found.weights == pytest.approx(target, abs=0.05)
    seeded = search_weights(objective, [0.0] * 3, also=[target, [0.0, 0.0, 1.0]], budget=2, progress=False)
    assert seeded.weights == target and seeded.value == 0 and seeded.evaluations == 2
    single = search_weights(lambda w: (w[0] + 1.0) ** 2, [0.5], budget=9, progress=False)
    assert single.evaluations == 9 and single.weights[0] == pytest.approx(-1.0, abs=0.2)
    with pytest.raises(SearchError, match="positive number of evaluations"):
        search_weights(objective, [0.0, 0.0], budget=0)


def test_a_causal_lm_is_scored_by_its_loss(tmp_path: Path) -> None:
    from tests.train_helpers import counting_rows, model_folder

    base = model_folder(tmp_path / "gpt", "gpt2", "gpt")
    folders = []
    from transformers import AutoModelForCausalLM

    for seed in (1, 2):
        model = peftkit.adapt(AutoModelForCausalLM.from_pretrained(base), "lora[r=2]", f"lm{seed}")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.adapter_parameters(f"lm{seed}"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        folders.append(str(tmp_path / f"lm{seed}"))
        model.save_adapter(folders[-1], f"lm{seed}")
    few = write_jsonl(tmp_path / "few.jsonl", counting_rows(12))
    with torch_threads(1):
        result = peftkit.auto_compose(str(base), folders, examples=few, budget=6, progress=False,
                                      out=tmp_path / "out")
    assert result.task == "causal-lm" and {r.accuracy for r in result.rows} == {None}
    assert all(0 < r.loss < 20 for r in result.rows) and result.evaluations == 6
    loaded = peftkit.AdaptedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "out"))
    assert loaded.adapter_record("default").config.r == 4  # the exact sum of two rank-2 changes
