"""``peftkit.AdapterTrainer``: a ``transformers.Trainer`` over an AdaptedModel behaves as it does over a PEFT
model. Checkpoints hold the training adapters, never the base weights; resuming continues the run exactly;
``load_best_model_at_end`` restores the best checkpoint; dataset columns and label names come from the base
model (no ``remove_unused_columns=False`` / ``label_names``); a causal LM's loss is normalized over the shifted
label tokens; the methods' callbacks are added once. Tiny models from configs, real Trainer runs on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import peftkit
from tests.tiny_models import VOCAB, build_tiny


def _classification_rows(count: int = 8, seq: int = 6) -> list[dict]:
    """Rows as a tokenizer gives them, with a text column the model does not take."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (count, seq), generator=gen)
    return [{"text": f"example {i}", "input_ids": row.tolist(), "attention_mask": [1] * seq, "labels": i % 3}
            for i, row in enumerate(ids)]


def _classifier(spec: str = "lora[r=4,alpha=8]") -> peftkit.AdaptedModel:
    model = peftkit.adapt(build_tiny("bert"), spec, "task")
    model.train_adapter("task")
    return model


def _args(folder: Path, **overrides) -> TrainingArguments:
    options = dict(per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", use_cpu=True,
                   disable_tqdm=True, logging_steps=1, seed=7, max_steps=4, save_steps=2)
    options.update(overrides)
    return TrainingArguments(str(folder), **options)


