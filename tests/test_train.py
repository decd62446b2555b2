"""peftkit.train on every task with tiny models, any installed method, the real MiniLM,
and what a run leaves on disk (adapter, card with metrics, labels, results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.card import read_card_metadata
from peftkit.core.errors import PeftkitError
from peftkit.core.own_metadata import read_own_metadata
from tests.tiny_models import minilm_path
from tests.train_helpers import (TASK_MODELS, model_folder, rows_for, sentiment_rows, torch_threads, word_tokenizer,
                                 write_jsonl)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-models")
    return {task: model_folder(root / task, *TASK_MODELS[task]) for task in TASK_MODELS}


def _auto_class(task: str):
    import transformers

    return getattr(transformers, {"seq-cls": "AutoModelForSequenceClassification",
                                  "token-cls": "AutoModelForTokenClassification",
                                  "causal-lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM"}[task])


@pytest.mark.parametrize("task", sorted(TASK_MODELS))
def test_each_task_trains_evaluates_and_saves(tmp_path, folders, task):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for(task, 32))
    dev = write_jsonl(tmp_path / "dev.jsonl", rows_for(task, 8, seed=5))
    out = tmp_path / "out"
    result = peftkit.train(str(folders[task]), "lora[r=4]", data, task=task, out=out, eval_data=dev, max_steps=4,
                           batch_size=8, lr=5e-3, logging_steps=1, save_steps=0, quiet=True)

    assert result.global_step == 4 and result.train_examples == 32 and result.eval_examples == 8
    expected = {"loss", "train_loss"} | ({"accuracy"} if task in ("seq-cls", "token-cls") else {"perplexity"})
    assert expected <= set(result.metrics)
    assert all(isinstance(v, float) for v in result.metrics.values())
    # The card records task, dataset and metrics; train_results.json the whole run.
    meta = read_card_metadata((out / "README.md").read_text())
    pipeline = {"seq-cls": "text-classification", "token-cls": "token-classification",
                "causal-lm": "text-generation", "seq2seq": "text2text-generation"}[task]
    # a local file is no hub dataset: the card names it in its text, not in `datasets`
    assert meta["pipeline_tag"] == pipeline and "datasets" not in meta
    assert "the local file `train.jsonl`" in (out / "README.md").read_text()
    card_metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert card_metrics == pytest.approx(result.metrics)
    saved = json.loads((out / "train_results.json").read_text())
    assert saved["metrics"] == pytest.approx(result.metrics) and saved["global_step"] == 4
    assert saved["run"]["options"]["max_steps"] == 4 and saved["run"]["method"] == "lora[r=4]"
    assert [e["step"] for e in saved["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert not (out / "checkpoints").exists()  # save_steps=0: no checkpoints
    # The run's tokenizer lies beside the adapter, as transformers' Trainer saves it.
    from transformers import AutoTokenizer

    text = "good movie , bad film"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(folders[task])(text)["input_ids"]

    # The folder loads onto a fresh base model and reproduces the trained adapter's parameters.
    kwargs = {}
    if task in ("seq-cls", "token-cls"):
        labels = json.loads((out / "labels.json").read_text())
        assert labels["labels"] == result.labels
        kwargs = {"num_labels": len(labels["labels"]), "ignore_mismatched_sizes": True}
    base = _auto_class(task).from_pretrained(folders[task], **kwargs)
    loaded = peftkit.AdaptedModel.from_pretrained(base, str(out))
    assert loaded.trainable_parameters()[0] == 0
    assert sum(p.numel() for p in loaded.adapter_parameters("default")) == result.trainable_parameters


def test_loss_decreases_on_a_learnable_task(tmp_path, folders):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq2seq", 64))
    result = peftkit.train(str(folders["seq2seq"]), "lora[r=8,alpha=16]", data, task="seq2seq", out=tmp_path / "o",
                           max_steps=24, batch_size=16, lr=1e-2, logging_steps=4, save_steps=0, quiet=True)
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]


def test_seq_cls_with_real_minilm_beats_chance(tmp_path):
    """MiniLM (a BertModel folder) gets a fresh 2-label head; LoRA + head learn the polarity task."""
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(200, seed=1))
    dev = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(60, seed=2))
    result = peftkit.train(minilm_path(), "lora[r=8]", data, task="seq-cls", out=tmp_path / "o", eval_data=dev,
                           epochs=3, batch_size=16, lr=3e-3, max_length=32, save_steps=0, quiet=True)
    assert result.labels == ["neg", "pos"]
    assert result.metrics["accuracy"] >= 0.9
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]


def test_seq_cls_folder_loads_in_real_peft_with_the_same_logits(tmp_path, folders):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 16))
    out = tmp_path / "o"
    peftkit.train(str(folders["seq-cls"]), "lora[r=4]", data, task="seq-cls", out=out, max_steps=3, lr=1e-2,
                  save_steps=0, quiet=True)
    tok = word_tokenizer("bert")
    batch = tok(["good movie", "bad film"], return_tensors="pt", padding=True)
    ours = peftkit.AdaptedModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(folders["seq-cls"], num_labels=2, ignore_mismatched_sizes=True), str(out))
    theirs = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(folders["seq-cls"], num_labels=2, ignore_mismatched_sizes=True), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits)


def test_a_transformers_pipeline_takes_the_output_folder(tmp_path, folders):
    """transformers' pipeline given the output folder alone (its PEFT integration, real peft: the base model the
    adapter names, then the adapter) scores as the adapter loaded by peftkit does (docs/train.md)."""
    from transformers import AutoModelForSequenceClassification, pipeline

    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 16))
    out = tmp_path / "o"
    peftkit.train(str(folders["seq-cls"]), "lora[r=4]", data, task="seq-cls", out=out, max_steps=3, lr=1e-2,
                  save_steps=0, quiet=True)
    texts = ["good movie", "bad film"]
    # the tiny base model's config has a head of another size: the pipeline is told the adapter's, as for the base
    classify = pipeline("text-classification", model=str(out),
                        model_kwargs={"num_labels": 2, "ignore_mismatched_sizes": True})
    scores = [row["score"] for row in classify(texts)]
    base = AutoModelForSequenceClassification.from_pretrained(folders["seq-cls"], num_labels=2,
                                                              ignore_mismatched_sizes=True)
    ours = peftkit.AdaptedModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        probs = ours(**word_tokenizer("bert")(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    assert scores == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


@pytest.mark.parametrize("spec", ["seq_bn[reduction_factor=4]", "double_seq_bn", "par_bn", "ia3", "prefix_tuning",
                                  "prompt_tuning[num_virtual_tokens=4]", "bitfit"])
def test_any_installed_method_trains(tmp_path, folders, spec):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("causal-lm", 16))
    out = tmp_path / "o"
    result = peftkit.train(str(folders["causal-lm"]), spec, data, task="causal-lm", out=out, eval_data=data,
                           max_steps=2, lr=1e-2, save_steps=0, quiet=True)
    assert result.method == spec.split("[")[0] and result.trainable_parameters > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert read_own_metadata(out, config)["method"] == result.method
    assert "loss" in result.metrics


def test_prompt_tuning_on_token_classification_aligns_labels(tmp_path, folders):
    """Soft prompts put virtual tokens in front: loss and accuracy use the trailing positions."""
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("token-cls", 16))
    result = peftkit.train(str(folders["token-cls"]), "prompt_tuning[num_virtual_tokens=5]", data, task="token-cls",
                           out=tmp_path / "o", eval_data=data, max_steps=2, save_steps=0, quiet=True)
    assert 0.0 <= result.metrics["accuracy"] <= 1.0


def test_model_and_tokenizer_objects(tmp_path, folders):
    from transformers import AutoModelForSequenceClassification

    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 16))
    model = AutoModelForSequenceClassification.from_pretrained(folders["seq-cls"], num_labels=2,
                                                               ignore_mismatched_sizes=True)
    result = peftkit.train(model, "lora", data, task="seq-cls", out=tmp_path / "o", tokenizer=word_tokenizer("bert"),
                           max_steps=1, save_steps=0, quiet=True)
    assert result.global_step == 1 and model.config.id2label == {0: "neg", 1: "pos"}
    three = AutoModelForSequenceClassification.from_pretrained(folders["seq-cls"], num_labels=3)
    with pytest.raises(PeftkitError, match="the model has 3 labels but the data has 2"):
        peftkit.train(three, "lora", data, task="seq-cls", out=tmp_path / "p", tokenizer=word_tokenizer("bert"),
                      max_steps=1, quiet=True)


def test_an_earlier_run_is_not_silently_mixed_in(tmp_path, folders):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    out = tmp_path / "o"
    kwargs = dict(task="seq-cls", out=out, max_steps=2, save_steps=1, quiet=True)
    peftkit.train(str(folders["seq-cls"]), "lora", data, **kwargs)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    with pytest.raises(PeftkitError, match="already holds files from an earlier run; continue it with --resume"):
        peftkit.train(str(folders["seq-cls"]), "lora", data, **kwargs)
    result = peftkit.train(str(folders["seq-cls"]), "lora", data, overwrite=True, **{**kwargs, "max_steps": 1})
    assert result.global_step == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]


def test_bad_options_and_specs_fail_before_any_model_loads(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    with pytest.raises(PeftkitError, match="unknown training option\\(s\\) 'epoch' \\(did you mean 'epochs'\\?\\)"):
        peftkit.train("no-such-model", "lora", data, task="seq-cls", out=tmp_path / "o", epoch=3)
    with pytest.raises(PeftkitError, match="'learning_rate', 'zzz' \\('learning_rate': write 'lr'\\); options: "):
        peftkit.train("no-such-model", "lora", data, task="seq-cls", out=tmp_path / "o", learning_rate=1e-3, zzz=1)
    with pytest.raises(PeftkitError, match="batch_size must be a whole number >= 1"):
        peftkit.train("no-such-model", "lora", data, task="seq-cls", out=tmp_path / "o", batch_size=0)
    with pytest.raises(PeftkitError, match="unknown task 'classify'"):
        peftkit.train("no-such-model", "lora", data, task="classify", out=tmp_path / "o")
    with pytest.raises(peftkit.ConfigError, match="rank"):
        peftkit.train("no-such-model", "lora[rank=8]", data, task="seq-cls", out=tmp_path / "o")
    with pytest.raises(PeftkitError, match="model folder '.*no-such-model' does not exist"):
        peftkit.train(str(tmp_path / "no-such-model"), "lora", data, task="seq-cls", out=tmp_path / "o")
    with pytest.raises(PeftkitError, match="'no-such-model': it is not a local folder.*offline mode is on"):
        peftkit.train("no-such-model", "lora", data, task="seq-cls", out=tmp_path / "o")  # offline: no hub


def _dropout_free_gpt2(path: Path) -> Path:
    from tests.tiny_models import build_tiny

    model = build_tiny("gpt2")
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model.save_pretrained(path)
    word_tokenizer("gpt").save_pretrained(path)
    return path


def test_gradient_accumulation_and_checkpointing_give_the_same_adapter(tmp_path):
    """The loss is the mean over every label token of an optimizer step, however the step is split
    into micro-batches (rows of different lengths make a mean of means differ), and activation
    checkpointing changes memory, not results."""
    import random

    from safetensors.torch import load_file

    from tests.train_helpers import DIGITS, NEUTRAL

    model = _dropout_free_gpt2(tmp_path / "gpt2")
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(NEUTRAL + DIGITS) for _ in range(rng.randint(2, 12)))} for _ in range(16)]
    data = write_jsonl(tmp_path / "lm.jsonl", rows)

    def adapter(name: str, **options) -> dict[str, torch.Tensor]:
        peftkit.train(str(model), "lora[r=4]", data, task="causal-lm", out=tmp_path / name, text_field="text",
                      max_steps=2, lr=1e-2, save_steps=0, quiet=True, **options)
        return load_file(str(tmp_path / name / "adapter_model.safetensors"))

    whole = adapter("whole", batch_size=8)
    for other in (adapter("accum", batch_size=2, grad_accum=4),
                  adapter("checkpointing", batch_size=8, gradient_checkpointing=True)):
        for key in whole:
            torch.testing.assert_close(other[key], whole[key], rtol=1e-4, atol=1e-6)
    assert any(k.endswith("lora_B.weight") and whole[k].abs().sum() > 0 for k in whole)
