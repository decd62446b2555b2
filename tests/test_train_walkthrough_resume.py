"""Found by the `peftkit train` walkthrough: resuming a run whose last checkpoint is its last step, an
interrupted run's report and exit code, options that contradict each other or have the wrong type, and
what a failed push after training tells the user to run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

import peftkit
import peftkit.hub_client
import peftkit.training
from peftkit.cli import run
from peftkit.core.errors import PeftkitError
from peftkit.training_plan import TRAINABLE_STATE_FILE, TrainOptions, push_adapter
from tests.train_helpers import model_folder, rows_for, torch_threads, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """A tiny BERT folder and its data; torch on one thread meanwhile (faster on a shared 2-core machine)."""
    root = tmp_path_factory.mktemp("walkthrough-resume")
    with torch_threads(1):
        yield model_folder(root / "bert", "bert", "bert"), write_jsonl(root / "train.jsonl", rows_for("seq-cls", 24))


def _run_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    # A constant rate: a step past the end would change the adapter (a linear schedule has reached 0 there).
    return ["train", str(model), "--base-model", "tiny/bert", "--task", "seq-cls", "--data", str(data),
            "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--lr-scheduler", "constant",
            "--save-steps", "3", "--seed", "5", *extra]


def test_resuming_from_the_last_step_trains_nothing_more(tmp_path, setup, capsys):
    """transformers resumes from a checkpoint at max_steps (not at an epoch's end) by training one more
    step: re-running a finished run with --resume changed its adapter and wrote checkpoint-4."""
    model, data = setup
    out = tmp_path / "out"
    assert run(_run_args(model, data, out, "--quiet")) == 0
    before = load_file(str(out / "adapter_model.safetensors"))
    capsys.readouterr()

    assert run(_run_args(model, data, out, "--resume")) == 0
    captured = capsys.readouterr()
    after = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 3
    assert "train_loss" not in results["metrics"]  # the Trainer's mean over no steps reads 0
    assert "nothing left to train" in captured.err
    assert "trained 3 steps\n" in captured.out


def _complete_checkpoint(folder: Path, step: int) -> Path:
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoint / TRAINABLE_STATE_FILE).write_bytes(b"")
    return checkpoint


def _interrupting(monkeypatch, write, interrupt) -> None:
    """`peftkit train` whose run writes checkpoints with ``write(out)``, then is interrupted."""

    def train(model, method, data, *, out, **options):
        write(Path(out))
        interrupt()

    monkeypatch.setattr(peftkit.training, "train", train)


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not stop the run")


def _unhandled_sigterm(_signum, _frame) -> None:
    """Stands in for SIGTERM's default (ending pytest) while a test sends one."""
    raise AssertionError("SIGTERM reached the handler outside the run, not the run's")


def _ctrl_c() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt, code", [(_ctrl_c, 130), (_sigterm, 143)])
def test_an_interrupted_run_names_the_newest_complete_checkpoint(tmp_path, setup, monkeypatch, capsys,
                                                                  interrupt, code):
    model, data = setup
    out = tmp_path / "out"

    def write(folder: Path) -> None:
        _complete_checkpoint(folder / "checkpoints", 4)
        (folder / "checkpoints" / "checkpoint-8").mkdir()  # interrupted while the Trainer wrote it

    _interrupting(monkeypatch, write, interrupt)
    previous = signal.signal(signal.SIGTERM, _unhandled_sigterm)
    try:
        assert run(_run_args(model, data, out)) == code
        assert signal.getsignal(signal.SIGTERM) is _unhandled_sigterm  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'checkpoint-4'}" in err
    assert "--resume" in err and "Aborted" not in err


def test_an_interrupted_run_without_a_checkpoint_says_to_start_over(tmp_path, setup, monkeypatch, capsys):
    model, data = setup
    out = tmp_path / "out"
    _interrupting(monkeypatch, lambda folder: (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True), _ctrl_c)
    assert run(_run_args(model, data, out, "--checkpoint-dir", str(tmp_path / "ck"))) == 130
    err = capsys.readouterr().err
    assert f"interrupted before a checkpoint was complete in {tmp_path / 'ck'}" in err
    assert "nothing to resume: run the command again to start over" in err


