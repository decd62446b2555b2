"""Learning an average() block's weights through the block itself (``model.learn_average``), and head-only
adapters (``target_modules="dummy-target-modules"``, PEFT's name): values against the saved block and peft."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit import Average
from peftkit.core.errors import CompositionError, TargetError
from tests.tiny_models import build_tiny

from .composition_util import inputs, lora_model


def _members() -> peftkit.AdaptedModel:
    """Two random LoRA adapters and an IA3 one (no low-rank change: the block's general path) on a tiny Llama."""
    model = lora_model(("a", "b"))
    torch.manual_seed(7)
    model.add_adapter("c", "ia3[init_ia3_weights=false]")
    return model


def _out(model: peftkit.AdaptedModel, batch: dict, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        return model(**batch).logits.detach()


def test_learned_weights_run_the_block_and_train_to_the_block_that_saves_and_loads_with_the_same_outputs(
        tmp_path: Path) -> None:
    model = _members()
    batch = inputs()
    block = Average("a", "b", "c", "__base__", weights=[0.2, 0.3, 0.1, 0.4])
    model.set_active(block)
    plain = _out(model, batch, grad=False)
    for param in model.parameters():
        param.requires_grad_(False)
    with model.learn_average(block, rest="__base__") as learned:
        assert learned.weights() == pytest.approx([0.2, 0.3, 0.1, 0.4])
        # Live weights (a tensor) and the block's numbers give the same outputs, with and without gradients.
        torch.testing.assert_close(_out(model, batch, grad=True), plain, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(_out(model, batch, grad=False), plain, atol=1e-6, rtol=1e-5)
        # Weights that do not sum to 1 among the members: __base__ carries the rest, exactly as a saved block.
        with torch.no_grad():
            learned.free.copy_(torch.tensor([0.9, -0.6, 1.3]))
        assert learned.weights() == pytest.approx([0.9, -0.6, 1.3, -0.6])
        expected = Average("a", "b", "c", "__base__", weights=[0.9, -0.6, 1.3, -0.6])
        live = _out(model, batch, grad=True)
        assert (live - plain).abs().max() > 1e-3
        # Gradients reach the weights only; a few steps move them and lower the loss.
        optimizer = torch.optim.Adam(learned.parameters(), lr=0.05)
        losses = []
        for _ in range(8):
            loss = model(**batch, labels=batch["input_ids"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0]
        assert all(p.grad is None for p in model.parameters())
        trained = _out(model, batch, grad=True)
        saved = learned.block()
    assert model.adapter_state.learned_averages == {}
    model.set_active(expected)
    torch.testing.assert_close(_out(model, batch, grad=False), live, atol=1e-6, rtol=1e-5)
    # The trained block, saved as a composition folder and loaded on a fresh model, gives the trained outputs.
    model.save_composition(str(tmp_path / "mix"), saved)
    loaded = peftkit.load_composition(build_tiny("llama"), str(tmp_path / "mix"))
    assert loaded.active_composition == saved and saved.weights[-1] == pytest.approx(1 - sum(saved.weights[:-1]))
    torch.testing.assert_close(_out(loaded, batch, grad=False), trained, atol=1e-5, rtol=1e-4)


def test_without_rest_the_learned_weights_are_normalized_as_the_blocks_own() -> None:
    model = _members()
    batch = inputs()
    block = Average("a", "b", "c")
    model.set_active(block)
    with model.learn_average(block) as learned:
        with torch.no_grad():
            learned.free.copy_(torch.tensor([2.0, 1.0, 1.0]))
        live = _out(model, batch, grad=True)
        assert learned.block() == Average("a", "b", "c", weights=[2.0, 1.0, 1.0])
    model.set_active(Average("a", "b", "c", weights=[0.5, 0.25, 0.25]))
    torch.testing.assert_close(_out(model, batch, grad=False), live, atol=1e-6, rtol=1e-5)


def test_learn_average_refuses_what_it_cannot_learn() -> None:
    model = _members()
    with pytest.raises(CompositionError, match="takes an average"):
        with model.learn_average("stack(a, b)"):
            pass
    with pytest.raises(CompositionError, match="'x' is not a child"):
        with model.learn_average("average(a, b)", rest="x"):
            pass
    with pytest.raises(CompositionError, match="not on the model"):
        with model.learn_average("average(a, zzz)"):
            pass
    with model.learn_average("average(a, b)"):
        with pytest.raises(CompositionError, match="already being learned"):
            with model.learn_average("average(a, b)"):
                pass
    assert model.adapter_state.learned_averages == {}


def test_a_head_only_adapter_adapts_no_layer_and_loads_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import BertConfig, BertForSequenceClassification

    def classifier() -> torch.nn.Module:
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=64, vocab_size=100)).eval()

    model = peftkit.adapt(classifier(), "lora[target_modules=dummy-target-modules]", "head")
    record = model.adapter_record("head")
    assert record.sites == [] and record.modules_to_save == ["classifier"] and not list(model.tuner_layers())
    with torch.no_grad():
        for param in model.adapter_parameters("head"):
            param.add_(torch.randn_like(param))
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])}
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_adapter(str(tmp_path / "head"), "head")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(classifier(), str(tmp_path / "head")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected)
    merged = peftkit.AdaptedModel.from_pretrained(classifier(), str(tmp_path / "head")).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected)
    with pytest.raises(TargetError, match="adapts no layer, and modules_to_save names no module"):
        peftkit.adapt(build_tiny("llama"), "lora[target_modules=dummy-target-modules]")


def test_merge_order_folds_an_average_of_lora_adapters_exactly_and_refuses_what_is_no_weight_change() -> None:
    from peftkit.core.composition import as_node
    from peftkit.core.errors import MergeError
    from peftkit.core.merging import merge_order

    model = _members()
    batch = inputs()
    block = as_node("average(a, b, __base__, weights=[0.7, -0.2, 0.5])")
    model.set_active(block)
    expected = _out(model, batch, grad=False)
    names = merge_order(model, as_node(f"stack({block})"))
    assert names == ["merged_average"]
    model.set_active("merged_average")
    torch.testing.assert_close(_out(model, batch, grad=False), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(MergeError, match="c \\(ia3\\) has no low-rank weight change"):
        merge_order(model, as_node("average(a, c)"))
    with pytest.raises(MergeError, match="mixes outputs at run time"):
        merge_order(model, as_node('fuse(a, b, name="f")'))
    with pytest.raises(MergeError, match="predicts with a's head"):
        merge_order(model, as_node("stack(a, b, head=a)"))
