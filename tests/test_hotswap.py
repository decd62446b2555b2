"""Hot-swapping: another saved adapter's weights copied in place into a loaded adapter
(AdaptedModel.hotswap_adapter, prepare_for_hotswap; PEFT's hotswap_adapter)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterError, AdapterLoadError, ConfigError
from peftkit.core.model import AdaptedModel
from tests.method_helpers import adapter_modules, output_of, randomize
from tests.tiny_models import build_tiny, output_tensor, sample_inputs


def _saved(folder: Path, spec: str, seed: int, arch: str = "llama", base=None) -> tuple[str, torch.Tensor]:
    """Save an adapter of ``spec``, moved away from its init with ``seed``; return (folder, its output)."""
    model = peftkit.adapt(base if base is not None else build_tiny(arch), spec)
    randomize(model, seed=seed)
    model.eval()
    model.save_adapter(str(folder))
    return str(folder), output_of(model, arch)


def _loaded(folder: str, arch: str = "llama") -> peftkit.AdaptedModel:
    return peftkit.from_pretrained(build_tiny(arch), folder)


def _snapshot(model: peftkit.AdaptedModel) -> dict:
    """Everything a refused swap must leave as it was: every tensor's value and object, configs, activation."""
    return {"tensors": {k: (id(v), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
            "configs": {n: c.to_dict() for n, c in model.adapters.items()},
            "active": model.active_adapters,
            "modules": [(n, type(m).__name__) for n, m in model.named_modules()]}


def _assert_unchanged(model: peftkit.AdaptedModel, before: dict) -> None:
    after = _snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, (ident, value) in before["tensors"].items():
        assert after["tensors"][key][0] == ident, key
        assert torch.equal(after["tensors"][key][1], value), key
    assert (after["configs"], after["active"], after["modules"]) == \
        (before["configs"], before["active"], before["modules"])


# -- swaps -----------------------------------------------------------------------------------------

SAME_SHAPE_CASES = [
    ("llama", "lora[r=4,alpha=8]"),
    ("llama", "lora[r=4,alpha=8,use_dora=true]"),
    ("bert", "lora[r=4,alpha=8]"),  # the task head (modules_to_save) is swapped too
    ("llama", "ia3"),
    ("llama", "seq_bn[reduction_factor=4]"),
    ("gpt2", "bitfit"),
    ("llama", "prompt_tuning[num_virtual_tokens=4]"),
    ("gpt2", "prefix_tuning[num_virtual_tokens=3]"),
]


@pytest.mark.parametrize("arch, spec", SAME_SHAPE_CASES)
def test_swap_gives_a_fresh_load_of_the_new_adapter_in_the_same_parameter_objects(tmp_path, arch, spec):
    first, first_out = _saved(tmp_path / "a", spec, seed=1, arch=arch)
    second, second_out = _saved(tmp_path / "b", spec, seed=2, arch=arch)
    assert not torch.allclose(first_out, second_out, atol=1e-4)
    model = _loaded(first, arch)
    params = [(n, id(p), p.data_ptr()) for n, p in model.named_parameters()]  # the objects and their storage
    own = [id(p) for p in model.adapter_parameters("default")]
    assert torch.equal(output_of(model, arch), first_out)

    record = model.hotswap_adapter(second, "default")

    assert record is model.adapter_record("default")
    assert torch.equal(output_of(model, arch), second_out)
    assert torch.equal(output_of(model, arch), output_of(_loaded(second, arch), arch))
    assert [(n, id(p), p.data_ptr()) for n, p in model.named_parameters()] == params
    assert [id(p) for p in model.adapter_parameters("default")] == own
    model.hotswap_adapter(first)  # and back
    assert torch.equal(output_of(model, arch), first_out)


def test_lora_of_lower_rank_and_another_alpha_is_padded_and_rescaled(tmp_path):
    first, _ = _saved(tmp_path / "a", "lora[r=4,alpha=8]", seed=1)
    second, second_out = _saved(tmp_path / "b", "lora[r=2,alpha=3,use_rslora=true]", seed=2)
    model = _loaded(first)
    slot_config = model.adapters["default"].to_dict()
    rng = torch.random.get_rng_state()
    model.hotswap_adapter(second)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the random stream is where it was
    torch.testing.assert_close(output_of(model, "llama"), second_out, atol=1e-5, rtol=1e-5)
    for module in adapter_modules(model).values():  # rank 2 in a rank-4 slot: the rest is zero
        assert module.lora_A.shape[0] == 4 and not module.lora_A[2:].any() and not module.lora_B[:, 2:].any()
    # The adapter keeps its slot's config (rank 4, alpha 8), in which the weights now hold the new adapter:
    # saving it writes an adapter with the second one's outputs.
    assert model.adapters["default"].to_dict() == slot_config
    model.save_adapter(str(tmp_path / "resaved"))
    torch.testing.assert_close(output_of(_loaded(str(tmp_path / "resaved")), "llama"), output_of(model, "llama"),
                               atol=1e-6, rtol=1e-6)


def test_load_adapter_with_hotswap_swaps_and_keeps_the_activation(tmp_path):
    first, _ = _saved(tmp_path / "a", "lora[r=4,alpha=8]", seed=1)
    second, second_out = _saved(tmp_path / "b", "lora[r=4,alpha=8]", seed=2)
    model = _loaded(first)
    active = model.active_composition
    model.load_adapter(second, "default", hotswap=True)
    assert model.active_composition is active  # untouched: a compiled graph guards on it
    assert torch.equal(output_of(model, "llama"), second_out)
    with pytest.raises(AdapterError, match="no adapter named 'other'"):
        model.load_adapter(second, "other", hotswap=True)


def test_peftkit_swaps_as_peft_does(tmp_path):
    """PEFT's own hotswap_adapter on a PEFT model and ours on the same PEFT folders give the same outputs."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.hotswap import hotswap_adapter

    folders = []
    for seed, alpha in ((1, 8), (2, 3)):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                            task_type="CAUSAL_LM")
        get_peft_model(build_tiny("llama"), config).save_pretrained(tmp_path / str(seed))
        folders.append(str(tmp_path / str(seed)))
    peft_model = PeftModel.from_pretrained(build_tiny("llama"), folders[0]).eval()
    ours = _loaded(folders[0])
    hotswap_adapter(peft_model, folders[1], adapter_name="default", torch_device="cpu")
    ours.hotswap_adapter(folders[1])
    torch.testing.assert_close(output_of(ours, "llama"), output_of(peft_model, "llama"), atol=1e-5, rtol=1e-5)


# -- making room for higher ranks -----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["lora[r=2,alpha=4]",
                                  'lora[r=2,alpha=3,use_rslora=true,rank_pattern={"v_proj":3},'
                                  'alpha_pattern={"q_proj":5}]'])
def test_prepare_for_hotswap_pads_with_zeros_and_keeps_the_outputs(tmp_path, spec):
    first, first_out = _saved(tmp_path / "a", spec, seed=1)
    bigger, bigger_out = _saved(tmp_path / "b", "lora[r=8,alpha=16]", seed=2)
    model = _loaded(first, "llama")
    model.train_adapter("default")
    model.eval()

    model.prepare_for_hotswap(target_rank=8)

    torch.testing.assert_close(output_of(model, "llama"), first_out, atol=1e-6, rtol=1e-6)
    assert model.adapters["default"].r == 8 and model.adapters["default"].rank_pattern == {}
    for module in adapter_modules(model).values():
        assert module.lora_A.shape[0] == 8 and module.lora_B.shape[1] == 8
        assert module.lora_A.requires_grad and module.lora_B.requires_grad  # still the trained adapter
        assert not module.lora_A[3:].any() and not module.lora_B[:, 3:].any()
    model.hotswap_adapter(bigger)
    torch.testing.assert_close(output_of(model, "llama"), bigger_out, atol=1e-5, rtol=1e-5)


def test_prepare_for_hotswap_refuses_what_it_cannot_pad_and_changes_nothing(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    model.add_adapter("dora", "lora[r=2,use_dora=true]")
    model.add_adapter("vector", "ia3")
    before = _snapshot(model)
    with pytest.raises(AdapterError, match=r"rank 4 at .* more than target_rank=2"):
        model.prepare_for_hotswap(target_rank=2, adapter_names=["default"])
    with pytest.raises(AdapterError, match="adapter 'dora' has no low-rank factors .*DoRA"):
        model.prepare_for_hotswap(target_rank=8)  # "default" would be padded: nothing may be
    with pytest.raises(AdapterError, match="adapter 'vector' \\(ia3\\) has no rank to pad"):
        model.prepare_for_hotswap(target_rank=8, adapter_names=["vector"])
    with pytest.raises(AdapterError, match="must be a positive integer"):
        model.prepare_for_hotswap(target_rank=0)
    _assert_unchanged(model, before)
    model.delete_adapter("dora")
    model.prepare_for_hotswap(target_rank=8)  # the IA3 adapter has no rank and is left alone
    assert model.adapters["default"].r == 8


# -- torch.compile ----------------------------------------------------------------------------------


def test_compiled_model_swaps_adapters_of_other_ranks_and_alphas_without_recompiling(tmp_path):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    first, first_out = _saved(tmp_path / "a", "lora[r=4,alpha=8]", seed=1)
    others = [_saved(tmp_path / "b", "lora[r=4,alpha=3]", seed=2),   # same rank, another alpha
              _saved(tmp_path / "c", "lora[r=8,alpha=16]", seed=3),  # higher rank
              _saved(tmp_path / "d", "lora[r=2,alpha=2]", seed=4)]   # lower rank
    model = _loaded(first)
    model.prepare_for_hotswap(target_rank=8)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    inputs = sample_inputs("llama")

    def run():
        with torch.no_grad():
            return output_tensor(compiled(**inputs))

    torch._dynamo.utils.warn_once_cache.clear()  # Dynamo warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(run(), first_out, atol=1e-5, rtol=1e-5)
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message) for w in caught]
    graphs = counter.frame_count
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for folder, expected in [*others, (first, first_out)]:
            compiled.hotswap_adapter(folder)
            torch.testing.assert_close(run(), expected, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == graphs
    # The counter does see recompilation: setting a LoRA scale (a Python float) recompiles.
    next(iter(adapter_modules(model).values())).scale *= 2
    run()
    assert counter.frame_count > graphs


# -- refusals ---------------------------------------------------------------------------------------

REFUSALS = [
    ("lora[r=4]", "ia3", r"the folder holds a 'ia3' adapter and 'default' is a 'lora' adapter"),
    ('lora[r=4,target_modules=["q_proj","v_proj"]]', 'lora[r=4,target_modules=["q_proj","k_proj"]]',
     r"the folder's adapter adapts model\.layers\.0\.self_attn\.k_proj and 'default' does not.*same target"),
    ("lora[r=2]", "lora[r=4]", r"rank 4 and the loaded one only 2.*prepare_for_hotswap\(target_rank=4\)"),
    ("lora[r=4]", "lora[r=4,use_dora=true]", r"setting use_dora is True in the folder and False"),
    ("lora[r=4,use_dora=true]", "lora[r=2,use_dora=true]", r"setting r is 2 in the folder and 4"),
    ("seq_bn[reduction_factor=4]", "seq_bn[reduction_factor=4,non_linearity=gelu]",
     r"setting non_linearity is 'gelu' in the folder and 'relu'"),
    ("seq_bn[reduction_factor=4]", "seq_bn[reduction_factor=8]", r"setting bottleneck is 4 in the folder and 8"),
    ("prompt_tuning[num_virtual_tokens=4]", "prompt_tuning[num_virtual_tokens=6]",
     r"model-level adapter: its setting num_virtual_tokens is 6 in the folder and 4"),
]


@pytest.mark.parametrize("slot_spec, file_spec, message", REFUSALS)
def test_incompatible_adapter_is_refused_naming_the_difference_and_nothing_changes(tmp_path, slot_spec, file_spec,
                                                                                  message):
    first, _ = _saved(tmp_path / "a", slot_spec, seed=1)
    other, _ = _saved(tmp_path / "b", file_spec, seed=2)
    model = _loaded(first)
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError, match=message):
        model.hotswap_adapter(other)
    _assert_unchanged(model, before)


def test_task_head_of_another_shape_is_refused(tmp_path):
    from transformers import BertForSequenceClassification

    two_labels = build_tiny("bert").config
    two_labels.num_labels = 2
    torch.manual_seed(0)
    other, _ = _saved(tmp_path / "two", "lora[r=4]", seed=2, arch="bert",
                      base=BertForSequenceClassification(two_labels).eval())
    first, _ = _saved(tmp_path / "three", "lora[r=4]", seed=1, arch="bert")
    model = _loaded(first, "bert")
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError, match=r"task head .*classifier\.weight is \(2, 32\) in the folder and "
                                               r"\(3, 32\) in 'default'"):
        model.hotswap_adapter(other)
    _assert_unchanged(model, before)


def test_merged_adapter_another_base_model_and_unknown_names_are_refused(tmp_path):
    first, _ = _saved(tmp_path / "a", "lora[r=4]", seed=1)
    second, _ = _saved(tmp_path / "b", "lora[r=4]", seed=2)
    gpt2, _ = _saved(tmp_path / "gpt2", "lora[r=4]", seed=2, arch="gpt2")
    model = _loaded(first)
    model.merge_adapter()
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError, match="'default' is merged into the base weights.*unmerge_adapter"):
        model.hotswap_adapter(second)
    _assert_unchanged(model, before)
    model.unmerge_adapter()
    before = _snapshot(model)
    with pytest.raises(AdapterLoadError, match="model_type='gpt2'"):
        model.hotswap_adapter(gpt2)
    with pytest.raises(AdapterError, match="no adapter named 'missing'"):
        model.hotswap_adapter(second, "missing")
    with pytest.raises(AdapterLoadError, match="is not an adapter folder"):
        model.hotswap_adapter(str(tmp_path / "nowhere"))
    _assert_unchanged(model, before)


@pytest.mark.parametrize("slot_spec, file_spec", [
    ("lora[r=4,alpha=8,use_dora=true]", "lora[r=4,alpha=16,use_dora=true]"),
    ("lora[r=4,alpha=8,use_dora=true]", "lora[r=4,alpha=4,use_rslora=true,use_dora=true]"),
])
def test_dora_of_another_alpha_is_rescaled_into_b(tmp_path, slot_spec, file_spec):
    """DoRA uses B only as scale * B (in the row norms too), so another alpha folds into B exactly."""
    first, _ = _saved(tmp_path / "a", slot_spec, seed=1)
    second, second_out = _saved(tmp_path / "b", file_spec, seed=2)
    model = _loaded(first)
    params = [id(p) for p in model.parameters()]
    scales = [m.scale for m in adapter_modules(model).values()]
    model.hotswap_adapter(second)
    torch.testing.assert_close(output_of(model, "llama"), second_out, atol=1e-5, rtol=1e-5)
    assert [id(p) for p in model.parameters()] == params
    assert [m.scale for m in adapter_modules(model).values()] == scales  # the compiled constant stays


# -- a swap that fails part-way ---------------------------------------------------------------------

def _hooks(model: torch.nn.Module) -> dict[str, list[int]]:
    """Module name -> the ids of its forward hooks and forward pre-hooks, for every module that holds any."""
    held = {name: [*m._forward_pre_hooks, *m._forward_hooks] for name, m in model.named_modules()}
    return {name: ids for name, ids in held.items() if ids}


@pytest.mark.parametrize("arch, spec, failing, calls", [
    ("llama", "prefix_tuning[num_virtual_tokens=2,use_gating=true]", "adapted_sites", 0),  # its gate hooks are on
    ("bert", "unipelt", "new_layer_adapter", 1),  # the gated prefix's hooks and one site's adapter are made
])
@pytest.mark.parametrize("error", [ConfigError("no such site"), RuntimeError("out of memory")])
def test_a_swap_failing_while_the_folder_is_built_leaves_the_model_exactly_as_it_was(
        tmp_path, monkeypatch, arch, spec, failing, calls, error):
    """Regression: the failure skipped undoing what the folder's half-built model-level adapter had changed in
    the model (a gated prefix's forward pre-hooks stayed on every attention module)."""
    first, _ = _saved(tmp_path / "a", spec, seed=1, arch=arch)
    other, _ = _saved(tmp_path / "b", spec, seed=2, arch=arch)
    model = _loaded(first, arch).eval()
    before, hooks, output = _snapshot(model), _hooks(model.base_model), output_of(model, arch)
    seen = _fail_after(monkeypatch, failing, calls, error)
    expected = AdapterLoadError if isinstance(error, ConfigError) else RuntimeError
    with pytest.raises(expected, match="no such site" if expected is AdapterLoadError else "out of memory"):
        model.hotswap_adapter(other)
    assert len(seen) == calls + 1  # it failed part-way, where the test says
    monkeypatch.undo()
    _assert_unchanged(model, before)
    assert _hooks(model.base_model) == hooks
    assert list(model.adapters) == ["default"]
    assert torch.equal(output_of(model, arch), output)


def test_a_swap_failing_after_a_pissa_site_was_built_gives_the_base_weight_back(tmp_path, monkeypatch):
    """The folder's first LoRA module, PiSSA-initialized, moved the principal part of its base weight into its
    factors; the failure at the next site gives it back (within float rounding, as deleting such an adapter
    does: LoraLinear.removed)."""
    spec = "lora[r=4,init_lora_weights=pissa]"
    first, _ = _saved(tmp_path / "a", spec, seed=1)
    other, _ = _saved(tmp_path / "b", spec, seed=2)
    model = _loaded(first).eval()
    weights = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    _fail_after(monkeypatch, "new_layer_adapter", 1, ConfigError("no such site"))
    with pytest.raises(AdapterLoadError, match="no such site"):
        model.hotswap_adapter(other)
    monkeypatch.undo()
    after = dict(model.base_model.named_parameters())
    assert after.keys() == weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(after[name].detach(), weight, atol=1e-6, rtol=0)


def _fail_after(monkeypatch: pytest.MonkeyPatch, method: str, calls: int, error: Exception) -> list[tuple]:
    """Make ``AdaptedModel.<method>`` raise ``error`` once it has been called ``calls`` times; returns the list
    its calls' arguments are noted in."""
    real = getattr(AdaptedModel, method)
    seen = []

    def fails_after_some_calls(self, *args, **kwargs):
        seen.append(args)
        if len(seen) > calls:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedModel, method, fails_after_some_calls)
    return seen
