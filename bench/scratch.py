"""Temporary folders for the benchmarks (adapters saved for peft to load, model folders), removed when
the process exits, so that no run leaves folders behind in the machine's temporary directory."""

from __future__ import annotations

import atexit
import shutil
import tempfile


def scratch_folder(prefix: str = "peftkit-bench-") -> str:
    """A new empty folder that is removed, with everything in it, when this process exits."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
