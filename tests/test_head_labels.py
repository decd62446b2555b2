"""Classifier adapters bring their own labels: the head's size and names come from the adapter.

A 4-label adapter loads onto a base whose head has 2 (from a folder, a hub, a
composition), the model config names the labels of the head that runs, a
merged model's config.json carries them, and combining heads that predict
different labels is refused. Tiny BERTs built from configs; the real MiniLM
runs in tests/test_first_day_walkthrough.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.composition import Average, BatchSplit, Fuse, Parallel, Stack
from peftkit.core.errors import AdapterLoadError, CompositionError, MergeError
from tests.hub_helpers import hub_env  # noqa: F401 - fixture

TOPICS = ["food", "sports", "tech", "travel"]
MOODS = ["negative", "positive"]
BASE_ID = "peftkit-tests/tiny-bert-classifier"


def tiny(labels: list[str] | None = None, task: str = "seq") -> torch.nn.Module:
    """A tiny BERT classifier; the same seed gives the same encoder whatever the labels."""
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    kwargs = {} if labels is None else {"id2label": dict(enumerate(labels)),
                                        "label2id": {n: i for i, n in enumerate(labels)}}
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=128, max_position_embeddings=64, **kwargs)
    torch.manual_seed(0)
    cls = BertForSequenceClassification if task == "seq" else BertForTokenClassification
    model = cls(config).eval()
    model.config._name_or_path = BASE_ID
    return model


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (4, 7), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def trained(name: str, labels: list[str], seed: int, task: str = "seq") -> peftkit.AdaptedModel:
    """An adapter with random (non-zero) weights and head, on a model built for its labels."""
    model = peftkit.adapt(tiny(labels, task), "lora[r=2]", name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(name):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, labels, seed in (("topic", TOPICS, 1), ("sentiment", MOODS, 2)):
        out[name] = tmp_path / name
        trained(name, labels, seed).save_adapter(str(out[name]), name)
    return out


def test_an_adapter_brings_its_head_size_and_label_names(folders: dict[str, Path]) -> None:
    assert json.loads((folders["topic"] / "labels.json").read_text())["id2label"] == dict(
        (str(i), n) for i, n in enumerate(TOPICS))
    expected = logits(trained("topic", TOPICS, 1))
    base = tiny()  # 2 labels, LABEL_0 and LABEL_1
    model = peftkit.AdaptedModel.from_pretrained(base, str(folders["topic"]), "topic")
    assert torch.allclose(logits(model), expected, atol=1e-6)
    assert base.config.id2label == dict(enumerate(TOPICS)) and base.config.label2id["travel"] == 3
    assert base.config.num_labels == 4 and model.adapter_labels("topic") == TOPICS
    model.set_active(None)  # the model's own head runs again, with its own labels
    assert base.config.id2label == {0: "LABEL_0", 1: "LABEL_1"} and logits(model).shape[-1] == 2
    with model.disable_adapters():
        model.set_active("topic")
    model.set_active("topic")
    with model.disable_adapters():
        assert base.config.num_labels == 2
    assert base.config.num_labels == 4


def test_a_stack_predicts_with_its_last_adapters_head(folders: dict[str, Path]) -> None:
    model = peftkit.AdaptedModel(tiny())
    model.load_adapter(str(folders["sentiment"]), "sentiment", activate=False)
    model.load_adapter(str(folders["topic"]), "topic", activate=False)
    model.set_active(Stack("sentiment", "topic"))
    assert logits(model).shape[-1] == 4 and model.config.id2label == dict(enumerate(TOPICS))
    model.set_active(Stack("topic", "sentiment"))
    assert logits(model).shape[-1] == 2 and model.config.id2label == dict(enumerate(MOODS))
    model.delete_adapter("sentiment")
    assert model.active_adapters == ["topic"] and model.config.id2label == dict(enumerate(TOPICS))


def test_a_pipeline_on_the_base_model_runs_the_active_adapters_and_names_their_labels(
        folders: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """composition.md: a transformers pipeline takes ``model.base_model`` (the adapters run inside its
    modules); it predicts what the adapted model does, with the labels of the head that runs, and
    transformers logs nothing about an unknown model class (it does for the AdaptedModel itself)."""
    import logging

    from transformers import BertTokenizer, pipeline

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(123)]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    model = peftkit.AdaptedModel(tiny())
    model.load_adapter(str(folders["sentiment"]), "sentiment", activate=False)
    model.load_adapter(str(folders["topic"]), "topic", activate=False)
    texts = ["w1 w7 w30", "w99 w3 w3 w12"]
    caplog.set_level(logging.WARNING, logger="transformers")
    classify = pipeline("text-classification", model=model.base_model, tokenizer=tokenizer)
    for active, labels in (("topic", TOPICS), ("sentiment", MOODS), (Stack("sentiment", "topic"), TOPICS)):
        model.set_active(active)
        with torch.no_grad():
            expected = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1)
        assert [r["label"] for r in classify(texts)] == [labels[i] for i in expected]
    assert "not supported" not in caplog.text


def test_heads_with_different_labels_are_not_averaged_fused_or_batched_together(folders: dict[str, Path]) -> None:
    model = peftkit.AdaptedModel(tiny())
    for name in ("sentiment", "topic"):
        model.load_adapter(str(folders[name]), name, activate=False)
    with pytest.raises(CompositionError, match=r"predict different labels \(sentiment: 2 labels \(negative, "
                                               r"positive\); topic: 4 labels .*use stack"):
        model.set_active(Average("sentiment", "topic"))
    with pytest.raises(CompositionError, match="predict different labels"):
        model.add_fusion(Fuse("sentiment", "topic", name="both"))
    with pytest.raises(CompositionError, match=r"parallel\(\) runs sentiment, topic in one batch.*numbers of labels"):
        model.set_active(Parallel("sentiment", "topic"))
    with pytest.raises(CompositionError, match="batch_split"):
        model.set_active(BatchSplit("sentiment", "topic", sizes=[2, 2]))
    with pytest.raises(CompositionError, match="adapter_names runs"):
        model(**batch(), adapter_names=["sentiment", "topic", "topic", "sentiment"])
    with pytest.raises(MergeError, match=r"predict different labels \(sentiment: 2 labels"):
        model.merge_adapters(["sentiment", "topic"], name="both", strategy="linear", modules_to_save="average")
    assert set(model.adapters) == {"sentiment", "topic"} and model.active_adapters == []
    # Weight-space merging keeps the head of the member named, with its labels.
    model.merge_adapters(["sentiment", "topic"], name="both", strategy="linear", modules_to_save="topic")
    model.set_active("both")
    assert model.adapter_labels("both") == TOPICS and logits(model).shape[-1] == 4
    # PEFT's spelling takes the same choice (PEFT itself refuses members that each keep a head).
    with pytest.raises(MergeError, match="pass modules_to_save='average' or the name"):
        model.add_weighted_adapter(["sentiment", "topic"], [1.0, 1.0], "peft_spelling", combination_type="linear")
    model.add_weighted_adapter(["sentiment", "topic"], [1.0, 1.0], "peft_spelling", combination_type="linear",
                               modules_to_save="sentiment")
    model.set_active("peft_spelling")
    assert model.adapter_labels("peft_spelling") == MOODS and logits(model).shape[-1] == 2


def test_heads_with_the_same_labels_combine(folders: dict[str, Path], tmp_path: Path) -> None:
    trained("other", TOPICS, 3).save_adapter(str(tmp_path / "other"), "other")
    model = peftkit.AdaptedModel(tiny())
    model.load_adapter(str(folders["topic"]), "topic", activate=False)
    model.load_adapter(str(tmp_path / "other"), "other", activate=False)
    model.set_active(Average("topic", "other"))
    assert logits(model).shape[-1] == 4 and model.config.id2label == dict(enumerate(TOPICS))
    model.set_active(Parallel("topic", "other"))
    assert [p.shape[-1] for p in model.split_parallel(logits(model))] == [4, 4]


def test_a_composition_folder_keeps_each_members_labels(folders: dict[str, Path], tmp_path: Path) -> None:
    model = peftkit.AdaptedModel(tiny())
    for name in ("sentiment", "topic"):
        model.load_adapter(str(folders[name]), name, activate=False)
    model.set_active(Stack("sentiment", "topic"))
    expected = logits(model)
    model.save_composition(str(tmp_path / "both"))
    for name, labels in (("sentiment", MOODS), ("topic", TOPICS)):
        assert json.loads((tmp_path / "both" / "adapters" / name / "labels.json").read_text())["labels"] == labels
    loaded = peftkit.AdaptedModel.load_composition(tiny(), str(tmp_path / "both"))
    assert torch.allclose(logits(loaded), expected, atol=1e-6)
    assert loaded.config.id2label == dict(enumerate(TOPICS)) and loaded.adapter_labels("sentiment") == MOODS


@pytest.mark.parametrize("names", [None, "topic", ["topic"]])
def test_merge_and_unload_keeps_the_head_and_its_labels(folders: dict[str, Path], tmp_path: Path, names) -> None:
    """Also with one adapter named as a plain string (AdapterHub's ``merge_adapter(name)``), never read as the
    sequence of its letters."""
    from transformers import AutoModelForSequenceClassification

    model = peftkit.AdaptedModel.from_pretrained(tiny(), str(folders["topic"]), "topic")
    model.load_adapter(str(folders["sentiment"]), "sentiment", activate=False)
    expected = logits(model)
    merged = model.merge_and_unload(names)
    merged.save_pretrained(str(tmp_path / "merged"))
    again = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert again.config.id2label == dict(enumerate(TOPICS))
    assert torch.allclose(logits(again), expected, atol=1e-5)


def test_unload_gives_back_the_base_model_its_modules_head_and_labels(folders: dict[str, Path]) -> None:
    """PEFT's unload(): every adapter removed without merging; refused (nothing changed) while one is merged."""
    from peftkit.core.layer import ModulesToSave, TunerLayer

    base = tiny()
    expected = logits(base)
    original = {name: type(module) for name, module in base.named_modules()}
    model = peftkit.AdaptedModel.from_pretrained(base, str(folders["topic"]), "topic")
    model.load_adapter(str(folders["sentiment"]), "sentiment")
    model.merge_adapter(["sentiment"])
    with pytest.raises(MergeError, match=r"'sentiment' are merged.*unmerge_adapter\(\) first"):
        model.unload()
    assert model.merged_adapters == ["sentiment"] and model.config.id2label == dict(enumerate(MOODS))
    model.unmerge_adapter()
    bare = model.unload()
    assert bare is base and {name: type(module) for name, module in bare.named_modules()} == original
    assert not any(isinstance(m, (TunerLayer, ModulesToSave)) for m in bare.modules())
    assert bare.config.id2label == {0: "LABEL_0", 1: "LABEL_1"} and bare.config.num_labels == 2
    torch.testing.assert_close(logits(bare), expected)


def test_token_classification_adapters_bring_their_tags(tmp_path: Path) -> None:
    tags = ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]
    source = trained("ner", tags, 4, task="token")
    source.save_adapter(str(tmp_path / "ner"), "ner")
    model = peftkit.AdaptedModel.from_pretrained(tiny(task="token"), str(tmp_path / "ner"), "ner")
    assert logits(model).shape == (4, 7, 5) and torch.allclose(logits(model), logits(source), atol=1e-6)
    assert model.config.id2label == dict(enumerate(tags))


