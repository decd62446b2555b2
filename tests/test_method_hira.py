"""HiRA (PEFT's HIRA) on tiny Llama, GPT-2, BERT and a net of convolutions: the same draws, outputs, gradients,
dropout masks and files as the real ``peft`` (Linear, Conv1D, Embedding, Conv1d/2d/3d layers), merging, half
precision, the fused forward and what it keeps for the backward, and the settings peftkit refuses by name.

The conformance suite runs hira[r=4,init_weights=false] on llama, bert, gpt2 and t5: tests/test_conformance.py
(BUILTIN_SPECS).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterError, AdapterLoadError, ConfigError
from peftkit.plugins.hira.config import HiraConfig
from peftkit.plugins.hira.layer import HiraEmbedding, HiraLinear
from tests.method_helpers import (adapted_after_seed, adapter_modules, bytes_kept_for_backward, frozen_layer,
                                  loaded_in_peft, merge_cycle_keeps_outputs, output_of, peft_file_loads_alike,
                                  peft_model_after_seed, peft_tensors_by_site)
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")

#: PEFT HiraConfig options per case, and the same as a peftkit spec (no task_type: peftkit reads the task from the
#: model's class; BERT's classifier head is then saved, as modules_to_save). init_weights=False: B is not zero.
CASES = [
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], init_weights=False),
     "hira[r=4,target_modules=[q_proj,v_proj,down_proj,embed_tokens],init_weights=false]"),
    ("gpt2", dict(r=3, target_modules=["c_attn", "c_fc"], init_weights=False, fan_in_fan_out=True),
     "hira[r=3,target_modules=[c_attn,c_fc],init_weights=false,fan_in_fan_out=true]"),
    ("bert", dict(r=2, init_weights=False, task_type="SEQ_CLS"),
     "hira[r=2,init_weights=false,modules_to_save=[classifier]]"),
]
TENSORS = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")


def _peft_model(arch: str, seed: int = 0, model: torch.nn.Module | None = None, **options: object
                ) -> torch.nn.Module:
    """A PEFT HiRA model (drawn after ``torch.manual_seed(seed)``), in eval mode."""
    return peft_model_after_seed(build_tiny(arch) if model is None else model, peft.HiraConfig(**options), seed)


def _ours(arch: str, spec: str, seed: int = 0, model: torch.nn.Module | None = None) -> peftkit.AdaptedModel:
    return adapted_after_seed(build_tiny(arch) if model is None else model, spec, seed)


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 120, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_a_peft_folder_loads_with_peft_outputs_merged_and_unmerged(tmp_path, arch, options, spec):
    peft_file_loads_alike(_peft_model(arch, **options), arch, tmp_path)


@pytest.mark.parametrize("arch,options,spec", CASES)
def test_peft_loads_what_peftkit_saves_with_the_same_outputs_fields_and_keys(tmp_path, arch, options, spec):
    _peft_model(arch, **options).save_pretrained(str(tmp_path / "peft"))
    ours = _ours(arch, spec, seed=1)
    expected = output_of(ours, arch)
    ours.save_adapter(str(tmp_path / "ours"))
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "hira_dropout", "fan_in_fan_out", "init_weights", "rank_pattern", "layers_pattern",
                "exclude_modules", "layers_to_transform"):
        assert our_config[key] == peft_config[key] and type(our_config[key]) is type(peft_config[key]), key
    peft_keys = {k: v.shape for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    our_keys = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert our_keys == peft_keys
    torch.testing.assert_close(output_of(loaded_in_peft(str(tmp_path / "ours"), build_tiny(arch)), arch), expected,
                               rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_the_draws_are_pefts_for_linear_and_embedding_layers(init):
    options = dict(r=4, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"], init_weights=init)
    theirs = peft_tensors_by_site(_peft_model("llama", seed=3, **options), TENSORS)
    shown = json.dumps(init)
    ours = adapter_modules(_ours("llama", f"hira[r=4,target_modules=[q_proj,v_proj,up_proj,embed_tokens],"
                                          f"init_weights={shown}]", seed=3))
    assert set(ours) == set(theirs)
    for site, layer in ours.items():
        for key, tensor in layer.tensors().items():
            assert tensor.shape == theirs[site][key].shape and torch.equal(tensor, theirs[site][key]), (site, key)
    embedding = ours["model.embed_tokens"]
    assert isinstance(embedding, HiraEmbedding)
    assert bool(embedding.hira_embedding_A.any()) == (init is False)  # A = 0 unless init_weights is false
    assert all(bool(layer.hira_B.any()) == (init is False) for layer in ours.values() if isinstance(layer, HiraLinear))


@pytest.mark.parametrize("length", [3, 12])
@pytest.mark.parametrize("arch,options,spec", CASES)
def test_gradients_after_a_backward_equal_pefts(arch, options, spec, length):
    theirs, ours = _peft_model(arch, **options), _ours(arch, spec)
    peft_tensors = peft_tensors_by_site(theirs, TENSORS)
    ids = _ids(length, seed=length)
    for model in (theirs, ours):  # eval mode: the models' own dropout off
        output = model(input_ids=ids).logits
        output.pow(2).mean().backward()
    for site, layer in adapter_modules(ours).items():
        for key, tensor in layer.tensors().items():
            assert tensor.grad is not None and tensor.grad.abs().max() > 0, (site, key)
            torch.testing.assert_close(tensor.grad, peft_tensors[site][key].grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in ours.base_model.parameters() if not p.requires_grad)


def test_hira_dropout_draws_pefts_masks_in_training():
    """PEFT drops elements of the update's input (nn.Dropout), from torch's global generator, layer by layer (not at
    Embedding layers): with the same seed peftkit draws the same masks, and evaluation drops nothing."""
    options, spec = CASES[0][1], CASES[0][2]
    theirs = _peft_model("llama", **{**options, "hira_dropout": 0.5}).train()
    ours = _ours("llama", spec.replace("]", ",hira_dropout=0.5]")).train()
    ids = _ids(6)
    torch.manual_seed(11)
    expected = theirs(input_ids=ids).logits
    torch.manual_seed(11)
    got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    with torch.no_grad():
        assert (got - ours.eval()(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("conv1d", [False, True])
def test_the_fused_forward_is_one_product_and_keeps_only_the_input_for_backward(conv1d):
    """Alone at a plain layer the output is x (W0 ⊙ (1 + B A))^T + b, one product; output and gradients equal the
    float64 formula, and the backward keeps the input alone besides the parameters (PEFT keeps W0 ⊙ B A too)."""
    base = frozen_layer(16, 24, conv1d=conv1d)
    torch.manual_seed(1)
    layer = HiraLinear(base, r=3, init_weights=False).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    a, b = layer.hira_A, layer.hira_B
    weight = base.weight.t() if conv1d else base.weight
    expected = x @ weight.t() + base.bias + x @ (weight * (b @ a)).t()
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        fused = layer.forward_alone(x, base)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(layer(x, base(x), base), expected)
    parameters = {t.untyped_storage().data_ptr() for t in (base.weight, a, b)}
    assert [tuple(t.shape) for t in kept if t.untyped_storage().data_ptr() not in parameters] == [(2, 5, 16)]
    seed = torch.randn(2, 5, 24, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(fused, (x, a, b), seed), torch.autograd.grad(expected, (x, a, b), seed)):
        torch.testing.assert_close(got, want)


def test_the_training_forward_keeps_less_for_backward_than_pefts():
    """PEFT keeps W0 ⊙ B A (out x in) per layer for the backward; peftkit builds it again there."""
    theirs = _peft_model("llama", r=4, target_modules="all-linear", init_weights=False)
    ours = _ours("llama", "hira[r=4,target_modules=all-linear,init_weights=false]")
    assert bytes_kept_for_backward(ours, input_ids=_ids(8)) < bytes_kept_for_backward(theirs, input_ids=_ids(8))


def test_the_embedding_update_gathers_rows_as_pefts_whole_matrix():
    """An id's row of W0 ⊙ (B A)^T, gathered: PEFT's lookup in the whole matrix, without padding_idx."""
    torch.manual_seed(0)
    base = torch.nn.Embedding(30, 8, padding_idx=0).double().requires_grad_(False)
    layer = HiraEmbedding(base, r=3, init_weights=False).double()
    ids = torch.tensor([[0, 4, 4, 29], [7, 0, 1, 2]])
    a, b = layer.hira_embedding_A, layer.hira_embedding_B
    expected = torch.nn.functional.embedding(ids, base.weight * (b @ a).t())
    got = layer.delta(ids, base(ids), base)
    torch.testing.assert_close(got, expected)
    seed = torch.randn(2, 4, 8, dtype=torch.float64)
    for mine, want in zip(torch.autograd.grad(got, (a, b), seed), torch.autograd.grad(expected, (a, b), seed)):
        torch.testing.assert_close(mine, want)
    torch.testing.assert_close(layer.delta_weight(base), base.weight * (b @ a).t())


def test_merge_equals_unmerged_and_merge_and_unload_keeps_the_outputs():
    merge_cycle_keeps_outputs(_ours("llama", "hira[r=4,init_weights=false,target_modules=all-linear]"), "llama")


def test_unmerge_gives_the_weight_back_where_one_plus_b_a_is_zero():
    """Merging multiplies W0 by 1 + B A and unmerging divides by it; where 1 + B A is 0 the values are kept."""
    base = frozen_layer(6, 4, dtype=torch.float32)
    layer = HiraLinear(base, r=1, init_weights=False)
    with torch.no_grad():
        layer.hira_B.copy_(torch.tensor([[-1.0], [0.5], [2.0], [-3.0]]))
        layer.hira_A.copy_(torch.tensor([[1.0, 0.25, -2.0, 1.0, 0.5, 3.0]]))
    before = base.weight.detach().clone()
    merged = before * (1 + layer.hira_B @ layer.hira_A)
    layer.merge(base)
    assert (merged == 0).any() and torch.allclose(base.weight, merged, rtol=1e-6, atol=0)
    layer.unmerge(base)
    torch.testing.assert_close(base.weight, before, rtol=3e-7, atol=0)


def test_a_bfloat16_model_runs_trains_and_matches_peft():
    """A and B are float32 beside bfloat16 weights and the update is computed in float32, as PEFT computes it. PEFT
    rounds its drawn A and B through bfloat16; the comparison copies PEFT's."""
    options, spec = CASES[0][1], CASES[0][2]
    theirs = _peft_model("llama", model=build_tiny("llama").to(torch.bfloat16), **options)
    ours = _ours("llama", spec, model=build_tiny("llama").to(torch.bfloat16))
    peft_tensors = peft_tensors_by_site(theirs, TENSORS)
    with torch.no_grad():
        for site, layer in adapter_modules(ours).items():
            for key, tensor in layer.tensors().items():
                assert tensor.dtype == peft_tensors[site][key].dtype == torch.float32, (site, key)
                tensor.copy_(peft_tensors[site][key])
    ids = _ids(20)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert expected.dtype == torch.bfloat16
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=2e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=2e-2)
    ours.train()
    ours(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = [layer.tensors()[key].grad for layer in adapter_modules(ours).values() for key in layer.tensors()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_a_peft_config_object_is_read_as_its_folder():
    model = peftkit.adapt(build_tiny("llama"), peft.HiraConfig(r=2, init_weights="gaussian"))
    config = model.adapter_record("default").config
    assert isinstance(config, HiraConfig)
    assert (config.r, config.init_weights, config.target_modules) == (2, "gaussian", ["q_proj", "v_proj"])
    assert len(adapter_modules(model)) == 4  # PEFT's (LoRA's) default targets: q_proj and v_proj of each layer
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"), rtol=0, atol=0)


def test_a_peft_folder_with_rank_pattern_loads_as_peft_loads_it(tmp_path):
    """PEFT's HiRA (0.21) creates every layer at r whatever rank_pattern says, saving and loading rank-r tensors:
    peftkit reads such a folder the same way."""
    theirs = _peft_model("llama", r=3, target_modules=["q_proj", "v_proj"], init_weights=False,
                         rank_pattern={"v_proj": 1})
    assert all(t["hira_A"].shape[0] == 3 for t in peft_tensors_by_site(theirs, TENSORS).values())
    model = peft_file_loads_alike(theirs, "llama", tmp_path)
    assert model.adapter_record("default").config.rank_pattern == {}


def test_prepare_for_hotswap_says_hira_has_no_rank_to_pad():
    model = _ours("llama", "hira[r=2]")
    with pytest.raises(AdapterError, match=r"'default' \(hira\) has no rank to pad"):
        model.prepare_for_hotswap(8, "default")


def test_pefts_layers_pattern_is_refused_by_name(tmp_path):
    _peft_model("llama", r=2, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers",
                init_weights=False).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterLoadError, match=r"PEFT setting layers_pattern='layers' is not supported by peftkit's "
                                               r"hira"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


@pytest.mark.parametrize("spec,message", [
    ("hira[r=0]", r"r=0 must be a positive integer"),
    ('hira[rank_pattern={"q_proj":2}]', r"rank_pattern=\{'q_proj': 2\} is not supported: PEFT's HiRA \(0.21\) "
                                        r"creates every layer at r"),
    ("hira[hira_dropout=1.0]", r"hira_dropout=1.0 must be at least 0 and below 1"),
    ("hira[init_weights=uniform]", r"init_weights='uniform' has the wrong type; expected bool or one of 'gaussian'"),
    ("hira[target_modules=all-linear,layers_to_transform=[0]]",
     r"layers_to_transform=\[0\] cannot be used with target_modules given as one string.*give target_modules as a "
     r"list"),
])
def test_bad_settings_are_refused_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


class _ConvNet(torch.nn.Module):
    """Conv1d, a strided Conv2d, a 1 x 1 Conv2d and a Conv3d in a row."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(3, 5, 3, padding=1)
        self.c2 = torch.nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.p = torch.nn.Conv2d(6, 4, 1)
        self.c3 = torch.nn.Conv3d(4, 2, (1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x).relu().view(x.shape[0], 5, 4, 4)
        y = self.p(self.c2(y).relu())
        return self.c3(y[:, :, None])


def _conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return _ConvNet().eval()


@pytest.mark.parametrize("init", [True, False])
def test_convolutions_draw_compute_and_save_as_pefts(tmp_path, init):
    theirs = peft_model_after_seed(_conv_net(), peft.HiraConfig(r=3, target_modules=["c1", "c2", "p", "c3"],
                                                                  init_weights=init), seed=5)
    ours = adapted_after_seed(_conv_net(), f"hira[r=3,target_modules=[c1,c2,p,c3],init_weights={str(init).lower()}]",
                              seed=5)
    peft_tensors = peft_tensors_by_site(theirs, TENSORS)
    for site, layer in adapter_modules(ours).items():
        for key, tensor in layer.tensors().items():
            assert torch.equal(tensor, peft_tensors[site][key]), (site, key)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if init:
        return
    expected.pow(2).sum().backward()
    got.pow(2).sum().backward()
    for site, layer in adapter_modules(ours).items():
        for key, tensor in layer.tensors().items():
            torch.testing.assert_close(tensor.grad, peft_tensors[site][key].grad, rtol=1e-4, atol=1e-6)
    ours.save_adapter(str(tmp_path))
    torch.testing.assert_close(loaded_in_peft(str(tmp_path), _conv_net())(x), got, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), got, rtol=1e-5, atol=1e-6)
        ours.unmerge_adapter()
        with ours.disable_adapters():
            torch.testing.assert_close(ours(x), _conv_net()(x), rtol=1e-5, atol=1e-6)


def test_a_convolutions_update_alone_equals_its_fused_output():
    """delta (used in compositions and with dropout) and the fused convolution with W0 ⊙ (1 + B A) agree."""
    from peftkit.plugins.hira.layer import HiraConv

    base = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1).double().requires_grad_(False)
    layer = HiraConv(base, r=2, init_weights=False).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(base(x) + layer.delta(x, base(x), base), layer.forward_alone(x, base))


def test_a_grouped_convolution_is_refused_naming_it():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"target '0' is a Conv2d; HiRA adapts .*not grouped convolutions, as PEFT"):
        peftkit.adapt(model, "hira[target_modules=['0']]")
    with pytest.raises(NotImplementedError, match="groups > 1"):
        peft.get_peft_model(model, peft.HiraConfig(target_modules=["0"]))


def test_a_quantized_layer_is_refused_naming_it():
    pytest.importorskip("bitsandbytes")
    from tests.method_helpers import quantized_linear_and_twin

    quantized, _ = quantized_linear_and_twin(4)
    with pytest.raises(ConfigError, match=r"target '0' is a Linear4bit; HiRA adapts .*not quantized layers"):
        peftkit.adapt(quantized, "hira[target_modules=['0']]")


@pytest.mark.parametrize("conv1d", [False, True])
def test_one_row_goes_through_the_weight_once_and_equals_the_formula(conv1d):
    """Decoding one token: x W0^T + sum_i ((x ⊙ a_i) W0^T) ⊙ b_i, one (r + 1)-row product and no (out, in) tensor;
    the output and gradients equal the float64 formula."""
    from tests.method_helpers import new_tensors

    base = frozen_layer(16, 24, conv1d=conv1d)
    torch.manual_seed(1)
    layer = HiraLinear(base, r=3, init_weights=False).double()
    x = torch.randn(1, 1, 16, dtype=torch.float64, requires_grad=True)
    a, b = layer.hira_A, layer.hira_B
    weight = base.weight.t() if conv1d else base.weight
    expected = x @ (weight * (1 + b @ a)).t() + base.bias
    got = layer.forward_alone(x, base)
    torch.testing.assert_close(got, expected)
    seed = torch.randn(1, 1, 24, dtype=torch.float64)
    for mine, want in zip(torch.autograd.grad(got, (x, a, b), seed), torch.autograd.grad(expected, (x, a, b), seed)):
        torch.testing.assert_close(mine, want)
    with torch.no_grad():
        made = new_tensors(lambda: layer.forward_alone(x, base))
    assert (24, 16) not in [shape for _, shape in made] and (16, 24) not in [shape for _, shape in made], made
    assert ("mm.default", (4, 24)) in made, made


def test_inference_on_many_rows_reuses_the_modulated_weight_until_a_factor_or_the_weight_changes():
    """Without gradients, several rows go through W0 ⊙ (1 + B A) built once and kept while A, B and W0 stay; a
    training forward builds it anew (through the node that keeps x alone) and drops the kept one."""
    base = frozen_layer(16, 24)
    torch.manual_seed(1)
    layer = HiraLinear(base, r=3, init_weights=False).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)

    def formula() -> torch.Tensor:
        return x @ (base.weight * (1 + layer.hira_B @ layer.hira_A)).t() + base.bias

    with torch.no_grad():
        first = layer.forward_alone(x, base)
        kept = layer.__dict__["_kept_changed_weight"][1]
        torch.testing.assert_close(first, formula())
        torch.testing.assert_close(layer.forward_alone(x, base), first, rtol=0, atol=0)
        assert layer.__dict__["_kept_changed_weight"][1] is kept
        layer.hira_A.mul_(2)
        torch.testing.assert_close(layer.forward_alone(x, base), formula())
        base.weight.mul_(1.5)
        torch.testing.assert_close(layer.forward_alone(x, base), formula())
    layer.forward_alone(x, base).sum().backward()
    assert "_kept_changed_weight" not in layer.__dict__ and layer.hira_B.grad.abs().max() > 0
