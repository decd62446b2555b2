"""Prompt tuning against a hand computation: the adapted model's output is the base model's output on
the soft prompt written in front of the input's embeddings (attention mask extended with ones), on
decoders and encoders; and it is deterministic in eval mode."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.testing import randomize

from .tiny_models import build_tiny, output_tensor, sample_inputs

P = 3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "roberta"])
def test_prompt_tuning_equals_the_base_model_on_the_prompt_then_the_input(arch):
    model = peftkit.adapt(build_tiny(arch), f"prompt_tuning[num_virtual_tokens={P}]")
    randomize(model, "default", seed=2, scale=0.5)
    model.eval()
    [prompt] = [p for n, p in model.named_parameters() if n.endswith("prompt_embeddings")]  # (P, hidden)
    inputs = sample_inputs(arch)
    with torch.no_grad():
        adapted = output_tensor(model(**inputs))
        again = output_tensor(model(**inputs))
        base = model.base_model
        with model.disable_adapters():
            embedded = base.get_input_embeddings()(inputs["input_ids"])
            batch = embedded.shape[0]
            by_hand = dict(inputs_embeds=torch.cat([prompt.expand(batch, -1, -1), embedded], dim=1),
                           attention_mask=torch.cat([torch.ones(batch, P, dtype=torch.long),
                                                     inputs["attention_mask"]], dim=1))
            expected = output_tensor(base(**by_hand))
            plain = output_tensor(base(**inputs))
    assert torch.equal(adapted, again)
    assert adapted.shape == expected.shape  # causal LMs score the prompt positions too, as PEFT does
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    if adapted.shape == plain.shape:
        assert not torch.allclose(adapted, plain, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_the_prompt_gradient_is_the_batch_sum_of_the_gradients_at_the_prompt_positions(arch):
    """A training step against a hand computation: the base model run on a per-row copy of the prompt
    (a leaf of shape (batch, P, hidden)) in front of the embedded input; the prompt's gradient is that
    leaf's gradient summed over the batch. T5's parameter has 2P rows (PEFT's geometry), of which the
    forward reads the first P: the other P get a zero gradient."""
    model = peftkit.adapt(build_tiny(arch), f"prompt_tuning[num_virtual_tokens={P}]")
    randomize(model, "default", seed=3, scale=0.5)
    model.eval()  # no dropout (T5 has some): both runs must see the same network
    [prompt] = [p for n, p in model.named_parameters() if n.endswith("prompt_embeddings")]
    inputs = sample_inputs(arch)
    labels = inputs["decoder_input_ids"] if arch == "t5" else inputs["input_ids"]
    base = model.base_model
    embedded = base.get_input_embeddings()(inputs["input_ids"]).detach()
    batch = embedded.shape[0]
    head = prompt.detach()[:P].expand(batch, -1, -1).clone().requires_grad_(True)
    by_hand = {k: v for k, v in inputs.items() if k != "input_ids"}
    by_hand["inputs_embeds"] = torch.cat([head, embedded], dim=1)
    by_hand["attention_mask"] = torch.cat([torch.ones(batch, P, dtype=torch.long), inputs["attention_mask"]], 1)
    by_hand["labels"] = (labels if arch == "t5" else
                         torch.cat([torch.full((batch, P), -100, dtype=labels.dtype), labels], dim=1))
    with model.disable_adapters():
        base(**by_hand).loss.backward()
    model(**inputs, labels=labels).loss.backward()
    expected = torch.zeros_like(prompt)
    expected[:P] = head.grad.sum(0)
    assert prompt.shape[0] == (2 * P if arch == "t5" else P)
    assert head.grad.abs().sum() > 0
    torch.testing.assert_close(prompt.grad, expected, atol=1e-6, rtol=1e-5)
