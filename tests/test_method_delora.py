"""DeLoRA (PEFT's DELORA) on tiny Llama and BERT: the same draws, column norms, outputs, gradients and files as the
real ``peft``, merging, half precision, dropout, the fused forward, and the settings peftkit refuses by name.

The conformance suite runs delora[r=4] on llama, bert and t5 (gpt2's Conv1D layers are refused, as by PEFT):
tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterError, AdapterLoadError, ConfigError
from peftkit.plugins.delora.config import DeloraConfig
from peftkit.plugins.delora.layer import DeloraLayer
from tests.method_helpers import (adapted_after_seed, adapter_modules, autograd_node_names, loaded_in_peft,
                                  merge_cycle_keeps_outputs, new_tensors, output_of, peft_file_loads_alike,
                                  peft_model_after_seed, peft_tensors_by_site)
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")

#: PEFT DeloraConfig options per case, and the same as a peftkit spec (no task_type: peftkit reads the task from
#: the model's class; BERT's classifier head is then saved, as modules_to_save).
CASES = [
    ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                   lambda_pattern={"v_proj": 3.5}),
     'delora[r=4,target_modules=[q_proj,v_proj,down_proj],init_weights=false,lambda_pattern={"v_proj":3.5}]'),
    ("bert", dict(r=2, init_weights=False, delora_lambda=40, rank_pattern={"value": 3}, task_type="SEQ_CLS"),
     'delora[r=2,init_weights=false,delora_lambda=40,rank_pattern={"value":3},modules_to_save=[classifier]]'),
]
TENSORS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")


def _peft_model(arch: str, seed: int = 0, model: torch.nn.Module | None = None, **options: object
                ) -> torch.nn.Module:
    """A PEFT DeLoRA model (drawn after ``torch.manual_seed(seed)``), in eval mode."""
    return peft_model_after_seed(build_tiny(arch) if model is None else model, peft.DeloraConfig(**options), seed)


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
    for key in ("peft_type", "r", "delora_lambda", "module_dropout", "rank_pattern", "lambda_pattern",
                "init_weights", "bias", "layers_pattern", "exclude_modules", "layers_to_transform"):
        assert our_config[key] == peft_config[key] and type(our_config[key]) is type(peft_config[key]), key
    peft_keys = {k: v.shape for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    our_keys = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert our_keys == peft_keys and any(k.endswith(".delora_w_norm") for k in our_keys)
    torch.testing.assert_close(output_of(loaded_in_peft(str(tmp_path / "ours"), build_tiny(arch)), arch), expected,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", [True, False])
def test_the_draws_lambdas_and_column_norms_are_pefts(init):
    options = dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_weights=init, delora_lambda=7,
                   rank_pattern={"up_proj": 2}, lambda_pattern={"v_proj": 0.5})
    theirs = peft_tensors_by_site(_peft_model("llama", seed=3, **options), TENSORS, buffers=True)
    spec = (f'delora[r=4,target_modules=[q_proj,v_proj,up_proj],init_weights={str(init).lower()},delora_lambda=7,'
            f'rank_pattern={{"up_proj":2}},lambda_pattern={{"v_proj":0.5}}]')
    ours = adapter_modules(_ours("llama", spec, seed=3))
    assert set(ours) == set(theirs)
    for site, layer in ours.items():
        for key, tensor in layer.tensors().items():
            assert tensor.shape == theirs[site][key].shape and torch.equal(tensor, theirs[site][key]), (site, key)
        assert layer.r == (2 if site.endswith("up_proj") else 4)
        assert float(layer.delora_lambda.detach()) == (0.5 if site.endswith("v_proj") else 7.0)
    assert all(bool(layer.delora_B.any()) == (not init) for layer in ours.values())


def test_the_column_norms_come_from_the_folder_not_the_model_it_loads_onto(tmp_path):
    """PEFT saves the norms it took from the weights it was created on; loading onto other weights (a merged or
    further trained base) keeps them, in both libraries."""
    _peft_model("llama", **CASES[0][1]).save_pretrained(str(tmp_path))
    other = build_tiny("llama", seed=7)
    ours = peftkit.from_pretrained(build_tiny("llama", seed=7), str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for site, layer in adapter_modules(ours).items():
        assert torch.equal(layer.delora_w_norm, saved[f"base_model.model.{site}.delora_w_norm"]), site
    torch.testing.assert_close(output_of(ours, "llama"), output_of(loaded_in_peft(str(tmp_path), other), "llama"),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("length", [3, 12])
@pytest.mark.parametrize("arch,options,spec", CASES)
def test_gradients_after_a_backward_equal_pefts(arch, options, spec, length):
    theirs, ours = _peft_model(arch, **options), _ours(arch, spec)
    peft_tensors = peft_tensors_by_site(theirs, TENSORS, buffers=True)
    ids = _ids(length, seed=length)
    for model in (theirs, ours):  # eval mode: the models' own dropout off
        output = model(input_ids=ids).logits
        output.pow(2).mean().backward()
    for site, layer in adapter_modules(ours).items():
        for key in ("delora_A", "delora_B", "delora_lambda"):
            grad = getattr(layer, key).grad
            assert grad is not None and grad.abs().max() > 0, (site, key)
            torch.testing.assert_close(grad, peft_tensors[site][key].grad, rtol=1e-4, atol=1e-7)
        assert not layer.delora_w_norm.requires_grad
    assert all(p.grad is None for p in ours.base_model.parameters() if not p.requires_grad)


def test_module_dropout_draws_pefts_masks_in_training():
    """PEFT's module_dropout drops elements of the update's input (nn.Dropout), from torch's global generator, layer
    by layer: with the same seed peftkit draws the same masks, and evaluation drops nothing."""
    theirs = _peft_model("llama", **{**CASES[0][1], "module_dropout": 0.5}).train()
    ours = _ours("llama", CASES[0][2].replace("]", ",module_dropout=0.5]")).train()
    ids = _ids(6)
    torch.manual_seed(11)
    expected = theirs(input_ids=ids).logits
    torch.manual_seed(11)
    got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (got - ours.eval()(input_ids=ids).logits).abs().max() > 1e-3


def test_a_bfloat16_model_runs_trains_and_matches_peft():
    """A, B, lambda and the norms are float32 beside bfloat16 weights (the norms taken in bfloat16, as PEFT takes
    them); the update is computed in float32 and added in bfloat16, as PEFT adds it. PEFT rounds its drawn A and B
    through bfloat16 (it casts them to the layer's dtype and back); peftkit keeps the float32 draws, so the
    comparison copies PEFT's."""
    options, spec = CASES[0][1], CASES[0][2]
    theirs = _peft_model("llama", model=build_tiny("llama").to(torch.bfloat16), **options)
    ours = _ours("llama", spec, model=build_tiny("llama").to(torch.bfloat16))
    peft_tensors = peft_tensors_by_site(theirs, TENSORS, buffers=True)
    with torch.no_grad():
        for site, layer in adapter_modules(ours).items():
            for key, tensor in layer.tensors().items():
                assert tensor.dtype == peft_tensors[site][key].dtype == torch.float32, (site, key)
                assert torch.equal(tensor.to(torch.bfloat16).float(), peft_tensors[site][key]), (site, key)
                tensor.copy_(peft_tensors[site][key])
    ids = _ids(20)
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert expected.dtype == torch.bfloat16
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-2)
    ours.train()
    ours(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = [layer.delora_A.grad for layer in adapter_modules(ours).values()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().max() > 0 for g in grads)


def test_the_fused_forward_writes_one_output_and_equals_the_formula():
    """Alone at a plain Linear, the layer's forward makes one (tokens, out) tensor (the update's product writes
    it, the base product accumulates onto it; PEFT makes four), and output and gradients equal the float64
    formula h + B diag(s) A (w * x)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24).double().requires_grad_(False)
    layer = DeloraLayer(base, r=3, delora_lambda=2.0, init_weights=False).double()
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    a, b, lam, w = layer.delora_A, layer.delora_B, layer.delora_lambda, layer.delora_w_norm
    scales = lam / 3 / (a.norm(dim=1) * b.norm(dim=0))
    expected = base(x) + ((x * w) @ a.t() * scales) @ b.t()
    fused = layer.forward_alone(x, base)
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(layer(x, base(x), base), expected)
    seed = torch.randn(10, 24, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(fused, (x, a, b, lam), seed),
                         torch.autograd.grad(expected, (x, a, b, lam), seed)):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        made = new_tensors(lambda: layer.forward_alone(x, base))
    assert sum(shape == (10, 24) for _, shape in made) == 1, made
    torch.testing.assert_close(layer.delta_weight(base), b @ torch.diag(scales) @ a * w)


def test_the_fused_node_with_module_dropout_equals_the_unfused_layer_in_training():
    """Alone at a plain Linear in training, the layer runs the plugin API's fused LoRA node (one autograd node,
    dropout drawn inside as nn.Dropout draws it): output and every gradient equal the unfused path's for one
    seed."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24).double().requires_grad_(False)
    layer = DeloraLayer(base, r=3, delora_lambda=2.0, module_dropout=0.3, init_weights=False).double().train()
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    leaves, seed = (x, layer.delora_A, layer.delora_B, layer.delora_lambda), torch.randn(10, 24, dtype=torch.float64)
    torch.manual_seed(5)
    fused = layer.forward_alone(x, base)
    torch.manual_seed(5)
    unfused = layer(x, base(x), base)
    torch.testing.assert_close(fused, unfused)
    assert (fused - base(x) - layer.eval()(x, base(x), base)).abs().max() > 1e-3  # dropout did drop entries
    assert any("LoraFn" in name for name in autograd_node_names(fused))
    for got, want in zip(torch.autograd.grad(fused, leaves, seed), torch.autograd.grad(unfused, leaves, seed)):
        torch.testing.assert_close(got, want)


