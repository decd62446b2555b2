"""Adapters of different methods at one site, each reading the input its own method asks for.

On Llama, ``par_bn`` sits at ``mlp.down_proj`` but reads the input of the whole
``mlp`` block (hidden size 32), while a LoRA on ``down_proj`` reads the
projection's own input (intermediate size 64) and ``seq_bn`` reads its output.
References come from models holding one adapter each (same weights, copied) and
from the bottleneck math written out by hand in forward hooks on a bare model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.core.composition import split_parallel
from peftkit.core.errors import CompositionError
from peftkit.core.layer import TunerLayer
from tests.tiny_models import build_tiny, sample_inputs

LORA = 'lora[r=4,alpha=8,target_modules="all-linear"]'
PAR = "par_bn[reduction_factor=4,scaling=2.0,non_linearity=relu]"
SEQ = "seq_bn[reduction_factor=4,scaling=1.0,non_linearity=relu]"
SPECS = {"lora": LORA, "par": PAR, "seq": SEQ}
LAYERS = 2
MLP = "model.layers.{i}.mlp"
SITE = "model.layers.{i}.mlp.down_proj"
ROWS = ["lora", "par", "__base__", "par", "lora"]  # interleaved: groups are gathered, not sliced


def _adapter_params(model: peftkit.AdaptedModel, name: str) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in model.base_model.named_parameters() if f".adapters.{name}." in k}


def _randomize(model: peftkit.AdaptedModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _copy_adapter(src: peftkit.AdaptedModel, dst: peftkit.AdaptedModel, name: str) -> None:
    theirs, ours = _adapter_params(src, name), _adapter_params(dst, name)
    assert theirs.keys() == ours.keys() and ours
    with torch.no_grad():
        for key, p in ours.items():
            p.copy_(theirs[key])


def _models(names: tuple[str, str]) -> tuple[peftkit.AdaptedModel, dict[str, peftkit.AdaptedModel]]:
    """A model holding both adapters (random, non-zero) and one model per adapter with the same weights."""
    joint = peftkit.AdaptedModel(build_tiny("llama"))
    for i, name in enumerate(names):
        joint.add_adapter(name, SPECS[name])
        _randomize(joint, name, seed=10 + i)
    singles = {}
    for name in names:
        single = peftkit.AdaptedModel(build_tiny("llama"))
        single.add_adapter(name, SPECS[name])
        _copy_adapter(joint, single, name)
        single.set_active(name)
        singles[name] = single.eval()
    return joint.eval(), singles


def _logits(model, inputs, active=None, **kwargs) -> torch.Tensor:
    if active is not None:
        model.set_active(active)
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def _branch(adapter, z: torch.Tensor) -> torch.Tensor:
    """A bottleneck adapter's branch, by hand: scaling * up(relu(down(z)))."""
    down = F.relu(F.linear(z, adapter.adapter_down.weight, adapter.adapter_down.bias))
    return F.linear(down, adapter.adapter_up.weight, adapter.adapter_up.bias) * adapter.scaling


def _hand_model(base: torch.nn.Module, joint: peftkit.AdaptedModel, steps: list[tuple[str, float]]):
    """``base`` with forward hooks on each mlp applying bottleneck ``steps`` in order to the block's
    output (which is down_proj's): ("par", w) adds w * par(block input), ("seq", w) adds w * seq(output)."""
    for i in range(LAYERS):
        adapters = joint.base_model.get_submodule(SITE.format(i=i)).adapters

        def hook(_module, args, out, adapters=adapters):
            for name, weight in steps:
                out = out + weight * _branch(adapters[name], args[0] if name == "par" else out)
            return out

        base.get_submodule(MLP.format(i=i)).register_forward_hook(hook)
    return base


def _scaled_lora(single: peftkit.AdaptedModel, factor: float) -> peftkit.AdaptedModel:
    """A copy of a LoRA-only model whose every B is scaled by ``factor``."""
    scaled = copy.deepcopy(single)
    with torch.no_grad():
        for key, p in _adapter_params(scaled, "lora").items():
            if "lora_B" in key:
                p.mul_(factor)
    return scaled


def _peftkit_hooks(module: torch.nn.Module) -> list:
    from peftkit.core.layer import _InputCapture

    return [h for h in module._forward_pre_hooks.values() if isinstance(h, _InputCapture)]


# -- each adapter alone, and blocks computed by hand -------------------------------------------------


