"""LoKr on tiny llama, gpt2, bert and a small convolution net, and two-way file compatibility with the real `peft`."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.core.errors import AdapterError, ConfigError
from peftkit.plugins.lokr.config import LokrConfig
from peftkit.plugins.lokr.layer import kron
from peftkit.plugins.lokr.shapes import LokrShapes, factorization
from tests.method_helpers import (adapter_modules, changed_by_a_train_step, merge_keeps_output, output_of,
                                  quantized_linear_and_twin, randomize, save_and_reload, switch_outputs, two_adapters,
                                  unload_keeps_output)
from tests.tiny_models import build_tiny

# The conformance suite runs lokr[r=4] on llama, gpt2, bert and t5: tests/test_conformance.py (BUILTIN_SPECS).

ALL_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _layer(model: peftkit.AdaptedModel, site: str):
    return model.base_model.get_submodule(site)


def _peft_tensors(peft_model) -> dict[str, dict[str, tuple[int, ...]]]:
    """Site -> {key: shape} of a PEFT LoKr model's adapter "default" (PEFT's module names)."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, param in peft_model.named_parameters():
        parts = name.split(".")
        if len(parts) > 2 and parts[-2] in ALL_KEYS and parts[-1] == "default":
            site = ".".join(parts[:-2]).removeprefix("base_model.model.")
            out.setdefault(site, {})[parts[-2]] = tuple(param.shape)
    return out


def _our_tensors(model: peftkit.AdaptedModel, name: str = "default") -> dict[str, dict[str, tuple[int, ...]]]:
    return {site: {k: tuple(t.shape) for k, t in module.tensors().items()}
            for site, module in adapter_modules(model, name).items()}


