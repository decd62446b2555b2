"""The real AdapterHub ``adapters`` library in its own virtualenv (``make adapters-venv``: it pins another
transformers), for the tests that compare peftkit with it.

The scripts in tests/adapterhub run there: each writes fixture cases (adapters saved by ``adapters`` with their
outputs), cached under the venv in a folder keyed by the scripts' bytes and the venv's install stamps, so a
changed script or a rebuilt venv makes new fixtures.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

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
