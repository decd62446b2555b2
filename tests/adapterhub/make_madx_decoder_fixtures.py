"""Run in the second virtualenv: MAD-X's invertible adapters (seq_bn_inv, double_seq_bn_inv) on Llama and GPT-2.

Usage: python make_madx_decoder_fixtures.py OUT_FOLDER  (make the fixtures)
       python make_madx_decoder_fixtures.py run JOBS_JSON  (load folders peftkit saved; see run())

Same layout as make_bottleneck_fixtures.py (``model.json`` names the transformers class peftkit builds:
``LlamaForCausalLM``, ``GPT2LMHeadModel``). ``adapters`` 1.3.0 puts the invertible block on these models'
embedding output (a forward hook on ``embed_tokens`` / ``transformer.drop``) under ``adapters.init`` too, but
applies its inverse only in a flex head: ``CausalLMHead`` runs the hidden states through the first active
adapter's inverse before its last Linear. So each case runs ``LlamaAdapterModel`` / ``GPT2AdapterModel`` with
a causal-LM head that is the LM's own ``lm_head`` (one bias-free Linear, its weights copied), which is what
the LM class computes. The last adapter's folder holds that head (a frozen pretrained head, as a language
adapter is trained with); a MAD-X case saves ``lang/`` and ``task/`` and the output of ``Stack(lang, task)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters import DoubleSeqBnInvConfig, SeqBnConfig, SeqBnInvConfig
from make_bottleneck_fixtures import build, load_and_run, save_adapters
from make_fixtures import FAMILIES, MODELS

#: model type -> the transformers LM class suffix peftkit runs
LM_SUFFIX = {"llama": "ForCausalLM", "gpt2": "LMHeadModel"}

#: case -> (model type, {adapter name: adapters config}, active setup)
CASES = {
    "llama_seq_bn_inv": ("llama", {"task": lambda: SeqBnInvConfig(reduction_factor=4)}, "task"),
    "llama_double_seq_bn_inv": ("llama", {"task": lambda: DoubleSeqBnInvConfig(
        reduction_factor=4, non_linearity="gelu", inv_adapter_reduction_factor=4)}, "task"),
    "gpt2_seq_bn_inv": ("gpt2", {"task": lambda: SeqBnInvConfig(reduction_factor=4, non_linearity="relu")},
                        "task"),
    "gpt2_double_seq_bn_inv": ("gpt2", {"task": lambda: DoubleSeqBnInvConfig(reduction_factor=4)}, "task"),
    "llama_madx_stack": ("llama", {"lang": lambda: SeqBnInvConfig(reduction_factor=4),
                                   "task": lambda: SeqBnConfig(reduction_factor=8)}, ("lang", "task")),
}


def causal_lm_adapter_model(model_type: str, pretrained: torch.nn.Module, head: str | None) -> torch.nn.Module:
    """adapters' ...AdapterModel with ``pretrained``'s body and, unless ``head`` is None, a causal-LM head
    ``head`` that is ``pretrained``'s own lm_head."""
    import adapters as library
    from adapters.heads import CausalLMHead

    model = getattr(library, f"{FAMILIES[model_type]}AdapterModel")(pretrained.config)
    result = model.base_model.load_state_dict(pretrained.base_model.state_dict(), strict=False)
    assert not result.unexpected_keys and not result.missing_keys, result
    if head is not None:
        model.add_prediction_head(CausalLMHead(model, head, layers=1, activation_function=None, layer_norm=False,
                                               bias=False))
        with torch.no_grad():
            model.heads[head][0].weight.copy_(pretrained.lm_head.weight)
    return model.eval()


def make_case(out: Path, case: str) -> None:
    model_type, configs, active = CASES[case]
    folder = out / case
    folder.mkdir(parents=True)
    suffix = LM_SUFFIX[model_type]
    pretrained = build(model_type, suffix)
    (folder / "model.json").write_text(json.dumps({"model_type": model_type, "config": MODELS[model_type],
                                                   "task": "causal_lm", "class": FAMILIES[model_type] + suffix}))
    # clones: a tied output layer (GPT-2's lm_head) cannot share storage with the embeddings in the file
    save_file({k: v.clone().contiguous() for k, v in pretrained.state_dict().items()},
              str(folder / "base.safetensors"))
    save_adapters(causal_lm_adapter_model(model_type, pretrained, list(configs)[-1]), folder, configs, active)


def main() -> None:
    out = Path(sys.argv[1])
    for case in CASES:
        make_case(out, case)


def run(job: dict) -> None:
    """Load the folders peftkit saved (``adapters``: list of folders, stacked in that order) into the case's
    flex model, with the LM's own head unless the last folder brings one, and write its output to ``out``."""
    case = Path(job["case"])
    spec = json.loads((case / "model.json").read_text())
    model_type = spec["model_type"]
    pretrained = build(model_type, LM_SUFFIX[model_type])
    pretrained.load_state_dict(load_file(str(case / "base.safetensors")))
    names = [Path(folder).name for folder in job["adapters"]]
    brings_head = (Path(job["adapters"][-1]) / "head_config.json").is_file()
    model = causal_lm_adapter_model(model_type, pretrained, None if brings_head else names[-1])
    load_and_run(model, job)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        for each in json.loads(Path(sys.argv[2]).read_text()):
            run(each)
    else:
        main()
