"""Tiny transformers models for :mod:`peftkit.testing` (no downloads).

Every model is built from a transformers config (hidden size 32, 2 layers,
vocabulary 128) with seeded weights, so a conformance run needs no network
and takes seconds. ``build_tiny(name)`` returns a fresh copy each call (the
first build of each architecture is cached and deep-copied), and
``sample_inputs(name)`` a matching batch.

A plugin that adds an architecture can test against its own tiny model:
pass a :class:`TinyModel` to ``peftkit.testing.check_method(architectures=...)``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    import torch.nn as nn

#: Vocabulary size of every tiny model; sample inputs use ids 3..VOCAB-1.
VOCAB = 128


def _llama() -> "nn.Module":
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, pad_token_id=0))


def _mistral() -> "nn.Module":
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                            max_position_embeddings=128, pad_token_id=0))


def _qwen2() -> "nn.Module":
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, pad_token_id=0))


def _gpt2() -> "nn.Module":
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _bert() -> "nn.Module":
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=VOCAB,
                                                    max_position_embeddings=128, num_labels=3))


def _roberta() -> "nn.Module":
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64,
                                                          vocab_size=VOCAB, max_position_embeddings=130,
                                                          num_labels=3, pad_token_id=1))


def _t5() -> "nn.Module":
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                                               num_heads=4, d_kv=8, vocab_size=VOCAB, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


def _token_inputs(batch: int, seq: int, seed: int, decoder: bool) -> dict[str, "torch.Tensor"]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if decoder:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=gen)
    return inputs


@dataclass(frozen=True)
class TinyModel:
    """A small model to run conformance checks on.

    ``build()`` returns a new model (any ``nn.Module``; transformers models get
    the architecture table's default targets); ``inputs(batch, seed)`` returns
    keyword arguments for its forward, with ``batch`` rows.
    """

    name: str
    build: Callable[[], "nn.Module"]
    inputs: Callable[[int, int], dict[str, Any]]


def _text_model(name: str, build: Callable[[], "nn.Module"], decoder: bool = False) -> TinyModel:
    return TinyModel(name, build, lambda batch, seed: _token_inputs(batch, 8, seed, decoder))


#: The built-in tiny models, by architecture name.
TINY_MODELS: dict[str, TinyModel] = {
    "llama": _text_model("llama", _llama),
    "mistral": _text_model("mistral", _mistral),
    "qwen2": _text_model("qwen2", _qwen2),
    "gpt2": _text_model("gpt2", _gpt2),
    "bert": _text_model("bert", _bert),
    "roberta": _text_model("roberta", _roberta),
    "t5": _text_model("t5", _t5, decoder=True),
}


def tiny_model(name: str | TinyModel) -> TinyModel:
    """The :class:`TinyModel` for an architecture name (or the TinyModel itself)."""
    if isinstance(name, TinyModel):
        return name
    try:
        return TINY_MODELS[name]
    except KeyError:
        raise ValueError(f"no tiny model for architecture {name!r}; built in: {', '.join(TINY_MODELS)} "
                         f"(or pass a peftkit.testing.TinyModel)") from None


@functools.lru_cache(maxsize=None)
def _prototype(name: str, seed: int) -> "nn.Module":
    import torch

    torch.manual_seed(seed)
    return with_bias_noise(TINY_MODELS[name].build().eval())


def with_bias_noise(model: "nn.Module", std: float = 0.02) -> "nn.Module":
    """``model`` with seeded noise on the biases of its linear layers (transformers initializes them to 0), so
    that a merge that forgets a layer's bias, or a method that reads it wrongly, changes the output."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
            if is_linear and isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point:
                bias.add_(torch.randn(bias.shape, generator=generator, dtype=bias.dtype) * std)
    return model


def build_tiny(name: str | TinyModel, seed: int = 0) -> "nn.Module":
    """A fresh tiny model in eval mode with seeded weights (the same weights for the same seed), its linear layers'
    biases not zero (:func:`with_bias_noise`)."""
    import torch

    if isinstance(name, TinyModel):
        torch.manual_seed(seed)
        return with_bias_noise(name.build().eval())
    tiny_model(name)  # a clear error for an unknown name
    return copy.deepcopy(_prototype(name, seed))


def sample_inputs(name: str | TinyModel, batch: int = 2, seed: int = 1) -> dict[str, Any]:
    """A batch of inputs for the tiny model (random token ids, no padding)."""
    return tiny_model(name).inputs(batch, seed)


def output_tensor(output: Any) -> "torch.Tensor":
    """The main tensor of a model output (``logits``, else the first element)."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output
