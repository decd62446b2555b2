"""Where peftkit says a saved folder is in Hugging Face PEFT's format, it decides per folder, by the folder's own
``peft_type``: the model card (``library_name: peft`` and a ``PeftModel.from_pretrained`` snippet), ``peftkit info``
("format: peft") and the card a push writes. A method with a ``peft_type`` (prompt tuning) writes a type PEFT does not
have for a config PEFT cannot express (a prompt at the embedding output), and PEFT refuses that folder: nothing may
claim PEFT's format for it. Real saved folders, the real ``peft`` package, a real embedded hub and registry.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

import peftkit
from peftkit.cli import run
from peftkit.core.card import read_card_metadata
from peftkit.hub_client import api as hub
from tests.hub_helpers import HubUnderTest, any_hub, hub_env  # noqa: F401
from tests.tiny_models import build_tiny

#: name -> (spec on a tiny bert, whether PEFT loads its folder)
FOLDERS = {
    "prompt_embedding_output": ("prompt_tuning[num_virtual_tokens=3,placement=embedding_output]", False),
    "lora": ("lora[r=2]", True),
}
SNIPPET = "PeftModel.from_pretrained"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("claims")
    out = {}
    for name, (spec, _) in FOLDERS.items():
        peftkit.adapt(build_tiny("bert"), spec).save_adapter(str(root / name))
        out[name] = root / name
    # copied without peftkit's record: only adapter_config.json, the weights and the card
    out["prompt_without_record"] = root / "prompt_without_record"
    shutil.copytree(out["prompt_embedding_output"], out["prompt_without_record"])
    (out["prompt_without_record"] / "peftkit.json").unlink()
    return out


def _peft_loads(folder: Path) -> bool:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            PeftModel.from_pretrained(build_tiny("bert"), str(folder))
        except KeyError:  # PEFT's answer to a peft_type it does not have
            return False
    return True


@pytest.mark.parametrize("name", FOLDERS)
def test_the_card_claims_peft_only_for_a_folder_peft_loads(folders: dict[str, Path], name: str) -> None:
    peft = FOLDERS[name][1]
    assert _peft_loads(folders[name]) is peft
    text = (folders[name] / "README.md").read_text()
    assert read_card_metadata(text)["library_name"] == ("peft" if peft else "peftkit")
    assert (SNIPPET in text) is peft


@pytest.mark.parametrize("name, method, fmt", [
    ("prompt_embedding_output", "prompt_tuning", "peftkit"),
    ("prompt_without_record", "prompt_tuning", "peftkit"),
    ("lora", "lora", "peft"),
])
def test_peftkit_info_says_the_folders_own_format(folders: dict[str, Path], name: str, method: str, fmt: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["info", str(folders[name]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["format"]) == (method, fmt)
    assert run(["info", str(folders[name])]) == 0
    assert f"format: {fmt}" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("name, peft", [("prompt_embedding_output", False), ("prompt_without_record", False),
                                        ("lora", True)])
def test_a_push_claims_peft_only_for_a_folder_peft_loads(any_hub: HubUnderTest, folders: dict[str, Path],  # noqa: F811
                                                         name: str, peft: bool) -> None:
    repo = f"alice/{name.replace('_', '-')}"
    hub.push(folders[name], repo, hub=any_hub.address, base_model="org/tiny-bert", progress=False)
    card = hub.info(repo, hub=any_hub.address).card
    assert card["library_name"] == ("peft" if peft else "peftkit")
    # the method's tag, also for a folder without peftkit.json (not its peft_type lower-cased)
    method_tags = [t for t in card["tags"] if t in ("lora", "prompt_tuning", "prompt_tuning_embedding_output")]
    assert method_tags == ["lora" if peft else "prompt_tuning"]
    pulled = hub.pull(repo, hub=any_hub.address, progress=False)
    assert (SNIPPET in (pulled / "README.md").read_text()) is peft
