"""OFT on tiny llama, gpt2 and bert, and two-way file compatibility with the real `peft`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.plugins.oft.blocks import nearest_divisor, OftBlocks
from peftkit.plugins.oft.config import OftConfig
from tests.method_helpers import (adapter_modules, changed_by_a_train_step, merge_keeps_output, output_of,
                                  peft_file_loads_alike, peftkit_file_loads_alike, quantized_matches_twin,
                                  randomize)
from tests.tiny_models import build_tiny
from tests.tiny_vision import BLOCK_CONVS, image_logits, logits_through_deltas, SHORTCUT, tiny_resnet

# The conformance suite runs oft[oft_block_size=8] on llama, gpt2, bert and t5: tests/test_conformance.py.


def _peft_shapes(peft_model) -> dict[str, tuple[int, ...]]:
    """Site -> shape of a PEFT OFT model's ``oft_R`` weight for adapter "default"."""
    out = {}
    for name, param in peft_model.named_parameters():
        if ".oft_R.default.weight" in name:
            out[name.split(".oft_R.")[0].removeprefix("base_model.model.")] = tuple(param.shape)
    return out


def _our_shapes(model: peftkit.AdaptedModel) -> dict[str, tuple[int, ...]]:
    return {site: tuple(m.weight.shape) for site, m in adapter_modules(model).items()}


def _peft_oft(model, **options):
    """A PEFT OFT model with random rotations (init_weights=False), in eval mode."""
    from peft import get_peft_model, OFTConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when it corrects a block size
        return get_peft_model(model, OFTConfig(init_weights=False, **options)).eval()


def test_the_built_in_plugin_registers_oft_without_importing_torch():
    code = ("import sys, peftkit; method = peftkit.get_method('oft'); "
            "assert (method.distribution, method.peft_type, method.can_merge) == ('peftkit', 'OFT', True); "
            "assert 'torch' not in sys.modules, 'loading the oft plugin imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert peftkit.OftConfig is OftConfig


def test_block_correction_equals_peft_for_every_width_and_request():
    from peft.tuners.oft.layer import OFTLayer

    for width in range(1, 130):
        for wanted in (1, 2, 3, 5, 7, 8, 16, 32, 100, 200):
            assert nearest_divisor(width, wanted) == OFTLayer.adjust_oft_parameters(None, width, wanted), \
                (width, wanted)
    assert OftBlocks.plan(48, 0, 32, False) == OftBlocks(48, 2, 24, False)
    assert OftBlocks.plan(48, 5, 0, True) == OftBlocks(48, 4, 12, True)  # a tie goes to the smaller


@pytest.mark.parametrize("arch,options", [
    ("llama", dict(oft_block_size=8, target_modules="all-linear")),
    ("llama", dict(r=3, oft_block_size=0, block_share=True)),
    ("bert", dict(oft_block_size=5)),  # corrected to a divisor of the width, as PEFT does
])
def test_tensor_shapes_equal_peft(arch, options):
    ours = peftkit.adapt(build_tiny(arch), OftConfig(**options))
    assert _our_shapes(ours) == _peft_shapes(_peft_oft(build_tiny(arch), **options))


def test_identity_at_init_and_rotations_are_orthogonal():
    base_out = output_of(build_tiny("llama"), "llama")
    model = peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=8]")
    torch.testing.assert_close(output_of(model, "llama"), base_out, atol=0, rtol=0)
    exact = peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=8,use_cayley_neumann=false,init_weights=false]")
    for module in adapter_modules(exact).values():
        rotations = module.rotations().detach()
        eye = torch.eye(8).expand_as(rotations)
        torch.testing.assert_close(rotations @ rotations.transpose(1, 2), eye, atol=1e-5, rtol=0)


def test_coft_keeps_each_block_within_eps():
    model = peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=8,coft=true,eps=0.01,init_weights=false]")
    output_of(model, "llama")
    for module in adapter_modules(model).values():
        skew = module.weight.detach()
        norms = (2 * skew.pow(2).sum(-1)).sqrt()  # Frobenius norm of Q - Q^T from its upper triangle
        assert (norms <= 0.01 / skew.shape[0] ** 0.5 * (1 + 1e-5)).all()