@pytest.mark.parametrize("names", [("par", "lora"), ("lora", "par"), ("par", "seq")])
def test_each_adapter_alone_equals_a_model_holding_only_it(names):
    joint, singles = _models(names)
    inputs = sample_inputs("llama", batch=3)
    for name in names:
        layer = joint.base_model.get_submodule(SITE.format(i=0))
        assert isinstance(layer, TunerLayer) and set(layer.adapters) == set(names)
        assert torch.equal(_logits(joint, inputs, name), _logits(singles[name], inputs))
    assert not torch.allclose(_logits(joint, inputs, names[0]), _logits(joint, inputs, names[1]), atol=1e-4)
    layer = joint.base_model.get_submodule(SITE.format(i=1))
    assert layer.input_sources == {"par": MLP.format(i=1)}
    assert layer.input_from is None  # the adapters here read different inputs


def test_hand_reference_matches_the_single_bottleneck_models():
    """The hooks below compute par_bn and seq_bn by hand; check them against peftkit once."""
    joint, singles = _models(("par", "seq"))
    inputs = sample_inputs("llama", batch=3)
    for name in ("par", "seq"):
        hand = _hand_model(build_tiny("llama"), joint, [(name, 1.0)])
        assert torch.allclose(_logits(hand, inputs), _logits(singles[name], inputs), atol=1e-5)


def test_stack_and_average_of_lora_and_par_match_the_math():
    joint, singles = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=3)
    # Both are additive at down_proj and LoRA's change depends on x only: the stack is their sum.
    stacked = _logits(_hand_model(copy.deepcopy(singles["lora"]), joint, [("par", 1.0)]), inputs)
    for composition in ("stack(lora, par)", "stack(par, lora)"):
        out = _logits(joint, inputs, composition)
        assert torch.allclose(out, stacked, atol=1e-5), composition
        for name in ("lora", "par"):
            assert not torch.allclose(out, _logits(singles[name], inputs), atol=1e-4)
    # average: each adapter's change times its normalized weight, at every site it acts.
    averaged = _hand_model(_scaled_lora(singles["lora"], 0.25), joint, [("par", 0.75)])
    out = _logits(joint, inputs, "average(lora, par, weights=[1, 3])")
    assert torch.allclose(out, _logits(averaged, inputs), atol=1e-5)
    assert not torch.allclose(out, stacked, atol=1e-4)


def test_stacks_of_seq_and_par_match_the_math_in_both_orders():
    joint, _ = _models(("par", "seq"))
    inputs = sample_inputs("llama", batch=3)
    for order in (["seq", "par"], ["par", "seq"]):
        hand = _hand_model(build_tiny("llama"), joint, [(n, 1.0) for n in order])
        assert torch.allclose(_logits(joint, inputs, f"stack({', '.join(order)})"), _logits(hand, inputs),
                              atol=1e-5), order
    hand = _hand_model(build_tiny("llama"), joint, [("seq", 0.5), ("par", 0.5)])
    assert torch.allclose(_logits(joint, inputs, "average(seq, par)"), _logits(hand, inputs), atol=1e-5)


# -- row splits ----------------------------------------------------------------------------------


def _separate_rows(singles: dict, inputs: dict, rows: list[str]) -> torch.Tensor:
    some = next(iter(singles.values()))
    with some.disable_adapters():
        base = _logits(some, inputs)
    outs = {name: _logits(model, inputs) for name, model in singles.items()}
    return torch.stack([base[i] if name == "__base__" else outs[name][i] for i, name in enumerate(rows)])


@pytest.mark.parametrize("names", [("lora", "par"), ("par", "seq")])
def test_per_row_routing_equals_separate_runs(names):
    joint, singles = _models(names)
    rows = [names[0], names[1], "__base__", names[1], names[0]]
    inputs = sample_inputs("llama", batch=len(rows))
    joint.set_active(names[0])  # routing overrides the active adapter
    out = _logits(joint, inputs, adapter_names=rows)
    assert torch.allclose(out, _separate_rows(singles, inputs, rows), atol=1e-5)


def test_rows_running_a_stack_get_their_rows_of_the_captured_input():
    joint, singles = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=4)
    stacked = _logits(_hand_model(copy.deepcopy(singles["lora"]), joint, [("par", 1.0)]), inputs)
    out = _logits(joint, inputs, adapter_names=["par", "stack(lora, par)", "lora", "stack(lora, par)"])
    separate = _separate_rows(singles, inputs, ["par", "lora", "lora", "lora"])
    assert torch.allclose(out[[0, 2]], separate[[0, 2]], atol=1e-5)
    assert torch.allclose(out[[1, 3]], stacked[[1, 3]], atol=1e-5)
    # batch_split runs the same general row split, with a stack in a group
    out = _logits(joint, inputs, "batch_split(par, stack(lora, par), lora, sizes=[1, 2, 1])")
    assert torch.allclose(out[[0, 3]], separate[[0, 3]], atol=1e-5)
    assert torch.allclose(out[[1, 2]], stacked[[1, 2]], atol=1e-5)


