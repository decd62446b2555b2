"""`peftkit train` under torchrun: two CPU processes (gloo) train data-parallel with the
unchanged command, and only the main process writes the adapter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.inspect_folder import TOKENIZER_FILES
from tests.train_helpers import free_port, model_folder, rows_for, write_jsonl


def _torchrun(cwd, args: list[str]) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo, also on a machine with one GPU) running ``args`` under torchrun in ``cwd``,
    where their temporary files (torchrun's torchelastic_* log folders) go too, not to the machine's /tmp."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TMPDIR": str(cwd)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *args, "--cpu"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_process_data_parallel_run_trains_and_saves_once(tmp_path):
    model = model_folder(tmp_path / "bert", "bert", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 32))
    dev = write_jsonl(tmp_path / "dev.jsonl", rows_for("seq-cls", 8, seed=4))
    out = tmp_path / "out"
    proc = _torchrun(tmp_path, ["-m", "peftkit", "train", str(model), "--task", "seq-cls", "--method", "lora[r=4]",
                                "--data", str(data), "--eval", str(dev), "--out", str(out), "--epochs", "1",
                                "--batch-size", "4", "--lr", "1e-2", "--save-steps", "2", "--logging-steps", "1"])

    # 32 examples, 4 per process per step, 2 processes: 4 steps to an epoch.
    results = json.loads((out / "train_results.json").read_text())
    assert results["run"]["world_size"] == 2
    assert results["global_step"] == 4 and results["train_metrics"]["epoch"] == pytest.approx(1.0)
    assert "accuracy" in results["metrics"]
    # One report, from the main process only; one folder, without leftovers of a second writer.
    assert proc.stdout.count("trained 4 steps") == 1
    assert proc.stderr.count("saved the adapter to") == 1
    tokenizer = sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES)  # the run's, saved once
    assert tokenizer and sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "checkpoints", "labels.json", "peftkit.json",
         "train_results.json", *tokenizer])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in (out / "checkpoints" / "checkpoint-4").iterdir()}

    # The adapter trained (LoRA B starts at zero) and loads.
    from transformers import AutoModelForSequenceClassification

    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and weights[k].abs().sum() > 0 for k in weights)
    base = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2, ignore_mismatched_sizes=True)
    loaded = peftkit.AdaptedModel.from_pretrained(base, str(out))
    batch = {"input_ids": torch.tensor([[2, 6, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        assert loaded(**batch).logits.shape == (1, 2)


# On the tiny BERT, EVA moves ranks between these layers (ranks 1 to 3).
EVA_METHOD = "lora[r=2,init=eva,eva_tau=0.7,eva_rho=4,target_modules=[query,key,value,intermediate.dense,output.dense]]"

# Runs peftkit's CLI with the EVA callback's log line (ranks, digest of the factors) shown, per process.
LOGGING_DRIVER = """
import logging, os, sys
logging.basicConfig(level=logging.WARNING, format="process " + os.environ["RANK"] + ": %(message)s")
logging.getLogger("peftkit.plugins.lora.eva_training").setLevel(logging.INFO)
from peftkit.cli import entry
sys.argv[0] = "peftkit"
entry()
"""


@pytest.mark.slow
def test_eva_under_data_parallel_gives_every_process_the_same_factors(tmp_path):
    model = model_folder(tmp_path / "bert", "bert", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 16))
    (tmp_path / "driver.py").write_text(LOGGING_DRIVER)
    out = tmp_path / "out"
    # Each process reads other batches; EVA fits on the inputs of both, so the ranks and factors agree.
    proc = _torchrun(tmp_path, ["driver.py", "train", str(model), "--task", "seq-cls", "--method",
                                EVA_METHOD, "--data", str(data), "--out", str(out),
                                "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"])
    found = dict(re.findall(r"process (\d): EVA initialised adapter 'default': (ranks .*)", proc.stderr))
    assert sorted(found) == ["0", "1"], proc.stderr[-4000:]
    assert found["0"] == found["1"] and "factors sha256" in found["0"]

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and config["rank_pattern"]  # EVA moved ranks between layers
    weights = load_file(str(out / "adapter_model.safetensors"))
    for key, value in weights.items():
        if key.endswith("lora_A.weight"):
            site = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            rank = next((r for pattern, r in config["rank_pattern"].items() if site.endswith(pattern)), config["r"])
            assert value.shape[0] == rank, key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora[r=4]", "loreft"])
def test_quiet_data_parallel_run_prints_no_library_warning(tmp_path, method):
    """--quiet under torchrun: torch's DDP warned on every process, about find_unused_parameters=True (transformers'
    default, an extra pass over the autograd graph each step; every trainable parameter of an adapter is used) and,
    for LoReFT's r = 1 projection, about its gradient's strides (plugins/reft/units.py: row_major_gradient)."""
    model = model_folder(tmp_path / "bert", "bert", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 16))
    proc = _torchrun(tmp_path, ["-m", "peftkit", "train", str(model), "--task", "seq-cls", "--method", method,
                                "--data", str(data), "--out", str(tmp_path / "out"), "--max-steps", "2",
                                "--batch-size", "4", "--quiet", "--base-model", "org/tiny-bert"])
    assert proc.stderr.strip() == "", proc.stderr[-4000:]
    assert proc.stdout.strip() == f"adapter: {tmp_path / 'out'}"
