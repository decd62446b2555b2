"""LoRA and DoRA on torch's convolution layers (nn.Conv1d / Conv2d / Conv3d), in PEFT's format.

Small conv nets built here (a kernel-3 strided conv with bias, a kernel-3 conv without bias, a 1x1
conv, a Linear head) and a tiny transformers ResNet; checked against hand computations, against
weights edited directly, and against the real ``peft`` package in both directions.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import ConfigError, MergeError
from peftkit.core.layer import TunerLayer
from peftkit.plugins.lora.conv import LoraConv
from tests.method_helpers import adapter_modules, randomize

DIMS = (1, 2, 3)
CONVS = ["conv_in", "conv_mid", "pointwise"]
TARGETS = '["conv_in","conv_mid","pointwise"]'
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_SPATIAL = {1: (10,), 2: (8, 8), 3: (4, 6, 6)}


def conv_net(dims: int, seed: int = 0) -> nn.Sequential:
    """conv k3/stride 2/padding 1 (bias) -> ReLU -> conv k3/padding 1 (no bias) -> ReLU -> 1x1 conv
    -> pool -> Linear head; the same weights for the same seed."""
    torch.manual_seed(seed)
    conv = _CONV[dims]
    return nn.Sequential(OrderedDict(
        conv_in=conv(3, 6, 3, stride=2, padding=1), act_in=nn.ReLU(),
        conv_mid=conv(6, 8, 3, padding=1, bias=False), act_mid=nn.ReLU(),
        pointwise=conv(8, 8, 1), pool=_POOL[dims](2), flatten=nn.Flatten(),
        head=nn.Linear(8 * 2 ** dims, 3)))


def grouped_net(seed: int = 0, padding_mode: str = "zeros") -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv_in=nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode), act=nn.ReLU(),
        depthwise=nn.Conv2d(8, 8, 3, padding=1, groups=4)))


def batch(dims: int, rows: int = 2, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, channels, *_SPATIAL[dims], generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)


def spec(r: int = 4, **options) -> str:
    extra = "".join(f",{k}={str(v).lower()}" for k, v in options.items())
    return f"lora[r={r},alpha=8,target_modules={TARGETS}{extra}]"


def noisy(model: peftkit.AdaptedModel, name: str = "default", seed: int = 0) -> peftkit.AdaptedModel:
    randomize(model, name, std=0.1, seed=seed)
    return model.eval()


def weight_edited(net: nn.Module, model: peftkit.AdaptedModel, weights: dict[str, float]) -> nn.Module:
    """``net`` with sum_i w_i * (adapter i's weight change) added to each conv weight, by hand."""
    with torch.no_grad():
        for site, layer in model.tuner_layers():
            target = net.get_submodule(site)
            for name, w in weights.items():
                target.weight += w * layer.adapters[name].delta_weight(layer.base_layer)
    return net.eval()


# -- the adapter itself ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", DIMS)
def test_identity_at_init_with_peft_shapes(dims):
    base = conv_net(dims)
    expected = run(base, batch(dims))
    model = peftkit.adapt(base, spec())
    assert torch.equal(run(model, batch(dims)), expected)
    adapters = adapter_modules(model)
    assert sorted(adapters) == sorted(CONVS)  # the Linear head is not named, so not adapted
    for site, adapter in adapters.items():
        conv = model.base_model.get_submodule(site).base_layer
        assert isinstance(adapter, LoraConv)
        shapes = {k: tuple(v.shape) for k, v in adapter.tensors().items()}
        assert shapes == {"lora_A.weight": (4, conv.in_channels, *conv.kernel_size),
                          "lora_B.weight": (conv.out_channels, 4, *(1,) * dims)}
        assert not adapter.lora_B.any() and adapter.lora_A.abs().sum() > 0


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("rslora, scale", [(False, 2.0), (True, 4.0)])
def test_output_is_base_plus_scaled_composed_convolutions(dims, rslora, scale):
    model = noisy(peftkit.adapt(conv_net(dims), spec(r=4, use_rslora=rslora)))
    conv = getattr(F, f"conv{dims}d")
    for site, channels in (("conv_in", 3), ("conv_mid", 6), ("pointwise", 8)):
        layer = model.base_model.get_submodule(site)
        adapter, base = layer.adapters["default"], layer.base_layer
        assert adapter.scale == pytest.approx(scale)
        x = batch(dims, channels=channels, seed=5)
        by_hand = base(x) + scale * conv(conv(x, adapter.lora_A, stride=base.stride, padding=base.padding),
                                         adapter.lora_B)
        torch.testing.assert_close(run(layer, x), by_hand, atol=1e-6, rtol=1e-6)


def test_a_train_step_changes_only_the_trained_adapter():
    model = peftkit.adapt(conv_net(2), spec(dropout=0.1), adapter_name="a")
    model.add_adapter("b", spec(r=2))
    model.train_adapter("a")
    model.train()
    params = dict(model.named_parameters())
    own = {id(p) for p in model.adapter_parameters("a")}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B starts at 0, so A first moves in the second step
        optimizer.zero_grad()
        model(batch(2)).pow(2).sum().backward()
        optimizer.step()
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert {id(params[n]) for n in changed} == own, sorted(changed)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("options", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_merge_unmerge_and_unload_keep_the_output(dims, options):
    original = {k: v.clone() for k, v in conv_net(dims).state_dict().items()}
    model = noisy(peftkit.adapt(conv_net(dims), spec(**options)))
    x = batch(dims)
    unmerged = run(model, x)
    assert not torch.allclose(unmerged, run(conv_net(dims), x), atol=1e-3)
    model.merge_adapter()
    torch.testing.assert_close(run(model, x), unmerged, atol=1e-4, rtol=0)
    model.unmerge_adapter()
    for site in CONVS:
        torch.testing.assert_close(model.base_model.get_submodule(site).base_layer.weight,
                                   original[f"{site}.weight"], atol=1e-5, rtol=0)
    torch.testing.assert_close(run(model, x), unmerged, atol=1e-5, rtol=0)
    bare = model.merge_and_unload()
    assert not any(isinstance(m, TunerLayer) for m in bare.modules())
    torch.testing.assert_close(run(bare, x), unmerged, atol=1e-4, rtol=0)


def test_dora_magnitude_is_the_channel_norm_and_trains():
    model = peftkit.adapt(conv_net(2), spec(use_dora=True))
    layer = model.base_model.conv_mid
    magnitude = layer.adapters["default"].lora_magnitude_vector
    assert tuple(magnitude.shape) == (1, 8, 1, 1)  # PEFT's shape
    torch.testing.assert_close(magnitude.flatten(), layer.base_layer.weight.flatten(1).norm(dim=1))
    torch.testing.assert_close(run(model, batch(2)), run(conv_net(2), batch(2)), atol=1e-6, rtol=0)
    model(batch(2)).pow(2).sum().backward()
    assert magnitude.grad is not None and magnitude.grad.abs().sum() > 0


def test_save_load_round_trip_is_bit_identical_in_peft_layout(tmp_path):
    model = noisy(peftkit.adapt(conv_net(3), spec(use_dora=True)))
    expected = run(model, batch(3))
    model.save_adapter(str(tmp_path))
    saved = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert saved["base_model.model.conv_in.lora_A.weight"] == (4, 3, 3, 3, 3)
    assert saved["base_model.model.conv_in.lora_B.weight"] == (6, 4, 1, 1, 1)
    assert saved["base_model.model.pointwise.lora_A.weight"] == (4, 8, 1, 1, 1)
    assert saved["base_model.model.conv_mid.lora_magnitude_vector"] == (1, 8, 1, 1, 1)
    assert len(saved) == 9
    loaded = peftkit.from_pretrained(conv_net(3), str(tmp_path), adapter_name="restored")
    assert torch.equal(run(loaded, batch(3)), expected)


def test_bf16_base_keeps_float32_adapters():
    model = peftkit.adapt(conv_net(2).to(torch.bfloat16), spec(init_weights=False))
    adapter = model.base_model.conv_in.adapters["default"]
    assert adapter.lora_A.dtype == torch.float32
    out = run(model, batch(2).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_expected_parameter_count_counts_conv_adapters():
    for net, lora in ((conv_net(3), spec()), (conv_net(1), spec(use_dora=True)),
                      (grouped_net(), 'lora[r=4,target_modules=["conv_in","depthwise"]]')):
        model = peftkit.adapt(net, lora)
        record = model.adapter_record("default")
        expected = record.method.expected_parameter_count(model.base_model, record.config, record.sites)
        assert expected == sum(p.numel() for p in model.adapter_parameters("default"))


# -- target matching --------------------------------------------------------------------------------------------


def test_all_linear_keeps_meaning_linear_layers_and_a_regex_picks_convolutions():
    model = peftkit.adapt(conv_net(2), "lora[r=2,target_modules=all-linear]")
    assert sorted(adapter_modules(model)) == ["head"]
    model = peftkit.adapt(conv_net(2), 'lora[r=2,target_modules="conv_.*"]')
    assert sorted(adapter_modules(model)) == ["conv_in", "conv_mid"]


def test_a_layer_type_lora_cannot_adapt_is_named():
    net = nn.Sequential(OrderedDict(up=nn.ConvTranspose2d(3, 4, 2), act=nn.ReLU()))
    with pytest.raises(ConfigError, match=r"target 'up' is a ConvTranspose2d; LoRA adapts .*Conv1d/Conv2d/Conv3d"):
        peftkit.adapt(net, 'lora[target_modules=["up"]]')


def test_a_misspelled_conv_target_gets_a_suggestion():
    with pytest.raises(peftkit.TargetError, match="did you mean 'conv_mid'"):
        peftkit.adapt(conv_net(2), 'lora[target_modules=["conv_mdi"]]')


# -- what is refused --------------------------------------------------------------------------------------------


def test_dilated_convolutions_are_refused_naming_the_layer():
    net = nn.Sequential(OrderedDict(dilated=nn.Conv2d(3, 4, 3, padding=2, dilation=2)))
    with pytest.raises(ConfigError, match=r"dilated is a Conv2d with dilation=\(2, 2\)"):
        peftkit.adapt(net, 'lora[target_modules=["dilated"]]')


def test_grouped_convolutions_need_a_rank_divisible_by_groups_and_no_dora():
    with pytest.raises(ConfigError, match=r"depthwise is a Conv2d with groups=4.*r=6 is not"):
        peftkit.adapt(grouped_net(), 'lora[r=6,target_modules=["depthwise"]]')
    with pytest.raises(ConfigError, match=r"DoRA is not available on depthwise"):
        peftkit.adapt(grouped_net(), 'lora[r=4,use_dora=true,target_modules=["depthwise"]]')


def test_grouped_convolution_runs_like_peft_and_refuses_merging(tmp_path):
    model = noisy(peftkit.adapt(grouped_net(), 'lora[r=4,alpha=8,target_modules=["conv_in","depthwise"]]'))
    x = batch(2)
    expected = run(model, x)
    assert tuple(model.base_model.depthwise.adapters["default"].lora_B.shape) == (8, 1, 1, 1)
    model.save_adapter(str(tmp_path))
    with pytest.warns(UserWarning, match="groups > 1"):
        peft_model = PeftModel.from_pretrained(grouped_net(), str(tmp_path)).eval()
    torch.testing.assert_close(run(peft_model, x), expected, atol=1e-5, rtol=1e-5)
    weights = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    with pytest.raises(MergeError, match="groups=4 cannot be merged"):
        model.merge_adapter()
    assert all(torch.equal(v, weights[k]) for k, v in model.base_model.state_dict().items())  # nothing half-done
    model.add_adapter("b", 'lora[r=4,target_modules=["conv_in","depthwise"]]')
    with pytest.raises(MergeError, match="groups=4 cannot be merged"):
        model.merge_adapters(["default", "b"], name="m", strategy="cat")
    assert "m" not in model.adapters


def test_non_zero_padding_runs_like_peft_but_is_not_merged(tmp_path):
    model = noisy(peftkit.adapt(grouped_net(padding_mode="reflect"), 'lora[r=4,target_modules=["conv_in"]]'))
    x = batch(2)
    expected = run(model, x)
    model.save_adapter(str(tmp_path))
    peft_model = PeftModel.from_pretrained(grouped_net(padding_mode="reflect"), str(tmp_path)).eval()
    torch.testing.assert_close(run(peft_model, x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(MergeError, match="padding_mode='reflect' cannot be merged"):
        model.merge_adapter()


# -- composition and weight-space merging -----------------------------------------------------------------------


def _two_adapters() -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(conv_net(2))
    model.add_adapter("a", spec(r=4))
    model.add_adapter("b", spec(r=2, use_rslora=True))
    noisy(model, "a", seed=1)
    return noisy(model, "b", seed=2)


def test_stack_and_average_equal_weights_edited_by_hand():
    model = _two_adapters()
    x = batch(2, rows=3)
    model.set_active("stack(a, b)")
    torch.testing.assert_close(run(model, x), run(weight_edited(conv_net(2), model, {"a": 1, "b": 1}), x),
                               atol=1e-5, rtol=0)
    model.set_active("average(a, b, weights=[1, 3])")
    torch.testing.assert_close(run(model, x), run(weight_edited(conv_net(2), model, {"a": .25, "b": .75}), x),
                               atol=1e-5, rtol=0)


def test_per_row_routing_rows_equal_separate_runs():
    model = _two_adapters()
    x = batch(2, rows=4)
    separate = {}
    for name in ("a", "b"):
        model.set_active(name)
        separate[name] = run(model, x)
    with model.disable_adapters():
        separate["__base__"] = run(model, x)
    routes = ["b", "a", "__base__", "b"]
    routed = run(model, x, adapter_names=routes)
    for row, name in enumerate(routes):
        torch.testing.assert_close(routed[row], separate[name][row], atol=1e-6, rtol=0)
    model.set_active("batch_split(a, b, sizes=[1, 3])")
    torch.testing.assert_close(run(model, x), torch.cat([separate["a"][:1], separate["b"][1:]]), atol=1e-6, rtol=0)
    model.set_active("parallel(a, b)")
    torch.testing.assert_close(run(model, x), torch.cat([separate["a"], separate["b"]]), atol=1e-6, rtol=0)


def test_fusion_is_refused_at_convolution_sites():
    """AdapterFusion attends over the last dimension, which a convolution's output spends on space."""
    model = _two_adapters()
    with pytest.raises(peftkit.CompositionError, match="cannot tell the output width of site 'conv_in'"):
        model.add_fusion("fuse(a, b, name=ab)")


def test_merge_adapters_cat_and_svd_are_exact_and_peft_loads_the_result(tmp_path):
    model = _two_adapters()
    x = batch(2)
    reference = run(weight_edited(conv_net(2), model, {"a": 1.0, "b": 0.5}), x)
    model.merge_adapters(["a", "b"], [1.0, 0.5], name="cat", strategy="cat")
    model.merge_adapters(["a", "b"], [1.0, 0.5], name="svd", strategy="svd", rank=6)
    for name in ("cat", "svd"):
        model.set_active(name)
        torch.testing.assert_close(run(model, x), reference, atol=1e-5, rtol=0)
    assert tuple(model.base_model.conv_mid.adapters["cat"].lora_A.shape) == (6, 6, 3, 3)
    model.save_adapter(str(tmp_path), adapter_name="svd")
    peft_model = PeftModel.from_pretrained(conv_net(2), str(tmp_path)).eval()
    torch.testing.assert_close(run(peft_model, x), reference, atol=1e-5, rtol=0)


def test_merge_adapters_truncates_to_the_best_low_rank_kernel():
    model = _two_adapters()
    model.merge_adapters(["a", "b"], name="low", strategy="svd", rank=2)
    model.merge_adapters(["a", "b"], name="ties", strategy="ties", density=0.5)
    layer = model.base_model.conv_mid
    exact = sum(layer.adapters[n].delta_weight(layer.base_layer) for n in ("a", "b")).flatten(1)
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(layer.adapters["low"].delta_weight(layer.base_layer).flatten(1), best,
                               atol=1e-5, rtol=0)
    model.set_active("ties")
    assert torch.isfinite(run(model, batch(2))).all()


def test_merge_adapters_merges_a_dora_member_through_its_dense_change():
    """DoRA's change rescales the kernel per output channel: merged densely (full rank) it is exact."""
    model = noisy(peftkit.adapt(conv_net(2), spec(use_dora=True), adapter_name="a"), "a")
    model.add_adapter("b", spec())
    x = batch(2)
    expected = run(model, x)
    record = model.merge_adapters(["a", "b"], [1.0, 0.0], name="m", strategy="linear")
    assert not record.config.use_dora
    model.set_active("m")
    torch.testing.assert_close(run(model, x), expected, atol=1e-5, rtol=1e-5)


# -- against the real peft ------------------------------------------------------------------------------------------

PEFT_CASES = [(d, rs, False) for d in DIMS for rs in (False, True)] + [(d, False, True) for d in DIMS]


def _peft_noise(peft_model: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("dims, rslora, dora", PEFT_CASES)
def test_peftkit_saved_adapter_loads_in_peft_and_merges_the_same(tmp_path, dims, rslora, dora):
    ours = noisy(peftkit.adapt(conv_net(dims), spec(use_rslora=rslora, use_dora=dora)))
    x = batch(dims)
    expected = run(ours, x)
    ours.save_adapter(str(tmp_path))
    peft_model = PeftModel.from_pretrained(conv_net(dims), str(tmp_path)).eval()
    torch.testing.assert_close(run(peft_model, x), expected, atol=1e-5, rtol=1e-5)
    ours.merge_adapter()
    for site in CONVS:
        peft_layer = peft_model.base_model.model.get_submodule(site)
        if peft_layer.get_base_layer().weight.shape[2:4] == (1, 1) and dims == 3:
            continue  # PEFT 0.21 takes a 1x1x1 Conv3d kernel for a 2-d 1x1 one and fails to merge it
        peft_layer.merge()
        torch.testing.assert_close(ours.base_model.get_submodule(site).base_layer.weight,
                                   peft_layer.get_base_layer().weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims, rslora, dora", PEFT_CASES)
def test_peft_saved_adapter_loads_in_peftkit(tmp_path, dims, rslora, dora):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=CONVS, use_rslora=rslora, use_dora=dora)
    peft_model = get_peft_model(conv_net(dims), config)
    _peft_noise(peft_model)
    peft_model.eval()
    x = batch(dims)
    expected = run(peft_model, x)
    peft_model.save_pretrained(str(tmp_path))
    ours = peftkit.AdaptedModel(conv_net(dims))
    ours.load_adapter(str(tmp_path), "default")
    torch.testing.assert_close(run(ours.eval(), x), expected, atol=1e-5, rtol=1e-5)


def _tiny_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


def _resnet_logits(model: nn.Module) -> torch.Tensor:
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def test_tiny_resnet_both_ways_with_peft(tmp_path):
    """7x7/stride-2, 3x3 and 1x1/stride-2 shortcut convolutions of a transformers ResNet."""
    base_logits = _resnet_logits(_tiny_resnet())
    ours = peftkit.adapt(_tiny_resnet(), 'lora[r=4,alpha=8,use_rslora=true,target_modules=["convolution"]]')
    assert len(adapter_modules(ours)) == 6
    assert torch.equal(_resnet_logits(ours), base_logits)
    noisy(ours)
    expected = _resnet_logits(ours)
    ours.save_adapter(str(tmp_path / "ours"))
    peft_model = PeftModel.from_pretrained(_tiny_resnet(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_resnet_logits(peft_model), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_resnet_logits(ours.merge_and_unload()), expected, atol=1e-4, rtol=0)

    peft_model = get_peft_model(_tiny_resnet(), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                           target_modules=r".*stages.*convolution"))
    _peft_noise(peft_model)
    expected = _resnet_logits(peft_model.eval())
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = peftkit.from_pretrained(_tiny_resnet(), str(tmp_path / "peft"))
    assert len(adapter_modules(loaded)) == 5
    torch.testing.assert_close(_resnet_logits(loaded), expected, atol=1e-5, rtol=1e-5)


def test_hot_swapping_a_conv_lora_of_another_alpha_rescales_b_in_place(tmp_path):
    """Convolution LoRAs have no (r, in) factors for the low-rank swap path, but use B only as scale * B:
    another alpha is folded into B, the module keeps its scale and its parameter objects."""
    saved = {}
    for name, alpha, seed in (("a", 8, 1), ("b", 2, 2)):
        model = noisy(peftkit.adapt(conv_net(2), f"lora[r=4,alpha={alpha},target_modules={TARGETS}]"), seed=seed)
        model.save_adapter(str(tmp_path / name))
        saved[name] = run(model, batch(2))
    model = peftkit.from_pretrained(conv_net(2), str(tmp_path / "a"))
    params = [id(p) for p in model.parameters()]
    model.hotswap_adapter(str(tmp_path / "b"))
    torch.testing.assert_close(run(model, batch(2)), saved["b"], atol=1e-5, rtol=1e-5)
    assert [id(p) for p in model.parameters()] == params
    from peftkit.core.layer import TunerLayer

    assert {m.adapters["default"].scale for m in model.modules() if isinstance(m, TunerLayer)} == {2.0}  # 8/4 stays


def test_a_dora_conv_adapter_merges_first_or_is_refused():
    model = peftkit.adapt(conv_net(2), spec(), adapter_name="plain")
    model.add_adapter("dora", spec(use_dora=True))
    noisy(model, "plain", seed=1)
    noisy(model, "dora", seed=2)
    model.set_active("stack(plain, dora)")
    before = run(model, batch(2))
    with pytest.raises(peftkit.MergeError, match="'dora' cannot be merged after 'plain'"):
        model.merge_adapter(["plain", "dora"])
    assert model.merged_adapters == [] and torch.equal(run(model, batch(2)), before)
    model.set_active("stack(dora, plain)")
    unmerged = run(model, batch(2))
    model.merge_adapter(["dora", "plain"])
    model.set_active(None)
    torch.testing.assert_close(run(model, batch(2)), unmerged, atol=1e-4, rtol=1e-4)
