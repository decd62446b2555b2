"""Automatic composition on the support-message family (peftkit.testing_intents), end to end on the real MiniLM.

The new task is the shipped examples/data/support_action_*.jsonl (what the agent does: pay_back, ship_goods,
update_account); the members know the intents of two halves of the departments (intents_of). A small version
of bench/bench_auto_compose.py --task support: members trained for a few steps, pushed to an embedded hub,
found by a hub search, combined by a learned mixture with a fresh head on the first 8 few-shot rows, the
result pushed and loaded back. It checks that the pieces fit, not how well a few steps learn.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import peftkit
from peftkit.testing_intents import ACTIONS, DEPARTMENTS, INTENTS, action_few_shot_task, intents_of, support_task
from tests.hub_helpers import hub_env  # noqa: F401 - fixture
from tests.tiny_models import minilm_path
from tests.train_helpers import torch_threads, write_jsonl

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
ACTION_LABELS = ["pay_back", "ship_goods", "update_account"]


def test_the_action_task_cuts_across_departments_and_its_shipped_file_has_balanced_prefixes() -> None:
    # No department decides the action alone (billing and shipping each hold two actions); each intent does.
    for department in ("billing", "shipping"):
        assert len({ACTIONS[i] for i in INTENTS if DEPARTMENTS[i] == department}) == 2
    task = action_few_shot_task()
    assert list(task.labels) == ACTION_LABELS and task.test == support_task(seed=1, labels="action").test
    assert set(task.train) <= set(support_task(seed=1, labels="action", noise=0.0).train)
    for n, most in ((8, 3), (16, 6), (64, 22)):  # every prefix is as balanced as its length allows
        counts = Counter(y for _, y in task.train[:n])
        assert len(counts) == 3 and max(counts.values()) == most and max(counts.values()) - min(counts.values()) <= 1
    for split, rows in (("train", task.train), ("eval", task.test)):
        lines = (DATA / f"support_action_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == [{"text": t, "label": task.labels[y]} for t, y in rows], (
            "run examples/data/make_data.py")
    half = intents_of(support_task(noise=0.0), ["returns", "account"])
    assert half.labels == ("account_access", "damaged_item", "wrong_item") and len(half.train) == 120
    with pytest.raises(ValueError, match=r"departments \['sales'\]; choose from account, billing"):
        intents_of(support_task(), ["sales"])
    with pytest.raises(ValueError, match="not labelled with the intents"):
        intents_of(support_task(labels="department"), ["billing"])
    with pytest.raises(ValueError, match="n=321"):
        action_few_shot_task(321)


@pytest.mark.slow  # MiniLM trained, combined and loaded back: about a minute of CPU
def test_members_of_the_family_are_combined_for_the_action_task_on_the_embedded_hub(
        hub_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811 - fixture
    from transformers import AutoTokenizer

    from peftkit.cli import run

    base, hub = minilm_path(), f"local:{hub_env / 'hub'}"
    intents = support_task(n_train=96, noise=0.0)
    with torch_threads(2):
        for departments in (("billing", "shipping"), ("returns", "account")):
            part = intents_of(intents, departments)
            name = "_".join(departments)
            data = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": t, "label": part.labels[y]} for t, y in part.train])
            peftkit.train(base, "lora[r=4]", str(data), task="seq-cls", out=str(tmp_path / name), max_steps=3,
                          lr=1e-2, batch_size=8, quiet=True, seed=0, base_model=BASE_ID)
            peftkit.hub.push(str(tmp_path / name), f"alice/{name}", hub=hub, task="text-classification",
                             progress=False)
        few = tmp_path / "few.jsonl"
        few.write_text("\n".join((DATA / "support_action_train.jsonl").read_text().splitlines()[:8]) + "\n")
        held_out = tmp_path / "held_out.jsonl"
        held_out.write_text("\n".join((DATA / "support_action_eval.jsonl").read_text().splitlines()[::8]) + "\n")
        code = run(["compose", base, "--auto", "--examples", str(few), "--eval", str(held_out), "--search",
                    f"base_model={BASE_ID} author=alice", "--hub", hub, "--strategy", "mixture", "--steps", "4",
                    "--lr", "0.05", "--out", str(tmp_path / "combined"), "--push", "alice/support-action", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    # Both members take part although they predict other labels: the action labels get a fresh head.
    assert sorted(m["name"] for m in result["members"]) == ["billing_shipping", "returns_account"]
    assert result["left_out"] == [] and result["fresh_head_labels"] == ACTION_LABELS
    by_name = {row["name"]: row for row in result["rows"]}
    assert set(by_name) == {"billing_shipping", "returns_account", "uniform average", "learned mixture"}
    assert result["heldout_examples"] == 20 and result["search_examples"] == 8
    assert set(result["combinations"]["mixture"]) == {"billing_shipping", "returns_account"}
    # The pushed card keeps what the folder's card says: how it was made and the composition it activates.
    card = (peftkit.hub.pull("alice/support-action", hub=hub, progress=False) / "README.md").read_text()
    assert "A learned mixture of the outputs of 2 adapters" in card and "Composition: `" in card
    # The pushed composition loads from the hub by its id and predicts the action labels as reported.
    model = peftkit.load(base, "alice/support-action", hub=hub, progress=False)
    assert model.base_model.config.id2label == dict(enumerate(ACTION_LABELS))
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    batch = AutoTokenizer.from_pretrained(base)([r["text"] for r in rows], padding=True, return_tensors="pt")
    predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(ACTION_LABELS[p] == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(by_name["learned mixture"]["accuracy"])
