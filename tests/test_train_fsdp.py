"""``peftkit train --fsdp``: two CPU processes (gloo) shard a tiny Llama with FSDP2 and train LoRA, DoRA,
a bottleneck adapter and prefix tuning; each saved adapter is the one a single process trains on the
same global batch (same files, same tensors to float tolerance), a sharded run resumes, ``accelerate
launch`` with an FSDP config shards the same way, and composition and routing run on a sharded model.

Eight examples, a global batch of eight (one process with 8, or two with 4 each): every step sees
all the data, so the runs agree whatever order the samplers draw it in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import peftkit
from peftkit.cli import run
from tests.train_helpers import free_port, model_folder, rows_for, torch_threads, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
BASE_ID = "peftkit-tests/tiny-llama"
COMMON = {"max_steps": 3, "lr": 1e-2, "logging_steps": 1, "base_model": BASE_ID, "quiet": True}
#: What a single process and a sharded run of the same steps may differ by (float32 sums in another order).
ATOL = 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("fsdp")
    return model_folder(folder / "llama", "llama", "gpt"), write_jsonl(folder / "train.jsonl", rows_for("causal-lm", 8))


def _env(scratch: Path) -> dict[str, str]:
    """The launched processes' environment; their temporary files (torchrun's torchelastic_* log folders) go
    to ``scratch``, which pytest removes, not to the machine's /tmp."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TMPDIR": str(scratch)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def _launch(command: list[str], cwd: Path, scratch: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_env(scratch), cwd=cwd)
    assert proc.returncode == 0, _rank_errors(proc.stderr)
    return proc


def _rank_errors(stderr: str) -> str:
    """Each rank's last lines, then the tail: the rank that failed first is often not the last to print (a
    crash on rank 1 shows up at the end as rank 0's 'Connection closed by peer')."""
    lines = stderr.splitlines()
    parts = []
    for rank in ("[rank0]", "[rank1]"):
        mine = [line for line in lines if line.startswith(rank)]
        if mine:
            parts.append("\n".join(mine[-25:]))
    return "\n\n".join([*parts, stderr[-2000:]])


def _single(model: Path, data: Path, method: str, out: Path, **options) -> None:
    """The same run in this one process, with the whole global batch."""
    with torch_threads(1):
        peftkit.train(str(model), method, str(data), task="causal-lm", out=str(out), batch_size=8,
                      **{**COMMON, **options})


def _tensors(folder: Path) -> tuple[dict[str, str], dict]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return f.metadata(), {key: f.get_tensor(key) for key in f.keys()}


def assert_same_adapter(single: Path, sharded: Path, atol: float = ATOL) -> None:
    """The sharded run wrote the folder a single process writes: the same files, config and metadata,
    and tensors of the same names, shapes and dtypes, equal to ``atol``."""
    def files(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "train_results.json")

    assert files(sharded) == files(single) and "adapter_config.json" in files(single)
    for name in files(single):
        if name.endswith(".json"):
            assert (sharded / name).read_text() == (single / name).read_text(), name
    (meta_a, a), (meta_b, b) = _tensors(single), _tensors(sharded)
    assert meta_a == meta_b and sorted(a) == sorted(b)
    for key in a:
        assert (a[key].shape, a[key].dtype) == (b[key].shape, b[key].dtype), key
        assert (a[key].float() - b[key].float()).abs().max() <= atol, key
    assert max(float(t.float().abs().max()) for t in b.values()) > 0  # it holds trained values, not nothing


@pytest.mark.slow
def test_cli_fsdp_run_is_sharded_and_saves_what_one_process_saves(llama, tmp_path):
    model, data = llama
    dev = write_jsonl(tmp_path / "dev.jsonl", rows_for("causal-lm", 6, seed=3))
    out = tmp_path / "sharded"
    proc = _launch(_torchrun("-m", "peftkit", "train", str(model), "--fsdp", "--task", "causal-lm", "--method",
                             "lora[r=4]", "--data", str(data), "--eval", str(dev), "--eval-batch-size", "1",
                             "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2",
                             "--logging-steps", "1", "--save-steps", "2", "--base-model", BASE_ID), tmp_path, tmp_path)
    # The main process reports once, and says the base is sharded.
    assert proc.stderr.count("FSDP2: the base model is sharded over 2 processes in 3 units") == 1
    assert proc.stderr.count("saved the adapter to") == 1 and proc.stdout.count("trained 3 steps") == 1
    results = json.loads((out / "train_results.json").read_text())
    assert results["run"]["world_size"] == 2 and results["run"]["options"]["fsdp"] is True
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]

    _single(model, data, "lora[r=4]", tmp_path / "single", save_steps=0, eval_data=str(dev), eval_batch_size=1)
    assert_same_adapter(tmp_path / "single", out)
    # Evaluation runs on the sharded model too, each process on its part of the data (one example per
    # batch, so the mean over examples is the single process's whatever the split).
    single = json.loads((tmp_path / "single" / "train_results.json").read_text())
    assert results["eval_metrics"]["eval_loss"] == pytest.approx(single["eval_metrics"]["eval_loss"], rel=1e-5)
    # The trained adapter loads on the plain (unsharded) model, as any adapter does.
    from transformers import AutoModelForCausalLM

    loaded = peftkit.AdaptedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(out))
    assert loaded.adapters["default"].r == 4


