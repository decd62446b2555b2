"""Run in the second virtualenv: ReFT adapters (LoReFT, NoReFT, DiReFT) of AdapterHub's ``adapters``, both ways.

Usage: python make_reft_fixtures.py OUT_FOLDER     (write the cases)
       python make_reft_fixtures.py --run JOBS_JSON (load folders peftkit saved; as run_saved.py)

Same layout as make_fixtures.py (``model.json``, ``base.safetensors``, ``adapter/``,
``expected.safetensors``), with padded batches: ``expected.safetensors`` holds ``input_ids``,
``attention_mask`` (right padding for encoders, left padding for decoders), ``output`` (the
adapted model's last hidden state, or a decoder's logits), ``reloaded`` (the output after
``adapters`` loads the saved folder again: it differs for DiReFT, whose ``subtract_projection``
adapters 1.3.0 does not save) and for decoders ``generated`` (greedy ``generate()`` without a KV
cache: ``adapters`` 1.3.0 fails with one once suffix positions or padding are involved). Models are put in
eval mode after an adapter is added: ``adapters`` makes a layer's ReFT modules in training mode, so
their dropout acts until ``eval()``.
A separate script from make_fixtures.py, so that helpers adding cases there do not edit one file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters import DiReftConfig, LoReftConfig, NoReftConfig
from make_fixtures import MODELS, base_weights, build_base, load_base

#: case -> (model type, adapters config)
CASES = {
    "bert_loreft": ("bert", lambda: LoReftConfig(prefix_positions=2, suffix_positions=2, r=2)),
    "roberta_noreft_tied_tanh": ("roberta", lambda: NoReftConfig(tied_weights=True, prefix_positions=1,
                                                                 suffix_positions=2, r=2, non_linearity="tanh")),
    "llama_loreft_layer1": ("llama", lambda: LoReftConfig(layers=[1], prefix_positions=1, suffix_positions=2, r=3)),
    "llama_direft": ("llama", lambda: DiReftConfig(prefix_positions=2, r=2)),
    "gpt2_loreft_relu": ("gpt2", lambda: LoReftConfig(prefix_positions=2, suffix_positions=1, r=2,
                                                      non_linearity="relu")),
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
    return ids, mask


def output(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).contiguous()


def randomize_reft(model: torch.nn.Module, name: str) -> None:
    """Random weights everywhere; an orthogonal projection's ``original`` keeps its diagonal of -1
    (torch's parametrization reads the diagonal's integer part; training never changes it)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".refts.{name}." not in key:
                continue
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            if key.endswith("parametrizations.weight.original"):
                param.diagonal().fill_(-1.0)


def make_case(out: Path, case: str) -> None:
    model_type, make_config = CASES[case]
    folder = out / case
    folder.mkdir(parents=True)
    model = build_base(model_type)
    spec = {"model_type": model_type, "config": MODELS[model_type]}
    if model_type in DECODERS:
        spec["task"] = "causal_lm"
    (folder / "model.json").write_text(json.dumps(spec))
    save_file(base_weights(model), str(folder / "base.safetensors"))
    adapters.init(model)
    model.add_adapter("task", config=make_config())
    randomize_reft(model, "task")
    model.set_active_adapters("task")
    model.eval()  # adapters makes a layer's ReFT modules in training mode (dropout on) even on an eval model
    model.save_adapter(str(folder / "adapter"), "task", use_safetensors=True)
    ids, mask = batch(model_type)
    tensors = {"input_ids": ids, "attention_mask": mask, "output": output(model, ids, mask)}
    if model_type in DECODERS:
        with torch.no_grad():
            tensors["generated"] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                  do_sample=False, use_cache=False, pad_token_id=0)
    again = build_base(model_type)
    load_base(again, str(folder / "base.safetensors"))
    adapters.init(again)
    again.set_active_adapters(again.load_adapter(str(folder / "adapter"), use_safetensors=True))
    again.eval()
    tensors["reloaded"] = output(again, ids, mask)
    save_file(tensors, str(folder / "expected.safetensors"))


def run(case: Path, adapter: str, out: str, prepare: Callable[[torch.nn.Module, str], None] | None = None) -> None:
    """Load a folder peftkit saved with ``adapters`` and write its output on the case's batch;
    ``prepare(model, model_type)`` runs on the base model first (e.g. to choose its attention)."""
    model_type = json.loads((case / "model.json").read_text())["model_type"]
    model = build_base(model_type)
    load_base(model, str(case / "base.safetensors"))
    if prepare is not None:
        prepare(model, model_type)
    adapters.init(model)
    info: dict = {}
    name = model.load_adapter(adapter, loading_info=info, use_safetensors=True)
    if info.get("missing_keys") or info.get("unexpected_keys"):
        raise SystemExit(f"{adapter}: adapters did not load every weight: {info}")
    model.set_active_adapters(name)
    model.eval()
    expected = load_file(str(case / "expected.safetensors"))
    save_file({"output": output(model, expected["input_ids"], expected["attention_mask"])}, out)


def main(cases: Iterable[str] = CASES, make: Callable[[Path, str], None] = make_case,
         prepare: Callable[[torch.nn.Module, str], None] | None = None) -> None:
    """``script OUT`` writes every case under OUT; ``script --run JOBS`` runs the saved folders JOBS lists."""
    if sys.argv[1] == "--run":
        for job in json.loads(Path(sys.argv[2]).read_text()):
            run(Path(job["case"]), job["adapter"], job["out"], prepare)
        return
    out = Path(sys.argv[1])
    for case in cases:
        make(out, case)


if __name__ == "__main__":
    main()