def test_training_step_under_routing_gives_each_adapter_gradients_from_its_rows_only():
    joint, singles = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=len(ROWS))
    joint.train_adapter("lora", "par")
    weights = torch.randn(len(ROWS), inputs["input_ids"].shape[1], 128, generator=torch.Generator().manual_seed(3))
    (joint(**inputs, adapter_names=ROWS).logits * weights).sum().backward()
    for name, model in singles.items():
        rows = [i for i, n in enumerate(ROWS) if n == name]
        model.train_adapter(name)
        sub = {k: v[rows] for k, v in inputs.items()}
        (model(**sub).logits * weights[rows]).sum().backward()
        ours, theirs = _adapter_params(joint, name), _adapter_params(model, name)
        for key, p in theirs.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, key
            assert torch.allclose(ours[key].grad, p.grad, atol=1e-5), key
    # an optimizer step moves both adapters, and routing still matches the separately trained models
    for model, names in ((joint, ("lora", "par")), *((m, (n,)) for n, m in singles.items())):
        with torch.no_grad():
            for name in names:
                for p in model.adapter_parameters(name):
                    p -= 0.1 * p.grad
    out = _logits(joint, inputs, adapter_names=ROWS)
    assert torch.allclose(out, _separate_rows(singles, inputs, ROWS), atol=1e-5)


def test_parallel_gives_each_child_its_own_output():
    joint, singles = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=2)
    joint.set_active("parallel(lora, par)")
    outs = split_parallel(_logits(joint, inputs), 2)
    assert torch.allclose(outs[0], _logits(singles["lora"], inputs), atol=1e-5)
    assert torch.allclose(outs[1], _logits(singles["par"], inputs), atol=1e-5)


def test_generate_with_routing_and_a_stack():
    joint, singles = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=2, seq=5)
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        routed = joint.generate(**inputs, adapter_names=["par", "lora"], **options)
        assert torch.equal(routed[0], singles["par"].generate(**inputs, **options)[0])
        assert torch.equal(routed[1], singles["lora"].generate(**inputs, **options)[1])
        joint.set_active("stack(lora, par)")
        hand = _hand_model(copy.deepcopy(singles["lora"]), joint, [("par", 1.0)])
        assert torch.equal(joint.generate(**inputs, **options), hand.generate(**inputs, **options))


# -- fusion ----------------------------------------------------------------------------------------


def test_fuse_of_lora_and_par_starts_as_the_average_where_both_act_and_trains():
    joint, singles = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=3)
    joint.add_fusion("fuse(lora, par, name=lp)")
    joint.set_active("fuse(lora, par, name=lp)")
    out = _logits(joint, inputs)
    # A new fusion is the unweighted average of the members acting at a site: LoRA alone at
    # q/k/v/o/gate/up, LoRA and par_bn with 1/2 each at down_proj.
    hand = copy.deepcopy(singles["lora"])
    with torch.no_grad():
        for key, p in _adapter_params(hand, "lora").items():
            if "down_proj" in key and "lora_B" in key:
                p.mul_(0.5)
    assert torch.allclose(out, _logits(_hand_model(hand, joint, [("par", 0.5)]), inputs), atol=1e-5)
    joint.train_fusion("lp")
    joint.train()
    before = {k: p.detach().clone() for k, p in _adapter_params(joint, "par").items()}
    fusion = list(joint.fusion_parameters("lp"))
    optimizer = torch.optim.SGD(fusion, lr=0.5)
    loss = F.cross_entropy(joint(**inputs).logits.flatten(0, 1), inputs["input_ids"].flatten())
    loss.backward()
    assert all(p.grad is not None for p in fusion) and any(p.grad.abs().sum() > 0 for p in fusion)
    assert all(p.grad is None for p in _adapter_params(joint, "par").values())  # members stay frozen
    optimizer.step()
    joint.eval()
    assert not torch.allclose(_logits(joint, inputs), out, atol=1e-5)
    assert all(torch.equal(p, before[k]) for k, p in _adapter_params(joint, "par").items())


# -- deleting, unwrapping, files ------------------------------------------------------------------


