"""Run in the second virtualenv: AdapterHub's ``Split`` block over bottleneck adapters, saved by ``adapters``.

Usage: python make_split_fixtures.py OUT_FOLDER

Each case folder holds ``model.json``, ``base.safetensors`` (a bare BertModel), one folder per adapter
(named as the adapter), ``setup.json`` (the split: children and splits) and ``expected.safetensors``
(``input_ids`` and the last hidden state under the split). Separate from make_fixtures.py so that
helpers adding cases there and here do not edit one file; it reuses that script's helpers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import adapters
from adapters import SeqBnConfig
from adapters.composition import Split, Stack
from make_fixtures import MODELS, base_weights, build_base, output_of, randomize

#: case -> ({adapter name: adapters config}, the active setup, its peftkit string form). Seven tokens a row.
#: The adapters sit at the same sites with the same layer-norm options: adapters runs the residual and
#: layer-norm step of a Split's first adapter (``pre_block``) for every child, and fails at a site where
#: that adapter has no module.
CASES = {
    "bert_split_two": ({"a": lambda: SeqBnConfig(reduction_factor=4),
                        "b": lambda: SeqBnConfig(reduction_factor=2, non_linearity="gelu")},
                       lambda: Split("a", "b", splits=[3, 4]), "split(a, b, splits=[3, 4])"),
    "bert_split_three": ({"a": lambda: SeqBnConfig(reduction_factor=4),
                          "b": lambda: SeqBnConfig(reduction_factor=2, non_linearity="gelu"),
                          "c": lambda: SeqBnConfig(reduction_factor=8)},
                         lambda: Split("c", "b", "a", splits=[2, 3, 2]), "split(c, b, a, splits=[2, 3, 2])"),
    # a split inside a stack (a stack or split inside a split differs: adapters runs the residual and
    # layer-norm step again for the inner block on the already normalized span, see docs/composition.md)
    "bert_stack_of_split": ({"a": lambda: SeqBnConfig(reduction_factor=4),
                             "b": lambda: SeqBnConfig(reduction_factor=2, non_linearity="gelu"),
                             "c": lambda: SeqBnConfig(reduction_factor=8)},
                            lambda: Stack(Split("c", "a", splits=[2, 5]), "b"),
                            "stack(split(c, a, splits=[2, 5]), b)"),
}


def make_case(out: Path, case: str) -> None:
    configs, setup, text = CASES[case]
    folder = out / case
    folder.mkdir(parents=True)
    model = build_base("bert")
    (folder / "model.json").write_text(json.dumps({"model_type": "bert", "config": MODELS["bert"]}))
    save_file(base_weights(model), str(folder / "base.safetensors"))
    adapters.init(model)
    for seed, (name, make_config) in enumerate(configs.items(), start=1):
        model.add_adapter(name, config=make_config())
        torch.manual_seed(seed)  # randomize() draws the same noise for every name: shift each by its own
        randomize(model, name)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f".adapters.{name}." in key:
                    param.add_(0.1 * seed)
        model.save_adapter(str(folder / name), name, use_safetensors=True)
    model.set_active_adapters(setup())
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    save_file({"input_ids": ids, "output": output_of(model, ids)}, str(folder / "expected.safetensors"))
    (folder / "setup.json").write_text(json.dumps({"composition": text, "adapters": list(configs)}))


if __name__ == "__main__":
    for name in CASES:
        make_case(Path(sys.argv[1]), name)
