"""Unions: several methods as one adapter (AdapterHub's ConfigUnion, and the ``mam`` preset).

A union must behave exactly like its parts added as separate adapters and stacked in the union's
order, under one name: the reference here is built that way, with the same weights copied in.
(The conformance suite runs every generic check on two unions too: tests/test_conformance.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit import ConfigError, Stack, TargetError
from peftkit.core.composition import CompositionError
from peftkit.core.plugins import parse_spec
from peftkit.plugins.union import MamConfig, UnionConfig
from tests.method_helpers import output_of, randomize
from tests.tiny_models import build_tiny, sample_inputs

LAYERS_ONLY = "lora[r=4]|par_bn[reduction_factor=4]"
WITH_PREFIX = "prefix_tuning[num_virtual_tokens=3]|par_bn[reduction_factor=4]"


def _union_and_stack(spec: str, arch: str = "llama") -> tuple[peftkit.AdaptedModel, peftkit.AdaptedModel]:
    """A model with union adapter "u" (non-trivial weights) and one with its parts as adapters named by
    method, stacked in the union's order, holding the same weights."""
    union = peftkit.adapt(build_tiny(arch), spec, adapter_name="u")
    randomize(union, "u", seed=3)
    parts = peftkit.AdaptedModel(build_tiny(arch))
    names = []
    for _, config in union.adapter_record("u").config.part_configs():
        parts.add_adapter(config.method, config)
        names.append(config.method)
    _copy_weights(union, "u", parts, names)
    parts.set_active(Stack(*names))
    return union.eval(), parts.eval()


def _copy_weights(union: peftkit.AdaptedModel, name: str, parts: peftkit.AdaptedModel, names: list[str]) -> None:
    from peftkit.core.serialization import adapter_tensors

    source = adapter_tensors(union, name)
    copied = 0
    with torch.no_grad():
        for part in names:
            for key, target in adapter_tensors(parts, part).items():
                target.copy_(source[_union_key(key, part, source)])
                copied += 1
    assert copied == len(source), "every union tensor has a counterpart among the separate adapters"


def _union_key(key: str, method: str, source: dict[str, torch.Tensor]) -> str:
    """The union's file key for a separate adapter's key: the method name goes before the site-relative part."""
    if f"{method}.{key}" in source:  # model-level part: <method>.<key>
        return f"{method}.{key}"
    for candidate in source:
        prefix, _, rest = candidate.partition(f".{method}.")
        if rest and f"{prefix}.{rest}" == key:
            return candidate
    raise AssertionError(f"no union key for {key!r}")


@pytest.mark.parametrize("spec", [LAYERS_ONLY, WITH_PREFIX, "lora[r=2]|seq_bn[reduction_factor=4]|ia3"])
def test_a_union_equals_its_parts_stacked(spec: str) -> None:
    union, parts = _union_and_stack(spec)
    expected = output_of(parts, "llama")
    assert torch.equal(output_of(union, "llama"), expected)
    assert not torch.allclose(expected, output_of(peftkit.AdaptedModel(build_tiny("llama")), "llama"), atol=1e-4)


def test_shorthand_json_and_preset_forms() -> None:
    method, config = parse_spec(LAYERS_ONLY)
    assert method.name == "union" and isinstance(config, UnionConfig)
    assert [p["method"] for p in config.parts] == ["lora", "par_bn"]
    assert config.parts[0]["r"] == 4 and config.parts[1]["reduction_factor"] == 4
    assert config.to_shorthand() == LAYERS_ONLY
    assert parse_spec(config.to_shorthand())[1] == config
    assert UnionConfig.from_json(config.to_json()) == config
    # a '|' inside a part's brackets (a regex) is the part's, not a union
    _, lora = parse_spec('lora[target_modules="q_proj|v_proj"]')
    assert lora.method == "lora" and lora.target_modules == "q_proj|v_proj"
    # a task head on the union needs the long form, which round-trips too
    headed = UnionConfig(parts=["lora[r=4]", "par_bn"], modules_to_save=["classifier"])
    assert parse_spec(headed.to_shorthand())[1] == headed
    # mam: AdapterHub's MAMConfig defaults, and overridable
    mam = MamConfig()
    assert mam.to_shorthand() == "mam"
    prefix, par = mam.parts
    assert (prefix["method"], prefix["num_virtual_tokens"], prefix["prefix_projection"],
            prefix["encoder_hidden_size"]) == ("prefix_tuning", 30, True, 800)
    assert (par["method"], par["reduction_factor"], par["scaling"]) == ("par_bn", 2, 4.0)
    small = parse_spec('mam[parts=["prefix_tuning[num_virtual_tokens=2]","par_bn"]]')[1]
    assert small.parts[0]["num_virtual_tokens"] == 2 and parse_spec(small.to_shorthand())[1] == small


