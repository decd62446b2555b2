"""P-tuning (PEFT's P_TUNING, PromptEncoderConfig): a soft prompt made by an MLP or LSTM encoder, side by side
with the real peft: the same start for one seed, the same training, and folders both ways."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit import ConfigError
from peftkit.core.plugins import parse_spec
from tests.composition_util import logits
from tests.method_helpers import check_greedy_generate
from tests.tiny_models import build_tiny, sample_inputs

P = 4
_TASKS = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def _spec(kind: str, **extra: object) -> str:
    options = ",".join([f"num_virtual_tokens={P}", f"encoder_reparameterization_type={kind}",
                        "encoder_hidden_size=16", *(f"{k}={v}" for k, v in extra.items())])
    return f"p_tuning[{options}]"


def _pair(name: str, kind: str, seed: int = 0) -> tuple[peftkit.AdaptedModel, torch.nn.Module]:
    """peftkit's and peft's P-tuning on the same tiny model, each made right after torch.manual_seed(seed)."""
    from peft import PromptEncoderConfig, get_peft_model

    torch.manual_seed(seed)
    ours = peftkit.adapt(build_tiny(name), _spec(kind))
    torch.manual_seed(seed)
    theirs = get_peft_model(build_tiny(name), PromptEncoderConfig(
        task_type=_TASKS[name], num_virtual_tokens=P, encoder_reparameterization_type=kind, encoder_hidden_size=16))
    return ours, theirs


def test_registered_with_honest_capabilities() -> None:
    method = peftkit.get_method("p_tuning")
    assert method.peft_type == "P_TUNING"
    assert method.can_merge is False and method.identity_at_init is False
    assert method.supported_blocks == frozenset({"stack"})
    _, config = parse_spec(_spec("LSTM", encoder_num_layers=3, encoder_dropout=0.1))
    assert parse_spec(config.to_shorthand())[1] == config


@pytest.mark.parametrize("spec, message", [
    (_spec("MLP", encoder_num_layers=3), "encoder_num_layers=3 has no effect with the MLP encoder"),
    (_spec("MLP", encoder_dropout=0.1), "encoder_dropout=0.1 has no effect with the MLP encoder"),
    (_spec("GRU"), "encoder_reparameterization_type='GRU' has the wrong type; expected one of 'MLP', 'LSTM'"),
    (_spec("LSTM", encoder_dropout=1.0), r"encoder_dropout=1.0 must be a number in \[0, 1\)"),
    ("p_tuning[encoder_hidden_size=0]", "encoder_hidden_size=0 must be a positive integer"),
    ("p_tuning[target_modules=['q_proj']]", "target_modules is not used"),
])
def test_bad_configs_name_the_setting(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_one_seed_gives_peft_s_start_and_training_stays_with_peft(name: str, kind: str) -> None:
    ours, theirs = _pair(name, kind)
    inputs = sample_inputs(name)
    assert ours.trainable_parameters()[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ours_opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    theirs_opt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        for model, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            opt.zero_grad()
            model(**inputs).logits.float().pow(2).mean().backward()
            opt.step()
    ours.eval(), theirs.eval()
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
@pytest.mark.parametrize("name", ["llama", "bert", "t5"])
def test_folders_load_both_ways_as_the_trained_prompt(tmp_path, name: str, kind: str) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    ours, theirs = _pair(name, kind, seed=3)
    if name == "bert":  # a trained head, saved with the prompt
        torch.nn.init.normal_(ours.base_model.classifier.copies["default"].weight)
        torch.nn.init.normal_(theirs.base_model.classifier.modules_to_save["default"].weight)
    inputs = sample_inputs(name)
    ours.eval(), theirs.eval()
    ours.save_adapter(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    data = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: data[k] for k in ("peft_type", "encoder_reparameterization_type", "encoder_hidden_size")} == \
        {"peft_type": "P_TUNING", "encoder_reparameterization_type": kind, "encoder_hidden_size": 16}
    assert list(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == ["prompt_embeddings"] or \
        name == "bert"
    peft_reads_ours = PeftModel.from_pretrained(build_tiny(name), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(peft_reads_ours, inputs), logits(ours, inputs), atol=0, rtol=0)
    we_read_peft = peftkit.from_pretrained(build_tiny(name), str(tmp_path / "theirs"))
    peft_reads_peft = PeftModel.from_pretrained(build_tiny(name), str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(logits(we_read_peft, inputs), logits(peft_reads_peft, inputs), atol=0, rtol=0)
    # the live model ran its encoder on a batch of one: the same prompt up to float rounding
    torch.testing.assert_close(logits(we_read_peft, inputs), logits(theirs, inputs), atol=1e-6, rtol=1e-5)
    assert we_read_peft.model_adapter("default").encoder is None  # a loaded prompt is the prompt itself


def test_a_loaded_prompt_trains_on_from_the_saved_output(tmp_path) -> None:
    """Loaded trainable, the prompt is the saved one and its own vectors train (PEFT refuses to load a prompt
    learning adapter trainable: checked here so the docs stay true)."""
    from peft import PeftModel

    model = peftkit.adapt(build_tiny("llama"), _spec("MLP"))
    inputs = sample_inputs("llama")
    model.eval()
    expected = logits(model, inputs)
    model.save_adapter(str(tmp_path / "a"))
    again = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"), is_trainable=True)
    assert torch.equal(logits(again, inputs), expected)
    assert again.trainable_parameters()[0] == P * 32  # the prompt's vectors, no encoder
    again.train()
    again(**inputs).logits.pow(2).mean().backward()
    assert again.model_adapter("default").prompt_embeddings.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "a"), is_trainable=True)


def test_a_peft_config_object_and_a_peft_folder_written_with_ignored_mlp_options(tmp_path) -> None:
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=8)
    model = peftkit.adapt(build_tiny("llama"), config)
    assert model.adapter_record("default").config.encoder_hidden_size == 8
    model.save_adapter(str(tmp_path / "a"))
    path = tmp_path / "a" / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(encoder_num_layers=5, encoder_dropout=0.2)  # what PEFT writes when asked (its MLP ignores them)
    path.write_text(json.dumps(data))
    assert peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a")).adapter_record(
        "default").config.encoder_num_layers == 2


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_greedy_generate_equals_step_by_step_without_cache(name: str) -> None:
    model = peftkit.adapt(build_tiny(name), _spec("LSTM"))
    check_greedy_generate(model, name)


def test_a_loaded_prompt_hot_swaps_in_place_and_a_new_one_refuses(tmp_path) -> None:
    from peftkit import AdapterLoadError

    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        peftkit.adapt(build_tiny("llama"), _spec("LSTM")).save_adapter(str(tmp_path / name))
    inputs = sample_inputs("llama")
    served = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"))
    before = [id(p) for p in served.parameters()]
    served.hotswap_adapter(str(tmp_path / "b"), "default")
    assert [id(p) for p in served.parameters()] == before
    assert torch.equal(logits(served, inputs), logits(peftkit.from_pretrained(build_tiny("llama"),
                                                                              str(tmp_path / "b")), inputs))
    fresh = peftkit.adapt(build_tiny("llama"), _spec("LSTM"))
    with pytest.raises(AdapterLoadError, match="its prompt is computed from other parameters"):
        fresh.hotswap_adapter(str(tmp_path / "b"), "default")


def test_a_forward_without_gradients_runs_under_torch_s_flop_counter() -> None:
    """torch's module tracker (FlopCounterMode) failed on a no-grad forward: the encoder got the parameter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = peftkit.adapt(build_tiny("llama"), _spec("MLP")).eval()
    inputs = sample_inputs("llama")
    with torch.no_grad():
        expected = model(**inputs).logits
        with FlopCounterMode(display=False) as counter:
            got = model(**inputs).logits
    assert counter.get_total_flops() > 0 and torch.equal(got, expected)
