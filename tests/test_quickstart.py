"""The README's main command (`make demo`) runs examples/quickstart.py: keep it working."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quickstart_env(tmp_path: Path) -> dict[str, str]:
    """A fresh embedded hub, no network, and the virtualenv's commands off PATH (as after `make demo`)."""
    env = {**os.environ, "PEFTKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    env.pop("PEFTKIT_HUB", None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(sys.executable).parent.resolve())
    return env


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    env = quickstart_env(tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "1",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "demo/minilm-sentiment" in out and "demo/minilm-urgency" in out
    assert "adapters on the model: ['sentiment', 'urgency']" in out
    # the steps are numbered as the script's docstring numbers them, in order
    assert re.findall(r"^== (\d)/5\. ", out, re.M) == ["1", "2", "3", "4", "5"]
    # training shows its progress: the step count and the loss as it goes
    assert re.search(r"^   step +10/10: loss \d\.\d{4}$", out, re.M), out[:3000]
    table = out.split("== 5/5. results", 1)[1]
    rows = [line.split() for line in table.splitlines() if line.startswith(("sentiment", "urgency"))]
    assert len(rows) == 2
    for row in rows:
        pulled, mixed = float(row[-2]), float(row[-1])
        assert pulled == mixed, "a row routed in a mixed batch must score as the adapter alone"
    assert (tmp_path / "home" / "hub").exists(), "the embedded hub lives under PEFTKIT_HOME"
    assert f"hub local:{tmp_path / 'home' / 'hub'}" in out  # where the demo wrote its hub
    check_next_commands(out, tmp_path, env)


def check_next_commands(out: str, tmp_path: Path, env: dict[str, str]) -> None:
    """The closing hints name this run's real paths and hub, and say how to reach the virtualenv's peftkit
    (`make demo` does not put it on PATH); the quick ones run as printed."""
    hints = [line.strip() for line in out.split("\nNext, try:\n", 1)[1].splitlines() if line.strip()]
    assert hints[0].startswith("# peftkit is installed in the virtualenv: `source ") and "/activate`" in hints[0]
    commands = {}
    for line in hints[1:]:
        argv = shlex.split(line)
        commands[" ".join(argv[1:3]) if argv[1] == "hub" else argv[1]] = argv
    assert set(commands) == {"info", "hub search", "hub pull", "train"}
    assert commands["info"][2] == str(tmp_path / "out" / "sentiment")
    for argv in commands.values():
        assert Path(ROOT, argv[0]).resolve() == (Path(sys.executable).parent / "peftkit").resolve()
    train = commands["train"]
    for flag in ("--data", "--eval"):
        assert (ROOT / train[train.index(flag) + 1]).is_file()
    assert train[train.index("--base-model") + 1] == "sentence-transformers/all-MiniLM-L6-v2"
    for name in ("info", "hub search", "hub pull"):
        ran = subprocess.run(commands[name], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert ran.returncode == 0, f"{name}: {ran.stderr}"
        if name == "hub search":
            assert "demo/minilm-sentiment" in ran.stdout
