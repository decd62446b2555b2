"""P-tuning as a PEFT user meets it: PEFT's PromptEncoderConfig object with options PEFT ignores, and a
classifier's folder read by the real ``peft`` with the same predictions."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import ConfigError
from tests.composition_util import logits
from tests.tiny_models import build_tiny, sample_inputs

peft = pytest.importorskip("peft")


def test_peft_s_object_with_mlp_dropout_is_read_as_peft_reads_it() -> None:
    """docs/methods/prompt_tuning.md: a spec with the MLP and encoder_dropout is refused, PEFT's own object is
    read as PEFT reads it (the MLP ignores the option), so both libraries start from the same encoder."""
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16, encoder_dropout=0.1)
    with pytest.raises(ConfigError, match="encoder_dropout=0.1 has no effect with the MLP encoder"):
        peftkit.adapt(build_tiny("llama"), "p_tuning[num_virtual_tokens=4,encoder_dropout=0.1]")
    torch.manual_seed(0)
    ours = peftkit.adapt(build_tiny("llama"), peft.PromptEncoderConfig(**config))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build_tiny("llama"), peft.PromptEncoderConfig(**config))
    assert ours.trainable_parameters()[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    inputs = sample_inputs("llama")
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_a_classifier_folder_predicts_the_same_in_peft(kind: str, tmp_path) -> None:
    spec = f"p_tuning[num_virtual_tokens=4,encoder_reparameterization_type={kind},modules_to_save=[classifier]]"
    model = peftkit.adapt(build_tiny("bert"), spec)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = sample_inputs("bert")
    for _ in range(2):
        opt.zero_grad()
        model(**inputs, labels=torch.tensor([0, 2])).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "cls")
    theirs = peft.PeftModel.from_pretrained(build_tiny("bert"), str(tmp_path / "cls")).eval()
    ours = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path / "cls"))
    torch.testing.assert_close(logits(theirs, inputs), logits(model, inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(ours, inputs), logits(model, inputs), atol=1e-6, rtol=0)
