"""LoRA on nn.Parameters (target_parameters): the stacked expert weights of a tiny Mixtral, against the
real `peft` both ways (same weights -> same logits), merged and unmerged, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError
from peftkit.testing import CHECKS, make_conformance_class, TinyModel

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
SPEC = "lora[r=2,alpha=4,target_parameters=[experts.gate_up_proj,experts.down_proj],init_weights=false]"


def _mixtral(seed: int = 0):
    """A tiny Mixtral: experts.gate_up_proj (experts, 2 * intermediate, hidden), down_proj (experts, hidden,
    intermediate)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, pad_token_id=0)
    return MixtralForCausalLM(config).eval()


def _gpt_oss(seed: int = 0):
    """A tiny GPT-OSS: its experts store weights transposed, (experts, in, out) (``is_transposed``)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=128, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 3:
                param.normal_(0, 0.1)
    return model


MOE_MODELS = {"mixtral": _mixtral, "gpt_oss": _gpt_oss}


def _ids() -> torch.Tensor:
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _peft(base, **extra):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=TARGETS, init_lora_weights=False,
                        **extra)
    return get_peft_model(base, config)


@pytest.mark.parametrize("kind", sorted(MOE_MODELS))
def test_peft_file_loads_in_peftkit_with_the_same_logits(tmp_path, kind):
    build = MOE_MODELS[kind]
    theirs = _peft(build())
    expected = _logits(theirs)
    assert not torch.allclose(expected, _logits(build()), atol=1e-4)  # the adapter changes the output
    theirs.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build(), str(tmp_path))
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(MOE_MODELS))
def test_peftkit_file_loads_in_peft_with_the_same_logits(tmp_path, kind):
    from peft import PeftModel

    build = MOE_MODELS[kind]
    ours = peftkit.adapt(build(), SPEC)
    expected = _logits(ours)
    assert not torch.allclose(expected, _logits(build()), atol=1e-4)
    ours.save_adapter(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == TARGETS and saved["target_modules"] == []
    theirs = PeftModel.from_pretrained(build(), str(tmp_path))
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)


def test_same_shapes_and_keys_as_peft_and_counted():
    theirs = _peft(_mixtral())
    peft_keys = {k.replace(".default", ""): tuple(v.shape)
                 for k, v in theirs.state_dict().items() if "lora_" in k}
    ours = peftkit.adapt(_mixtral(), SPEC)
    from peftkit.core.serialization import adapter_tensors

    our_keys = {k: tuple(v.shape) for k, v in adapter_tensors(ours, "default").items()}
    assert our_keys == peft_keys
    assert sum(p.numel() for p in ours.adapter_parameters("default")) == \
        sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)


def test_merge_and_unload_gives_the_adapted_weights_and_gradients_reach_the_factors():
    model = peftkit.adapt(_mixtral(), SPEC)
    expected = _logits(model)
    model.base_model.train()
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    grads = [p.grad for p in model.adapter_parameters("default")]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    plain = model.merge_and_unload()
    torch.testing.assert_close(_logits(plain.eval()), expected, atol=1e-5, rtol=0)


def test_rank_pattern_per_parameter_and_errors():
    model = peftkit.adapt(_mixtral(), "lora[r=2,target_parameters=[experts.gate_up_proj,experts.down_proj],"
                                      "rank_pattern={\"down_proj\": 3}]")
    layer = model.base_model.get_submodule("model.layers.0.mlp.experts").adapters["default"]
    assert [f.r for f in layer.factors] == [2, 3]
    with pytest.raises(ConfigError, match="matched no parameter.*model.layers.N.mlp.experts.gate_up_proj"):
        peftkit.adapt(_mixtral(), "lora[target_parameters=[experts.nothing]]")
    with pytest.raises(ConfigError, match="init_weights true, false"):
        peftkit.adapt(_mixtral(), "lora[target_parameters=[experts.down_proj],init_weights=olora]")
    with pytest.raises(ConfigError, match="dropout=0"):
        peftkit.adapt(_mixtral(), "lora[target_parameters=[experts.down_proj],dropout=0.1]")
    with pytest.raises(ConfigError, match="wrong type"):
        peftkit.LoraConfig(target_parameters="experts.down_proj")
    with pytest.raises(ConfigError, match="empty name"):
        peftkit.LoraConfig(target_parameters=[""])


def test_with_target_modules_too_and_composition_refused():
    model = peftkit.adapt(_mixtral(), "lora[target_modules=[q_proj],target_parameters=[experts.down_proj]]")
    names = {n for n, _ in model.base_model.named_modules() if n.endswith(("q_proj", "experts"))}
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.experts" in names
    model.add_adapter("other", "lora[target_parameters=[experts.down_proj]]")
    model.set_active(peftkit.Stack(["default", "other"]))
    with pytest.raises(ConfigError, match="runs alone"):
        _logits(model)


def _mixtral_inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 128, (batch, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


#: The conformance suite on the tiny Mixtral, every check but the composition blocks (such an adapter
#: runs alone at its module; test_with_target_modules_too_and_composition_refused covers the refusal) and
#: "deterministic", which sets dropout, refused on parameters (test_rank_pattern_per_parameter_and_errors).
TestConformance_lora_parameters = make_conformance_class(
    "lora[r=2,target_parameters=[experts.gate_up_proj,experts.down_proj]]",
    architectures=(TinyModel("mixtral", _mixtral, _mixtral_inputs),),
    checks=[c for c in CHECKS if not c.startswith("block_") and c != "deterministic"])


def test_loading_the_lora_method_imports_no_torch():
    """peftkit methods stays fast: LoRA's parameter sites live in a torch-free module."""
    import subprocess
    import sys

    code = ("import sys\nfrom peftkit.core.plugins import get_method\nget_method('lora')\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
