"""Checkpoints of `peftkit train` and resuming: an interrupted run, resumed, ends with
the adapter an uninterrupted run with the same seed ends with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import peftkit
from peftkit.cli import run
from peftkit.core.errors import PeftkitError
from tests.train_helpers import model_folder, rows_for, torch_threads, write_jsonl

STEPS = 10  # 40 examples, batch 8: 5 steps per epoch, 2 epochs
OPTIONS = dict(task="seq-cls", epochs=2, batch_size=8, lr=5e-3, logging_steps=1, save_steps=4, seed=3, quiet=True)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    return model_folder(root / "bert", "bert", "bert"), write_jsonl(root / "train.jsonl", rows_for("seq-cls", 40))


class StopAt(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as an interruption would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class CountSteps(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_resumed_run_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path, setup):
    model, data = setup
    # lora_dropout and BERT's own dropout make the RNG state part of what a resume must restore.
    spec = "lora[r=4,dropout=0.1]"
    whole = peftkit.train(str(model), spec, data, out=tmp_path / "whole", **OPTIONS)
    assert whole.global_step == STEPS

    first = peftkit.train(str(model), spec, data, out=tmp_path / "run", callbacks=[StopAt(4)], **OPTIONS)
    assert first.global_step == 4
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "labels.json",
            "trainable_state.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= \
        {p.name for p in checkpoint.iterdir()}
    at_checkpoint = _weights(checkpoint)

    counter = CountSteps()
    resumed = peftkit.train(str(model), spec, data, out=tmp_path / "run", resume=True, callbacks=[counter],
                            **OPTIONS)
    assert resumed.resumed_from == str(checkpoint)
    assert counter.steps == list(range(5, STEPS + 1))  # only the steps after the checkpoint ran
    assert resumed.global_step == STEPS
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "run")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    # Resuming really restored the adapter: the checkpoint differs from the end result.
    assert any(not torch.allclose(at_checkpoint[k], a[k]) for k in a)


def test_prefix_tuning_with_its_projection_mlp_resumes_exactly(tmp_path, setup):
    """The adapter folder holds only the MLP's output; the trainable state holds the MLP."""
    model, data = setup
    spec = "prefix_tuning[num_virtual_tokens=4,prefix_projection=true,encoder_hidden_size=16]"
    whole = peftkit.train(str(model), spec, data, out=tmp_path / "whole", **OPTIONS)
    peftkit.train(str(model), spec, data, out=tmp_path / "run", callbacks=[StopAt(4)], **OPTIONS)
    resumed = peftkit.train(str(model), spec, data, out=tmp_path / "run",
                            resume=str(tmp_path / "run" / "checkpoints" / "checkpoint-4"), **OPTIONS)
    assert whole.global_step == resumed.global_step == STEPS
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "run")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_a_union_with_a_prefix_resumes_exactly_and_refuses_other_parts(tmp_path, setup):
    """The prefix part's geometry is filled in when the adapter is added: a resume asking for the same
    union without it (as the user wrote it) must match, and a different part option must not."""
    model, data = setup
    spec = 'mam[parts=["prefix_tuning[num_virtual_tokens=4,prefix_projection=true,encoder_hidden_size=16]","par_bn"]]'
    whole = peftkit.train(str(model), spec, data, out=tmp_path / "whole", **OPTIONS)
    peftkit.train(str(model), spec, data, out=tmp_path / "run", callbacks=[StopAt(4)], **OPTIONS)
    other = spec.replace("num_virtual_tokens=4", "num_virtual_tokens=5")
    with pytest.raises(PeftkitError, match=r"checkpoint-4 was trained with method 'mam' and parts="):
        peftkit.train(str(model), other, data, out=tmp_path / "run", resume=True, **OPTIONS)
    resumed = peftkit.train(str(model), spec, data, out=tmp_path / "run", resume=True, **OPTIONS)
    assert whole.global_step == resumed.global_step == STEPS
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "run")
    assert a.keys() == b.keys() and any(k.startswith("prefix_tuning.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_is_a_loadable_adapter_folder(tmp_path, setup):
    from transformers import AutoModelForSequenceClassification

    model, data = setup
    peftkit.train(str(model), "lora", data, out=tmp_path / "o", **{**OPTIONS, "epochs": 1})
    checkpoint = tmp_path / "o" / "checkpoints" / "checkpoint-4"
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2, ignore_mismatched_sizes=True)
    loaded = peftkit.AdaptedModel.from_pretrained(base, str(checkpoint))
    assert loaded.active_adapters == ["default"]


def test_cli_resume_takes_the_newest_checkpoint_and_refuses_another_method(tmp_path, setup, capsys):
    model, data = setup
    out = tmp_path / "o"
    base = ["train", str(model), "--task", "seq-cls", "--data", str(data), "--out", str(out), "--epochs", "2",
            "--batch-size", "8", "--save-steps", "4", "--seed", "3", "--quiet"]
    assert run(base + ["--max-steps", "8"]) == 0
    capsys.readouterr()
    assert run(base + ["--method", "lora[r=2]", "--max-steps", "10", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint-8 was trained with method 'lora' and r=8 (this run: 2)" in err
    assert run(base + ["--max-steps", "10", "--resume", "--json"]) == 0
    assert '"resumed_from": "' + str(out / "checkpoints" / "checkpoint-8") + '"' in capsys.readouterr().out


def test_resume_from_a_folder_that_is_no_checkpoint(tmp_path, setup):
    model, data = setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftkitError, match="is not a peftkit training checkpoint"):
        peftkit.train(str(model), "lora", data, out=tmp_path / "o", resume=str(tmp_path / "empty"), **OPTIONS)
