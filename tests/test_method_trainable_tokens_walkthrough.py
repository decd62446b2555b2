"""Trainable tokens as a PEFT user adds chat tokens to a causal LM: resize, adapt, train, save, load in the
real ``peft`` and back, merge, generate; and the mistakes such a user makes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import TargetError
from tests.tiny_models import VOCAB, build_tiny

peft = pytest.importorskip("peft")

NEW = [VOCAB, VOCAB + 1]  # two added special tokens
BATCH = torch.tensor([[VOCAB, 5, 6, 7, VOCAB + 1, 9], [VOCAB, 20, 21, VOCAB + 1, 22, 23]])


def _resized(arch: str, seed: int) -> torch.nn.Module:
    """The tiny model with two tokens added; ``seed`` draws the new rows (transformers' mean resizing)."""
    model = build_tiny(arch)
    torch.manual_seed(seed)
    model.resize_token_embeddings(VOCAB + 2)
    return model


def _train(model: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        opt.step()
    model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=BATCH).logits


def test_chat_tokens_on_a_tied_model_round_trip_through_peft_merge_and_generate(tmp_path) -> None:
    model = peftkit.adapt(_resized("gpt2", seed=0), f"trainable_tokens[token_indices={NEW}]")
    before = model.get_input_embeddings().base_layer.weight.detach().clone()
    _train(model)
    ours = _logits(model)
    model.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_resized("gpt2", seed=1), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(theirs), ours, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")
    back = peftkit.from_pretrained(_resized("gpt2", seed=2), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(back), ours, rtol=0, atol=1e-5)
    prompt = BATCH[:, :3]
    expected = theirs.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(back.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0), expected)
    merged = back.merge_and_unload()
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    torch.testing.assert_close(_logits(merged), ours, rtol=0, atol=1e-5)
    assert torch.equal(merged.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0),
                       expected)
    after = model.get_input_embeddings().base_layer.weight
    assert torch.equal(after, before)  # training wrote no row of the base weight


def test_an_untied_model_targets_embed_tokens_and_lm_head_as_the_page_says(tmp_path) -> None:
    """docs/methods/trainable_tokens.md: on Llama the new tokens' lm_head rows are trained and saved only when
    lm_head is targeted too; then a fresh resize (other random rows) gives the same logits, in PEFT too."""
    spec = f"trainable_tokens[token_indices={NEW},target_modules=[embed_tokens,lm_head]]"
    model = peftkit.adapt(_resized("llama", seed=0), spec)
    _train(model)
    model.save_pretrained(tmp_path / "ours")
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert keys == {"base_model.model.model.embed_tokens.trainable_tokens_delta",
                    "base_model.model.lm_head.trainable_tokens_delta"}
    theirs = peft.PeftModel.from_pretrained(_resized("llama", seed=1), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=0, atol=1e-5)
    back = peftkit.from_pretrained(_resized("llama", seed=2), str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(back), _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("option, named", [
    ("exclude_modules=[embed_tokens]", "exclude_modules=['embed_tokens'] left out every one"),
    ("layers_to_transform=[0]", "layers_to_transform=[0] left out every one (it keeps only modules inside"),
])
def test_an_option_that_leaves_out_the_embedding_is_named(option: str, named: str) -> None:
    """The page lists exclude_modules and layers_to_transform; when they leave out the embedding the error
    named target_modules and asked "'embed_tokens' is not here; did you mean 'embed_tokens'?"."""
    with pytest.raises(TargetError) as caught:
        peftkit.adapt(build_tiny("llama"), f"trainable_tokens[token_indices=[3],{option}]")
    assert named in str(caught.value) and "did you mean" not in str(caught.value)
