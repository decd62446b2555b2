"""Run in the second virtualenv: what a user moving from ``adapters`` to peftkit brings along (docs/migrating.md).

Usage: python make_walkthrough_fixtures.py OUT_FOLDER

Each case folder holds ``model.json``, ``base.safetensors`` (the body of the model), one folder per adapter
(named as the adapter), ``setup.json`` and ``expected.safetensors`` (``input_ids`` and the outputs named in
``setup.json``):

- ``fusion_*``: AdapterFusion (``add_adapter_fusion``) over bottleneck adapters on a bare model, saved with
  ``save_adapter_fusion`` into ``fusion/``; the output is the last hidden state under the fusion;
- ``heads_prefix``: two flex classification heads whose names begin alike (``t``, ``t2``) on a
  ``BertAdapterModel``: ``save_adapter(..., "t")`` writes ``heads.t2.*`` too; outputs: each adapter's logits;
- ``average_lora``: ``Average`` of two LoRA adapters with weights; output: the last hidden state.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import adapters
from adapters import AutoAdapterModel, DoubleSeqBnConfig, LoRAConfig, SeqBnConfig
from adapters.composition import Average, Fuse
from make_fixtures import MODELS, base_weights, build_base, output_of, randomize

#: case -> (model type, {adapter: config}, fusion options ("dynamic" or a dict of adapters' fusion config),
#: save with safetensors)
FUSIONS = {
    "fusion_seq_bn": ("bert", {"a": lambda: SeqBnConfig(original_ln_before=False, reduction_factor=4),
                               "b": lambda: SeqBnConfig(original_ln_before=False, reduction_factor=8)},
                      "dynamic", False),
    "fusion_double_seq_bn_roberta": ("roberta", {"a": lambda: DoubleSeqBnConfig(reduction_factor=4),
                                                 "b": lambda: DoubleSeqBnConfig(reduction_factor=2),
                                                 "c": lambda: DoubleSeqBnConfig(reduction_factor=8)},
                                     "dynamic", True),
    "fusion_static": ("bert", {"a": lambda: SeqBnConfig(original_ln_before=False),
                               "b": lambda: SeqBnConfig(original_ln_before=False)}, "static", True),
    # no query projection; the residual joins the values before the attention (peftkit's residual=false)
    "fusion_residual_before": ("bert", {"a": lambda: SeqBnConfig(original_ln_before=False),
                                        "b": lambda: SeqBnConfig(original_ln_before=False)},
                               {"key": True, "query": False, "value": True, "query_before_ln": False,
                                "regularization": True, "residual_before": True, "temperature": False,
                                "value_before_softmax": False, "value_initialized": True, "dropout_prob": None},
                               True),
    # AdapterHub's default SeqBnConfig (original_ln_before=True): its fusion queries LN(h + r)
    "fusion_pfeiffer": ("bert", {"a": lambda: SeqBnConfig(), "b": lambda: SeqBnConfig(reduction_factor=8)},
                        "dynamic", True),
    # the same members, the query read before that LayerNorm (h)
    "fusion_pfeiffer_query_before_ln": ("bert", {"a": lambda: SeqBnConfig(), "b": lambda: SeqBnConfig()},
                                        {"key": True, "query": True, "value": True, "query_before_ln": True,
                                         "regularization": True, "residual_before": False, "temperature": False,
                                         "value_before_softmax": True, "value_initialized": True,
                                         "dropout_prob": None}, True),
    # members that differ in original_ln_before (adapters feeds each what the last reads): refused
    "fusion_mixed_ln_before": ("bert", {"a": lambda: SeqBnConfig(original_ln_before=False),
                                        "b": lambda: SeqBnConfig()}, "dynamic", True),
}
IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))


def shift(model: torch.nn.Module, marker: str, seed: int, scale: float = 0.1) -> None:
    """Move the parameters whose key holds ``marker`` off randomize()'s draw (the same for every name)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if marker in key:
                param.add_(scale * torch.randn(param.shape, generator=gen))


def new_case(out: Path, case: str, model_type: str) -> tuple[Path, torch.nn.Module]:
    """The case's folder with ``model.json`` and ``base.safetensors``, and the bare model they describe."""
    folder = out / case
    folder.mkdir(parents=True)
    model = build_base(model_type)
    (folder / "model.json").write_text(json.dumps({"model_type": model_type, "config": MODELS[model_type]}))
    save_file(base_weights(model), str(folder / "base.safetensors"))
    return folder, model


def make_fusion_case(out: Path, case: str) -> None:
    model_type, configs, fusion_config, safetensors = FUSIONS[case]
    folder, model = new_case(out, case, model_type)
    adapters.init(model)
    for seed, (name, make_config) in enumerate(configs.items(), start=1):
        model.add_adapter(name, config=make_config())
        randomize(model, name)
        shift(model, f".adapters.{name}.", seed)
        model.save_adapter(str(folder / name), name, use_safetensors=safetensors)
    fuse = Fuse(*configs)
    model.add_adapter_fusion(fuse, config=fusion_config)
    shift(model, f"adapter_fusion_layer.{fuse.name}.", 99, scale=0.5)
    model.save_adapter_fusion(str(folder / "fusion"), fuse, use_safetensors=safetensors)
    model.set_active_adapters(fuse)
    model.eval()
    save_file({"input_ids": IDS, "output": output_of(model, IDS)}, str(folder / "expected.safetensors"))
    (folder / "setup.json").write_text(json.dumps({"adapters": list(configs)}))


def make_heads_case(out: Path) -> None:
    import transformers

    folder, body = new_case(out, "heads_prefix", "bert")
    model = AutoAdapterModel.from_config(transformers.BertConfig(**MODELS["bert"]))
    model.bert.load_state_dict(body.state_dict(), strict=False)
    outputs = {"input_ids": IDS}
    for seed, name in enumerate(("t", "t2"), start=1):
        model.add_adapter(name, config=SeqBnConfig(original_ln_before=False, reduction_factor=4))
        model.add_classification_head(name, num_labels=2 + seed, id2label={i: f"{name}_{i}" for i in range(2 + seed)})
        randomize(model, name)
        shift(model, f".adapters.{name}.", seed)
        shift(model, f"heads.{name}.", 10 + seed)
    model.eval()
    for name in ("t", "t2"):
        model.save_adapter(str(folder / name), name)
        model.set_active_adapters(name)
        with torch.no_grad():
            outputs[name] = model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.contiguous()
    save_file(outputs, str(folder / "expected.safetensors"))
    (folder / "setup.json").write_text(json.dumps({"adapters": ["t", "t2"]}))


def make_average_case(out: Path) -> None:
    folder, model = new_case(out, "average_lora", "bert")
    adapters.init(model)
    for seed, name in enumerate(("a", "b"), start=1):
        model.add_adapter(name, config=LoRAConfig(r=4, alpha=8))
        randomize(model, name)
        shift(model, f".loras.{name}.", seed)
        model.save_adapter(str(folder / name), name, use_safetensors=True)
    model.set_active_adapters(Average("a", "b", weights=[3.0, 1.0]))
    model.eval()
    save_file({"input_ids": IDS, "output": output_of(model, IDS)}, str(folder / "expected.safetensors"))
    (folder / "setup.json").write_text(json.dumps({"adapters": ["a", "b"], "weights": [3.0, 1.0]}))


if __name__ == "__main__":
    target = Path(sys.argv[1])
    for name in FUSIONS:
        make_fusion_case(target, name)
    make_heads_case(target)
    make_average_case(target)
