"""A new user's first day, scripted: the README's and docs/train.md's flows end to end on the real MiniLM.

Through the real CLI (``peftkit.cli.run``, what the ``peftkit`` script calls) with the embedded hub under
``$PEFTKIT_HOME`` (docs/hub.md): train a 4-label topic adapter and push it from ``peftkit train``, train a
2-label sentiment adapter and push it with ``peftkit hub push``, find both by base model, pull one, compose
both into a composition folder and into a merged model, and load the merged model with transformers alone.
Checked: the labels (names, not ``LABEL_0``) everywhere, the refusal to average heads with different
labels, and that every file comes out with the umask's normal permissions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from tests.tiny_models import minilm_path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
TOPICS = ["food", "sports", "tech", "travel"]
MOODS = ["negative", "positive"]
STACK = "stack(alice/sentiment, alice/topic)"
UMASK = 0o022


def _subset(source: str, per_label: int, out: Path) -> Path:
    """The first ``per_label`` examples of each label of an example data file."""
    kept: dict[str, list[str]] = {}
    for line in (ROOT / "examples" / "data" / source).read_text().splitlines():
        rows = kept.setdefault(json.loads(line)["label"], [])
        if len(rows) < per_label:
            rows.append(line)
    out.write_text("\n".join(line for rows in kept.values() for line in rows) + "\n")
    return out


def _cli(*argv: str) -> tuple[int, str]:
    from peftkit.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(argv))
    return code, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run the whole walkthrough once; each test checks one part of what the user saw."""
    root = tmp_path_factory.mktemp("first-day")
    minilm = minilm_path()
    train = ("train", minilm, "--task", "seq-cls", "--method", "lora[r=8]", "--max-steps", "2", "--batch-size", "8",
             "--lr", "3e-3", "--base-model", BASE_ID)
    topic_data = _subset("topic_train.jsonl", 3, root / "topic.jsonl")
    mood_data = _subset("sentiment_train.jsonl", 4, root / "sentiment.jsonl")
    mood_eval = _subset("sentiment_eval.jsonl", 2, root / "sentiment_eval.jsonl")
    steps: dict[str, tuple[int, str]] = {}
    old_umask = os.umask(UMASK)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PEFTKIT_HOME", str(root / "home"))  # the embedded hub: $PEFTKIT_HOME/hub
        env.delenv("PEFTKIT_HUB", raising=False)
        try:
            steps["train topic"] = _cli(*train, "--data", str(topic_data), "--out", str(root / "out" / "topic"),
                                        "--push", "alice/topic")
            steps["train sentiment"] = _cli(*train, "--data", str(mood_data), "--eval", str(mood_eval), "--out",
                                            str(root / "out" / "sentiment"))
            steps["push sentiment"] = _cli("hub", "push", str(root / "out" / "sentiment"), "alice/sentiment",
                                           "--task", "text-classification", "-q")
            steps["search"] = _cli("hub", "search", "--base-model", BASE_ID, "--task", "text-classification",
                                   "--json")
            steps["pull"] = _cli("hub", "pull", "alice/topic", "--out", str(root / "pulled"), "-q")
            steps["compose"] = _cli("compose", minilm, STACK, "--out", str(root / "composed"), "-q")
            steps["merge"] = _cli("compose", minilm, STACK, "--out", str(root / "merged"), "--merge", "-q")
            steps["average"] = _cli("compose", minilm, "average(alice/sentiment, alice/topic)", "--out",
                                    str(root / "averaged"), "-q")
            import peftkit

            loaded = {spec: peftkit.load(minilm, spec, progress=False) for spec in ("alice/topic", STACK)}
            yield {"root": root, "steps": steps, "loaded": loaded, "minilm": minilm}
        finally:
            os.umask(old_umask)


def _ok(day: dict[str, Any], step: str) -> str:
    code, output = day["steps"][step]
    assert code == 0, f"{step} failed:\n{output[-3000:]}"
    return output