def test_the_kept_scaled_a_follows_training_steps_loads_and_writes(tmp_path):
    """Forwards without gradients reuse diag(s) A diag(w) until A, B, lambda or the norms change (an optimizer
    step, a load, a write); a training forward keeps nothing."""
    model = _ours("llama", "delora[r=4,init_weights=false]")
    layers = adapter_modules(model).values()
    first = output_of(model, "llama")
    kept = [layer.__dict__["_kept_scaled_a"][1] for layer in layers]
    assert torch.equal(output_of(model, "llama"), first)
    assert all(layer.__dict__["_kept_scaled_a"][1] is made for layer, made in zip(layers, kept))
    ids = torch.tensor([[1, 5, 9, 17]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all("_kept_scaled_a" not in layer.__dict__ for layer in layers)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    stepped = output_of(model, "llama")
    assert (stepped - first).abs().max() > 1e-4
    model.save_adapter(str(tmp_path))
    assert torch.equal(output_of(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path)), "llama"), stepped)
    with torch.no_grad():
        for layer in layers:
            layer.delora_w_norm.zero_()  # the buffer too: it is part of the update
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"), rtol=0, atol=0)


def test_merge_equals_unmerged_and_merge_and_unload_keeps_the_outputs():
    merge_cycle_keeps_outputs(_ours("llama", "delora[r=4,init_weights=false,target_modules=all-linear]"), "llama")


