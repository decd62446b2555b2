"""MiSS (``miss``, PEFT's MISS, formerly Bone): one trained block shared by the input's shards of r features.
Before, a PEFT MiSS folder or ``peft.MissConfig`` was refused as an unknown peft_type. Tested against the real
``peft`` for each variant (balance, with and without padded shards; bat; mini): outputs, gradients, random init,
dropout draws, folders both ways, merging, and the settings refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError
from tests.method_helpers import merge_cycle_keeps_outputs, output_of, randomize
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

#: PEFT's MissConfig keywords per case; r=5 does not divide the tiny layers' 32 inputs (the last shard is padded).
VARIANTS = {
    "balance": {"r": 4},
    "balance_padded": {"r": 5},
    "bat": {"r": 4, "init_weights": "bat"},
    "mini": {"r": 5, "init_weights": "mini", "mini_r": 8},
}


def _peft_model(arch: str, options: dict, seed: int = 3):
    from peft import get_peft_model, MissConfig

    model = get_peft_model(build_tiny(arch), MissConfig(**options))
    with torch.no_grad():  # every variant starts as the identity: move the blocks, so that they matter
        gen = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "miss_block" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def _gradients(model, arch: str, prefix: str) -> dict[str, torch.Tensor]:
    model.zero_grad()
    output_tensor(model(**sample_inputs(arch))).square().mean().backward()
    return {name.removeprefix(prefix).replace(".adapters.default.", ".").replace(".miss_block.default", ".miss_block"):
            param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def _shapes(folder) -> dict[str, torch.Size]:
    return {key: value.shape for key, value in load_file(str(folder / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_folder_loads_with_the_same_outputs_and_saves_back(tmp_path, arch, variant):
    from peft import PeftModel

    theirs = _peft_model(arch, VARIANTS[variant])
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"))
    assert ours.adapter_record("default").method.name == "miss"
    expected = output_of(theirs, arch)
    torch.testing.assert_close(output_of(ours, arch), expected, atol=1e-5, rtol=0)

    ours.save_pretrained(str(tmp_path / "ours"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MISS" and saved["r"] == VARIANTS[variant]["r"]
    shapes = _shapes(tmp_path / "ours")
    assert shapes == _shapes(tmp_path / "peft")
    assert all(key.endswith(".miss_block") for key in shapes)
    again = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output_of(again, arch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_equal_peft(tmp_path, variant):
    theirs = _peft_model("llama", VARIANTS[variant])
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "peft"), is_trainable=True).eval()
    expected = _gradients(theirs, "llama", "base_model.model.")
    got = _gradients(ours, "llama", "base_model.")
    assert sorted(got) == sorted(expected) and got
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_random_init_draws_what_peft_draws(arch):
    from peft import get_peft_model, MissConfig

    torch.manual_seed(7)
    theirs = get_peft_model(build_tiny(arch), MissConfig(r=4, init_weights=False)).eval()
    torch.manual_seed(7)
    ours = peftkit.adapt(build_tiny(arch), "miss[r=4,init_weights=false]").eval()
    torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), atol=1e-5, rtol=0)


def _bert_with_biases():
    """The tiny BERT with nonzero biases (transformers starts them at zero, where a lost bias goes unseen)."""
    model = build_tiny("bert")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("variant", ["balance", "balance_padded"])
def test_balance_fused_with_the_base_product_equals_peft_on_layers_with_a_bias(monkeypatch, tmp_path, variant):
    """On a plain float layer balance writes its update first and the base product accumulates onto it in place
    (``forward_alone``: no pass copies or adds the output). Outputs and gradients equal PEFT's, bias included."""
    from peft import get_peft_model, MissConfig

    from peftkit.plugins.miss.layer import MissLayer

    fused, unfused_forward_alone = [], MissLayer.forward_alone

    def recorded(self, x, base):
        out = unfused_forward_alone(self, x, base)
        fused.append(out is not None)
        return out
    monkeypatch.setattr(MissLayer, "forward_alone", recorded)
    base = _bert_with_biases()
    theirs = get_peft_model(copy.deepcopy(base), MissConfig(**VARIANTS[variant]))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, param in theirs.named_parameters():
            if "miss_block" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    theirs.eval().save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft"), is_trainable=True).eval()
    torch.testing.assert_close(output_of(ours, "bert"), output_of(theirs, "bert"), atol=1e-5, rtol=0)
    expected, got = _gradients(theirs, "bert", "base_model.model."), _gradients(ours, "bert", "base_model.")
    assert sorted(got) == sorted(expected) and got
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-6, rtol=1e-4)
    assert fused and all(fused)


