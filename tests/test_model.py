"""The adapted-model wrapper: adapters by name, activation, training mode, and
the integrations users rely on (generate, Trainer, torch.compile)."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterError, TargetError
from peftkit.core.layer import ModulesToSave, TunerLayer
from tests.tiny_models import build_tiny, output_tensor, sample_inputs


def _randomize(model, name, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _out(model, arch="llama"):
    with torch.no_grad():
        return output_tensor(model(**sample_inputs(arch)))


def test_add_list_activate_delete_restores_the_original_modules():
    base = build_tiny("llama")
    original_q = base.model.layers[0].self_attn.q_proj
    reference = _out(base)
    model = peftkit.adapt(base, "lora[r=2]", adapter_name="a")
    model.add_adapter("b", "lora[r=2,target_modules=all-linear]")
    assert list(model.adapters) == ["a", "b"]
    assert model.active_adapters == ["a"]
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    out_a = _out(model)
    model.set_active("b")
    out_b = _out(model)
    assert not torch.allclose(out_a, out_b)
    model.set_active(None)
    torch.testing.assert_close(_out(model), reference)
    model.delete_adapter("a")
    model.delete_adapter("b")
    assert model.adapters == {}
    assert base.model.layers[0].self_attn.q_proj is original_q
    assert not any(isinstance(m, TunerLayer) for m in base.modules())
    with pytest.raises(AdapterError, match="no adapter named 'a'"):
        model.delete_adapter("a")


def test_adapter_names_are_checked():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    with pytest.raises(AdapterError, match="already exists"):
        model.add_adapter("default", "lora")
    for bad in ("a.b", "", "__base__", "x y", "x\n"):  # "x\n": a pattern ending in $ would take it
        with pytest.raises(AdapterError, match="invalid"):
            model.add_adapter(bad, "lora")
    for taken in ("to", "half", "train", "forward"):  # nn.ModuleDict attributes cannot key adapters
        with pytest.raises(AdapterError, match=f"{taken!r} is taken by torch.*{taken}_adapter"):
            model.add_adapter(taken, "lora")
    assert list(model.adapters) == ["default"]


def test_failed_add_leaves_the_model_as_it_was():
    base = build_tiny("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.AdaptedModel(base)
    with pytest.raises(peftkit.TargetError):
        model.add_adapter("x", 'lora[target_modules=["nope"]]')
    assert model.adapters == {}
    assert base.state_dict().keys() == before.keys()


def test_disable_adapters_context():
    base = build_tiny("llama")
    reference = _out(base)
    model = peftkit.adapt(base, "lora[r=2,init_weights=false]")
    adapted = _out(model)
    assert not model.adapters_disabled
    with model.disable_adapters():
        torch.testing.assert_close(_out(model), reference)
        assert model.adapters_disabled and model.active_composition == "default"  # kept for when it ends
    torch.testing.assert_close(_out(model), adapted)
    assert not model.adapters_disabled
    model.disable_adapters()
    assert model.adapters_disabled
    model.enable_adapters()
    assert not model.adapters_disabled


def test_peft_and_adapterhub_names_say_what_to_use_instead():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    with pytest.raises(AttributeError, match=r"AdaptedModel has no 'disable_adapter' .*model\.disable_adapters\(\)"):
        model.disable_adapter()
    with pytest.raises(AttributeError, match=r"'peft_config' .* use model\.adapters"):
        _ = model.peft_config
    assert not hasattr(model, "add_adapter_fusion")  # still an AttributeError, so hasattr() stays False
    with pytest.raises(AttributeError, match="no attribute 'not_a_thing'"):
        _ = model.not_a_thing
    assert model.config.model_type == "llama"  # everything else still comes from the wrapped model


def test_trainable_report_and_freezing():
    base = build_tiny("llama")
    total = sum(p.numel() for p in base.parameters())
    model = peftkit.adapt(base, "lora[r=4]")
    trainable, all_params = model.trainable_parameters()
    # q_proj: 32->32, v_proj: 32->16 (GQA), two layers: r*(in+out) each
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert trainable == expected
    assert all_params == total + expected
    report = model.parameter_report()
    assert report["adapters"] == {"default": expected}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "adapters" not in n)


def test_modules_to_save_keeps_a_head_per_adapter():
    base = build_tiny("bert")  # BertForSequenceClassification: the head is saved by default
    model = peftkit.adapt(base, "lora[r=2]", adapter_name="a")
    model.add_adapter("b", "lora[r=2]")
    assert isinstance(base.classifier, ModulesToSave)
    assert set(base.classifier.copies) == {"a", "b"}
    model.train_adapter("a")
    head_a = base.classifier.copies["a"]
    assert all(p.requires_grad for p in head_a.parameters())
    assert not any(p.requires_grad for p in base.classifier.copies["b"].parameters())
    assert not any(p.requires_grad for p in base.classifier.original_module.parameters())
    with torch.no_grad():
        head_a.weight.add_(1.0)
    out_a = _out(model, "bert")
    model.set_active("b")
    assert not torch.allclose(out_a, _out(model, "bert"))
    model.delete_adapter("a")
    model.delete_adapter("b")
    assert isinstance(base.classifier, torch.nn.Linear)


def test_generate_uses_the_adapter():
    base = build_tiny("llama")
    prompt = torch.tensor([[5, 6, 7, 8]])
    plain = base.generate(prompt, max_new_tokens=6, do_sample=False)
    model = peftkit.adapt(base, "lora[r=4,init_weights=false,alpha=64]")
    model.eval()
    adapted = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    with model.disable_adapters():
        again = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(again, plain)
    assert adapted.shape == plain.shape and not torch.equal(adapted, plain)
    # greedy generate == step-by-step argmax of the adapted model
    ids = prompt
    for _ in range(6):
        with torch.no_grad():
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(ids, adapted)


def test_transformers_trainer_trains_the_adapter(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = build_tiny("llama")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peftkit.adapt(base, "lora[r=8,alpha=16,target_modules=all-linear]")
    pattern = torch.arange(3, 19).repeat(2)  # a sequence the model can learn
    rows = [{"input_ids": pattern[i:i + 12], "labels": pattern[i:i + 12]} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4,
                             learning_rate=3e-2, report_to=[], save_strategy="no", logging_steps=5,
                             remove_unused_columns=False, label_names=["labels"], use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.2, losses  # deterministic (seeded)
    assert result.global_step == 30
    lora_state = {k: v for k, v in base.state_dict().items() if ".adapters." in k}
    assert any(v.abs().sum() > 0 for k, v in lora_state.items() if "lora_B" in k)
    for key, value in base.state_dict().items():
        if ".adapters." in key:
            continue
        original = key.replace(".base_layer", "")
        assert torch.equal(value, base_state[original]), f"base weight {key} changed"


def test_torch_compile_matches_eager():
    base = build_tiny("llama")
    model = peftkit.adapt(base, "lora[r=4,init_weights=false]")
    model.eval()
    inputs = sample_inputs("llama")
    eager = _out(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        out = output_tensor(compiled(**inputs))
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)


def test_targets_only_inside_the_task_head_are_refused_and_leave_the_model_as_it_was():
    model = peftkit.AdaptedModel(build_tiny("bert"))  # BertForSequenceClassification: its head is saved whole
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(TargetError, match=r"inside modules_to_save=\['classifier'\].*would adapt nothing"):
        model.add_adapter("head_only", 'lokr[r=2,target_modules=["classifier"]]')
    assert list(model.adapters) == []
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_load_adapter_activates_the_loaded_adapter_unless_told_not_to(tmp_path):
    """Unlike PEFT's and AdapterHub's load_adapter (docs/migrating.md): the loaded adapter becomes the
    active one; ``activate=False`` keeps the active setup as it was."""
    saved = peftkit.adapt(build_tiny("llama"), "lora[r=2]", "b")
    _randomize(saved, "b", 3)
    saved.save_adapter(str(tmp_path / "b"), "b")
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]", "a")
    model.set_active("a")
    model.load_adapter(str(tmp_path / "b"), "b", activate=False)
    assert model.active_adapters == ["a"]
    model.load_adapter(str(tmp_path / "b"), "b2")
    assert model.active_adapters == ["b2"]
    torch.testing.assert_close(_out(model), _out(saved))


@pytest.mark.parametrize("spec", ["prompt_tuning[num_virtual_tokens=3]", "seq_bn", "lora[r=2]"])
def test_unload_removes_layer_and_input_adapters_without_merging(spec):
    base = build_tiny("llama")
    expected = _out(base)
    model = peftkit.adapt(base, spec)
    _randomize(model, "default", 1)
    adapted = _out(model)  # prompt tuning: longer by its virtual tokens
    assert adapted.shape != expected.shape or not torch.allclose(adapted, expected)
    bare = model.unload()
    assert bare is base and not any(isinstance(m, TunerLayer) for m in bare.modules())
    torch.testing.assert_close(_out(bare), expected)
