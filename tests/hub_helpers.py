"""Shared pieces of the hub tests: saved task adapters and hubs to push them to.

Each hub fixture yields a :class:`HubUnderTest`: the embedded store in a
temporary folder, or a peftkit registry served on 127.0.0.1 and driven
through huggingface_hub (the same code path as the Hugging Face Hub).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

import peftkit
from tests.registry_conftest_helpers import running_registry
from tests.tiny_models import build_tiny

BASE_ID = "peftkit-tests/tiny-llama"


def tiny_base() -> torch.nn.Module:
    """The tiny Llama, recorded under a hub-style id (as from_pretrained("org/name") would)."""
    model = build_tiny("llama")
    model.config._name_or_path = BASE_ID
    return model


def randomize(model: peftkit.AdaptedModel, name: str, seed: int) -> None:
    """Non-trivial adapter weights, so that every adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters(name):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def save_task_adapters(root: Path) -> dict[str, Path]:
    """lang (LoRA), ner (bottleneck seq_bn) and its v2, summ (IA3): saved folders."""
    model = peftkit.AdaptedModel(tiny_base())
    specs = {"lang": ("lora[r=4]", 1), "ner": ("seq_bn[reduction_factor=4]", 2), "summ": ("ia3", 4)}
    folders = {}
    for name, (spec, seed) in specs.items():
        model.add_adapter(name, spec)
        randomize(model, name, seed)
        folders[name] = root / name
        model.save_adapter(str(folders[name]), name)
    randomize(model, "ner", 3)
    folders["ner-v2"] = root / "ner-v2"
    model.save_adapter(str(folders["ner-v2"]), "ner")
    return folders


@dataclass
class HubUnderTest:
    kind: str  # "local" or "registry"
    address: str
    token: str | None = None
    store: object | None = None


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private PEFTKIT_HOME, no tokens from the environment, huggingface_hub allowed onto loopback."""
    from huggingface_hub import constants

    monkeypatch.setenv("PEFTKIT_HOME", str(tmp_path / "home"))
    for name in ("PEFTKIT_HUB", "PEFTKIT_HUB_TOKEN", "HF_TOKEN", "PEFTKIT_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return tmp_path


@pytest.fixture(params=["local", "registry"])
def any_hub(request: pytest.FixtureRequest, hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubUnderTest]:
    if request.param == "local":
        yield HubUnderTest("local", f"local:{hub_env / 'local-hub'}")
        return
    with running_registry(hub_env / "registry", users={"alice": True}) as (store, server, tokens):
        monkeypatch.setenv("PEFTKIT_HUB_TOKEN", tokens["alice"])
        yield HubUnderTest("registry", server.url, tokens["alice"], store)