@pytest.mark.slow
def test_methods_resume_mixed_precision_and_composition_on_a_sharded_model(llama, tmp_path):
    """One launch of two processes: DoRA, a bottleneck adapter and prefix tuning sharded; a LoRA run
    resumed from a sharded checkpoint; a bf16 run; gradient accumulation; then composition and routing
    on a sharded model."""
    model, data = llama
    methods = {"dora": "lora[r=4,use_dora=true]", "seq_bn": "seq_bn[reduction_factor=4]",
               "prefix": "prefix_tuning[num_virtual_tokens=4]"}
    sharded = {**COMMON, "batch_size": 4, "fsdp": True, "save_steps": 0}
    first = tmp_path / "first"
    runs = [{"method": spec, "out": str(tmp_path / f"fsdp-{name}"), "options": sharded}
            for name, spec in methods.items()]
    runs += [{"method": "lora[r=4]", "out": str(first), "options": {**sharded, "save_steps": 2}},
             {"method": "lora[r=4]", "out": str(tmp_path / "resumed"),
              "options": {**sharded, "resume": str(first / "checkpoints" / "checkpoint-2")}},
             {"method": "lora[r=4]", "out": str(tmp_path / "fsdp-bf16"), "options": {**sharded, "bf16": True}},
             {"method": "lora[r=4]", "out": str(tmp_path / "fsdp-accum"),
              "options": {**sharded, "batch_size": 2, "grad_accum": 2}}]
    spec = {"model": str(model), "data": str(data), "runs": runs, "composition": str(tmp_path / "composition.json")}
    (tmp_path / "runs.json").write_text(json.dumps(spec))
    _launch(_torchrun("-m", "tests.fsdp_runs", str(tmp_path / "runs.json")), ROOT, tmp_path)

    for name, method in methods.items():
        _single(model, data, method, tmp_path / f"single-{name}", save_steps=0)
        assert_same_adapter(tmp_path / f"single-{name}", tmp_path / f"fsdp-{name}")
    # Resumed at step 2 of 3 from the sharded run's checkpoint: the adapter of an uninterrupted run.
    _single(model, data, "lora[r=4]", tmp_path / "single-lora", save_steps=0)
    assert json.loads((tmp_path / "resumed" / "train_results.json").read_text())["resumed_from"].endswith(
        "checkpoint-2")
    assert_same_adapter(tmp_path / "single-lora", tmp_path / "resumed")
    # Two micro-batches of 2 per process and step: the gradients are averaged once, at the step.
    assert_same_adapter(tmp_path / "single-lora", tmp_path / "fsdp-accum")
    # bf16: the sharded units gather and compute in bfloat16, the single process autocasts float32 weights:
    # the same losses to bfloat16's precision, and the same adapter, saved in float32 like it, to about
    # one Adam step (lr 1e-2: a gradient near zero may take either sign).
    _single(model, data, "lora[r=4]", tmp_path / "single-bf16", save_steps=0, bf16=True)
    assert_same_adapter(tmp_path / "single-bf16", tmp_path / "fsdp-bf16", atol=2e-2)
    losses = [[entry["loss"] for entry in json.loads((tmp_path / run / "train_results.json").read_text())
               ["log_history"] if "loss" in entry] for run in ("single-bf16", "fsdp-bf16")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-3)
    # Composition blocks and per-row routing give the outputs they give before sharding.
    distances = json.loads((tmp_path / "composition.json").read_text())
    assert sorted(distances) == ["average", "batch_split", "parallel", "routing", "stack"]
    assert max(distances.values()) < 1e-5, distances


@pytest.mark.slow
def test_accelerate_launch_with_an_fsdp_config_shards_like_fsdp(llama, tmp_path):
    pytest.importorskip("accelerate")
    model, data = llama
    config = tmp_path / "fsdp.yaml"
    shutil.copy(ROOT / "examples" / "accelerate" / "fsdp.yaml", config)
    out = tmp_path / "sharded"
    proc = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                    "--main_process_port", str(free_port()), "-m", "peftkit", "train", str(model), "--task",
                    "causal-lm", "--method", "lora[r=4]", "--data", str(data), "--out", str(out), "--max-steps", "3",
                    "--batch-size", "4", "--lr", "1e-2", "--save-steps", "0", "--base-model", BASE_ID, "--cpu"],
                   tmp_path, tmp_path)
    assert proc.stderr.count("FSDP2: the base model is sharded over 2 processes") == 1
    assert "peftkit shards the base model itself with FSDP2" in proc.stderr
    assert json.loads((out / "train_results.json").read_text())["run"]["options"]["fsdp"] is True
    _single(model, data, "lora[r=4]", tmp_path / "single", save_steps=0)
    assert_same_adapter(tmp_path / "single", out)


def test_fsdp_in_a_single_process_is_refused_before_loading(llama, tmp_path, capsys, monkeypatch):
    model, data = llama
    for key in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(key, raising=False)
    code = run(["train", str(model), "--fsdp", "--task", "causal-lm", "--data", str(data), "--out",
                str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "this is a single one; launch the command with torchrun --nproc_per_node N (N >= 2)" in err
    assert not (tmp_path / "out").exists()


def test_fsdp_with_quantize_is_refused(llama, tmp_path):
    model, data = llama
    with pytest.raises(peftkit.PeftkitError, match="fsdp and quantize='4bit' do not go together"):
        peftkit.train(str(model), "lora", str(data), task="causal-lm", out=str(tmp_path / "out"), fsdp=True,
                      quantize="4bit")


def test_a_deepspeed_launch_is_refused_before_loading(llama, tmp_path, monkeypatch):
    model, data = llama
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for a DeepSpeed config
    with pytest.raises(peftkit.PeftkitError, match="does not run under DeepSpeed .*--fsdp"):
        peftkit.train(str(model), "lora", str(data), task="causal-lm", out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_eva_initialisation_with_fsdp_is_refused(llama, tmp_path):
    model, data = llama
    with pytest.raises(peftkit.PeftkitError, match="fsdp and init_weights='eva' do not go together"):
        peftkit.train(str(model), "lora[init_weights=eva]", str(data), task="causal-lm", out=str(tmp_path / "out"),
                      fsdp=True)