def test_module_dropout_sets_blocks_to_identity_in_training_only():
    model = peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=4,module_dropout=0.5,init_weights=false]")
    module = next(iter(adapter_modules(model).values()))
    x = torch.randn(3, module.blocks.in_features)
    module.eval()
    torch.testing.assert_close(module.rotate(x), module.rotate(x))
    module.train()
    kept = (module.rotate(x).reshape(3, -1, 4) == x.reshape(3, -1, 4)).all(-1).all(0)
    assert int(kept.sum()) == module.blocks.count // 2


@pytest.mark.parametrize("options", ["", ",coft=true,eps=0.01", ",block_share=true,module_dropout=0.5",
                                     ",use_cayley_neumann=false"])
def test_train_step_changes_only_oft_rotations(options):
    changed = changed_by_a_train_step("llama", f"oft[oft_block_size=8{options}]")
    assert changed == {f"base_model.model.layers.{i}.self_attn.{p}_proj.adapters.a.weight"
                       for i in (0, 1) for p in ("q", "v")}, changed


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_unmerge_and_unload(arch):
    model = peftkit.adapt(build_tiny(arch), "oft[oft_block_size=8,init_weights=false]")
    merge_keeps_output(model, arch)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_layer_gives_what_its_dequantized_twin_gives(bits):
    pytest.importorskip("bitsandbytes")
    quantized_matches_twin(bits, "oft[oft_block_size=16,init_weights=false,target_modules=['0']]")


def test_merging_after_another_adapter_at_the_same_layer_is_refused():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]", adapter_name="lora")
    model.add_adapter("rot", "oft[oft_block_size=8,init_weights=false]")
    randomize(model, "lora")
    with pytest.raises(peftkit.PeftkitError, match="cannot be merged after"):
        model.merge_adapter(["lora", "rot"])


