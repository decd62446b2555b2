"""Run in the second virtualenv: LoRA and IA3 of ``adapters`` outside self-attention, with ``leave_out``.

Usage: python make_ffn_fixtures.py OUT_FOLDER

Same layout and helpers as make_fixtures.py (its ``make_case``, given these cases): LoRAConfig with
``intermediate_lora`` / ``output_lora`` (and gated), IA3Config with any ``alpha``, ``output_lora`` and
``leave_out``, on BERT, RoBERTa, Llama and GPT-2 (two layers each). A separate script, so that its
fixtures are cached apart from make_fixtures.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import make_fixtures
from adapters import IA3Config, LoRAConfig

#: case name -> (model type, adapters config, save with safetensors)
CASES = {
    "bert_lora_ffn": ("bert", lambda: LoRAConfig(r=4, alpha=8, intermediate_lora=True, output_lora=True,
                                                 leave_out=[0]), True),
    "roberta_lora_output_only": ("roberta", lambda: LoRAConfig(r=2, alpha=4, selfattn_lora=False,
                                                               output_lora=True), True),
    "bert_lora_ffn_gated": ("bert", lambda: LoRAConfig(r=2, alpha=4, attn_matrices=["k"], intermediate_lora=True,
                                                       output_lora=True, use_gating=True), True),
    "llama_lora_ffn": ("llama", lambda: LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"],
                                                   intermediate_lora=True, output_lora=True, leave_out=[1]), True),
    "gpt2_lora_ffn": ("gpt2", lambda: LoRAConfig(r=4, alpha=8, selfattn_lora=False, intermediate_lora=True,
                                                 output_lora=True, leave_out=[0]), True),
    "gpt2_lora_ffn_gated": ("gpt2", lambda: LoRAConfig(r=2, alpha=4, selfattn_lora=False, intermediate_lora=True,
                                                       use_gating=True), True),
    "gpt2_lora_leave_out": ("gpt2", lambda: LoRAConfig(r=2, alpha=4, leave_out=[1]), True),
    "bert_ia3_alpha": ("bert", lambda: IA3Config(alpha=2, output_lora=True, leave_out=[1]), True),
    "roberta_ia3_output_only": ("roberta", lambda: IA3Config(alpha=0.5, selfattn_lora=False, intermediate_lora=False,
                                                             output_lora=True), True),
    "llama_ia3": ("llama", lambda: IA3Config(alpha=1.5, output_lora=True), True),
    "llama_ia3_leave_out": ("llama", lambda: IA3Config(leave_out=[0]), True),
    "gpt2_ia3": ("gpt2", lambda: IA3Config(alpha=2, attn_matrices=["q", "k", "v"], output_lora=True), True),
    "gpt2_ia3_kv": ("gpt2", lambda: IA3Config(alpha=2, intermediate_lora=False, leave_out=[0]), True),
    "gpt2_ia3_ffn": ("gpt2", lambda: IA3Config(alpha=3, selfattn_lora=False, output_lora=True), True),
    "gpt2_ia3_default": ("gpt2", lambda: IA3Config(), True),
    "gpt2_lora_fused_ffn": ("gpt2", lambda: LoRAConfig(r=2, alpha=4, intermediate_lora=True, output_lora=True,
                                                       leave_out=[1]), True),
}

if __name__ == "__main__":
    make_fixtures.CASES.update(CASES)
    for name in CASES:
        make_fixtures.make_case(Path(sys.argv[1]), name)
