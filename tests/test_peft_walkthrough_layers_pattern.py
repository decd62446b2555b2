"""PEFT's ``layers_pattern`` (with ``layers_to_transform``) on LoRA: a ``peft.LoraConfig`` and a folder PEFT saved
with it were refused ("only layers_pattern=None"); now the same modules are adapted, with the same outputs, both
ways (found by the PEFT user's walkthrough)."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError, TargetError
from tests.method_helpers import output_of
from tests.tiny_models import build_tiny

CASES = [
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=0, layers_pattern=["h"])),
    ("t5", dict(target_modules=["q", "wi"], layers_to_transform=[1], layers_pattern="block")),
]


def _peft_sites(model) -> list[str]:
    return sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                  if "default" in getattr(module, "lora_A", {}))


@pytest.mark.parametrize("arch, options", CASES)
def test_layers_pattern_adapts_what_peft_adapts_and_loads_both_ways(tmp_path, arch, options):
    from peft import LoraConfig, PeftModel, get_peft_model

    theirs = get_peft_model(build_tiny(arch), LoraConfig(r=4, init_lora_weights=False, **options)).eval()
    ours = peftkit.adapt(build_tiny(arch), LoraConfig(r=4, **options))
    assert sorted(site.name for site in ours.adapter_record("default").sites) == _peft_sites(theirs)

    theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"))
    torch.testing.assert_close(output_of(loaded, arch), output_of(theirs, arch), atol=1e-5, rtol=0)

    loaded.save_adapter(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["layers_pattern"] == options["layers_pattern"]
    again = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path / "ours")).eval()
    assert _peft_sites(again) == _peft_sites(theirs)
    torch.testing.assert_close(output_of(again, arch), output_of(theirs, arch), atol=1e-5, rtol=0)


def test_the_pattern_decides_the_index_not_the_architecture():
    """A pattern that is not the model's list of layers matches nothing (PEFT: no module found), even where the
    architecture's own numbering would find layer 1."""
    with pytest.raises(TargetError, match=r"no targeted module is in layers \[1\] under layers_pattern='mlp'"):
        peftkit.adapt(build_tiny("llama"), "lora[target_modules=[q_proj],layers_to_transform=[1],layers_pattern=mlp]")


def test_empty_pattern_is_the_default_numbering_and_a_pattern_needs_layers_to_transform():
    empty = peftkit.adapt(build_tiny("llama"), "lora[layers_pattern=[],layers_to_transform=[0]]")
    assert [s.name for s in empty.adapter_record("default").sites] == \
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(ConfigError, match="set layers_to_transform too"):
        peftkit.adapt(build_tiny("llama"), "lora[layers_pattern=layers]")
    with pytest.raises(ConfigError, match="holds an empty name"):
        peftkit.adapt(build_tiny("llama"), 'lora[layers_pattern=[layers,""],layers_to_transform=[0]]')


class _Stack(torch.nn.Module):
    """Layers holding layers (module names "layers.0.inner.layers.1.proj", or "outer.layers..." when wrapped):
    the pattern matches at the start of a name too, and the first index after it counts, not a nested one
    (PEFT's rule)."""

    def __init__(self, wrapped: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(_Block() for _ in range(2))
        self.outer = _Stack() if wrapped else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outer is not None:
            return self.outer(x)
        for layer in self.layers:
            x = layer(x)
        return x


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Module()
        self.inner.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
        for sub in self.inner.layers:
            sub.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for sub in self.inner.layers:
            x = sub.proj(x)
        return x


@pytest.mark.parametrize("wrapped", [False, True])
def test_the_first_index_after_the_pattern_counts_from_the_start_of_the_name(wrapped):
    from peft import LoraConfig, get_peft_model

    options = dict(r=2, target_modules=["proj"], layers_to_transform=[1], layers_pattern="layers")
    theirs = get_peft_model(_Stack(wrapped), LoraConfig(**options))
    ours = peftkit.adapt(_Stack(wrapped), LoraConfig(**options))
    sites = sorted(site.name for site in ours.adapter_record("default").sites)
    assert sites == _peft_sites(theirs)
    assert "layers.1.inner.layers.0.proj" in {site.removeprefix("outer.") for site in sites}
