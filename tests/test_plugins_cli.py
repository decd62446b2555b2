"""``peftkit plugins install / uninstall / inspect``.

install and uninstall run the real pip of the interpreter that runs peftkit.
The test runs them in a throw-away virtualenv that sees this environment's
packages but installs into its own site-packages, so the shared test
environment is never changed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from peftkit.cli import run
from tests.plugin_fixtures import clean_env, copy_sources, make_child_venv


def _methods(python: Path) -> set[str]:
    result = subprocess.run([str(python), "-m", "peftkit", "methods", "--json"], capture_output=True, text=True,
                            timeout=120, env=clean_env())
    assert result.returncode == 0, result.stderr
    return {m["name"] for m in json.loads(result.stdout)}


def test_install_then_uninstall_a_local_plugin(tmp_path):
    python = make_child_venv(tmp_path / "venv")
    (source,) = copy_sources(("peftkit-hello",), tmp_path / "src")
    before = _methods(python)
    assert "lora" in before and "hello" not in before

    installed = subprocess.run([str(python), "-m", "peftkit", "plugins", "install", str(source), "--no-deps",
                                "--no-build-isolation", "--no-index", "--quiet"],
                               capture_output=True, text=True, timeout=300, env=clean_env())
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert ("plugin hello (peftkit-hello 1.2.0): methods hello; merge strategies hello_mean; architectures "
            "hello_net; hub backends hello; commands hello") in installed.stdout
    assert _methods(python) == before | {"hello"}
    site = Path(subprocess.run([str(python), "-c", "import peftkit_hello; print(peftkit_hello.__file__)"],
                               capture_output=True, text=True, check=True, env=clean_env()).stdout.strip())
    assert str(tmp_path / "venv") in str(site), "installed outside the environment that runs peftkit"

    declined = subprocess.run([str(python), "-m", "peftkit", "plugins", "uninstall", "hello"], input="n\n",
                              capture_output=True, text=True, timeout=120, env=clean_env())
    assert declined.returncode == 1 and "peftkit-hello 1.2.0 (plugins: hello)" in declined.stdout
    assert "hello" in _methods(python)

    removed = subprocess.run([str(python), "-m", "peftkit", "plugins", "uninstall", "hello", "-y"],
                             capture_output=True, text=True, timeout=120, env=clean_env())
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "uninstalled peftkit-hello 1.2.0" in removed.stdout
    assert _methods(python) == before


def test_install_reports_a_broken_new_plugin_and_fails(tmp_path):
    python = make_child_venv(tmp_path / "venv")
    (source,) = copy_sources(("peftkit-future-api",), tmp_path / "src")
    result = subprocess.run([str(python), "-m", "peftkit", "plugins", "install", str(source), "--no-deps",
                             "--no-build-isolation", "--no-index", "--quiet"],
                            capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 1
    assert "plugin future_api (peftkit-future-api 0.3.0) BROKEN" in result.stdout
    assert "was written for peftkit plugin API 2" in result.stderr
    assert "fix or uninstall: peftkit plugins uninstall peftkit-future-api" in result.stderr


def test_install_failure_from_pip_exits_nonzero(tmp_path, capsys):
    missing = tmp_path / "no-such-plugin"
    assert run(["plugins", "install", str(missing), "--no-index", "--no-deps", "--quiet"]) == 1
    assert "pip install failed" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("lora", "'lora' is part of peftkit itself"),
    ("peftkit", "'peftkit' is part of peftkit itself"),
    ("click", "'click' is installed but is not a peftkit plugin"),
    ("peftkit-no-such-plugin", "no installed plugin or distribution named 'peftkit-no-such-plugin'; installed "
                               "plugin distributions: "),
])
def test_uninstall_refuses_what_is_not_a_plugin(name, message, capsys):
    assert run(["plugins", "uninstall", name, "-y"]) == 1
    assert message in capsys.readouterr().err


def test_inspect(capsys):
    assert run(["plugins", "inspect", "peftkit-loha", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["name"], data["distribution"], data["version"], data["status"]) == ("loha", "peftkit-loha",
                                                                                     "1.0.0", "ok")
    assert data["file"].endswith("peftkit_loha/__init__.py")
    (method,) = data["methods"]
    assert method["name"] == "loha" and method["can_merge"] and method["peft_format"]
    assert {"r", "alpha", "rank_dropout", "module_dropout"} <= set(method["options"])
    assert run(["plugins", "inspect", "loha"]) == 0
    text = capsys.readouterr().out
    assert "distribution: peftkit-loha 1.0.0" in text and "method: loha: Low-rank Hadamard" in text
    assert run(["plugins", "inspect", "nosuch"]) == 1
    assert "no plugin or distribution named 'nosuch' is loaded; plugins: " in capsys.readouterr().err
