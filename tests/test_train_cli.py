"""`peftkit train` on the command line: a run, its report, and clean errors (exit 1,
the file and line named, no traceback) for bad data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.cli import run
from peftkit.core.card import read_card_metadata
from peftkit.core.inspect_folder import TOKENIZER_FILES
from tests.train_helpers import model_folder, rows_for, torch_threads, write_jsonl


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("cli-train") / "bert", "bert", "bert")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_train_command_trains_and_reports(tmp_path, bert_folder, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"sentence": r["text"], "polarity": r["label"]}
                                                  for r in rows_for("seq-cls", 16)])
    out = tmp_path / "out"
    code = run(["train", str(bert_folder), "--method", "lora[r=4]", "--task", "seq-cls", "--data", str(data),
                "--eval", str(data), "--out", str(out), "--text-field", "sentence", "--label-field", "polarity",
                "--labels", "pos,neg", "--max-steps", "2", "--batch-size", "4", "--save-steps", "0",
                "--dataset-name", "toy-sentiment"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trained 2 steps; loss" in captured.out and "accuracy" in captured.out
    assert f"adapter: {out}" in captured.out
    assert "peftkit train: seq-cls, lora adapter 'default'" in captured.err  # the run's notes go to stderr
    assert json.loads((out / "labels.json").read_text())["labels"] == ["pos", "neg"]
    card = (out / "README.md").read_text()
    assert read_card_metadata(card)["datasets"] == ["toy-sentiment"]  # --dataset-name names a hub dataset
    assert "the dataset `toy-sentiment` (local file `train.jsonl`)" in card


def test_json_output_and_quiet(tmp_path, bert_folder, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("token-cls", 8))
    code = run(["train", str(bert_folder), "--task", "token-cls", "--data", str(data), "--out", str(tmp_path / "o"),
                "--max-steps", "1", "--save-steps", "0", "--quiet", "--json"])
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)
    assert result["task"] == "token-cls" and result["labels"] == ["NAME", "O"] and result["global_step"] == 1
    assert "peftkit train:" not in captured.err and "it/s" not in captured.err


BAD_DATA = {
    "malformed JSON": ('{"text": "good", "label": "pos"}\n{"text": "bad" "label": "neg"}\n', "line 2: malformed JSON"),
    "missing field": ('{"text": "good", "label": "pos"}\n{"txt": "bad", "label": "neg"}\n',
                      "line 2: missing field 'text'"),
    "wrong type": ('{"text": "good", "label": "pos"}\n{"text": "bad", "label": ["neg"]}\n',
                   "line 2: label field 'label' must be a string or an integer, not an array"),
    "empty file": ("", "the file holds no records"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_exits_1_naming_file_and_line(tmp_path, bert_folder, capsys, case):
    text, expected = BAD_DATA[case]
    data = tmp_path / "train.jsonl"
    data.write_text(text, encoding="utf-8")
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"Error: {data}" in err and expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unknown_label_in_eval_file(tmp_path, bert_folder, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "good", "label": "pos"}, {"text": "meh", "label": "mixed"}])
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--eval", str(dev),
                "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{dev}, line 2: label 'mixed' is not in the training data ({data})" in err


def test_bad_data_from_a_fresh_process_fails_before_torch_loads(tmp_path, bert_folder):
    """The real entry point: exit 1, one line naming file and line, no traceback, torch never imported."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n\n{"text": 3, "label": "neg"}\n', encoding="utf-8")
    code = ("import sys\nfrom peftkit.cli import run\n"
            f"rc = run(['train', {str(bert_folder)!r}, '--task', 'seq-cls', '--data', {str(data)!r}, "
            f"'--out', {str(tmp_path / 'o')!r}])\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\nsys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: {data}, line 3: field 'text' must be a string, not a number"
    assert proc.stdout.strip() == "torch not loaded"


def test_usage_errors(tmp_path, bert_folder, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    assert run(["train", str(bert_folder), "--task", "classify", "--data", str(data), "--out", "o"]) == 2
    assert run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--out", "o",
                "--labels", "one"]) == 2
    assert run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data),
                "--out", str(tmp_path / "o"), "--resume"]) == 1
    assert "nothing to resume: no checkpoint-N folder" in capsys.readouterr().err