@pytest.mark.parametrize("spec, message", [
    ("lora|lora[r=2]", "method 'lora' appears twice"),
    ('union[parts=["lora"]]', "at least two parts"),
    ('union[parts=["lora","par_bn"],target_modules=["q_proj"]]', "target_modules is chosen by each part"),
    ('lora[modules_to_save=["lm_head"]]|par_bn', "part 'lora' sets modules_to_save"),
    ("lora|mam", "cannot itself be a union"),
    ("lora|nonexistent[x=1]", "unknown tuning method 'nonexistent'"),
    ('union[parts=[{"r": 4}, "par_bn"]]', "names no method"),
    ("lora[r=0]|par_bn", "lora"),
])
def test_bad_unions_are_clear_errors(spec: str, message: str) -> None:
    with pytest.raises(peftkit.PeftkitError, match=message):
        parse_spec(spec)


def test_parts_reading_different_inputs_at_one_module_are_refused_and_leave_the_model_as_it_was() -> None:
    model = peftkit.AdaptedModel(build_tiny("llama"))
    before = output_of(model, "llama")
    with pytest.raises(TargetError, match=r"lora and par_bn both adapt '.*down_proj' but read different inputs"):
        model.add_adapter("u", 'lora[target_modules=["down_proj"]]|par_bn')
    assert model.adapters == {} and torch.equal(output_of(model, "llama"), before)
    with pytest.raises(ConfigError, match="prefix_tuning and prompt_tuning both change the model's inputs"):
        model.add_adapter("u", "prefix_tuning[num_virtual_tokens=2]|prompt_tuning[num_virtual_tokens=2]")
    assert model.adapters == {} and torch.equal(output_of(model, "llama"), before)


def test_a_refused_union_takes_off_the_hooks_its_parts_had_put_on() -> None:
    """The gated prefix hooks every attention module when made; the refusal that follows removes them."""
    model = peftkit.AdaptedModel(build_tiny("llama"))
    attention = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    assert attention and all(not m._forward_pre_hooks for m in attention)
    with pytest.raises(ConfigError, match="prefix_tuning and prompt_tuning both change the model's inputs"):
        model.add_adapter("u", "prefix_tuning[num_virtual_tokens=2,use_gating=true]|prompt_tuning[num_virtual_tokens=2]")
    assert model.adapters == {} and all(not m._forward_pre_hooks for m in attention)
    model.add_adapter("g", "prefix_tuning[num_virtual_tokens=2,use_gating=true]|par_bn")  # made, it does hook them
    assert all(len(m._forward_pre_hooks) == 1 for m in attention)


