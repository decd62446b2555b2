"""The test suite's own rules (tests/conftest.py): the plugins a test sees are pinned, and tests write only
under temporary folders that are removed again."""

from __future__ import annotations

import os
import re
from pathlib import Path

from peftkit.core.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]
#: Files allowed to make their own temporary folders, and why.
OWN_TEMP_FOLDERS = {
    "tests/conftest.py": "the session's HF_HOME/PEFTKIT_HOME, set before huggingface_hub is imported; removed at exit",
    "tests/registry_pg_helpers.py": "the PostgreSQL server's data folder, deleted by pgserver (cleanup_mode='delete')",
}


def test_only_the_pinned_plugins_load() -> None:
    allowed = {"loha"}
    registry = get_registry()
    third_party = {name for name, record in registry.records.items() if not record.builtin}
    assert third_party <= allowed, f"plugins outside tests/conftest.py's PEFTKIT_PLUGINS loaded: {third_party}"
    assert os.environ["PEFTKIT_PLUGINS"] == "peftkit-loha"


def test_the_session_homes_are_temporary() -> None:
    from tests.conftest import SESSION_HOME

    for variable in ("HF_HOME", "PEFTKIT_HOME"):
        assert Path(os.environ[variable]).parent == Path(SESSION_HOME), f"{variable} is not the session's own"


def test_tests_make_temporary_folders_only_through_pytest() -> None:
    """tmp_path / tmp_path_factory are cleaned by pytest; a tempfile.mkdtemp folder stays behind."""
    pattern = re.compile(r"\b(mkdtemp|TemporaryDirectory|NamedTemporaryFile|mkstemp)\b")
    found = sorted(str(p.relative_to(ROOT)) for folder in (ROOT / "tests", ROOT / "examples" / "peftkit-loha" / "tests")
                   for p in folder.rglob("*.py") if p.name != Path(__file__).name and pattern.search(p.read_text()))
    assert found == sorted(OWN_TEMP_FOLDERS), "use tmp_path or tmp_path_factory instead of tempfile in tests"
