"""`peftkit train` under torchrun: two CPU processes (gloo) train data-parallel with the
unchanged command, and only the main process writes the adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.train_helpers import free_port, model_folder, rows_for, write_jsonl


@pytest.mark.slow
def test_two_process_data_parallel_run_trains_and_saves_once(tmp_path):
    model = model_folder(tmp_path / "bert", "bert", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 32))
    dev = write_jsonl(tmp_path / "dev.jsonl", rows_for("seq-cls", 8, seed=4))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "peftkit", "train", str(model), "--task", "seq-cls",
               "--method", "lora[r=4]", "--data", str(data), "--eval", str(dev), "--out", str(out),
               "--epochs", "1", "--batch-size", "4", "--lr", "1e-2", "--save-steps", "2", "--logging-steps", "1",
               "--cpu"]  # gloo on CPUs, also on a machine with one GPU
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # 32 examples, 4 per process per step, 2 processes: 4 steps to an epoch.
    results = json.loads((out / "train_results.json").read_text())
    assert results["run"]["world_size"] == 2
    assert results["global_step"] == 4 and results["train_metrics"]["epoch"] == pytest.approx(1.0)
    assert "accuracy" in results["metrics"]
    # One report, from the main process only; one folder, without leftovers of a second writer.
    assert proc.stdout.count("trained 4 steps") == 1
    assert proc.stderr.count("saved the adapter to") == 1
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                     "checkpoints", "labels.json", "peftkit.json", "train_results.json"]
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
