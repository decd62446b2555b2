"""The README's main command (`make demo`) runs examples/quickstart.py: keep it working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    env = {**os.environ, "PEFTKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "2"}
    env.pop("PEFTKIT_HUB", None)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "1",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "demo/minilm-sentiment" in out and "demo/minilm-urgency" in out
    assert "adapters on the model: ['sentiment', 'urgency']" in out
    table = out.split("== 5. results", 1)[1]
    rows = [line.split() for line in table.splitlines() if line.startswith(("sentiment", "urgency"))]
    assert len(rows) == 2
    for row in rows:
        pulled, mixed = float(row[-2]), float(row[-1])
        assert pulled == mixed, "a row routed in a mixed batch must score as the adapter alone"
    assert (tmp_path / "home" / "hub").exists(), "the embedded hub lives under PEFTKIT_HOME"
