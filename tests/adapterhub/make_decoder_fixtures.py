"""Run in the second virtualenv: more decoder cases saved by ``adapters`` (GPT-2's fused LoRA, par_bn).

Usage: python make_decoder_fixtures.py OUT_FOLDER

Same layout and helpers as make_fixtures.py (its ``make_case``, given these cases); a separate script
so that helpers adding cases there and here do not edit one file, and its fixtures are cached apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import make_fixtures
from adapters import LoRAConfig, ParBnConfig

#: case name -> (model type, adapters config, save with safetensors)
CASES = {
    "gpt2_lora": ("gpt2", lambda: LoRAConfig(r=4, alpha=8), True),  # attn_matrices q, v (the default)
    "gpt2_lora_qkv": ("gpt2", lambda: LoRAConfig(r=2, alpha=5, attn_matrices=["q", "k", "v"]), True),
    "gpt2_lora_k": ("gpt2", lambda: LoRAConfig(r=3, alpha=3, attn_matrices=["k"]), True),
    "gpt2_par_bn": ("gpt2", lambda: ParBnConfig(reduction_factor=4), True),
    "llama_par_bn": ("llama", lambda: ParBnConfig(reduction_factor=4), True),
}

if __name__ == "__main__":
    make_fixtures.CASES.update(CASES)
    for name in CASES:
        make_fixtures.make_case(Path(sys.argv[1]), name)