def test_train_push_search_and_pull(day: dict[str, Any]) -> None:
    root = day["root"]
    assert "pushed: alice/topic" in _ok(day, "train topic")
    assert "accuracy" in _ok(day, "train sentiment")  # evaluated on --eval
    _ok(day, "push sentiment")
    hits = {hit["repo_id"]: hit for hit in json.loads(_ok(day, "search"))}
    assert set(hits) == {"alice/topic", "alice/sentiment"}
    assert all(hit["base_model"] == BASE_ID and hit["method"] == "lora" for hit in hits.values())
    _ok(day, "pull")
    for folder, labels in ((root / "out" / "topic", TOPICS), (root / "out" / "sentiment", MOODS),
                           (root / "pulled", TOPICS)):
        assert json.loads((folder / "labels.json").read_text())["labels"] == labels


def test_a_training_output_loads_with_its_labels_as_docs_train_md_shows(day: dict[str, Any]) -> None:
    import peftkit
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(day["minilm"])  # any number of labels
    model = peftkit.AdaptedModel.from_pretrained(base, str(day["root"] / "out" / "topic"))
    assert model.config.id2label == dict(enumerate(TOPICS)) and model.adapter_labels("default") == TOPICS


def test_loading_from_the_hub_gives_the_adapters_labels(day: dict[str, Any]) -> None:
    topic, stacked = day["loaded"]["alice/topic"], day["loaded"][STACK]
    assert topic.config.id2label == dict(enumerate(TOPICS)) and topic.config.label2id["tech"] == 2
    assert stacked.config.id2label == dict(enumerate(TOPICS))  # a stack predicts with its last adapter's head
    assert stacked.adapter_labels("sentiment") == MOODS
    composition = stacked.active_composition
    stacked.set_active("sentiment")
    try:
        assert stacked.config.id2label == dict(enumerate(MOODS))
    finally:
        stacked.set_active(composition)  # the other tests use the stack
    assert stacked.config.id2label == dict(enumerate(TOPICS))


def test_compose_keeps_each_members_labels(day: dict[str, Any]) -> None:
    import peftkit
    from transformers import AutoModelForSequenceClassification

    assert "labels: food, sports, tech, travel" in _ok(day, "compose")  # what the stack predicts
    composed = day["root"] / "composed"
    for name, labels in (("sentiment", MOODS), ("topic", TOPICS)):
        assert json.loads((composed / "adapters" / name / "labels.json").read_text())["labels"] == labels
    base = AutoModelForSequenceClassification.from_pretrained(day["minilm"])
    model = peftkit.AdaptedModel.load_composition(base, str(composed))
    assert model.config.id2label == dict(enumerate(TOPICS))


def test_the_merged_model_needs_only_transformers(day: dict[str, Any]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    assert "labels: food, sports, tech, travel" in _ok(day, "merge")
    merged_dir = str(day["root"] / "merged")
    assert json.loads((day["root"] / "merged" / "config.json").read_text())["id2label"] == {
        str(i): n for i, n in enumerate(TOPICS)}
    model = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert model.config.id2label == dict(enumerate(TOPICS))
    texts = ["The striker scored twice in the derby.", "Let the dough rest for an hour."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, day["loaded"][STACK](**batch).logits, atol=1e-4)
    predicted = pipeline("text-classification", model=model, tokenizer=tokenizer)(texts)
    assert all(p["label"] in TOPICS for p in predicted)


def test_averaging_heads_with_different_labels_is_refused(day: dict[str, Any]) -> None:
    code, output = day["steps"]["average"]
    assert code == 1 and "predict different labels" in output and "use stack" in output, output[-2000:]
    assert not (day["root"] / "averaged").exists()


def test_every_file_gets_the_umasks_permissions(day: dict[str, Any]) -> None:
    root = day["root"]
    wrong = []
    for top in ("out", "pulled", "composed", "merged"):
        for path in [root / top, *(root / top).rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            want = (0o777 if path.is_dir() else 0o666) & ~UMASK
            if mode != want:
                wrong.append(f"{path.relative_to(root)}: {oct(mode)}, not {oct(want)}")
    assert not wrong, "\n".join(wrong)