def test_delete_par_removes_its_capture_hook_and_deleting_all_restores_the_model():
    base = build_tiny("llama")
    originals = dict(base.named_modules())
    inputs = sample_inputs("llama", batch=2)
    with torch.no_grad():
        reference = base(**inputs).logits
    joint, singles = _models(("par", "lora"))
    joint = peftkit.AdaptedModel(base)
    for name in ("par", "lora"):
        joint.add_adapter(name, SPECS[name])
        _copy_adapter(singles[name], joint, name)
    joint.eval()
    mlps = [base.get_submodule(MLP.format(i=i)) for i in range(LAYERS)]
    assert all(len(_peftkit_hooks(m)) == 1 for m in mlps)
    joint.delete_adapter("par")
    assert all(not _peftkit_hooks(m) and not m._forward_pre_hooks for m in mlps)
    layer = base.get_submodule(SITE.format(i=0))
    assert isinstance(layer, TunerLayer) and not layer.input_sources and not layer.captured
    assert torch.equal(_logits(joint, inputs, "lora"), _logits(singles["lora"], inputs))
    joint.delete_adapter("lora")
    assert not any(isinstance(m, TunerLayer) for m in base.modules())
    assert {n: id(m) for n, m in base.named_modules()} == {n: id(m) for n, m in originals.items()}
    assert torch.equal(_logits(joint, inputs), reference)


def test_delete_lora_keeps_the_capture_for_par_and_re_adding_par_hooks_once():
    joint, singles = _models(("par", "lora"))
    inputs = sample_inputs("llama", batch=2)
    mlp = joint.base_model.get_submodule(MLP.format(i=0))
    joint.delete_adapter("lora")
    assert len(_peftkit_hooks(mlp)) == 1
    assert torch.equal(_logits(joint, inputs, "par"), _logits(singles["par"], inputs))
    joint.add_adapter("par2", PAR)
    assert len(_peftkit_hooks(mlp)) == 1  # one capture per source, however many adapters read it
    joint.delete_adapter("par")
    assert len(_peftkit_hooks(mlp)) == 1
    joint.delete_adapter("par2")
    assert not _peftkit_hooks(mlp) and not any(isinstance(m, TunerLayer) for m in joint.base_model.modules())


def test_merge_and_unload_of_lora_drops_the_capture_hooks():
    joint, singles = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=2)
    expected = _logits(singles["lora"], inputs)
    joint.set_active("lora")
    model = joint.merge_and_unload()
    assert not any(_peftkit_hooks(m) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)


def test_deepcopy_of_a_shared_site_model_captures_into_the_copy():
    joint, _ = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=2)
    expected = _logits(joint, inputs, "par")
    twin = copy.deepcopy(joint)
    _logits(twin, sample_inputs("llama", batch=3, seed=7))  # writes only the copy's captured inputs
    layer = joint.base_model.get_submodule(SITE.format(i=0))
    assert layer.captured[MLP.format(i=0)].shape[0] == 2
    assert torch.equal(_logits(twin, inputs), expected)
    joint.set_active("stack(lora, par)")  # a model with an active block copies too (blocks are immutable)
    stacked = _logits(joint, inputs)
    twin = copy.deepcopy(joint)
    assert twin.active_composition == joint.active_composition
    assert torch.equal(_logits(twin, inputs), stacked)


def test_a_layer_run_alone_names_the_missing_input():
    joint, _ = _models(("lora", "par"))
    joint.set_active("par")
    layer = joint.base_model.get_submodule(SITE.format(i=0))
    with pytest.raises(CompositionError, match=r"reads the input of module 'model\.layers\.0\.mlp'"):
        layer(torch.randn(1, 3, 64))


def test_save_both_and_load_into_a_fresh_model(tmp_path):
    joint, singles = _models(("lora", "par"))
    inputs = sample_inputs("llama", batch=3)
    for name in ("lora", "par"):
        joint.save_adapter(str(tmp_path / name), name)
        singles[name].save_adapter(str(tmp_path / f"only_{name}"), name)
        ours = (tmp_path / name / "adapter_model.safetensors").read_bytes()
        assert ours == (tmp_path / f"only_{name}" / "adapter_model.safetensors").read_bytes()
        assert (tmp_path / name / "adapter_config.json").read_text() == \
            (tmp_path / f"only_{name}" / "adapter_config.json").read_text()
    fresh = peftkit.AdaptedModel(build_tiny("llama"))
    fresh.load_adapter(str(tmp_path / "par"), "par")
    fresh.load_adapter(str(tmp_path / "lora"), "lora")
    fresh.eval()
    for active in ("lora", "par", "stack(lora, par)", "average(lora, par)"):
        assert torch.equal(_logits(fresh, inputs, active), _logits(joint, inputs, active)), active
    assert torch.allclose(_logits(fresh, inputs, adapter_names=["lora", "par", "__base__"]),
                          _logits(joint, inputs, adapter_names=["lora", "par", "__base__"]), atol=1e-6)
