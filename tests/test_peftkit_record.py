"""peftkit's own record (peftkit.json beside a PEFT-format config) is what hubs index the method by."""

from __future__ import annotations

import json
from pathlib import Path

import peftkit
from peftkit.registry.cards import extract_metadata
from tests.hub_helpers import hub_env, tiny_base  # noqa: F401


def test_the_record_names_the_method_over_the_coarser_peft_type() -> None:
    config = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}).encode()
    assert extract_metadata(None, config).methods == ["lora"]
    assert extract_metadata(None, config, b'{"method": "lora_plus"}').methods == ["lora_plus"]
    older = json.dumps({"peft_type": "LORA", "peftkit": {"method": "vera_plus"}}).encode()
    assert extract_metadata(None, older, b'{"method": "lora_plus"}').methods == ["vera_plus"]  # the key wins
    assert extract_metadata(None, config, b"{broken").methods == ["lora"]


def test_a_pushed_folder_is_indexed_by_its_record(hub_env: Path) -> None:  # noqa: F811
    hub = f"local:{hub_env / 'hub'}"
    model = peftkit.AdaptedModel(tiny_base())
    model.add_adapter("default", "lora[r=2]")
    folder = hub_env / "a"
    model.save_adapter(str(folder))
    record = json.loads((folder / "peftkit.json").read_text())
    (folder / "peftkit.json").write_text(json.dumps(dict(record, method="lora_plus")))  # a plugin's LoRA variant
    peftkit.hub.push(folder, "alice/a", hub=hub, progress=False)
    [hit] = peftkit.hub.search(hub=hub, method="lora_plus")
    assert hit.repo_id == "alice/a" and hit.method == "lora_plus"
    pulled = peftkit.hub.pull("alice/a", hub=hub, progress=False)
    assert json.loads((pulled / "peftkit.json").read_text())["method"] == "lora_plus"
