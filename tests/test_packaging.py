"""The distribution itself: every package is listed, and a built wheel works in a fresh venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"peftkit": "peftkit", "core": "peftkit.core", "plugins": "peftkit.plugins",
           "hub_client": "peftkit.hub_client", "registry": "peftkit.registry"}


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]) if rel.parts else package)
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"



def test_project_metadata_builds_without_deprecation_warnings():
    """The license is an SPDX string (a TOML table makes every install print a deprecation warning)."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
    assert "LICENSE" in dist.metadata.license_files


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", "examples", "bench", "tests"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True, timeout=300)
    (wheel,) = wheels.glob("peftkit-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    # The wheel's own dependencies come from this test environment's site-packages
    # (appended after the venv's own, so the wheel's peftkit wins over the editable one).
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([python, "-c", "import peftkit; print(peftkit.__file__)"], capture_output=True,
                           text=True, check=True, env=env, cwd=tmp_path).stdout
    assert str(env_dir) in where, f"peftkit came from {where}, not from the wheel"
    cli = env_dir / "bin" / "peftkit"
    help_text = subprocess.run([cli, "--help"], capture_output=True, text=True, check=True, env=env,
                               cwd=tmp_path).stdout
    assert "methods" in help_text
    methods = subprocess.run([cli, "methods", "--json"], capture_output=True, text=True, check=True, env=env,
                             cwd=tmp_path).stdout
    assert '"lora"' in methods
    # The user docs ship inside the wheel: error messages send users to `peftkit docs PAGE#SECTION`.
    page = subprocess.run([cli, "docs", "plugins", "--path"], capture_output=True, text=True, check=True, env=env,
                          cwd=tmp_path).stdout.strip()
    assert page.startswith(str(env_dir)) and page.endswith("peftkit/docs/plugins.md"), page
    hook = subprocess.run([cli, "docs", "lora#option-reference"], capture_output=True, text=True, check=True,
                          env=env, cwd=tmp_path).stdout
    assert hook.startswith("## Option reference") and "`r`" in hook
    # The hub client and the registry, with the rules they share (peftkit.hub_rules), are in the wheel.
    hub = subprocess.run([python, "-c", "import peftkit.hub_rules.names, peftkit.hub_client.local, "
                          "peftkit.registry.hub_api; print(peftkit.hub_rules.names.is_commit_sha('a' * 40))"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert hub.returncode == 0 and hub.stdout.strip() == "True", hub.stderr
    code = ("import peftkit, torch; from transformers import LlamaConfig, LlamaForCausalLM; "
            "m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, num_key_value_heads=2, vocab_size=32)); "
            "a = peftkit.adapt(m, 'lora[r=2]'); print(a.trainable_parameters()[0])")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) > 0
