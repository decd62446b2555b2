"""The docs' worked examples run as written (on the real MiniLM, a few steps): a reader who copies
them gets what the docs say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def code_block(page: Path, language: str, after: str) -> str:
    """The first ``language`` code block of ``page`` after the text ``after``."""
    text = page.read_text()
    start = text.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {language} block after {after!r} in {page}"
    return match.group(1)


def docs_env(tmp_path: Path) -> dict[str, str]:
    """The reader's shell: the venv's commands first on PATH, a fresh embedded hub, no network."""
    env = {**os.environ, "PEFTKIT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PEFTKIT_HUB", None)
    return env


@pytest.mark.slow
def test_train_md_example_is_found_by_base_model_after_its_push(tmp_path):
    script = code_block(DOCS / "train.md", "bash", "Try it on the example data")
    assert "--base-model sentence-transformers/all-MiniLM-L6-v2" in script and "--push alice/sentiment" in script
    script = script.replace("--epochs 3 --batch-size 16", "--max-steps 2 --batch-size 4").replace("--out out/sentiment",
                                                                   f"--out {tmp_path / 'sentiment'}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=docs_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Warning" not in result.stderr  # the base model is a hub id, not the local folder
    assert "alice/sentiment" in result.stdout.split(f"adapter: {tmp_path / 'sentiment'}", 1)[1]  # found


@pytest.mark.slow
def test_guide_trainer_example_trains_evaluates_and_saves(tmp_path):
    """docs/guide.md's AdapterTrainer example runs as written (its `out/` folders land in a scratch folder):
    evaluation reports a loss with the Trainer's default columns and label names, and the checkpoints are
    adapter folders of the size the guide gives."""
    import json

    script = code_block(DOCS / "guide.md", "python", "A complete run with `peftkit.AdapterTrainer`")
    assert "DataCollatorWithPadding" in script and "tokenizer(" in script
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=docs_env(tmp_path),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "'eval_loss'" in result.stdout  # label names read from the base model
    checkpoint = tmp_path / "out" / "sentiment-run" / "checkpoint-2"
    files = {path.name: path.stat().st_size for path in checkpoint.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert 1.0e6 < sum(files.values()) < 1.6e6  # "here 1.2 MB" in the guide
    saved = tmp_path / "out" / "sentiment"
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8
    assert (saved / "adapter_model.safetensors").is_file()


def test_plugins_md_compile_test_passes_for_the_example_plugin():
    """docs/plugins.md's test that a plugin compiles as one graph, as written, on the LoHa example plugin that
    `make` installs: a plugin author copying it gets a test that passes for a method that compiles whole."""
    import torch._dynamo

    script = code_block(DOCS / "plugins.md", "python", "Every built-in method compiles whole")
    assert "counter.frame_count == 1" in script and '"loha[r=4]"' in script
    namespace: dict = {}
    exec(compile(script, "plugins.md", "exec"), namespace)
    torch._dynamo.reset()
    namespace["test_a_training_step_compiles_as_one_graph"]()
    torch._dynamo.reset()