def test_default_labels_write_no_labels_file_and_load_by_size(tmp_path: Path) -> None:
    model = trained("plain", ["LABEL_0", "LABEL_1", "LABEL_2"], 5)
    model.save_adapter(str(tmp_path / "plain"), "plain")
    assert not (tmp_path / "plain" / "labels.json").exists()
    loaded = peftkit.AdaptedModel.from_pretrained(tiny(), str(tmp_path / "plain"), "plain")
    assert loaded.config.num_labels == 3 and loaded.adapter_labels("plain") == ["LABEL_0", "LABEL_1", "LABEL_2"]


def test_a_labels_file_that_does_not_fit_the_head_is_refused(folders: dict[str, Path]) -> None:
    (folders["topic"] / "labels.json").write_text(json.dumps({"labels": ["a", "b"]}))
    base = tiny()
    with pytest.raises(AdapterLoadError, match=r"labels.json names 2 labels \(a, b\) but the adapter's "
                                               r"classification head predicts 4"):
        peftkit.AdaptedModel.from_pretrained(base, str(folders["topic"]), "topic")
    assert base.config.num_labels == 2 and isinstance(base.classifier, torch.nn.Linear)
    (folders["topic"] / "labels.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="labels.json is not valid JSON"):
        peftkit.AdaptedModel.from_pretrained(base, str(folders["topic"]), "topic")


# -- from a hub ---------------------------------------------------------------------------------------------


def test_hub_load_stack_and_compose_bring_each_adapters_labels(folders: dict[str, Path], tmp_path: Path,
                                                               hub_env: Path) -> None:  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    from peftkit.hub_client.compose import compose_to_folder, save_composed

    hub = f"local:{tmp_path / 'hub'}"
    for name in ("sentiment", "topic"):
        peftkit.hub.push(folders[name], f"alice/{name}", hub=hub, progress=False)
    base_dir = tmp_path / "base"
    tiny().save_pretrained(str(base_dir))

    model = peftkit.load(str(base_dir), "alice/topic", hub=hub, progress=False)
    assert model.config.id2label == dict(enumerate(TOPICS))
    assert torch.allclose(logits(model), logits(trained("topic", TOPICS, 1)), atol=1e-6)

    both = peftkit.load(str(base_dir), "stack(alice/sentiment, alice/topic)", hub=hub, progress=False)
    assert logits(both).shape[-1] == 4 and both.config.id2label == dict(enumerate(TOPICS))
    expected = logits(both)
    with pytest.raises(CompositionError, match="predict different labels"):
        peftkit.load(str(base_dir), "average(alice/sentiment, alice/topic)", hub=hub, progress=False)

    summary = save_composed(str(base_dir), "stack(alice/sentiment, alice/topic)", tmp_path / "composed", hub=hub,
                            progress=False)
    assert summary.endswith("; labels: food, sports, tech, travel)")
    # parallel(): each part predicts with its own member's head, so each part's labels are reported
    urgency = ["routine", "urgent"]  # as many labels as sentiment's: parallel() takes both heads
    trained("urgency", urgency, 3).save_adapter(str(tmp_path / "urgency"), "urgency")
    peftkit.hub.push(tmp_path / "urgency", "alice/urgency", hub=hub, progress=False)
    report = compose_to_folder(str(base_dir), "parallel(alice/sentiment, alice/urgency)", tmp_path / "par", hub=hub,
                               progress=False)
    assert report.labels is None and report.labels_by_part == {"sentiment": MOODS, "urgency": urgency}
    assert report.summary().endswith("; labels: sentiment: negative, positive; urgency: routine, urgent)")
    assert report.to_json()["labels_by_part"] == {"sentiment": MOODS, "urgency": urgency}
    assert json.loads((tmp_path / "composed" / "adapters" / "topic" / "labels.json").read_text())["labels"] == TOPICS
    save_composed(str(base_dir), "stack(alice/sentiment, alice/topic)", tmp_path / "merged", hub=hub, merge=True,
                  progress=False)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["id2label"] == {
        str(i): n for i, n in enumerate(TOPICS)}
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.id2label == dict(enumerate(TOPICS))
    assert torch.allclose(logits(merged), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["roberta", "gpt2"])
def test_heads_of_other_shapes_resize_too(arch: str, tmp_path: Path) -> None:
    """RoBERTa's head ends in classifier.out_proj after a dense layer; GPT-2's score has no bias."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    def build(labels: list[str] | None) -> torch.nn.Module:
        torch.manual_seed(0)
        kw = {} if labels is None else {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in
                                                                                          enumerate(labels)}}
        if arch == "roberta":
            return RobertaForSequenceClassification(RobertaConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128,
                max_position_embeddings=130, pad_token_id=1, **kw)).eval()
        return GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                        n_positions=64, pad_token_id=0, bos_token_id=1,
                                                        eos_token_id=2, **kw)).eval()

    source = peftkit.adapt(build(TOPICS), "lora[r=2]", "topic")
    with torch.no_grad():
        for param in source.adapter_parameters("topic"):
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(6)) * 0.2)
    source.save_adapter(str(tmp_path / "topic"), "topic")
    loaded = peftkit.AdaptedModel.from_pretrained(build(None), str(tmp_path / "topic"), "topic")
    assert torch.allclose(logits(loaded), logits(source.eval()), atol=1e-5)
    assert loaded.config.id2label == dict(enumerate(TOPICS))


def test_info_shows_a_classifiers_labels(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import run

    assert run(["info", str(folders["topic"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == TOPICS
    assert run(["info", str(folders["topic"])]) == 0
    assert "       labels: 0: food, 1: sports, 2: tech, 3: travel\n" in capsys.readouterr().out
