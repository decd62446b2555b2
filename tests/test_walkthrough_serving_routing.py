"""A serving engineer's mixed batches (adapter_names=, PEFT's spelling): the mistakes such a user
makes are refused naming the row and the fix, close names suggested."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.core.errors import AdapterError, CompositionError
from tests.tiny_models import build_tiny, sample_inputs


@pytest.fixture(scope="module")
def served() -> peftkit.AdaptedModel:
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]", "llama-a")
    model.add_adapter("llama-b", "lora[r=2,target_modules=all-linear]")
    return model.eval()


def test_a_misspelled_row_suggests_the_close_name(served: peftkit.AdaptedModel) -> None:
    with pytest.raises(AdapterError, match=r"adapter_names\[1\] is 'llama_b', not on this model.*"
                                           r"did you mean 'llama-b'\?"):
        served(**sample_inputs("llama", batch=3), adapter_names=["llama-a", "llama_b", "__base__"])


def test_a_misspelled_base_row_suggests_base(served: peftkit.AdaptedModel) -> None:
    with pytest.raises(AdapterError, match=r"did you mean '__base__'\?"):
        served(**sample_inputs("llama", batch=2), adapter_names=["llama-a", "__base"])


def test_a_none_row_names_the_row_and_base(served: peftkit.AdaptedModel) -> None:
    with pytest.raises(CompositionError, match=r"adapter_names\[0\] is None; give an adapter name, or "
                                               r"'__base__' for the base model"):
        served(**sample_inputs("llama", batch=2), adapter_names=[None, "llama-a"])


def test_set_active_with_a_misspelled_name_suggests_the_close_name(served: peftkit.AdaptedModel) -> None:
    with pytest.raises(CompositionError, match=r"names adapter 'lama-a'.*did you mean 'llama-a'\?"):
        served.set_active("stack(llama-b, lama-a)")
    with pytest.raises(CompositionError, match=r"names adapter 'lama-b'.*did you mean 'llama-b'\?"):
        served.set_active("lama-b")


def test_transformers_bare_disable_and_enable_adapters_work() -> None:
    """transformers' PEFT integration spells it model.disable_adapters() / model.enable_adapters(): enable
    reached the base model's own method, which failed with a PEFT version error, and a bare disable call
    (a context manager only) silently left the adapters on."""
    served = peftkit.adapt(build_tiny("llama"), "lora[r=4,init_weights=false]").eval()
    ids = torch.arange(12).reshape(2, 6) % 50 + 3
    with torch.no_grad():
        adapted = served(input_ids=ids).logits
        served.disable_adapters()
        bare = served(input_ids=ids).logits
        with served.disable_adapters():  # nested: leaving it keeps them off, as before the block
            assert torch.equal(served(input_ids=ids).logits, bare)
        assert torch.equal(served(input_ids=ids).logits, bare)
        served.enable_adapters()
        assert torch.equal(served(input_ids=ids).logits, adapted)
        with served.disable_adapters():
            assert torch.equal(served(input_ids=ids).logits, bare)
        assert torch.equal(served(input_ids=ids).logits, adapted)
    assert not torch.allclose(bare, adapted)