@pytest.mark.parametrize("width", [24, 29])  # 29: a short last shard
@pytest.mark.parametrize("bias", [False, True])
def test_balance_node_equals_the_padded_formula_and_passes_gradcheck(width, bias):
    """The training node's output is x W^T + b + (sum of x zero-padded to whole shards) D, and its backward
    (g D^T spread over the shards of g W in place) passes torch's gradient check in float64."""
    from peftkit.plugins.miss.shards import BalanceNode

    gen = torch.Generator().manual_seed(0)
    x, block = torch.randn(5, width, generator=gen, dtype=torch.float64, requires_grad=True), \
        torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, width, generator=gen, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64) if bias else None
    padded = torch.nn.functional.pad(x, (0, -width % 4))
    expected = x @ weight.t() + padded.reshape(5, -1, 4).sum(dim=1) @ block + (b if bias else 0)
    torch.testing.assert_close(BalanceNode.apply(x, block, weight, b, 4), expected)
    assert torch.autograd.gradcheck(lambda x, block: BalanceNode.apply(x, block, weight, b, 4), (x, block))


@pytest.mark.parametrize("variant", ["balance_padded", "mini"])
def test_dropout_drops_what_peft_drops(tmp_path, variant):
    """In training, a seed drops the same entries in both (the input is padded to whole shards first, as PEFT
    does); the tiny Llama has no dropout of its own."""
    theirs = _peft_model("llama", {**VARIANTS[variant], "miss_dropout": 0.5})
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "peft"))
    outputs = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(11)
        outputs.append(output_of(model, "llama"))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    assert not torch.allclose(outputs[0], output_of(theirs.eval(), "llama"), atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_and_unmerge_keep_outputs(variant):
    options = VARIANTS[variant]
    spec = "miss[" + ",".join(f"{key}={value}" for key, value in options.items()) + "]"
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, std=0.3)
    merge_cycle_keeps_outputs(model.eval(), "llama")


def test_bat_unmerge_gives_the_weight_back():
    """bat's merge is W (I + B) + B per block; unmerging solves it back rather than subtracting a change."""
    model = peftkit.adapt(build_tiny("llama"), "miss[r=4,init_weights=bat]")
    randomize(model, std=0.3)
    layer = model.base_model.get_submodule("model.layers.0.self_attn.q_proj").base_layer
    before = layer.weight.detach().clone()
    model.merge_adapter()
    assert not torch.allclose(layer.weight, before, atol=1e-3)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.weight, before, atol=1e-5, rtol=0)


def _peft_folder(tmp_path, **changes):
    theirs = _peft_model("llama", {"r": 4})
    theirs.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return str(tmp_path)


@pytest.mark.parametrize(("changes", "named"), [
    ({"bias": "all"}, "bias='all'"),
    ({"layers_pattern": "layers", "layers_to_transform": [0]}, "layers_pattern='layers'"),
])
def test_peft_settings_peftkit_lacks_are_refused_by_name(tmp_path, changes, named):
    with pytest.raises(AdapterLoadError, match=named):
        peftkit.from_pretrained(build_tiny("llama"), _peft_folder(tmp_path, **changes))


@pytest.mark.parametrize(("spec", "named"), [
    ("miss[r=64]", r"r=64 is larger than .*in_features=32; set r to at most 32"),
    ("miss[r=5,init_weights=bat]", r"init_weights=\"bat\" .* r=5 does not divide both"),
    ("miss[r=4,init_weights=mini,mini_r=5]", r"mini_r=5 .* out_features=32"),
    ("miss[init_weights=balance]", r"init_weights='balance' is not a MiSS variant"),
    ("miss[r=0]", r"r=0 must be a positive integer"),
    ("miss[miss_dropout=1.0]", r"miss_dropout=1.0 must be in \[0, 1\)"),
])
def test_shapes_and_values_peft_refuses_are_refused_by_name(spec, named):
    with pytest.raises(ConfigError, match=named):
        peftkit.adapt(build_tiny("llama"), spec)


def test_gpt2_conv1d_layers_are_refused_as_peft_refuses_them():
    """PEFT's MiSS adapts torch Linear layers only; GPT-2's default target c_attn is a Conv1D."""
    with pytest.raises(ConfigError, match=r"default targets \['c_attn'\] are not torch Linear layers"):
        peftkit.adapt(build_tiny("gpt2"), "miss[r=4]")
    with pytest.raises(ConfigError, match="is a Conv1D; MiSS adapts torch Linear layers"):
        peftkit.adapt(build_tiny("gpt2"), "miss[r=4,target_modules=[c_attn]]")


def test_peft_config_object_is_accepted():
    from peft import MissConfig

    model = peftkit.adapt(build_tiny("llama"), MissConfig(r=4, init_weights="bat"))
    layer = model.base_model.get_submodule("model.layers.0.self_attn.v_proj").adapters["default"]
    assert layer.miss_block.shape == (4, 4, 4)  # (out / r, r, r): v_proj is 16 x 32
