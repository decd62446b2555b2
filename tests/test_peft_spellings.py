"""What users of Hugging Face PEFT and AdapterHub write works as they mean it: a ``peft.LoraConfig`` object as the
spec, AdapterHub's ``add_adapter(name, config=...)``, PEFT's ``is_trainable`` and ``safe_merge``/``progressbar``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterError, ConfigError, MergeError
from tests.method_helpers import output_of, randomize
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")


def test_a_peft_config_object_is_the_adapter_peft_would_make(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             init_lora_weights=False)
    ours = peftkit.adapt(build_tiny("llama"), config)
    assert ours.adapters["default"].r == 4 and ours.adapters["default"].alpha == 8.0
    assert sorted(ours.adapters["default"].target_modules) == ["q_proj", "v_proj"]
    ours.save_adapter(str(tmp_path / "a"))
    theirs = peft.PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "a")).eval()
    assert theirs.peft_config["default"].r == 4
    # the same numbers up to float rounding (their products run in another order, which CPU BLAS may round apart)
    torch.testing.assert_close(output_of(ours.eval(), "llama"), output_of(theirs, "llama"), atol=1e-6, rtol=0)
    ia3 = peftkit.adapt(build_tiny("llama"), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                            feedforward_modules=["down_proj"]))
    assert ia3.adapters["default"].feedforward_modules == ["down_proj"]


def test_a_peft_option_peftkit_lacks_is_refused_by_name() -> None:
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 1]])
    with pytest.raises(ConfigError, match=r"peft.LoraConfig: .*layer_replication=\[\[0, 1\]\] is not supported"):
        peftkit.adapt(build_tiny("llama"), config)


def test_a_setting_outside_pefts_saved_config_is_refused_by_name() -> None:
    """PEFT's SHiRA takes a custom mask function set on the config object, which its to_dict() (the saved
    adapter_config.json) leaves out: read as that file, the function would be dropped in silence."""
    config = peft.ShiraConfig(r=2, target_modules=["q_proj"])
    config.mask_fn = lambda base_layer, r, **kwargs: None
    with pytest.raises(ConfigError, match=r"peft.ShiraConfig has mask_fn set on the object.*save it and load the "
                                          r"folder with peftkit.from_pretrained"):
        peftkit.adapt(build_tiny("llama"), config)
    for untouched in (peft.ShiraConfig(r=2, target_modules=["q_proj"]), peft.LoraConfig(r=2, target_modules=["q_proj"])):
        peftkit.adapt(build_tiny("llama"), untouched)  # the attributes PEFT sets itself are no such setting


def test_adapterhubs_config_keyword_names_the_method() -> None:
    model = peftkit.AdaptedModel(build_tiny("llama"))
    model.add_adapter("a", config="ia3")
    assert model.adapter_record("a").method.name == "ia3"
    with pytest.raises(AdapterError, match=r"got spec and config=; pass the method once"):
        model.add_adapter("b", "lora", config="ia3")
    for config in (peftkit.LoraConfig(r=4), peft.LoraConfig(r=4)):  # transformers' order: config, then name
        with pytest.raises(AdapterError, match=r"takes the adapter's name first, then its method: "
                                               r"add_adapter\('b', LoraConfig\(...\)\)"):
            model.add_adapter(config, "b")
    assert list(model.adapters) == ["a"]


def test_is_trainable_is_trainable(tmp_path: Path) -> None:
    peftkit.adapt(build_tiny("llama"), "lora[r=2]").save_adapter(str(tmp_path / "a"))
    model = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"), is_trainable=True)
    assert all(p.requires_grad for p in model.adapter_parameters("default"))
    frozen = peftkit.AdaptedModel.from_pretrained(build_tiny("llama"), str(tmp_path / "a"), is_trainable=False)
    assert not any(p.requires_grad for p in frozen.adapter_parameters("default"))
    frozen.load_adapter(str(tmp_path / "a"), "b", is_trainable=True)
    assert all(p.requires_grad for p in frozen.adapter_parameters("b"))
    with pytest.raises(AdapterError, match="trainable=True and is_trainable=False disagree"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"), trainable=True, is_trainable=False)


def test_safe_merge_refuses_a_non_finite_weight_and_merges_nothing() -> None:
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    randomize(model, "default", seed=1)
    model.add_adapter("broken", "lora[r=2]")
    randomize(model, "broken", seed=2)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "broken" in n and "lora_B" in n)[0, 0] = float("nan")
    weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if ".adapters." not in n}
    with pytest.raises(MergeError, match=r"merging adapter 'broken' into model.layers.0.self_attn.q_proj gives a "
                                         r"weight with NaN or inf values \(safe_merge\).*nothing was merged"):
        model.merge_adapter(["default", "broken"], safe_merge=True)
    assert model.merged_adapters == []  # the layers merged before it were unmerged: the weights as they were
    assert all(torch.allclose(p, weights[n], atol=1e-6) for n, p in model.base_model.named_parameters()
               if n in weights)
    assert all(bool(torch.isfinite(p).all()) for n, p in model.base_model.named_parameters() if n in weights)
    model.set_active("default")
    expected = output_of(model.eval(), "llama")
    bare = model.merge_and_unload("default", progressbar=True, safe_merge=True)
    assert torch.allclose(output_of(bare, "llama"), expected, atol=1e-5)


def test_adapterhubs_adapter_summary_points_at_peftkits_equivalents() -> None:
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    with pytest.raises(AttributeError, match=r"no 'adapter_summary' \(the PEFT / AdapterHub name\); use "
                                             r"model.print_trainable_parameters\(\)"):
        model.adapter_summary()


def test_adapterhubs_train_embeddings_says_how_peftkit_trains_the_embedding() -> None:
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    with pytest.raises(AdapterError, match=r"train_embeddings=True: .*modules_to_save=\['embed_tokens'\]"):
        model.train_adapter("default", train_embeddings=True)
    with_embedding = peftkit.adapt(build_tiny("llama"), "lora[r=2,modules_to_save=[embed_tokens]]")
    assert any("embed_tokens" in n for n, p in with_embedding.named_parameters() if p.requires_grad)


def test_adapterhubs_load_as_and_set_active_name_the_adapter_and_its_activation(tmp_path: Path) -> None:
    peftkit.adapt(build_tiny("llama"), "lora[r=2]").save_adapter(str(tmp_path / "a"))
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    model.load_adapter(str(tmp_path / "a"), load_as="task", set_active=False)
    assert "task" in model.adapters and model.active_adapters == ["default"]
    model.load_adapter(str(tmp_path / "a"), load_as="other", set_active=True)
    assert model.active_adapters == ["other"]
    with pytest.raises(AdapterError, match="adapter_name='x' and load_as='y'; pass the name once"):
        model.load_adapter(str(tmp_path / "a"), "x", load_as="y")
    assert "x" not in model.adapters and "y" not in model.adapters


@pytest.mark.parametrize("option, says", [
    ("with_head", r"with_head=: AdapterHub's option: .*default_head=False"),
    ("use_safetensors", r"use_safetensors=: peftkit always writes safetensors"),
    ("meta_dict", r"meta_dict=: AdapterHub's option: card facts go in as keyword arguments of their own: task="),
    ("selected_adapters", r"selected_adapters=: PEFT's option: save_pretrained\(path, adapter_names=\[...\]\)"),
    ("colour", r"colour= is not a card field"),
])
def test_a_save_option_peftkit_lacks_is_refused_before_anything_is_written(tmp_path: Path, option, says) -> None:
    """Card fields arrive as keyword arguments; another library's save option used to vanish among them (the
    head saved although with_head=False said otherwise)."""
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    for save, call in ((model.save_adapter, "save_adapter()"), (model.save_pretrained, "save_pretrained()")):
        with pytest.raises(ConfigError, match=rf"{re.escape(call)} got {option}=, which it does not take \({says}"):
            save(str(tmp_path / "out"), **{option: False})
        assert not (tmp_path / "out").exists()
    model.save_adapter(str(tmp_path / "out"), task="text-classification", license="mit")  # card fields still go


@pytest.mark.parametrize("name, says", [
    ("add_classification_head", "AutoModelForSequenceClassification"),
    ("add_tagging_head", "AutoModelForTokenClassification"),
    ("freeze_model", r"peftkit.adapt\(\) freezes the base model"),
    ("push_adapter_to_hub", r"peftkit.hub.push\(model, repo_id"),
])
def test_adapterhubs_model_methods_point_at_peftkits_way(name, says) -> None:
    model = peftkit.adapt(build_tiny("llama"), "lora[r=2]")
    with pytest.raises(AttributeError, match=rf"no '{name}' \(the PEFT / AdapterHub name\); use .*{says}"):
        getattr(model, name)


def test_peft_keyword_names_of_add_adapter() -> None:
    """PEFT's add_adapter(adapter_name=..., peft_config=...) raised a bare TypeError."""
    model = peftkit.AdaptedModel(build_tiny("llama"))
    model.add_adapter(adapter_name="c", peft_config=peft.LoraConfig(r=4, lora_alpha=8))
    assert model.adapter_record("c").config.r == 4 and model.adapter_record("c").config.alpha == 8
    with pytest.raises(AdapterError, match=r"got spec and peft_config=; pass the method once"):
        model.add_adapter("d", "ia3", peft_config=peft.LoraConfig(r=4))
    with pytest.raises(AdapterError, match=r"got name 'd' and adapter_name='e'; pass the name once"):
        model.add_adapter("d", adapter_name="e")
    with pytest.raises(AdapterError, match=r"needs the new adapter's name"):
        model.add_adapter(spec="lora")
    assert list(model.adapters) == ["c"]
