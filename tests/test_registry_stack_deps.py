"""The server's libraries are an extra: without them `serve` says what to install; peftkit never imports them early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.registry_conftest_helpers import subprocess_env

_BLOCKER = '''
import sys

class _Blocked:
    """Makes the server's libraries missing for real: every import of them fails as if not installed."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("uvicorn", "httptools"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
'''


def test_serve_without_the_registry_extra_says_what_to_install(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    env = subprocess_env()
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    check = subprocess.run([sys.executable, "-c", "import uvicorn"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode != 0 and "No module named 'uvicorn'" in check.stderr  # the blocker works
    out = subprocess.run(
        [sys.executable, "-m", "peftkit.registry", "serve", "--port", "0", "--data", str(tmp_path / "reg")],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert "pip install 'peftkit[registry]'" in out.stderr and "uvicorn" in out.stderr
    assert "Traceback" not in out.stderr


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports peftkit like this one."""
    return subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)


def test_peftkit_and_its_help_import_no_server_libraries() -> None:
    code = (
        "import sys, peftkit, peftkit.registry, peftkit.registry.server, peftkit.registry.cli\n"
        "from peftkit.cli import run\n"
        "for args in (['--help'], ['registry', 'serve', '--help']):\n"
        "    assert run(args) == 0, args\n"
        "print(sorted(m for m in ('uvicorn', 'httptools', 'starlette', 'torch') if m in sys.modules))\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "--trusted-proxy" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"


def test_serving_raises_the_open_file_limit_to_the_hard_limit() -> None:
    out = _python(
        "import resource\n"
        "from peftkit.registry.server import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "raise_open_file_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)\n"
    )
    assert out.stdout.strip() == "True", out.stderr