def test_resume_and_overwrite_together_are_refused(tmp_path, setup, capsys):
    model, data = setup
    assert run(_run_args(model, data, tmp_path / "out", "--resume", "--overwrite")) == 1
    assert "--resume (resume=) continues the run in the output folder and --overwrite (overwrite=True) starts it over" \
        in capsys.readouterr().err


def test_resume_from_a_folder_that_does_not_exist(tmp_path, setup, capsys):
    model, data = setup
    missing = tmp_path / "ck" / "checkpoint-9"
    assert run(_run_args(model, data, tmp_path / "out", "--resume", str(missing))) == 1
    assert f"--resume '{missing}': no such folder" in capsys.readouterr().err


def test_base_model_with_a_mistyped_model_folder_says_there_is_no_folder(tmp_path, setup, capsys):
    _, data = setup
    typo = "models/bret"  # relative, so it also reads as a hub id
    assert run(_run_args(Path(typo), data, tmp_path / "out")) == 1
    assert f"If '{typo}' is meant to be a model folder, there is no folder at that path" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, says", [
    ("epochs", "3", "epochs must be a number, not str '3'"),
    ("batch_size", 8.0, "batch_size must be a whole number, not float 8.0"),
    ("seed", True, "seed must be a whole number, not bool True"),
])
def test_options_of_the_wrong_type_name_the_option(tmp_path, setup, option, value, says):
    model, data = setup
    with pytest.raises(PeftkitError, match=says):
        peftkit.train(str(model), "lora", data, task="seq-cls", out=tmp_path / "out", **{option: value})


def test_a_push_failing_after_training_says_how_to_publish_without_training_again(tmp_path, monkeypatch):
    def push(*args, **kwargs):
        raise PeftkitError("cannot reach hub at http://127.0.0.1:9")

    monkeypatch.setattr(peftkit.hub_client, "push", push)
    opts = TrainOptions(push="alice/sentiment", hub="http://127.0.0.1:9", private=True)
    with pytest.raises(peftkit.PushAfterTrainingError) as caught:
        push_adapter(tmp_path / "my out", opts, "text-classification", None, {})
    assert str(caught.value).endswith("publish it without training again: peftkit hub push "
                                      f"'{tmp_path / 'my out'}' alice/sentiment --hub http://127.0.0.1:9 --private")


def test_a_run_whose_push_fails_after_training_exits_3_with_the_adapter_saved(tmp_path, setup, monkeypatch, capsys):
    """A script must tell 'trained, not published' (push the folder again) from a failed run (train again)."""
    def push(*args, **kwargs):
        raise peftkit.HubError("the hub answered 503 Service Unavailable")

    monkeypatch.setattr(peftkit.hub_client, "push", push)
    model, data = setup
    out = tmp_path / "out"
    assert run(_run_args(model, data, out, "--push", "alice/sentiment", "--hub", "local:" + str(tmp_path / "hub"),
                         "--quiet")) == 3
    assert f"the adapter is trained and saved in {out}, but pushing it to alice/sentiment failed" in \
        capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()
    assert run(_run_args(model, data, tmp_path / "bad", "--batch-size", "0")) == 2  # other codes stay as they were


def test_an_unknown_lr_scheduler_is_refused_before_the_model_loads(tmp_path, setup, monkeypatch, capsys):
    """'cosinus' failed only after the model and data were loaded and encoded, in transformers' words."""
    import transformers

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the scheduler was checked")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", must_not_load)
    model, data = setup
    args = _run_args(model, data, tmp_path / "out")
    args[args.index("constant")] = "cosinus"
    assert run(args) == 1
    assert ("lr_scheduler (--lr-scheduler) 'cosinus' is not one of transformers' schedulers; did you mean 'cosine'? "
            "choose one of linear, cosine") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    TrainOptions(lr_scheduler="cosine_with_restarts").check_scheduler()
