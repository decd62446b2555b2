"""Run in the second virtualenv: UniPELT, gated adapters and MAM of AdapterHub's ``adapters``, both ways.

Usage: python make_unipelt_fixtures.py OUT_FOLDER     (write the cases)
       python make_unipelt_fixtures.py --run JOBS_JSON (load folders peftkit saved; as run_saved.py)

Same layout as make_prefix_fixtures.py (``model.json``, ``base.safetensors``, ``adapter/``,
``expected.safetensors`` with a padded batch and the adapted model's ``output``). Every tensor of the
adapter (gates included) is drawn at random, so that each one matters. Decoders run eager attention
(adapters 1.3.0 joins a prefix's mask wrongly to sdpa's boolean masks; see make_prefix_fixtures.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapters import LoRAConfig, MAMConfig, PrefixTuningConfig, SeqBnConfig, UniPELTConfig
from make_prefix_fixtures import eager_decoders, write_case
from make_reft_fixtures import main as run_fixtures


def small_unipelt(shared_gating: bool = True) -> UniPELTConfig:
    return UniPELTConfig(prefix_tuning=PrefixTuningConfig(prefix_length=3, bottleneck_size=16,
                                                          shared_gating=shared_gating),
                         adapter=SeqBnConfig(reduction_factor=4), lora=LoRAConfig(r=2, alpha=4))


#: case -> (model type, adapters config)
CASES = {
    "bert_unipelt": ("bert", UniPELTConfig),  # adapters' defaults
    "roberta_unipelt_small": ("roberta", small_unipelt),
    "bert_unipelt_two_prefix_gates": ("bert", lambda: small_unipelt(shared_gating=False)),
    "llama_unipelt_small": ("llama", small_unipelt),
    "bert_lora_gated": ("bert", lambda: LoRAConfig(r=2, alpha=4, use_gating=True)),
    "bert_seq_bn_gated": ("bert", lambda: SeqBnConfig(reduction_factor=4, use_gating=True)),
    "bert_mam": ("bert", MAMConfig),  # another ConfigUnion, without gates
}


def randomize_adapter(model: torch.nn.Module, name: str) -> None:
    """Random weights in every tensor of adapter ``name`` (LoRA, bottleneck, prefix and their gates)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".{name}." in key or key.endswith(f".{name}"):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def make_case(out: Path, case: str) -> None:
    model_type, make_config = CASES[case]
    write_case(out, case, model_type, make_config, randomize_adapter)


def main() -> None:
    run_fixtures(CASES, make_case, eager_decoders)


if __name__ == "__main__":
    main()