def test_training_a_union_trains_every_part_and_nothing_else() -> None:
    model = peftkit.adapt(build_tiny("llama"), WITH_PREFIX, adapter_name="u")
    model.add_adapter("other", "lora[r=2]")
    randomize(model, "u", seed=3)  # off the zero init of LoRA's B and par_bn's up projection: every part gets a gradient
    model.train_adapter("u")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = {id(p) for p in model.adapter_parameters("u")}
    assert trainable and all(id(p) in own for n, p in model.named_parameters() if p.requires_grad)
    assert any("_model_adapters.u.parts.prefix_tuning" in n for n in trainable)
    assert any(".adapters.u.parts.par_bn." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    inputs = sample_inputs("llama")
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_save_load_files_and_composition(tmp_path: Path) -> None:
    union, _ = _union_and_stack(LAYERS_ONLY)
    union.add_adapter("other", "lora[r=2]")
    randomize(union, "other", seed=5)
    union.set_active("u")
    expected = output_of(union, "llama")
    union.save_adapter(str(tmp_path / "u"), "u")
    config = json.loads((tmp_path / "u" / "adapter_config.json").read_text())
    assert config["peft_type"] == "UNION" and config["peftkit"]["method"] == "union"
    assert [p["method"] for p in config["parts"]] == ["lora", "par_bn"]
    assert config["parts"][0]["lora_alpha"] == 8  # each part in its own method's file form
    keys = set(load_file(str(tmp_path / "u" / "adapter_model.safetensors")))
    assert any(k.endswith("q_proj.lora.lora_A.weight") for k in keys)
    assert any(k.endswith("mlp.down_proj.par_bn.adapter_down.weight") for k in keys)

    fresh = peftkit.AdaptedModel(build_tiny("llama"))
    fresh.load_adapter(str(tmp_path / "u"), "u")
    assert torch.equal(output_of(fresh, "llama"), expected)

    # one name in every block, and per-row routing (rows equal separate runs)
    for active in ("stack(u, other)", "average(u, other)", "fuse(u, other)"):
        if active.startswith("fuse"):
            union.add_fusion(active)
        union.set_active(active)
        out = output_of(union, "llama")
        assert out.shape == expected.shape and not torch.allclose(out, expected, atol=1e-5), active
    union.set_active("u")
    inputs = sample_inputs("llama", batch=3)
    routed = union(**inputs, adapter_names=["u", "__base__", "other"]).logits.detach()
    for row, name in enumerate(["u", None, "other"]):
        union.set_active(name)
        with torch.no_grad():
            alone = union(**{k: v[row:row + 1] for k, v in inputs.items()}).logits
        torch.testing.assert_close(routed[row:row + 1], alone, atol=1e-5, rtol=1e-5)


def test_a_union_with_an_input_part_follows_the_core_rules() -> None:
    model = peftkit.adapt(build_tiny("llama"), WITH_PREFIX, adapter_name="u")
    model.add_adapter("other", "lora[r=2]")
    model.set_active("stack(u, other)")  # a direct member of the outermost stack: fine
    with pytest.raises(CompositionError, match="changes the model's inputs"):
        model.set_active("average(u, other)")
    with pytest.raises(CompositionError, match=r"changes the model's inputs .* after set_active\('u'\)"):
        model(**sample_inputs("llama", batch=2), adapter_names=["u", "other"])


def test_merging_a_union_is_refused_clearly() -> None:
    model = peftkit.adapt(build_tiny("llama"), LAYERS_ONLY)
    with pytest.raises(peftkit.MergeError, match="union"):
        model.merge_adapter()
    model.add_adapter("b", LAYERS_ONLY)
    with pytest.raises(peftkit.MergeError, match="union"):
        model.merge_adapters(["default", "b"], name="m")


def test_mam_on_a_real_encoder_trains_and_round_trips(tmp_path: Path) -> None:
    """The preset on BERT (prefix through an MLP of width 800, par_bn at every FFN) for one step."""
    model = peftkit.adapt(build_tiny("bert"), "mam")
    record = model.adapter_record("default")
    assert record.config.parts[0]["num_layers"] is not None  # the prefix's geometry is filled in and saved
    model.train()
    inputs = sample_inputs("bert")
    loss = model(**inputs, labels=torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)).loss
    loss.backward()
    assert all(p.grad is not None for p in model.adapter_parameters("default"))
    model.eval()
    expected = output_of(model, "bert")
    model.save_adapter(str(tmp_path / "mam"))
    fresh = peftkit.AdaptedModel(build_tiny("bert"))
    fresh.load_adapter(str(tmp_path / "mam"), "default")
    assert torch.equal(output_of(fresh, "bert"), expected)


def test_a_part_whose_plugin_is_missing_names_the_distribution_to_install(tmp_path: Path) -> None:
    model = peftkit.adapt(build_tiny("llama"), LAYERS_ONLY)
    model.save_adapter(str(tmp_path / "u"))
    path = tmp_path / "u" / "adapter_config.json"
    config = json.loads(path.read_text())
    assert [(p["method"], p["plugin"]) for p in config["parts"]] == [("lora", "peftkit"), ("par_bn", "peftkit")]
    config["parts"][1].update(method="fancy_bn", plugin="peftkit-fancy", plugin_version="2.1.0")
    path.write_text(json.dumps(config))
    fresh = peftkit.AdaptedModel(build_tiny("llama"))
    with pytest.raises(peftkit.PluginError, match=r"union part: unknown tuning method 'fancy_bn'.*"
                                                  r"pip install 'peftkit-fancy>=2'"):
        fresh.load_adapter(str(tmp_path / "u"), "u")
    assert fresh.adapters == {}
