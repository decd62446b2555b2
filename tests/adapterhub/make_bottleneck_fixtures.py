"""Run in the second virtualenv: Compacter and invertible (MAD-X) adapters saved by AdapterHub's ``adapters``.

Usage: python make_bottleneck_fixtures.py OUT_FOLDER  (make the fixtures)
       python make_bottleneck_fixtures.py run JOBS_JSON  (load folders peftkit saved; see run())

Same layout as make_fixtures.py (``model.json``, ``base.safetensors``, ``adapter/``,
``expected.safetensors``). The models are task models: ``adapters`` 1.3 leaves a Compacter's shared
rule matrices out of a bare model's file (its save filter wants a dot before ``shared_parameters``),
and an invertible adapter is inverted before a masked-LM head (MAD-X). A MAD-X case saves two
adapters (``lang/`` and ``task/``) and the output of ``Stack(lang, task)``; its ``model.json`` lists
``lang_spec`` for peftkit's own run of that recipe. A separate script from make_fixtures.py so that
helpers adding cases there and here do not edit one file; it reuses that script's helpers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import adapters
from adapters import (CompacterConfig, CompacterPlusPlusConfig, DoubleSeqBnInvConfig, SeqBnConfig, SeqBnInvConfig)
from adapters.composition import Stack
from make_fixtures import FAMILIES, MODELS, output_of

#: model class suffix -> the task name written to model.json
TASKS = {"ForSequenceClassification": "seq_cls", "ForMaskedLM": "masked_lm", "ForCausalLM": "causal_lm",
         "Model": None}

#: case -> (model type, transformers class suffix, {adapter name: adapters config}, active setup). A masked-LM
#: case runs adapters' ...AdapterModel with a masked-LM head holding the masked-LM model's own (pretrained)
#: head: only that flex head applies the inverse of an invertible adapter (adapters.init on a
#: ...ForMaskedLM class does not); the last adapter's folder holds the head.
CASES = {
    "bert_compacter": ("bert", "ForSequenceClassification", {"task": lambda: CompacterConfig(reduction_factor=4)},
                       "task"),
    "bert_compacterpp_factorized": ("bert", "ForSequenceClassification", {"task": lambda: CompacterPlusPlusConfig(
        reduction_factor=2, factorized_phm_rule=True, phm_rank=2, phm_dim=8, non_linearity="relu")}, "task"),
    "roberta_compacter_own_rules": ("roberta", "ForSequenceClassification", {"task": lambda: CompacterConfig(
        reduction_factor=4, shared_phm_rule=False, factorized_phm_W=False, phm_bias=False)}, "task"),
    "bert_compacter_shared_w": ("bert", "ForSequenceClassification", {"task": lambda: CompacterConfig(
        reduction_factor=4, shared_W_phm=True, phm_rank=2)}, "task"),
    "bert_seq_bn_inv_mlm": ("bert", "ForMaskedLM", {"task": lambda: SeqBnInvConfig(reduction_factor=4)}, "task"),
    "roberta_double_seq_bn_inv_mlm": ("roberta", "ForMaskedLM", {"task": lambda: DoubleSeqBnInvConfig(
        reduction_factor=4, non_linearity="gelu", inv_adapter_reduction_factor=4)}, "task"),
    "bert_madx_stack": ("bert", "ForMaskedLM", {"lang": lambda: SeqBnInvConfig(reduction_factor=4),
                                                "task": lambda: SeqBnConfig(reduction_factor=8)}, ("lang", "task")),
    # a masked-LM head of its own (drawn at random): loaded as the adapter's copy of the model's head
    "roberta_seq_bn_trained_mlm_head": ("roberta", "ForMaskedLM", {"task": lambda: SeqBnConfig(reduction_factor=4)},
                                        "task"),
    "llama_compacter": ("llama", "ForCausalLM", {"task": lambda: CompacterConfig(reduction_factor=4)}, "task"),
    # a bare model: adapters leaves the shared rule matrices out of the file (kept to check the refusal)
    "bert_compacter_bare": ("bert", "Model", {"task": lambda: CompacterConfig(reduction_factor=4)}, "task"),
}
#: masked-LM cases whose head is drawn at random instead of holding the model's own
TRAINED_HEADS = ("roberta_seq_bn_trained_mlm_head",)

#: adapters' module dicts holding an adapter's tensors, and a classification head (saved with the adapter as
#: its static head): all drawn at random, so that every tensor matters.
MARKERS = (".adapters.{}.", "invertible_adapters.{}.", "shared_parameters.{}.", "classifier.")


def build(model_type: str, suffix: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    family = FAMILIES[model_type]
    config = getattr(transformers, f"{family}Config")(**MODELS[model_type])
    return getattr(transformers, f"{family}{suffix}")(config).eval()


def draw(model: torch.nn.Module, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    markers = tuple(m.format(name) for m in MARKERS)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if any(m in key for m in markers):
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def masked_lm_adapter_model(model_type: str, pretrained: torch.nn.Module, head: str) -> torch.nn.Module:
    """adapters' ...AdapterModel with ``pretrained``'s body and a masked-LM head ``head`` holding its head."""
    import transformers

    import adapters as library

    family = FAMILIES[model_type]
    model = getattr(library, f"{family}AdapterModel")(getattr(transformers, f"{family}Config")(**MODELS[model_type]))
    result = model.base_model.load_state_dict(pretrained.base_model.state_dict(), strict=False)
    # a masked-LM model has no pooler (the MLM head does not read it); adapters' prompt tuning adds a copy
    assert not result.unexpected_keys and all(k.startswith(("pooler.", "prompt_tuning.")) for k in result.missing_keys)
    model.add_masked_lm_head(head)
    own = pretrained.cls.predictions if model_type == "bert" else pretrained.lm_head
    dense, norm = (own.transform.dense, own.transform.LayerNorm) if model_type == "bert" else (own.dense, own.layer_norm)
    with torch.no_grad():
        for index, module in ((0, dense), (2, norm), (3, own.decoder)):
            for leaf, tensor in module.state_dict().items():
                getattr(model.heads[head][index], leaf).copy_(tensor)
    return model.eval()


def make_case(out: Path, case: str) -> None:
    model_type, suffix, configs, active = CASES[case]
    folder = out / case
    folder.mkdir(parents=True)
    model = build(model_type, suffix)
    (folder / "model.json").write_text(json.dumps({"model_type": model_type, "config": MODELS[model_type],
                                                   "task": TASKS[suffix], "class": FAMILIES[model_type] + suffix}))
    # clones: tied tensors (the MLM decoder and the word embeddings) cannot share storage in the file
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(folder / "base.safetensors"))
    if suffix == "ForMaskedLM":
        model = masked_lm_adapter_model(model_type, model, list(configs)[-1])
    else:
        adapters.init(model)
    save_adapters(model, folder, configs, active, trained_heads=case in TRAINED_HEADS)


def save_adapters(model: torch.nn.Module, folder: Path, configs: dict, active: str | tuple[str, ...],
                  trained_heads: bool = False) -> None:
    """Add the adapters of ``configs`` (name -> config maker) to ``model``, drawn at random (seeds 1, 2, ...; with
    ``trained_heads`` their heads too), save each (the last with its head) into ``folder/adapter`` (one adapter)
    or ``folder/<name>``, activate ``active`` (a tuple: a Stack) and write ``expected.safetensors``."""
    last = list(configs)[-1]
    for seed, (name, make_config) in enumerate(configs.items(), start=1):
        model.add_adapter(name, config=make_config())
        draw(model, name, seed)
        if trained_heads:
            with torch.no_grad():
                for param in model.heads[name].parameters():
                    if param is model.get_input_embeddings().weight:  # the decoder is tied to the embeddings
                        continue
                    param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
        target = folder / "adapter" if len(configs) == 1 else folder / name
        model.save_adapter(str(target), name, with_head=name == last, use_safetensors=True)
    model.set_active_adapters(Stack(*active) if isinstance(active, tuple) else active)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    save_file({"input_ids": ids, "output": output_of(model, ids)}, str(folder / "expected.safetensors"))


def main() -> None:
    out = Path(sys.argv[1])
    for case in CASES:
        make_case(out, case)


if __name__ == "__main__" and sys.argv[1:2] != ["run"]:
    main()


# -- run: load with adapters what peftkit saved -------------------------------------------------------


def run(job: dict) -> None:
    """Load the folders peftkit saved (``adapters``: list of folders, ``setup``: the names to stack) into the
    case's model as adapters builds it, and write its output on the case's inputs to ``out``."""
    from safetensors.torch import load_file

    case = Path(job["case"])
    spec = json.loads((case / "model.json").read_text())
    model_type, suffix = spec["model_type"], spec["class"][len(FAMILIES[spec["model_type"]]):]
    pretrained = build(model_type, suffix)
    pretrained.load_state_dict(load_file(str(case / "base.safetensors")))
    names = [Path(folder).name for folder in job["adapters"]]
    if suffix == "ForMaskedLM" and not (Path(job["adapters"][-1]) / "head_config.json").is_file():
        model = masked_lm_adapter_model(model_type, pretrained, names[-1])  # the model's own head
    else:  # peftkit writes a classification or masked-LM head of the adapter's own as adapters' flex head
        import adapters as library

        model = getattr(library, f"{FAMILIES[model_type]}AdapterModel")(pretrained.config)
        result = model.base_model.load_state_dict(pretrained.base_model.state_dict(), strict=False)
        # RoBERTa's classification model has no pooler; peftkit writes its head as one that reads none
        assert not result.unexpected_keys and all(k.startswith(("pooler.", "prompt_tuning.")) for k in
                                                   result.missing_keys), result
        model.eval()
    load_and_run(model, job)


def load_and_run(model: torch.nn.Module, job: dict) -> None:
    """Load the job's folders into ``model`` (every weight, or exit), stack them in order and write the output
    on the case's inputs to ``job["out"]``."""
    from safetensors.torch import load_file

    names = [Path(folder).name for folder in job["adapters"]]
    for folder, name in zip(job["adapters"], names):
        info: dict = {}
        model.load_adapter(folder, load_as=name, loading_info=info, use_safetensors=True)
        if info.get("missing_keys") or info.get("unexpected_keys"):
            raise SystemExit(f"{folder}: adapters did not load every weight: {info}")
    model.set_active_adapters(Stack(*names) if len(names) > 1 else names[0])
    ids = load_file(str(Path(job["case"]) / "expected.safetensors"))["input_ids"]
    save_file({"output": output_of(model, ids)}, job["out"])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "run":
    for each in json.loads(Path(sys.argv[2]).read_text()):
        run(each)
