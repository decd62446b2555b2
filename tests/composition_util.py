"""Helpers shared by the composition, fusion and merging tests."""

from __future__ import annotations

import torch

import peftkit
from tests.tiny_models import build_tiny, sample_inputs

LORA_ALL = 'lora[r=4,alpha=8,init_weights=false,target_modules="all-linear"]'


def lora_model(names: tuple[str, ...] = ("a", "b"), spec: str = LORA_ALL, model: str = "llama",
               seed: int = 0) -> peftkit.AdaptedModel:
    """A tiny model with one random (non-identity) LoRA adapter per name, in eval mode."""
    adapted = peftkit.AdaptedModel(build_tiny(model))
    for i, name in enumerate(names):
        torch.manual_seed(seed + 100 + i)
        adapted.add_adapter(name, spec)
    return adapted.eval()


def logits(model: peftkit.AdaptedModel, inputs: dict, active=None, **kwargs) -> torch.Tensor:
    """Output logits with ``active`` set (None: keep the current composition)."""
    if active is not None:
        model.set_active(active)
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def inputs(batch: int = 4, seq: int = 6, model: str = "llama", seed: int = 1) -> dict:
    return sample_inputs(model, batch=batch, seq=seq, seed=seed)


def copy_adapter(model: peftkit.AdaptedModel, source: str, target: str, scale_b: float = 1.0) -> None:
    """Give ``target`` the weights of ``source`` (LoRA), with B scaled by ``scale_b``."""
    with torch.no_grad():
        for _, layer in model.tuner_layers():
            if source in layer.adapters:
                a_src, b_src, _ = layer.adapters[source].low_rank()
                a_dst, b_dst, _ = layer.adapters[target].low_rank()
                a_dst.copy_(a_src)
                b_dst.copy_(b_src * scale_b)


def assert_saves_and_loads(model: peftkit.AdaptedModel, name: str, folder, atol: float = 1e-5) -> None:
    """Adapter ``name`` saved to ``folder`` gives the same logits loaded here and in the real peft (tiny Llama)."""
    import warnings

    from peft import PeftModel

    batch = inputs()
    expected = logits(model, batch, name)
    model.save_adapter(folder, name)
    loaded = peftkit.AdaptedModel.from_pretrained(build_tiny("llama"), str(folder))
    assert torch.allclose(logits(loaded, batch), expected, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(build_tiny("llama"), str(folder)).eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, expected, atol=atol)