class ConvNet(nn.Module):
    """Conv2d (3x3, 1x1, grouped), Conv1d and Linear layers, as in a small vision or audio model."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=2)
        self.d1 = nn.Conv1d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = self.grouped(x).mean(-1)
        return self.fc(torch.relu(self.d1(x)).mean(-1))


CONV_TARGETS = ["c1", "c2", "grouped", "d1", "fc"]
CONV_INPUT = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def _convnet() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def _conv_out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(CONV_INPUT)


def test_the_built_in_plugin_registers_lokr_without_importing_torch():
    code = ("import sys, peftkit; method = peftkit.get_method('lokr'); "
            "assert (method.distribution, method.peft_type, method.can_merge) == ('peftkit', 'LOKR', True); "
            "assert 'torch' not in sys.modules, 'loading the lokr plugin imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert peftkit.LokrConfig is LokrConfig


# -- the factorization and the factor shapes are PEFT's ----------------------------------------------------------


def test_factorization_equals_peft_for_every_dimension_and_factor():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    cases = [(dim, factor) for dim in range(1, 600) for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 100)]
    assert [factorization(d, f) for d, f in cases] == [peft_factorization(d, f) for d, f in cases]
    assert factorization(4096) == (64, 64) and factorization(11008) == (86, 128)
    assert factorization(128, 32) == (32, 4)  # a dividing factor comes first, as given


@pytest.mark.parametrize("arch,options", [
    ("llama", dict(r=2, target_modules=["q_proj", "down_proj", "up_proj"])),
    ("llama", dict(r=2, decompose_both=True, target_modules="all-linear")),
    ("llama", dict(r=8, decompose_factor=4, rank_pattern={"down_proj": 1}, target_modules=["q_proj", "down_proj"])),
    ("bert", dict(r=1, decompose_both=True)),
])
def test_tensor_names_and_shapes_equal_peft(arch, options):
    from peft import LoKrConfig, get_peft_model

    peft_model = get_peft_model(build_tiny(arch), LoKrConfig(**options))
    ours = peftkit.adapt(build_tiny(arch), LokrConfig(**options))
    assert _our_tensors(ours) == _peft_tensors(peft_model)


@pytest.mark.parametrize("options", [dict(r=2), dict(r=2, use_effective_conv2d=True), dict(r=8),
                                     dict(r=1, decompose_both=True, use_effective_conv2d=True)])
def test_convolution_tensor_shapes_equal_peft(options):
    from peft import LoKrConfig, get_peft_model

    peft_model = get_peft_model(_convnet(), LoKrConfig(target_modules=CONV_TARGETS, **options))
    ours = peftkit.adapt(_convnet(), LokrConfig(target_modules=CONV_TARGETS, **options))
    assert _our_tensors(ours) == _peft_tensors(peft_model)


def test_which_factors_are_full_follows_the_rank():
    # q_proj is 32 x 32: out = 4 * 8, in = 4 * 8; w2 (8, 8) is full once r >= 4, w1 (4, 4)
    # is decomposed only with decompose_both and r < 2.
    plan = LokrShapes.plan
    assert plan(32, 32, (), 3, decompose_both=True, decompose_factor=-1, use_effective_conv2d=False).tensor_shapes() \
        == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}
    assert plan(32, 32, (), 4, decompose_both=False, decompose_factor=-1, use_effective_conv2d=False).tensor_shapes() \
        == {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}
    assert plan(32, 32, (), 1, decompose_both=True, decompose_factor=-1, use_effective_conv2d=False).tensor_shapes() \
        == {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}
    # A 1x1 convolution never takes the Tucker form; a 3x3 one does (a Conv1d's core gets a trailing 1).
    conv = plan(16, 4, (1, 1), 1, decompose_both=False, decompose_factor=-1, use_effective_conv2d=True)
    assert not conv.tucker and conv.tensor_shapes()["lokr_w2_b"] == (1, 2)
    conv1d = plan(8, 12, (3,), 1, decompose_both=False, decompose_factor=-1, use_effective_conv2d=True)
    assert conv1d.tensor_shapes()["lokr_t2"] == (1, 1, 3, 1)


# -- what it computes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["true", '"lycoris"'])
def test_identity_at_init_and_random_init_differs(init):
    reference = output_of(build_tiny("llama"), "llama")
    model = peftkit.adapt(build_tiny("llama"), f"lokr[r=2,init_weights={init},target_modules='all-linear']")
    assert torch.equal(output_of(model, "llama"), reference)
    zero = ("lokr_w1", "lokr_w1_a") if init == "true" else ("lokr_w2", "lokr_w2_b")
    for module in adapter_modules(model).values():
        tensors = module.tensors()
        assert any(k in tensors and not tensors[k].any() for k in zero)
        assert all(tensors[k].abs().sum() > 0 for k in tensors if k not in zero)
    random = peftkit.adapt(build_tiny("llama"), "lokr[r=2,init_weights=false]")
    assert not torch.allclose(output_of(random, "llama"), reference, atol=1e-3)


def test_forward_is_the_base_plus_the_scaled_kronecker_product():
    model = peftkit.adapt(build_tiny("llama"), "lokr[r=2,alpha=6,decompose_both=true,init_weights=false,"
                                                "target_modules=['q_proj','down_proj','up_proj']]")
    x = torch.randn(2, 5, 64)
    layer = _layer(model, "model.layers.0.mlp.down_proj")  # 32 x 64: w1 (4, 8) of rank 2, w2 (8, 8) of rank 2
    lokr = layer.adapters["default"]
    w1, w2 = lokr.lokr_w1_a @ lokr.lokr_w1_b, lokr.lokr_w2_a @ lokr.lokr_w2_b
    weight = layer.base_layer.weight + 3.0 * torch.kron(w1, w2)  # alpha / r
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ weight.t(), atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(torch.kron(w1, w2)) == 4  # the ranks multiply
    # Both orders of the factored product (down_proj and up_proj take different ones) equal the dense one.
    for site, width in (("model.layers.1.mlp.down_proj", 64), ("model.layers.1.mlp.up_proj", 32)):
        layer = _layer(model, site)
        lokr, x = layer.adapters["default"], torch.randn(3, 4, width)
        with torch.no_grad():
            torch.testing.assert_close(lokr._linear_delta(x), F.linear(x, lokr.delta_out_in()), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_layers_use_the_transposed_layout():
    model = peftkit.adapt(build_tiny("gpt2"), "lokr[r=2,init_weights=false]")  # c_attn: (in 32, out 96)
    layer = _layer(model, "transformer.h.0.attn.c_attn")
    lokr = layer.adapters["default"]
    assert set(lokr.tensors()) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    dense = kron(lokr.lokr_w1, lokr.lokr_w2_a @ lokr.lokr_w2_b) * lokr.scale  # (96, 32)
    assert tuple(dense.shape) == (96, 32)
    assert torch.equal(lokr.delta_weight(layer.base_layer), dense.t())
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ dense.t(), atol=1e-5, rtol=1e-5)


def test_dropouts_act_in_training_only():
    model = peftkit.adapt(build_tiny("llama"), "lokr[r=2,init_weights=false,rank_dropout=0.5,module_dropout=0.3]")
    model.eval()
    first, second = output_of(model, "llama"), output_of(model, "llama")
    assert torch.equal(first, second)
    model.train()
    torch.manual_seed(0)
    outputs = [output_of(model, "llama") for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_drops_output_rows_and_rescales_on_request(scale):
    model = peftkit.adapt(build_tiny("llama"), f"lokr[r=2,init_weights=false,rank_dropout=0.5,"
                                                f"rank_dropout_scale={str(scale).lower()},target_modules=['q_proj']]")
    layer = _layer(model, "model.layers.0.self_attn.q_proj")
    lokr, x = layer.adapters["default"], torch.randn(4, 32)
    full = F.linear(x, lokr.delta_out_in()).detach()
    lokr.train()
    torch.manual_seed(3)
    with torch.no_grad():
        dropped = lokr.delta(x, torch.zeros(4, 32), layer.base_layer)
    kept = dropped.abs().sum(0) > 0
    assert 0 < kept.sum() < 32  # whole rows (output features) are dropped, the same for every input
    factor = 32 / kept.sum() if scale else 1.0
    torch.testing.assert_close(dropped[:, kept], full[:, kept] * factor, atol=1e-5, rtol=1e-5)


def test_train_step_changes_only_this_adapter():
    changed = changed_by_a_train_step("llama", "lokr[r=2,decompose_both=true,target_modules=['q_proj','down_proj']]")
    # From the zero init, w1 gets a gradient first (w1_a with decompose_both); w2 moves after.
    assert changed == {f"base_model.model.layers.{i}.{site}.adapters.a.{key}" for i in (0, 1)
                       for site, key in (("self_attn.q_proj", "lokr_w1"), ("mlp.down_proj", "lokr_w1_a"))}


# -- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,spec", [("llama", "lokr[r=2,decompose_both=true]"), ("gpt2", "lokr[r=2]"),
                                       ("bert", "lokr[r=8]")])
def test_merge_unmerge_and_unload(arch, spec):
    model = peftkit.adapt(build_tiny(arch), spec)
    randomize(model)
    weights = {n: t.detach().clone() for n, t in model.base_model.state_dict().items()}
    unmerged = merge_keeps_output(model, arch)
    assert model.merged_adapters == ["default"]
    model.unmerge_adapter()
    for name, tensor in model.base_model.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], atol=1e-6, rtol=1e-6)
    unload_keeps_output(model, arch, unmerged)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_convolutions_merge_exactly(padding_mode):
    net = _convnet()
    for conv in (net.c1, net.grouped, net.d1):
        conv.padding_mode = padding_mode
    model = peftkit.adapt(net, LokrConfig(r=1, decompose_both=True, use_effective_conv2d=True,
                                          target_modules=CONV_TARGETS, init_weights=False))
    unmerged = _conv_out(model)
    assert not torch.allclose(unmerged, _conv_out(_convnet()), atol=1e-3)
    model.merge_adapter()
    torch.testing.assert_close(_conv_out(model), unmerged, atol=1e-4, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(_conv_out(model), unmerged, atol=1e-5, rtol=0)


# -- files -----------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    spec = ("lokr[r=2,decompose_both=true,rank_pattern={'down_proj':1},alpha_pattern={'q_proj':4},"
            "target_modules=['q_proj','down_proj']]")
    model, loaded, saved = save_and_reload("llama", spec, tmp_path / "lokr")
    expected = {f"base_model.model.{site}.{key}" for site, keys in _our_tensors(model).items() for key in keys}
    assert set(saved) == expected
    assert "base_model.model.model.layers.0.mlp.down_proj.lokr_w1_a" in saved  # rank 1 decomposes w1
    assert loaded.adapter_record("restored").config == model.adapter_record("default").config
    data = json.loads((tmp_path / "lokr" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LOKR" and data["rank_pattern"] == {"down_proj": 1}


def test_the_file_holds_every_peft_field_and_round_trips():
    import dataclasses

    from peft import LoKrConfig, PeftConfig

    method = peftkit.get_method("lokr")
    config = method.make_config(r=4, alpha=16, decompose_both=True, decompose_factor=8, rank_dropout=0.1,
                                init_weights="lycoris", use_effective_conv2d=True, target_modules=["q_proj"])
    data = method.config_to_file(config)
    own = {f.name for f in dataclasses.fields(LoKrConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert own <= set(data), f"fields PEFT has that the file lacks: {own - set(data)}"
    assert method.config_from_file(data) == config
    peft_config = LoKrConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    assert (peft_config.decompose_factor, peft_config.init_weights) == (8, "lycoris")


@pytest.mark.parametrize("spec", ["lokr[r=4,alpha=16,decompose_both=true,decompose_factor=8]",
                                  'lokr[init_weights="lycoris",rank_dropout_scale=true]',
                                  "lokr[rank_pattern={'q_proj':2},use_effective_conv2d=true]"])
def test_shorthand_and_json_round_trip(spec):
    method = peftkit.get_method("lokr")
    config = method.make_config(**peftkit.parse_shorthand(spec)[1])
    assert method.make_config(**peftkit.parse_shorthand(config.to_shorthand())[1]) == config
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.parametrize("spec,message", [
    ("lokr[r=0]", "r=0 must be a positive integer"),
    ("lokr[rank_dropout=1.5]", "rank_dropout=1.5 must be in"),
    ("lokr[decompose_factor=0]", "decompose_factor=0 must be -1"),
    ("lokr[rank_pattern={'q_proj':0}]", "rank_pattern"),
    ("lokr[init_weights=\"gaussian\"]", "init_weights"),
    ("lokr[lora_alpha=3]", "unknown key 'lora_alpha'"),
    ("lokr[target_modules=['embed_tokens']]", "'model.embed_tokens' is an Embedding; LoKr adapts Linear"),
])
def test_bad_values_raise_config_error_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        peftkit.adapt(build_tiny("llama"), spec)


def test_conv3d_is_refused_as_peft_does():
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="'0' is a Conv3d; LoKr adapts Linear, transformers' Conv1D, and torch's "
                                          "Conv1d and Conv2d"):
        peftkit.adapt(net, "lokr[target_modules=['0']]")


def test_peft_settings_peftkit_lacks_are_refused_by_name():
    method = peftkit.get_method("lokr")
    base = method.config_to_file(method.make_config(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="layers_pattern='blocks'"):
        method.config_from_file({**base, "layers_pattern": "blocks"})
    with pytest.raises(ConfigError, match="some_new_option=3"):
        method.config_from_file({**base, "some_new_option": 3})
    assert method.config_from_file({**base, "some_new_option": None}) == method.make_config(target_modules=["q_proj"])


def test_lokr_adapters_have_no_rank_to_pad_for_hotswapping():
    model = peftkit.adapt(build_tiny("llama"), "lokr[r=2]")
    with pytest.raises(AdapterError, match="has no rank to pad"):
        model.prepare_for_hotswap(8, ["default"])


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_layer_gives_what_its_dequantized_twin_gives(bits):
    pytest.importorskip("bitsandbytes")
    quantized, twin = quantized_linear_and_twin(bits)
    spec = "lokr[r=2,decompose_both=true,init_weights=false,target_modules=['0']]"
    ours, reference = peftkit.adapt(quantized, spec).train(), peftkit.adapt(twin, spec).train()
    with torch.no_grad():
        for a, b in zip(ours.adapter_parameters("default"), reference.adapter_parameters("default"), strict=True):
            assert a.dtype == torch.float32
            b.copy_(a)
    x = torch.randn(3, 64)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-4 if bits == 8 else 1e-5, rtol=1e-4)
    with pytest.raises(peftkit.MergeError, match="quantized"):
        ours.merge_adapter()


def test_a_half_precision_base_keeps_float32_factors():
    base = build_tiny("llama").to(torch.bfloat16)
    model = peftkit.adapt(base, "lokr[r=2,init_weights=false]")
    lokr = adapter_modules(model)["model.layers.0.self_attn.q_proj"]
    assert all(t.dtype == torch.float32 for t in lokr.tensors().values())
    assert output_of(model, "llama").dtype == torch.bfloat16


# -- composition ---------------------------------------------------------------------------------------------------


def test_switch_stack_average_and_routing_rows():
    model = two_adapters("llama", "lokr[r=2,target_modules=['q_proj','down_proj']]",
                         "lokr[r=4,decompose_both=true,target_modules=['q_proj','v_proj']]")
    out_a, out_b = switch_outputs(model, "llama")
    # Per-row routing: each row equals a separate run with its adapter.
    routed = output_of(model, "llama", adapter_names=["b", "a"])
    torch.testing.assert_close(routed[0], out_b[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(routed[1], out_a[1], atol=1e-5, rtol=0)
    # Average: each layer adds the weighted deltas (weights normalized once).
    layer = _layer(model, "model.layers.0.self_attn.q_proj")
    da = layer.adapters["a"].delta_weight(layer.base_layer)
    db = layer.adapters["b"].delta_weight(layer.base_layer)
    x = torch.randn(2, 3, 32)
    model.set_active(peftkit.Average("a", "b", weights=[3, 1]))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ (0.75 * da + 0.25 * db).t(),
                                   atol=1e-5, rtol=1e-5)
    # Stack: both deltas added, the same as merging both into the base weights.
    model.set_active(peftkit.Stack("a", "b"))
    merge_keeps_output(model, "llama", ["a", "b"])


# -- compatibility with Hugging Face PEFT, both ways ---------------------------------------------------------------


def _peft_lokr(model, **options):
    """A PEFT LoKr model with every factor random (init_weights=False), in eval mode."""
    from peft import LoKrConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on GPT-2's lm_head: PEFT cannot tie an adapter to the input embedding
        return get_peft_model(model, LoKrConfig(init_weights=False, **options)).eval()


PEFT_CASES = [
    ("llama", dict(r=4)),
    ("llama", dict(r=2, alpha=6, decompose_both=True, target_modules="all-linear")),
    ("llama", dict(r=8, decompose_factor=4, rank_pattern={"down_proj": 1}, alpha_pattern={"q_proj": 3},
                   target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gpt2", dict(r=2, target_modules=["lm_head"])),  # PEFT's LoKr adapts nn.Linear only: not GPT-2's Conv1D
    ("bert", dict(r=2, decompose_both=True, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peft_saved_lokr_loads_with_identical_logits(tmp_path, arch, options):
    peft_model = _peft_lokr(build_tiny(arch), **options)
    if arch == "bert":  # give the task head real values, so modules_to_save is checked
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    expected = output_of(peft_model, arch)
    assert not torch.allclose(expected, output_of(build_tiny(arch), arch), atol=1e-4)
    # PEFT saves the whole (tied) output embedding with an lm_head adapter unless told not to.
    peft_model.save_pretrained(str(tmp_path), save_embedding_layers=False)
    model = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    torch.testing.assert_close(output_of(model, arch), expected, atol=2e-6, rtol=1e-5)
    assert _our_tensors(model) == _peft_tensors(peft_model)
    if arch != "gpt2":  # merging into GPT-2's tied lm_head would change the input embedding too
        peft_model.merge_adapter()
        model.merge_adapter()
        torch.testing.assert_close(output_of(model, arch), output_of(peft_model, arch), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peftkit_saved_lokr_loads_in_peft_with_identical_logits(tmp_path, arch, options):
    from peft import PeftModel

    options = {k: v for k, v in options.items() if k != "task_type"}
    model = peftkit.adapt(build_tiny(arch), LokrConfig(init_weights=False, **options))
    if arch == "bert":
        with torch.no_grad():
            model.base_model.classifier.copies["default"].weight.add_(0.5)
    model.eval()
    expected = output_of(model, arch)
    model.save_adapter(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes the extra "peftkit" key
        peft_model = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(peft_model, arch), expected, atol=2e-6, rtol=1e-5)
    loaded = {n: p for n, p in peft_model.named_parameters() if any(f".{k}." in n for k in ALL_KEYS)}
    assert len(loaded) == sum(len(keys) for keys in _our_tensors(model).values())


@pytest.mark.parametrize("options", [dict(r=2), dict(r=2, use_effective_conv2d=True), dict(r=8),
                                     dict(r=2, decompose_both=True, use_effective_conv2d=True),
                                     dict(r=16, decompose_factor=2)])
def test_convolutions_load_both_ways_with_peft(tmp_path, options):
    from peft import PeftModel

    peft_model = _peft_lokr(_convnet(), target_modules=CONV_TARGETS, **options)
    expected = _conv_out(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(_convnet(), str(tmp_path / "peft"))
    torch.testing.assert_close(_conv_out(ours), expected, atol=1e-6, rtol=1e-5)
    ours.save_adapter(str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(_convnet(), str(tmp_path / "ours")).eval()
    assert torch.equal(_conv_out(back), expected)