def test_push_publishes_the_adapter_and_labels_to_the_hub(tmp_path, bert_folder, capsys):
    """--push uses the hub client (here the embedded store in a temporary folder): the repo gets the
    adapter, labels.json and a card with task, dataset and metrics; no checkpoint or local paths."""
    import peftkit

    hub = f"local:{tmp_path / 'hub'}"
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 16))
    out = tmp_path / "out"
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--eval", str(data),
                "--out", str(out), "--max-steps", "2", "--save-steps", "1", "--quiet", "--push", "alice/toy-sentiment",
                "--hub", hub, "--base-model", "tiny/bert"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((out / "train_results.json").read_text())
    assert results["pushed"]["repo_id"] == "alice/toy-sentiment" and len(results["pushed"]["commit"]) == 40
    # --quiet still says where the adapter went, in one line
    assert captured.out == (f"adapter: {out}; pushed: alice/toy-sentiment ({results['pushed']['hub']}, "
                            f"commit {results['pushed']['commit']})\n")
    assert captured.err == ""
    # --base-model is recorded in the saved folder too, so a later `peftkit hub push OUT` publishes it
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny/bert"
    assert (out / "checkpoints" / "checkpoint-2").is_dir()  # kept locally, never published

    folder = peftkit.hub.pull("alice/toy-sentiment", hub=hub, cache_dir=tmp_path / "cache", progress=False)
    adapter_files = ["README.md", "adapter_config.json", "adapter_model.safetensors", "labels.json", "peftkit.json"]
    tokenizer_files = sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES)  # published with it
    assert tokenizer_files and sorted(p.name for p in folder.iterdir()) == sorted(adapter_files + tokenizer_files)
    [hit] = peftkit.hub.search(hub=hub, base_model="tiny/bert", task="text-classification")
    assert hit.repo_id == "alice/toy-sentiment"
    card = (folder / "README.md").read_text()
    assert "accuracy" in card and "train.jsonl" in card


def test_push_target_is_checked_before_training(tmp_path, bert_folder, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "o"),
                "--push", "not a repo id", "--hub", f"local:{tmp_path / 'hub'}"])
    assert code == 1 and "not a repo id" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_push_to_a_remote_hub_without_a_token_fails_before_training(tmp_path, bert_folder, capsys, monkeypatch):
    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))  # no stored token
    for name in ("PEFTKIT_HUB_TOKEN", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "o"),
                "--push", "alice/x", "--hub", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 1 and "needs a token" in err and "peftkit hub login --hub http://127.0.0.1:9" in err
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written


def test_json_stdout_is_json_alone_and_warnings_are_one_line(tmp_path, bert_folder, capsys):
    """Without --quiet the Trainer logs its metrics as it goes: with --json they go to stderr, and a
    push's warning (a local base model path) is one 'Warning:' line, not Python's file:line form."""
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "o"),
                "--max-steps", "1", "--save-steps", "0", "--logging-steps", "1", "--json",
                "--push", "alice/x", "--hub", f"local:{tmp_path / 'hub'}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["pushed"]["repo_id"] == "alice/x"
    assert "'train_loss'" in captured.err  # the Trainer's own log line, on stderr
    assert "Warning: the adapter will record the local folder" in captured.err
    assert captured.err.count("--base-model ORG/NAME") == 1  # said when the run starts, not again at the push
    assert "UserWarning" not in captured.err


def test_quiet_run_from_a_fresh_process_prints_only_where_the_adapter_went(tmp_path, bert_folder):
    """--quiet: errors and the result line only, also for what libraries say while the Trainer is imported
    (bitsandbytes, pulled in through peft, notes a missing optional CPU kernel on some machines)."""
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    proc = subprocess.run([sys.executable, "-m", "peftkit", "train", str(bert_folder), "--task", "seq-cls",
                           "--data", str(data), "--out", str(tmp_path / "o"), "--max-steps", "1", "--save-steps", "0",
                           "--quiet", "--base-model", "tiny/bert"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"adapter: {tmp_path / 'o'}\n" and proc.stderr == ""
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_a_local_base_model_is_pointed_out_when_the_run_starts(tmp_path, bert_folder, capsys):
    """A local model folder would be recorded as the base model, which `hub search --base-model` never
    matches: the run says so (and how to pass --base-model) before training, not at the push."""
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "o"),
                "--max-steps", "1", "--save-steps", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    warning = err.index(f"Warning: the adapter will record the local folder {str(bert_folder)!r} as its base model")
    assert "pass --base-model ORG/NAME" in err
    assert warning < err.index("peftkit train: seq-cls")  # before the model loads and training starts
    code = run(["train", str(bert_folder), "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "p"),
                "--max-steps", "1", "--save-steps", "0", "--base-model", "tiny/bert"])
    assert code == 0 and "Warning" not in capsys.readouterr().err


def test_base_model_other_than_the_hub_id_trained_fails_before_loading(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 4))
    code = run(["train", "tiny/bert", "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "o"),
                "--base-model", "tiny/other"])
    err = capsys.readouterr().err
    assert code == 1 and "base_model 'tiny/other' differs from the hub id being trained ('tiny/bert')" in err
    assert not (tmp_path / "o").exists()
