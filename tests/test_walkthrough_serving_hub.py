"""A serving engineer's hub adapters: what load_adapter / hotswap_adapter say when given a hub id
(PEFT's load_adapter takes one; peftkit's takes a folder), and the way they name."""

from __future__ import annotations

from pathlib import Path

import pytest

import peftkit
from peftkit import hub
from peftkit.core.errors import AdapterLoadError
from tests.method_helpers import randomize
from tests.tiny_models import build_tiny


@pytest.fixture()
def hub_with_adapter(tmp_path: Path) -> str:
    where = f"local:{tmp_path / 'hub'}"
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    randomize(model, seed=1)
    model.save_adapter(str(tmp_path / "a"))
    hub.push(str(tmp_path / "a"), "alice/llama-a", hub=where, progress=False)
    return where


@pytest.mark.parametrize("call,name", [("load_adapter", "a"), ("hotswap_adapter", "default")])
def test_a_hub_id_given_as_a_folder_names_the_pull(hub_with_adapter: str, call: str, name: str) -> None:
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    with pytest.raises(AdapterLoadError) as caught:
        getattr(model, call)("alice/llama-a@main", name)
    message = str(caught.value)
    assert "not an adapter folder" in message
    assert "peftkit.hub.pull('alice/llama-a@main')" in message
    folder = hub.pull("alice/llama-a@main", hub=hub_with_adapter, progress=False)
    getattr(model, call)(folder, name)  # what the message says works


def test_load_given_a_saved_folder_names_from_pretrained(hub_with_adapter: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """peftkit.load(model, "out/w1") with out/w1 a saved folder said only that the repo does not exist."""
    peftkit.adapt(build_tiny("llama"), "lora[r=4]").save_adapter(str(tmp_path / "out" / "w1"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(peftkit.HubError) as caught:
        peftkit.load(build_tiny("llama"), "out/w1", hub=hub_with_adapter, progress=False)
    assert str(caught.value).endswith("; 'out/w1' is also a folder here: peftkit.load reads hub repos, and "
                                      "peftkit.from_pretrained(model, 'out/w1') loads a saved folder")
    assert peftkit.from_pretrained(build_tiny("llama"), "out/w1").adapters  # what the message says works
    with pytest.raises(peftkit.HubError) as caught:
        peftkit.load(build_tiny("llama"), "alice/none", hub=hub_with_adapter, progress=False)
    assert "also a folder" not in str(caught.value)


@pytest.mark.parametrize("as_path", [False, True])
def test_load_given_a_folder_path_that_is_no_hub_id_names_from_pretrained(tmp_path: Path, as_path: bool) -> None:
    """peftkit.load(model, "/abs/folder") or a Path said it could not parse or read a composition."""
    folder = tmp_path / "runs" / "w1"
    peftkit.adapt(build_tiny("llama"), "lora[r=4]").save_adapter(str(folder))
    with pytest.raises(peftkit.CompositionError) as caught:
        peftkit.load(build_tiny("llama"), folder if as_path else str(folder), progress=False)
    assert str(caught.value) == (f"{str(folder)!r} is a folder here, and peftkit.load reads hub repos; load a saved "
                                 f"adapter folder with peftkit.from_pretrained(model, {str(folder)!r}) (a composition "
                                 f"folder: peftkit.load_composition), or push it and load the repo")