def test_the_file_holds_every_peft_field_and_round_trips():
    from peft import OFTConfig, PeftConfig

    method = peftkit.get_method("oft")
    config = method.make_config(r=4, oft_block_size=0, coft=True, eps=1e-3, block_share=True,
                                use_cayley_neumann=False, num_cayley_neumann_terms=7, target_modules=["q_proj"])
    data = method.config_to_file(config)
    own = {f.name for f in dataclasses.fields(OFTConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert own <= set(data), f"fields PEFT has that the file lacks: {own - set(data)}"
    assert method.config_from_file(data) == config
    with pytest.raises(ConfigError, match="bias='all'"):
        method.config_from_file({**data, "bias": "all"})


@pytest.mark.parametrize("spec,message", [
    ("oft[r=4]", "set exactly one of r=4"),
    ("oft[r=0,oft_block_size=0]", "set exactly one of r=0"),
    ("oft[module_dropout=1.0]", "module_dropout=1.0 must be in"),
    ("oft[eps=0]", "eps=0"),
    ("oft[target_modules=['embed_tokens']]", "'model.embed_tokens' is an Embedding; OFT adapts Linear"),
])
def test_bad_values_raise_config_error_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        peftkit.adapt(build_tiny("llama"), spec)


# -- compatibility with Hugging Face PEFT, both ways ---------------------------------------------------------------

PEFT_CASES = [
    ("llama", dict(oft_block_size=8)),
    ("llama", dict(oft_block_size=8, use_cayley_neumann=False, target_modules="all-linear")),
    ("llama", dict(r=4, oft_block_size=0, block_share=True, num_cayley_neumann_terms=3)),
    ("llama", dict(oft_block_size=4, coft=True, eps=0.05)),
    ("bert", dict(oft_block_size=8, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peft_saved_oft_loads_with_identical_logits(tmp_path, arch, options):
    peft_model = _peft_oft(build_tiny(arch), **options)
    if arch == "bert":  # give the task head real values, so modules_to_save is checked
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    model = peft_file_loads_alike(peft_model, arch, tmp_path)  # with coft, PEFT projects its weights first
    assert _our_shapes(model) == _peft_shapes(peft_model)


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peftkit_saved_oft_loads_in_peft_with_identical_logits(tmp_path, arch, options):
    options = {k: v for k, v in options.items() if k != "task_type"}
    model = peftkit.adapt(build_tiny(arch), OftConfig(init_weights=False, **options))
    if arch == "bert":
        with torch.no_grad():
            model.base_model.classifier.copies["default"].weight.add_(0.5)
    peft_model = peftkit_file_loads_alike(model, arch, tmp_path)
    assert _peft_shapes(peft_model) == _our_shapes(model)


def test_a_file_from_peft_before_0_14_is_refused_with_the_reason():
    method = peftkit.get_method("oft")
    data = method.config_to_file(method.make_config(target_modules=["q_proj"]))
    del data["oft_block_size"]
    with pytest.raises(ConfigError, match="written by PEFT before 0.14"):
        method.config_from_file(data)


def test_peft_loads_a_peftkit_file_without_the_old_parametrization_warning(tmp_path):
    from peft import PeftModel

    peftkit.adapt(build_tiny("llama"), "oft[oft_block_size=8]").save_adapter(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path))
    assert not [w for w in caught if "cayley-neumann" in str(w.message)]


# -- Conv2d ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(oft_block_size=4), dict(oft_block_size=0, r=2, block_share=True,
                                                                   use_cayley_neumann=False)])
def test_conv2d_peft_saved_oft_gives_peft_logits(tmp_path, options):
    """A 1x1 convolution: PEFT's unmerged and merged logits. A 3x3 one: PEFT's merged logits, unmerged and
    merged (PEFT's own unmerged forward on a kernel larger than 1 sums overlapping rotated patches, which
    neither equals its merge nor the base at init; docs/methods/oft.md)."""
    for targets in (SHORTCUT, BLOCK_CONVS + SHORTCUT):
        folder = tmp_path / targets[0]
        peft_model = _peft_oft(tiny_resnet(), target_modules=targets, **options)
        peft_model.save_pretrained(str(folder))
        model = peftkit.from_pretrained(tiny_resnet(), str(folder)).eval()
        assert _our_shapes(model) == _peft_shapes(peft_model)
        unmerged = image_logits(model)
        assert not torch.allclose(unmerged, image_logits(tiny_resnet()), atol=1e-4)
        if targets == SHORTCUT:
            torch.testing.assert_close(unmerged, image_logits(peft_model), atol=1e-5, rtol=1e-5)
        peft_model.merge_adapter()
        torch.testing.assert_close(unmerged, image_logits(peft_model), atol=1e-5, rtol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(image_logits(model), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(image_logits(model), unmerged, atol=1e-5, rtol=1e-5)


def test_conv2d_peftkit_saved_oft_loads_in_peft_with_identical_merged_logits(tmp_path):
    from peft import PeftModel

    targets = BLOCK_CONVS + SHORTCUT
    model = peftkit.adapt(tiny_resnet(), OftConfig(oft_block_size=4, init_weights=False, target_modules=targets))
    expected = image_logits(model.eval())
    model.save_adapter(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_resnet(), str(tmp_path)).eval()
    peft_model.merge_adapter()
    torch.testing.assert_close(image_logits(peft_model), expected, atol=1e-5, rtol=1e-5)


def test_conv2d_identity_at_init_and_unsupported_convolutions_refused():
    model = peftkit.adapt(tiny_resnet(), OftConfig(oft_block_size=4, target_modules=BLOCK_CONVS))
    assert torch.equal(image_logits(model), image_logits(tiny_resnet()))
    for conv, what in ((torch.nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
                       (torch.nn.Conv2d(4, 4, (1, 3)), r"kernel_size=\(1, 3\)"),
                       (torch.nn.Conv2d(4, 4, 3, dilation=2), r"dilation=\(2, 2\)")):
        with pytest.raises(ConfigError, match=f"'0' is a Conv2d with .*{what}"):
            peftkit.adapt(torch.nn.Sequential(conv), OftConfig(oft_block_size=4, target_modules=["0"]))


def test_conv2d_change_inside_a_composition_equals_the_layer_alone():
    model = peftkit.adapt(tiny_resnet(), OftConfig(oft_block_size=4, init_weights=False,
                                                   target_modules=BLOCK_CONVS + SHORTCUT)).eval()
    alone = image_logits(model)
    assert not torch.allclose(alone, image_logits(tiny_resnet()), atol=1e-4)
    torch.testing.assert_close(logits_through_deltas(model), alone, atol=1e-5, rtol=1e-5)