def _trainable(model: peftkit.AdaptedModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_checkpoints_hold_the_adapter_and_not_the_base_model(tmp_path: Path) -> None:
    model = _classifier()
    trainer = peftkit.AdapterTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=_classification_rows())
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    names = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainable_state.safetensors"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    base_tensors = sum(p.numel() for p in model.base_model.parameters())
    saved = sum(t.numel() for t in load_file(str(checkpoint / "adapter_model.safetensors")).values())
    assert saved < base_tensors / 10  # the LoRA factors and the classifier head, not the encoder
    reloaded = peftkit.adapt(build_tiny("bert"), "lora[r=4,alpha=8]", "other")
    reloaded.load_adapter(str(checkpoint), "task")
    reloaded.set_active("task")
    inputs = {"input_ids": torch.tensor([_classification_rows()[0]["input_ids"]])}
    model.eval()
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path: Path) -> None:
    rows = _classification_rows()
    whole = _classifier()
    peftkit.AdapterTrainer(model=whole, args=_args(tmp_path / "whole"), train_dataset=rows).train()

    first = _classifier()
    peftkit.AdapterTrainer(model=first, args=_args(tmp_path / "cut"), train_dataset=rows).train()
    resumed = _classifier(spec="lora[r=4,alpha=8,init_weights=false]")  # other starting values: all overwritten
    trainer = peftkit.AdapterTrainer(model=resumed, args=_args(tmp_path / "cut"), train_dataset=rows)
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    expected, got = _trainable(whole), _trainable(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_a_checkpoint_of_another_adapter_is_refused_with_the_fix(tmp_path: Path) -> None:
    peftkit.AdapterTrainer(model=_classifier(), args=_args(tmp_path / "run"), train_dataset=_classification_rows()).train()
    other = _classifier(spec="lora[r=2,alpha=4]")
    trainer = peftkit.AdapterTrainer(model=other, args=_args(tmp_path / "run"), train_dataset=_classification_rows())
    with pytest.raises(peftkit.PeftkitError, match="does not fit this run's adapter.*other shape"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path: Path) -> None:
    rows = _classification_rows()
    model = _classifier()
    # A learning rate this large makes the loss move around, so the best checkpoint is rarely the last.
    args = _args(tmp_path / "run", max_steps=6, learning_rate=2.0, eval_strategy="steps", eval_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer = peftkit.AdapterTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    saved = load_file(str(best / "trainable_state.safetensors"))
    live = _trainable(model)
    assert saved.keys() == live.keys()
    for name in live:
        torch.testing.assert_close(live[name], saved[name], msg=name)
    losses = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    assert trainer.state.best_metric == min(losses.values())


def test_columns_and_label_names_come_from_the_base_model(tmp_path: Path) -> None:
    """With the Trainer's defaults (remove_unused_columns=True, label_names unset) the text column is dropped,
    the rest kept, and evaluation reports a loss: a plain Trainer drops every column of the wrapper."""
    rows = _classification_rows()
    args = _args(tmp_path / "run", save_strategy="no")
    trainer = peftkit.AdapterTrainer(model=_classifier(), args=args, train_dataset=rows, eval_dataset=rows)
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    plain = Trainer(model=_classifier(), args=args, train_dataset=rows)
    with pytest.raises(ValueError, match="batch received was empty"):
        plain.train()


def test_a_causal_lm_loss_is_the_mean_over_the_shifted_label_tokens(tmp_path: Path) -> None:
    """The Trainer counts the label tokens of all micro-batches of a step (num_items_in_batch) and the model
    divides its summed loss by that count; for a causal LM each row's first token is no target. The Trainer
    asks the model object for its loss type, config and loss kwargs, which the AdaptedModel answers from the
    base model: the logged loss of a step (learning rate 0, two micro-batches of different target counts in
    any order) is the model's own mean token loss over the whole batch, not a mean of the micro-batches'
    means."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (4, 6), generator=gen)
    labels = ids.clone()
    for row, targets in enumerate((5, 3, 2, 1)):  # no two pairs of rows have equal target counts
        labels[row, 1 + targets:] = -100
    rows = [{"input_ids": i.tolist(), "labels": t.tolist()} for i, t in zip(ids, labels)]
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4,alpha=8,target_modules=all-linear,init_weights=false]")
    model.train_adapter("default")
    args = _args(tmp_path / "run", max_steps=1, learning_rate=0.0, save_strategy="no",
                 per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = peftkit.AdapterTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_the_methods_callbacks_are_added_once(tmp_path: Path) -> None:
    model = peftkit.adapt(build_tiny("gpt2"), "adalora[init_r=4,target_r=2,total_step=4]")
    model.train_adapter("default")
    args = _args(tmp_path / "run", save_strategy="no")
    given = peftkit.AdapterTrainer(model=model, args=args, callbacks=peftkit.training_callbacks(model))
    added = peftkit.AdapterTrainer(model=model, args=args)
    for trainer in (given, added):
        kinds = [type(callback).__name__ for callback in trainer.callback_handler.callbacks]
        assert kinds.count("AdaloraCallback") == 1 and kinds.count("LossTermCallback") == 1, kinds


def test_a_model_without_a_training_adapter_is_refused_with_the_fix(tmp_path: Path) -> None:
    args = _args(tmp_path / "run")
    frozen = peftkit.adapt(build_tiny("bert"), "lora[r=4]")
    frozen.requires_grad_(False)
    with pytest.raises(peftkit.PeftkitError, match=r"call model.train_adapter\(name\)"):
        peftkit.AdapterTrainer(model=frozen, args=args)
    with pytest.raises(peftkit.PeftkitError, match=r"adapter_names=\['nope'\] must name adapters of the model "
                                                   r"\(default\)"):
        peftkit.AdapterTrainer(model=frozen, args=args, adapter_names=["nope"])
    with pytest.raises(peftkit.PeftkitError, match="AdapterTrainer trains an AdaptedModel.*not BertForSequence"):
        peftkit.AdapterTrainer(model=build_tiny("bert"), args=args)
    with pytest.raises(peftkit.PeftkitError, match=r"pass model=peftkit.adapt\(...\), not no model \(model_init"):
        peftkit.AdapterTrainer(args=args, model_init=lambda: frozen)


def test_several_training_adapters_are_saved_one_folder_each(tmp_path: Path) -> None:
    model = peftkit.adapt(build_tiny("bert"), "lora[r=4,alpha=8]", "a")
    model.add_adapter("b", "lora[r=2,alpha=4]")
    model.train_adapter("stack(a, b)")
    trainer = peftkit.AdapterTrainer(model=model, args=_args(tmp_path / "run", save_strategy="no"))
    assert trainer.adapter_names == ["a", "b"]
    trainer.save_model(str(tmp_path / "out"))
    for name, rank in (("a", 4), ("b", 2)):
        fresh = peftkit.adapt(build_tiny("bert"), "lora[r=1]", "unused")
        fresh.load_adapter(str(tmp_path / "out" / name), name)
        assert fresh.adapters[name].r == rank


def _fusion_model() -> peftkit.AdaptedModel:
    torch.manual_seed(0)
    model = peftkit.AdaptedModel(build_tiny("bert"))
    model.add_adapter("ner", "lora[r=4,init_weights=false]")
    model.add_adapter("pos", "ia3")
    model.add_fusion(peftkit.Fuse("ner", "pos"))
    return model


def test_a_training_fusion_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    """AdapterHub's flow: members frozen, the fusion trains; its checkpoints hold the fusion (at the root when
    it is the one part that trains), and with a training adapter beside it, each part in its own folder."""
    rows = _classification_rows()
    model = _fusion_model()
    model.train_fusion(peftkit.Fuse("ner", "pos"))
    trainer = peftkit.AdapterTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=rows)
    assert (trainer.adapter_names, trainer.fusion_names) == ([], ["ner_pos"])
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "fusion_config.json").is_file() and not (checkpoint / "adapter_config.json").exists()
    fresh = _fusion_model()
    fresh.delete_fusion("ner_pos")
    fresh.load_fusion(str(checkpoint))
    for (name, trained), (_, loaded) in zip(model.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(loaded, trained, msg=name)

    resumed = _fusion_model()
    resumed.train_fusion(peftkit.Fuse("ner", "pos"))
    peftkit.AdapterTrainer(model=resumed, args=_args(tmp_path / "run"), train_dataset=rows).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for (name, whole), (_, again) in zip(model.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(again, whole, msg=name)

    both = _fusion_model()
    both.train_fusion(peftkit.Fuse("ner", "pos"))  # and a member trains beside the fusion
    for parameter in both.adapter_parameters("ner"):
        parameter.requires_grad_(True)
    trainer = peftkit.AdapterTrainer(model=both, args=_args(tmp_path / "both", save_strategy="no"))
    trainer.save_model(str(tmp_path / "both" / "out"))
    assert (tmp_path / "both" / "out" / "ner" / "adapter_config.json").is_file()
    assert (tmp_path / "both" / "out" / "fusions" / "ner_pos" / "fusion_config.json").is_file()


def test_combined_with_seq2seq_trainer_it_generates_in_evaluation(tmp_path: Path) -> None:
    """docs/guide.md: ``class AdapterSeq2SeqTrainer(peftkit.AdapterTrainer, Seq2SeqTrainer)`` keeps both: the
    adapter-only checkpoints and generation in predict (the adapted model's generate)."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
    from transformers.data.data_collator import default_data_collator

    class AdapterSeq2SeqTrainer(peftkit.AdapterTrainer, Seq2SeqTrainer):
        pass

    model = peftkit.adapt(build_tiny("t5"), "lora[r=4,target_modules=all-linear]")
    model.train_adapter("default")
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, VOCAB, (7,), generator=gen).tolist(),
             "labels": torch.randint(3, VOCAB, (4,), generator=gen).tolist()} for _ in range(8)]
    args = Seq2SeqTrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                                    report_to="none", use_cpu=True, disable_tqdm=True, save_steps=2,
                                    predict_with_generate=True)
    trainer = AdapterSeq2SeqTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
    trainer.train()
    names = {path.name for path in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    predictions = trainer.predict(rows).predictions
    model.eval()
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([rows[0]["input_ids"]]))
    assert predictions[0][: expected.shape[1]].tolist() == expected[0].tolist()
