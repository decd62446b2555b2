"""BOFT on tiny llama, gpt2, bert and a tiny ResNet, and two-way file compatibility with the real `peft`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import warnings

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.plugins.boft.butterfly import Butterfly
from peftkit.plugins.boft.config import BoftConfig
from tests.method_helpers import (adapter_modules, changed_by_a_train_step, merge_keeps_output, output_of,
                                  peft_file_loads_alike, peftkit_file_loads_alike, quantized_matches_twin)
from tests.tiny_models import build_tiny, sample_inputs
from tests.tiny_vision import BLOCK_CONVS, image_logits, logits_through_deltas, SHORTCUT, tiny_resnet

# The conformance suite runs boft[boft_block_size=4,boft_n_butterfly_factor=2] on llama, gpt2, bert and t5:
# tests/test_conformance.py.


@pytest.fixture
def peft_block_diagonal(monkeypatch):
    """PEFT builds BOFT's block-diagonal matrices with a CUDA extension; without one (these CPU tests) it
    silently drops to one butterfly factor. This hands PEFT's layer the extension's one job, the block
    diagonal of each factor's blocks, computed by torch.block_diag, so PEFT's own permutations and
    products run with every factor the config asks for."""
    import peft.tuners.boft.layer as peft_boft

    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks.unbind(0)])]

    monkeypatch.setattr(peft_boft, "_FBD_CUDA", types.SimpleNamespace(forward=forward))


def _peft_boft(model, **options):
    """A PEFT BOFT model with random rotations and scales (init_weights=False), in eval mode."""
    from peft import BOFTConfig, get_peft_model

    return get_peft_model(model, BOFTConfig(init_weights=False, **options)).eval()


def _peft_shapes(peft_model) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Site -> (boft_R shape, boft_s shape) of a PEFT BOFT model's adapter "default"."""
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, param in peft_model.named_parameters():
        for key in ("boft_R", "boft_s"):
            if f".{key}.default" in name:
                site = name.split(f".{key}.")[0].removeprefix("base_model.model.")
                out.setdefault(site, {})[key] = tuple(param.shape)
    return {site: (v["boft_R"], v["boft_s"]) for site, v in out.items()}


def _our_shapes(model: peftkit.AdaptedModel) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    return {site: (tuple(m.boft_R.shape), tuple(m.boft_s.shape)) for site, m in adapter_modules(model).items()}


def test_the_built_in_plugin_registers_boft_without_importing_torch():
    code = ("import sys, peftkit; method = peftkit.get_method('boft'); "
            "assert (method.distribution, method.peft_type, method.can_merge) == ('peftkit', 'BOFT', True); "
            "assert 'torch' not in sys.modules, 'loading the boft plugin imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert peftkit.BoftConfig is BoftConfig


def test_butterfly_permutations_equal_peft():
    from peft.tuners.boft.layer import BOFTLayer

    checked = 0
    for features in (8, 16, 24, 32, 48, 64, 96, 144):
        for size in (2, 4, 6, 8):
            for factors in (1, 2, 3, 4):
                try:
                    plan = Butterfly.plan(features, size, 0, factors, "a layer")
                except ConfigError:
                    continue
                for i in range(factors):
                    expected = BOFTLayer.block_butterfly_perm(None, features, plan.block_num // 2 ** i, size // 2,
                                                              factors - 1)
                    assert plan.permutation(i) == expected.tolist(), (features, size, factors, i)
                    checked += 1
    assert checked > 100
    assert Butterfly.plan(16, 4, 0, 2, "x").permutation(1) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


@pytest.mark.parametrize("features,size,num,factors,message", [
    (30, 4, 0, 1, r"the input width of q \(30\) is not divisible by boft_block_size=4"),
    (32, 0, 5, 1, "not divisible by boft_block_num=5"),
    (32, 8, 0, 4, r"boft_block_size=8 times 2\^3"),
    (32, 0, 2, 3, r"multiple of 2\^2"),
    (12, 0, 4, 2, "both be even"),
])
def test_blocks_that_do_not_fit_are_refused_as_peft_refuses_them(features, size, num, factors, message,
                                                                 peft_block_diagonal):
    with pytest.raises(ConfigError, match=message):
        Butterfly.plan(features, size, num, factors, "the input width of q")
    with pytest.raises(ValueError):
        _peft_boft(torch.nn.Sequential(torch.nn.Linear(features, 4)), target_modules=["0"], boft_block_size=size,
                   boft_block_num=num, boft_n_butterfly_factor=factors)


@pytest.mark.parametrize("arch,options", [
    ("llama", dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules="all-linear")),
    ("llama", dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3)),
    ("bert", dict(boft_block_size=8)),
])
def test_tensor_shapes_equal_peft(arch, options, peft_block_diagonal):
    ours = peftkit.adapt(build_tiny(arch), BoftConfig(**options))
    assert _our_shapes(ours) == _peft_shapes(_peft_boft(build_tiny(arch), **options))


