"""A union's modules called directly: at a site its parts run in the union's order (each on the output of
the one before), its change is that output less h, a lone LoRA part hands routing its factors, and
loading copies each part's tensors; on T5, generate() gets the prompted encoder input from the union's
prompt-tuning part exactly as from the part added alone."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.testing import randomize

from .tiny_models import build_tiny, sample_inputs

SPEC = "lora[r=2,dropout=0.1]|seq_bn[reduction_factor=4]|ia3"


@pytest.mark.parametrize("spec", [SPEC, 'ia3|lora[r=2,target_modules=["q_proj"]]'])
def test_at_a_site_the_parts_run_in_order_and_the_change_is_the_output_less_h(spec):
    """Also where a part reads the base layer (IA3 on the feed-forward input: base(x * l) - base(x))."""
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, "default", seed=3, scale=0.3)
    model.eval()
    counts = set()
    for _, layer in model.tuner_layers():
        union = layer.adapters["default"]
        count = len(union.parts)
        counts.add(count)
        assert union.additive is all(part.additive for part in union.parts.values())
        base = layer.base_layer
        x = torch.randn(2, 5, base.in_features, generator=torch.Generator().manual_seed(count))
        with torch.no_grad():
            h = base(x)
            chained = h
            for part in union.parts.values():
                chained = part(x, chained, base)
            assert not torch.allclose(chained, h, atol=1e-4)
            torch.testing.assert_close(union(x, h, base), chained)
            torch.testing.assert_close(union.delta(x, h, base), chained - h)
            if count == 1:
                (part,) = union.parts.values()
                torch.testing.assert_close(union.delta(x, h, base), part.delta(x, h, base))
    assert counts == ({1, 2} if spec == SPEC else {1})


def test_a_lone_lora_part_gives_its_factors_and_none_while_its_dropout_is_active():
    model = peftkit.adapt(build_tiny("llama"), SPEC)
    lone = [(layer, union) for _, layer in model.tuner_layers() for union in [layer.adapters["default"]]
            if list(union.parts) == ["lora"]]
    mixed = [union for _, layer in model.tuner_layers() for union in [layer.adapters["default"]]
             if len(union.parts) > 1]
    assert lone and mixed and all(union.low_rank() is None for union in mixed)
    _, union = lone[0]
    part = union.parts["lora"]
    model.train()
    a, b, scale = union.low_rank()  # factors for merging-style use even while training
    assert a is part.lora_A and b is part.lora_B and scale == part.scale
    assert union.low_rank(forward=True) is None  # dropout acts on the input: no batched form
    model.eval()
    assert union.low_rank(forward=True)[0] is part.lora_A
    seq_only = [union for _, layer in model.tuner_layers() for union in [layer.adapters["default"]]
                if list(union.parts) == ["seq_bn"]]
    assert all(union.low_rank() is None for union in seq_only)


def test_loading_tensors_copies_each_part_by_its_prefixed_key():
    model = peftkit.adapt(build_tiny("llama"), SPEC)
    model.add_adapter("other", SPEC)
    randomize(model, "default", seed=3, scale=0.3)
    randomize(model, "other", seed=4, scale=0.3)
    for _, layer in model.tuner_layers():
        target, source = layer.adapters["default"], layer.adapters["other"]
        saved = {k: v.detach().clone() for k, v in source.tensors().items()}
        assert all(k.split(".", 1)[0] in target.parts for k in saved)
        target.load_tensors(saved)
        for key, value in target.tensors().items():
            assert torch.equal(value, saved[key]), key


def test_t5_generate_with_a_prompt_part_equals_the_part_added_alone():
    spec = "prompt_tuning[num_virtual_tokens=2]|lora[r=2]"
    union = peftkit.adapt(build_tiny("t5"), spec)
    randomize(union, "default", seed=5, scale=0.3)
    parts = peftkit.AdaptedModel(build_tiny("t5"))
    for _, config in union.adapter_record("default").config.part_configs():
        parts.add_adapter(config.method, config)
    with torch.no_grad():
        for key, tensor in union.model_adapter("default").tensors().items():
            parts.model_adapter("prompt_tuning").tensors()[key.split(".", 1)[1]].copy_(tensor)
        for _, layer in union.tuner_layers():
            own = layer.adapters["default"].parts["lora"].tensors()
            twin = parts.base_model.get_submodule(_name_of(union, layer)).adapters["lora"].tensors()
            for key, tensor in own.items():
                twin[key].copy_(tensor)
    parts.set_active(peftkit.Stack("prompt_tuning", "lora"))
    inputs = sample_inputs("t5", seq=5)
    ask = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=4,
               do_sample=False)
    generated = union.generate(**ask)
    assert torch.equal(generated, parts.generate(**ask))
    assert torch.equal(union.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      max_new_tokens=4, do_sample=False), generated)
    with union.disable_adapters():
        assert not torch.equal(union.generate(**ask), generated)
    with torch.no_grad():  # a forward with the input ids given positionally reaches the prompt part too
        keyword = union(**inputs).logits
        positional = union(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           decoder_input_ids=inputs["decoder_input_ids"]).logits
    torch.testing.assert_close(positional, keyword)


def _name_of(model: peftkit.AdaptedModel, layer: torch.nn.Module) -> str:
    return next(name for name, other in model.tuner_layers() if other is layer)
