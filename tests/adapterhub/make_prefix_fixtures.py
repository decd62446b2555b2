"""Run in the second virtualenv: prefix-tuning adapters of AdapterHub's ``adapters``, both ways.

Usage: python make_prefix_fixtures.py OUT_FOLDER     (write the cases)
       python make_prefix_fixtures.py --run JOBS_JSON (load folders peftkit saved; as run_saved.py)

Same layout as make_fixtures.py (``model.json``, ``base.safetensors``, ``adapter/``,
``expected.safetensors``), with padded batches: ``expected.safetensors`` holds ``input_ids``,
``attention_mask`` (right padding for encoders, left padding for decoders) and ``output`` (the
adapted model's last hidden state, or a decoder's logits). The prefix is saved as ``adapters`` keeps
it: the reparametrization MLP (``flat=False``, its default), the flat prefix (``flat=True``), or the
flat prefix ``eject_prefix_tuning`` made from the MLP. A separate script from make_fixtures.py, so
that helpers adding cases there do not edit one file (nor invalidate its cached fixtures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

import adapters
from adapters import PrefixTuningConfig
from make_fixtures import MODELS, base_weights, build_base
from make_reft_fixtures import main as run_fixtures, output

#: case -> (model type, adapters config, eject the MLP before saving)
CASES = {
    "bert_prefix_mlp": ("bert", lambda: PrefixTuningConfig(prefix_length=4, bottleneck_size=16), False),
    "bert_prefix_flat": ("bert", lambda: PrefixTuningConfig(prefix_length=3, flat=True), False),
    "bert_prefix_ejected": ("bert", lambda: PrefixTuningConfig(prefix_length=5, bottleneck_size=8), True),
    "roberta_prefix_flat": ("roberta", lambda: PrefixTuningConfig(prefix_length=3, flat=True), False),
    "llama_prefix_flat": ("llama", lambda: PrefixTuningConfig(prefix_length=3, flat=True), False),
    "llama_prefix_mlp": ("llama", lambda: PrefixTuningConfig(prefix_length=2, bottleneck_size=8), False),
}
DECODERS = ("llama", "gpt2")


def batch(model_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 7 tokens, the second with 5 real ones: padded on the right, or on the left for a decoder."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if model_type in DECODERS:
        mask[1, :2] = 0
    else:
        mask[1, 5:] = 0
        ids[1, 5:] = MODELS[model_type].get("pad_token_id", 0)
    return ids, mask


def randomize_prefix(model: torch.nn.Module, name: str) -> None:
    """Random weights in every tensor of the prefix (and its gates), so that each one matters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".{name}." in key and ("prefix_tunings" in key or "prefix_gates" in key):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def make_case(out: Path, case: str) -> None:
    model_type, make_config, eject = CASES[case]
    write_case(out, case, model_type, make_config, randomize_prefix, eject)


def write_case(out: Path, case: str, model_type: str, make_config: Callable[[], Any],
               randomize: Callable[[torch.nn.Module, str], None], eject: bool = False) -> None:
    """Write case ``case``: the base model, adapter "task" of ``make_config()`` with weights drawn by
    ``randomize(model, "task")`` (its MLP ejected first if ``eject``), saved by adapters, and its output."""
    folder = out / case
    folder.mkdir(parents=True)
    model = build_base(model_type)
    spec = {"model_type": model_type, "config": MODELS[model_type]}
    if model_type in DECODERS:
        spec["task"] = "causal_lm"
    (folder / "model.json").write_text(json.dumps(spec))
    save_file(base_weights(model), str(folder / "base.safetensors"))
    if model_type in DECODERS:
        # adapters 1.3.0 joins the prefix's mask as "not attended" to the boolean masks of sdpa (transformers'
        # default), so a decoder's prefix changes nothing there; eager attention's additive mask is joined right
        model.set_attn_implementation("eager")
    adapters.init(model)
    model.add_adapter("task", config=make_config())
    randomize(model, "task")
    if eject:
        model.eject_prefix_tuning("task")
    model.set_active_adapters("task")
    model.eval()
    # adapters cannot write safetensors here: the pool is registered in every layer too (shared tensors)
    model.save_adapter(str(folder / "adapter"), "task", use_safetensors=False)
    ids, mask = batch(model_type)
    save_file({"input_ids": ids, "attention_mask": mask, "output": output(model, ids, mask)},
              str(folder / "expected.safetensors"))


def eager_decoders(model: torch.nn.Module, model_type: str) -> None:
    """Decoders run eager attention, as in make_case."""
    if model_type in DECODERS:
        model.set_attn_implementation("eager")


def main() -> None:
    run_fixtures(CASES, make_case, eager_decoders)


if __name__ == "__main__":
    main()