def test_a_peft_config_object_is_read_as_its_folder():
    model = peftkit.adapt(build_tiny("llama"), peft.DeloraConfig(r=2, delora_lambda=3))
    config = model.adapter_record("default").config
    assert isinstance(config, DeloraConfig)
    assert (config.r, config.delora_lambda, config.target_modules) == (2, 3.0, ["q_proj", "v_proj"])
    assert len(adapter_modules(model)) == 4  # PEFT's (LoRA's) default targets: q_proj and v_proj of each layer
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama"), "llama"), rtol=0, atol=0)


def test_prepare_for_hotswap_says_delora_has_no_rank_to_pad():
    """Padding A and B with zeros would change lambda / r (the update), so DeLoRA has no rank to pad."""
    model = _ours("llama", "delora[r=2]")
    with pytest.raises(AdapterError, match=r"'default' \(delora\) has no rank to pad"):
        model.prepare_for_hotswap(8, "default")


@pytest.mark.parametrize("field,value", [("bias", "all"), ("bias", "delora_only"), ("layers_pattern", "layers")])
def test_pefts_options_peftkit_lacks_are_refused_by_name(tmp_path, field, value):
    options = dict(r=2, target_modules=["q_proj"])
    if field == "layers_pattern":
        options["layers_to_transform"] = [0]
    _peft_model("llama", **options, **{field: value}).save_pretrained(str(tmp_path))
    with pytest.raises(AdapterLoadError, match=rf"PEFT setting {field}='{value}' is not supported by peftkit's delora"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


@pytest.mark.parametrize("spec,message", [
    ("delora[r=0]", r"r=0 must be a positive integer"),
    ('delora[rank_pattern={"q_proj":-1}]', r"rank_pattern\['q_proj'\]=-1 must be a positive integer"),
    ("delora[module_dropout=1.0]", r"module_dropout=1.0 must be at least 0 and below 1"),
    ("delora[target_modules=all-linear,layers_to_transform=[0]]",
     r"layers_to_transform=\[0\] cannot be used with target_modules given as one string.*give target_modules as a "
     r"list"),
    ("delora[target_modules=[embed_tokens]]", r"'model.embed_tokens' is an Embedding; DeLoRA adapts torch's Linear"),
])
def test_bad_settings_are_refused_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


@pytest.mark.parametrize("field", ["delora_lambda", "lambda_pattern"])
def test_a_lambda_that_is_not_finite_is_refused(field):
    value = {"q_proj": float("nan")} if field == "lambda_pattern" else float("inf")
    label = "lambda_pattern\\['q_proj'\\]=nan" if field == "lambda_pattern" else "delora_lambda=inf"
    with pytest.raises(ConfigError, match=rf"{label} must be a finite number"):
        DeloraConfig(**{field: value})


def test_pefts_regex_and_layer_indices_refusal_is_pefts_too():
    with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        peft.DeloraConfig(target_modules="all-linear", layers_to_transform=[0])


def test_gpt2s_conv1d_layers_are_refused_as_by_peft():
    with pytest.raises(ConfigError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D; DeLoRA adapts torch's Linear"):
        peftkit.adapt(build_tiny("gpt2"), "delora")
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        _peft_model("gpt2", target_modules=["c_attn"])


def test_a_quantized_layer_is_refused_naming_it():
    """DeLoRA reads the base weight's column norms, which a packed 4-bit weight does not give (PEFT would take the
    norms of the packed storage)."""
    pytest.importorskip("bitsandbytes")
    from tests.method_helpers import quantized_linear_and_twin

    quantized, _ = quantized_linear_and_twin(4)
    with pytest.raises(ConfigError, match=r"target '0' is a Linear4bit; DeLoRA adapts .*not quantized layers"):
        peftkit.adapt(quantized, "delora[target_modules=['0']]")


def test_the_fused_forward_counts_every_product_it_runs() -> None:
    """The base product accumulates onto the update's with addmm(out=), which FLOP counters (bench/perf_table.py's
    floor columns) see: the adapted forward's FLOPs are the base's plus the two rank-r products per layer."""
    from torch.utils.flop_counter import FlopCounterMode

    base = build_tiny("llama")
    model = peftkit.adapt(build_tiny("llama"), "delora[r=4,target_modules=[q_proj]]")
    ids = torch.randint(0, 100, (1, 8))
    flops = []
    for run in (base, model):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            run(input_ids=ids)
        flops.append(counter.get_total_flops())
    q = base.model.layers[0].self_attn.q_proj
    per_layer = 2 * 8 * 4 * (q.in_features + q.out_features)
    assert flops[1] - flops[0] == per_layer * len(base.model.layers)
