"""Installing the fixture plugin distributions of this folder for tests.

Each fixture is a real distribution (pyproject.toml with a ``peftkit`` entry
point). :func:`install_target` pip-installs some of them into a folder with
``pip install --target``; putting that folder on ``PYTHONPATH`` (or
``sys.path``) makes peftkit discover them through their entry points.
Sources are copied first, so builds never write into the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
FIXTURES = ("peftkit-hello", "peftkit-broken-import", "peftkit-dup-method", "peftkit-future-api",
            "peftkit-bad-signature", "peftkit-eager-torch")


def copy_sources(names: tuple[str, ...], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        target = dest / name
        if not target.exists():
            shutil.copytree(HERE / name, target, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        out.append(target)
    return out


def pip_install(python: str | Path, *args: str | Path) -> None:
    """A real, offline pip install (no index, no build isolation, no dependencies)."""
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                             "--no-index", "--disable-pip-version-check", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"pip install {args} failed:\n{result.stdout}\n{result.stderr}")


def install_target(target: Path, names: tuple[str, ...] = FIXTURES) -> Path:
    """pip install the named fixtures into ``target`` (for PYTHONPATH / sys.path)."""
    sources = copy_sources(names, target.parent / f"{target.name}-src")
    pip_install(sys.executable, "--target", target, *sources)
    return target


def make_child_venv(path: Path) -> Path:
    """A throw-away virtualenv that sees this environment's packages (torch, peftkit,
    pip, setuptools) but installs into and uninstalls from its own site-packages.

    Returns its python. The parent's site-packages are added with
    ``site.addsitedir`` so that its editable installs (.pth files) work too.
    """
    venv.create(path, with_pip=False, symlinks=True)
    python = path / "bin" / "python"
    child_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    parent_site = sysconfig.get_paths()["purelib"]
    Path(child_site, "zz_parent_env.pth").write_text(f"import site; site.addsitedir({parent_site!r})\n")
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without PEFTKIT_PLUGINS / PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PEFTKIT_PLUGINS", "PYTHONPATH")}
    env.update(extra)
    return env
