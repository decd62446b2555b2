"""Hot-swapping a folder that adapts only some of the loaded adapter's modules, as PEFT's
``hotswap_adapter`` allows: the modules the folder leaves out are zeroed and add nothing (found by the PEFT
user's walkthrough, where peftkit refused such a folder that PEFT swaps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterLoadError
from tests.method_helpers import output_of, randomize
from tests.tiny_models import build_tiny


def _saved(folder: Path, spec: str, seed: int) -> tuple[str, torch.Tensor]:
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, seed=seed)
    model.eval()
    model.save_adapter(str(folder))
    return str(folder), output_of(model, "llama")


SUBSETS = [
    ('lora[r=4,alpha=8,target_modules=["q_proj","v_proj"]]', 'lora[r=4,alpha=16,target_modules=["q_proj"]]'),
    ('lora[r=4,target_modules=["embed_tokens","q_proj","v_proj"]]', 'lora[r=2,target_modules=["v_proj"]]'),
    ('lora[r=4,target_modules=all-linear]', 'lora[r=4,target_modules=["down_proj"],use_rslora=true]'),
]


@pytest.mark.parametrize("slot_spec, file_spec", SUBSETS)
def test_a_folder_adapting_fewer_modules_swaps_in_and_the_others_add_nothing(tmp_path, slot_spec, file_spec):
    first, _ = _saved(tmp_path / "a", slot_spec, seed=1)
    other, expected = _saved(tmp_path / "b", file_spec, seed=2)
    model = peftkit.from_pretrained(build_tiny("llama"), first)
    output_of(model, "llama")  # a warm forward first: no product of the old factors may survive the swap
    objects = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    model.hotswap_adapter(other)
    assert {k: id(v) for k, v in model.state_dict(keep_vars=True).items()} == objects
    torch.testing.assert_close(output_of(model, "llama"), expected, atol=1e-5, rtol=0)
    # what it saves now is the swapped-in adapter (zeros where the folder had nothing), in PEFT too
    model.save_adapter(str(tmp_path / "again"))
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "again")).eval()
    torch.testing.assert_close(output_of(theirs, "llama"), expected, atol=1e-5, rtol=0)


def test_peft_swaps_the_same_subset_to_the_same_outputs(tmp_path):
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    first, _ = _saved(tmp_path / "a", 'lora[r=4,target_modules=["q_proj","v_proj","o_proj"]]', seed=1)
    other, expected = _saved(tmp_path / "b", 'lora[r=4,alpha=2,target_modules=["o_proj"]]', seed=2)
    theirs = PeftModel.from_pretrained(build_tiny("llama"), first).eval()
    hotswap_adapter(theirs, other, adapter_name="default")
    ours = peftkit.from_pretrained(build_tiny("llama"), first)
    ours.hotswap_adapter(other)
    torch.testing.assert_close(output_of(ours, "llama"), output_of(theirs, "llama"), atol=1e-5, rtol=0)
    torch.testing.assert_close(output_of(ours, "llama"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("slot_spec, file_spec, message", [
    # DoRA's magnitude rescales the rows even with zero factors: it cannot be made to add nothing
    ('lora[r=4,use_dora=true,target_modules=["q_proj","v_proj"]]', 'lora[r=4,use_dora=true,target_modules=["q_proj"]]',
     r"'default' adapts model\.layers\.0\.self_attn\.v_proj and the folder's adapter does not.*LoraLinear.*"
     r"only a low-rank change"),
    # a module the loaded adapter does not adapt has no parameters to copy into
    ('lora[r=4,target_modules=["q_proj","v_proj"]]', 'lora[r=4,target_modules=["q_proj","k_proj"]]',
     r"the folder's adapter adapts model\.layers\.0\.self_attn\.k_proj and 'default' does not.*same target"),
])
def test_what_cannot_be_zeroed_or_is_not_adapted_is_refused_and_nothing_changes(tmp_path, slot_spec, file_spec,
                                                                                message):
    first, before_out = _saved(tmp_path / "a", slot_spec, seed=1)
    other, _ = _saved(tmp_path / "b", file_spec, seed=2)
    model = peftkit.from_pretrained(build_tiny("llama"), first)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=message):
        model.hotswap_adapter(other)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    torch.testing.assert_close(output_of(model, "llama"), before_out, atol=0, rtol=0)
