"""Early stopping and the best checkpoint: ``callbacks=[EarlyStoppingCallback(...)]``,
``metric_for_best_model`` and ``load_best_model_at_end`` (``--metric-for-best-model``,
``--load-best-model-at-end``), as with transformers' Trainer.

Every training sentence is labelled ``pos`` and every held-out one ``neg``, so the held-out loss rises
at every step while the adapter learns: the first evaluation is the best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import EarlyStoppingCallback

import peftkit
from tests.train_helpers import model_folder, sentiment_rows, torch_threads, write_jsonl

OPTIONS = dict(task="seq-cls", labels=["neg", "pos"], batch_size=8, lr=1e-2, eval_steps=1, logging_steps=1,
               quiet=True, base_model="test/tiny-bert")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_folder(tmp_path_factory.mktemp("best-model") / "bert", "bert", "bert")


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    rows = sentiment_rows(24)
    train = [{"text": r["text"], "label": "pos"} for r in rows[:16]]
    held_out = [{"text": r["text"], "label": "neg"} for r in rows[16:]]
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "dev.jsonl", held_out)


def _eval_losses(result: peftkit.TrainResult) -> dict[int, float]:
    return {entry["step"]: entry["eval_loss"] for entry in result.log_history if "eval_loss" in entry}


def test_early_stopping_stops_when_the_eval_loss_rises(tmp_path: Path, bert: Path, data: tuple[Path, Path]) -> None:
    """The docs' example: the callback alone, metric_for_best_model defaulting to the eval loss."""
    train, dev = data
    stopper = EarlyStoppingCallback(early_stopping_patience=1)
    result = peftkit.train(str(bert), peftkit.LoraConfig(r=4), train, out=tmp_path / "out", eval_data=dev,
                           max_steps=8, callbacks=[stopper], **OPTIONS)
    losses = _eval_losses(result)
    assert losses[2] > losses[1]
    assert result.global_step == 2 < 8 and stopper.early_stopping_patience_counter == 1
    assert result.best_step is None  # the last step's adapter is saved (no load_best_model_at_end)
    assert result.eval_metrics["eval_loss"] == losses[2]


def test_load_best_model_at_end_saves_the_best_checkpoints_adapter(tmp_path: Path, bert: Path,
                                                                   data: tuple[Path, Path]) -> None:
    train, dev = data
    out = tmp_path / "out"
    result = peftkit.train(str(bert), "lora[r=4]", train, out=out, eval_data=dev, max_steps=3,
                           load_best_model_at_end=True, save_total_limit=1, **OPTIONS)
    losses = _eval_losses(result)
    assert result.global_step == 3 and min(losses, key=losses.get) == 1
    assert result.best_step == 1 and result.best_metric == losses[1]
    assert result.eval_metrics["eval_loss"] == losses[1] == result.metrics["loss"]
    # one checkpoint per evaluation; save_total_limit=1 keeps the best one
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]
    saved = load_file(out / "adapter_model.safetensors")
    best = load_file(out / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in saved)
    recorded = json.loads((out / "train_results.json").read_text())
    assert recorded["best_step"] == 1 and recorded["run"]["options"]["load_best_model_at_end"] is True


def test_the_cli_options_rank_by_another_metric(tmp_path: Path, bert: Path, data: tuple[Path, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from peftkit.cli import run

    train, dev = data
    code = run(["train", str(bert), "--task", "seq-cls", "--data", str(train), "--eval", str(dev),
                "--out", str(tmp_path / "out"), "--max-steps", "2", "--eval-steps", "1", "--batch-size", "8",
                "--labels", "neg,pos", "--load-best-model-at-end", "--metric-for-best-model", "accuracy",
                "--base-model", "test/tiny-bert",
                "--quiet", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    accuracies = {e["step"]: e["eval_accuracy"] for e in result["log_history"] if "eval_accuracy" in e}
    best = max(accuracies.values())  # higher is better for a metric not ending in "loss"
    assert result["best_metric"] == best and accuracies[result["best_step"]] == best
    assert result["run"]["options"]["metric_for_best_model"] == "accuracy"


@pytest.mark.parametrize(("options", "message"), [
    (dict(load_best_model_at_end=True), r"load_best_model_at_end compares evaluations.*give eval_data"),
    (dict(metric_for_best_model="loss"), r"metric_for_best_model compares evaluations.*give eval_data"),
    (dict(callbacks=[EarlyStoppingCallback()]), r"EarlyStoppingCallback stops training .* no evaluation data"),
])
def test_comparing_evaluations_without_eval_data_is_refused_before_the_model_loads(
        tmp_path: Path, bert: Path, data: tuple[Path, Path], options: dict, message: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=message):
        peftkit.train(str(bert), "lora", data[0], task="seq-cls", out=tmp_path / "out", labels=["neg", "pos"],
                      base_model="test/tiny-bert", **options)


@pytest.mark.parametrize(("options", "message"), [
    (dict(metric_for_best_model="perplexity"), r"'perplexity' is not an evaluation metric of task seq-cls; "
                                               r"choose one of loss, accuracy, f1_macro"),
    (dict(load_best_model_at_end=True, save_steps=0), r"save_steps=0 writes none"),
])
def test_bad_best_model_options_are_refused_before_the_model_loads(
        tmp_path: Path, bert: Path, data: tuple[Path, Path], options: dict, message: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=message):
        peftkit.train(str(bert), "lora", data[0], task="seq-cls", out=tmp_path / "out", eval_data=data[1],
                      labels=["neg", "pos"], base_model="test/tiny-bert", **options)
