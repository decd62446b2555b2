"""The real AdapterHub ``adapters`` library in its own virtualenv (``make adapters-venv``: it pins another
transformers), for the tests that compare peftkit with it.

The scripts in tests/adapterhub run there: each writes fixture cases (adapters saved by ``adapters`` with their
outputs), cached under the venv in a folder keyed by the scripts' bytes and the venv's install stamps, so a
changed script or a rebuilt venv makes new fixtures.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).parent / "adapterhub"
VENV = ROOT / ".venv-adapters"
PYTHON = VENV / "bin" / "python"


def run_in_venv(args: list[str], timeout: int = 600) -> None:
    """Run ``python ARGS`` of the adapters venv in tests/adapterhub; a failure fails the test with its output."""
    done = subprocess.run([str(PYTHON), *args], cwd=SCRIPTS, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def cached_fixtures(prefix: str, script: str, *also: str) -> Path:
    """The folder of cases ``script`` (a file in tests/adapterhub) writes, made once per version of it and of
    the scripts it imports (``also``); a run cut short leaves only a ``.partial`` folder, made again next time."""
    done = subprocess.run(["make", "-C", str(ROOT), "adapters-venv"], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f"make adapters-venv failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    content = b"".join((SCRIPTS / name).read_bytes() for name in (script, *also))
    content += "".join(sorted(p.name for p in VENV.glob(".installed-*"))).encode()
    folder = VENV / "fixtures" / f"{prefix}{hashlib.sha256(content).hexdigest()[:16]}"
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        run_in_venv([script, str(partial)])
        partial.rename(folder)
    return folder


def saved_both_ways(fixtures: Path, saved: dict[str, tuple[str, str | None]], base_of: Callable[[Path], Any],
                    shuffle: Callable[[Any, int], None], output: Callable[[Any, dict], Any], tmp_path: Path,
                    atol: float) -> tuple[Path, dict[str, Any]]:
    """Save adapters in AdapterHub's format for a venv script's ``--run`` and check that peftkit reads each back.

    ``saved`` maps a label to (the fixture case whose base model (``base_of(case)``) and batch are used, the
    spec peftkit adapts it with, or None for the case's own folder loaded); ``shuffle(model, seed)`` moves the
    weights away from where they start. Returns the jobs file (``{"case", "adapter", "out"}`` per label, the
    folder saved under ``tmp_path/<label>``) and peftkit's outputs on each case's batch, by label."""
    import torch
    from safetensors.torch import load_file

    import peftkit

    jobs, ours = [], {}
    for label, (name, spec) in saved.items():
        case = fixtures / name
        model = (peftkit.from_pretrained(base_of(case), str(case / "adapter")) if spec is None
                 else peftkit.adapt(base_of(case), spec))
        shuffle(model, len(jobs))
        model.eval()
        folder = tmp_path / label
        model.save_adapter(str(folder), format="adapters")
        expected = load_file(str(case / "expected.safetensors"))
        ours[label] = output(model, expected)
        jobs.append({"case": str(case), "adapter": str(folder), "out": str(tmp_path / f"{label}.safetensors")})
        again = peftkit.from_pretrained(base_of(case), str(folder))  # and peftkit reads its own file back
        torch.testing.assert_close(output(again, expected), ours[label], atol=atol, rtol=0)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    return tmp_path / "jobs.json", ours


def with_changed_options(adapter: Path, tmp_path: Path, change: dict[str, Any]) -> Path:
    """A copy of an AdapterHub adapter folder whose ``adapter_config.json`` has ``change`` in its options."""
    folder = tmp_path / "changed"
    shutil.copytree(adapter, folder)
    data = json.loads((folder / "adapter_config.json").read_text())
    data["config"].update(change)
    (folder / "adapter_config.json").write_text(json.dumps(data))
    return folder