def test_identity_at_init_and_blocks_are_orthogonal():
    base_out = output_of(build_tiny("llama"), "llama")
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_n_butterfly_factor=2]")
    torch.testing.assert_close(output_of(model, "llama"), base_out, atol=0, rtol=0)
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_n_butterfly_factor=3,init_weights=false]")
    for module in adapter_modules(model).values():
        m = module.matrix().detach()
        torch.testing.assert_close(m @ m.t(), torch.eye(m.shape[0]), atol=1e-5, rtol=0)
        x = torch.randn(3, m.shape[0])
        torch.testing.assert_close(module.rotate(x), x @ m, atol=1e-5, rtol=0)


def test_dropout_sets_blocks_of_one_factor_to_identity_in_training_only():
    model = peftkit.adapt(build_tiny("llama"), "boft[boft_block_size=2,boft_dropout=0.5,init_weights=false]")
    module = next(iter(adapter_modules(model).values()))
    module.eval()
    assert torch.equal(module._blocks_for_use(), module.blocks())
    module.train()
    eye = torch.eye(2)
    kept = (module._blocks_for_use() == eye).all(-1).all(-1)
    assert int(kept.sum()) == module.butterfly.block_num // 2


@pytest.mark.parametrize("options", ["", ",boft_n_butterfly_factor=2,boft_dropout=0.25"])
def test_train_step_changes_only_boft_tensors(options):
    changed = changed_by_a_train_step("llama", f"boft[boft_block_size=4{options}]")
    assert changed == {f"base_model.model.layers.{i}.self_attn.{p}_proj.adapters.a.{key}"
                       for i in (0, 1) for p in ("q", "v") for key in ("boft_R", "boft_s")}, changed


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_unmerge_and_unload(arch):
    model = peftkit.adapt(build_tiny(arch), "boft[boft_block_size=4,boft_n_butterfly_factor=2,init_weights=false]")
    unmerged = merge_keeps_output(model, arch)
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, arch), unmerged, atol=1e-5, rtol=0)
    bare = model.merge_and_unload()
    torch.testing.assert_close(output_of(bare, arch), unmerged, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_layer_gives_what_its_dequantized_twin_gives(bits):
    pytest.importorskip("bitsandbytes")
    quantized_matches_twin(bits, "boft[boft_block_size=8,boft_n_butterfly_factor=2,init_weights=false,"
                                 "target_modules=['0']]")


def test_a_peft_file_trained_without_its_cuda_extension_is_refused_with_the_fix(tmp_path):
    """PEFT without its CUDA extension (as here) trains one factor whatever the config asks for: the refusal says
    so and how to load the file, and with the config set to one factor it loads with PEFT's logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it could not build the extension
        peft_model = _peft_boft(build_tiny("llama"), boft_block_size=4, boft_n_butterfly_factor=2)
    peft_model.save_pretrained(str(tmp_path))
    refusal = r"boft_R holds 1 butterfly factor, but the config asks for boft_n_butterfly_factor=2: .*set \"boft_n_"
    with pytest.raises(peftkit.AdapterLoadError, match=refusal):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "boft_n_butterfly_factor": 1}))
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    ids = sample_inputs("llama")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_the_file_holds_every_peft_field_and_round_trips():
    from peft import BOFTConfig, PeftConfig

    method = peftkit.get_method("boft")
    config = method.make_config(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3, boft_dropout=0.1,
                                target_modules=["q_proj"])
    data = method.config_to_file(config)
    own = {f.name for f in dataclasses.fields(BOFTConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    assert own <= set(data), f"fields PEFT has that the file lacks: {own - set(data)}"
    assert method.config_from_file(data) == config
    with pytest.raises(ConfigError, match="bias='boft_only'"):
        method.config_from_file({**data, "bias": "boft_only"})


@pytest.mark.parametrize("spec,message", [
    ("boft[boft_block_num=4]", "set exactly one of boft_block_size=4 and boft_block_num=4"),
    ("boft[boft_block_size=0]", "set exactly one of boft_block_size=0"),
    ("boft[boft_n_butterfly_factor=0]", "boft_n_butterfly_factor=0 must be at least 1"),
    ("boft[boft_dropout=1.0]", r"boft_dropout=1.0 must be in"),
    ("boft[boft_block_size=5]", r"the input width of model.layers.0.self_attn.q_proj \(32\) is not divisible"),
    ("boft[target_modules=['embed_tokens']]", "'model.embed_tokens' is an Embedding; BOFT adapts Linear"),
])
def test_bad_values_raise_config_error_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        peftkit.adapt(build_tiny("llama"), spec)


# -- compatibility with Hugging Face PEFT, both ways ---------------------------------------------------------------

PEFT_CASES = [
    ("llama", dict(boft_block_size=4)),
    ("llama", dict(boft_block_size=0, boft_block_num=4, target_modules="all-linear")),
    ("llama", dict(boft_block_size=4, boft_n_butterfly_factor=2)),
    ("llama", dict(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=["o_proj", "down_proj"])),
    ("bert", dict(boft_block_size=8, boft_n_butterfly_factor=2, task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peft_saved_boft_loads_with_identical_logits(tmp_path, arch, options, peft_block_diagonal):
    peft_model = _peft_boft(build_tiny(arch), **options)
    if arch == "bert":  # give the task head real values, so modules_to_save is checked
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    model = peft_file_loads_alike(peft_model, arch, tmp_path)
    assert _our_shapes(model) == _peft_shapes(peft_model)


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peftkit_saved_boft_loads_in_peft_with_identical_logits(tmp_path, arch, options, peft_block_diagonal):
    options = {k: v for k, v in options.items() if k != "task_type"}
    model = peftkit.adapt(build_tiny(arch), BoftConfig(init_weights=False, **options))
    if arch == "bert":
        with torch.no_grad():
            model.base_model.classifier.copies["default"].weight.add_(0.5)
    peft_model = peftkit_file_loads_alike(model, arch, tmp_path)
    assert _peft_shapes(peft_model) == _our_shapes(model)


# -- Conv2d ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(boft_block_size=4), dict(boft_block_size=4, boft_n_butterfly_factor=2)])
def test_conv2d_both_ways_with_peft(tmp_path, options, peft_block_diagonal):
    from peft import PeftModel

    targets = BLOCK_CONVS + SHORTCUT
    peft_model = _peft_boft(tiny_resnet(), target_modules=targets, **options)
    expected = image_logits(peft_model)
    assert not torch.allclose(expected, image_logits(tiny_resnet()), atol=1e-4)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = peftkit.from_pretrained(tiny_resnet(), str(tmp_path / "peft")).eval()
    assert _our_shapes(model) == _peft_shapes(peft_model)
    torch.testing.assert_close(image_logits(model), expected, atol=1e-5, rtol=1e-5)
    peft_model.merge_adapter()
    model.merge_adapter()
    torch.testing.assert_close(image_logits(model), image_logits(peft_model), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_logits(model), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(image_logits(model), expected, atol=1e-5, rtol=1e-5)

    ours = peftkit.adapt(tiny_resnet(), BoftConfig(init_weights=False, target_modules=targets, **options)).eval()
    ours.save_adapter(str(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_resnet(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(image_logits(loaded), image_logits(ours), atol=1e-5, rtol=1e-5)


def test_conv2d_identity_at_init_and_grouped_convolutions_refused():
    model = peftkit.adapt(tiny_resnet(), BoftConfig(target_modules=BLOCK_CONVS))
    assert torch.equal(image_logits(model), image_logits(tiny_resnet()))
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="'0' is a Conv2d with groups=2"):
        peftkit.adapt(grouped, BoftConfig(target_modules=["0"]))


def test_conv2d_change_inside_a_composition_equals_the_layer_alone():
    model = peftkit.adapt(tiny_resnet(), BoftConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False,
                                                   target_modules=BLOCK_CONVS + SHORTCUT)).eval()
    alone = image_logits(model)
    assert not torch.allclose(alone, image_logits(tiny_resnet()), atol=1e-4)
    torch.testing.assert_close(logits_through_deltas(model), alone, atol=1e-5, rtol=1e-5)
