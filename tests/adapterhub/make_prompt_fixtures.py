"""Run in the second virtualenv: prompt-tuning adapters of AdapterHub's ``adapters``, both ways.

Usage: python make_prompt_fixtures.py OUT_FOLDER     (write the cases)
       python make_prompt_fixtures.py --run JOBS_JSON (load folders peftkit saved; as run_saved.py)

Same layout as make_fixtures.py (``model.json``, ``base.safetensors``, ``adapter/``,
``expected.safetensors`` with ``input_ids``, ``attention_mask`` and ``output``: the last hidden
state, or a head's logits). ``adapters`` puts its prompt after the embedding block (after the
position embeddings and LayerNorm). ``model.json`` also names the attention implementation: on a
padded batch, ``adapters`` 1.3.0 with sdpa attention (transformers' default) lets the prompt's own
positions attend the padding (it prefixes the 4-D sdpa mask along both query and key axes with
"attend"), so its outputs there depend on the padding; with eager attention the padding is masked
for every position. Padded cases therefore run eager, and one unpadded case runs sdpa.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters import PromptTuningConfig
from make_fixtures import FAMILIES, LABELS, MODELS, TAGS, base_weights
from make_prefix_fixtures import batch
from make_reft_fixtures import main as run_fixtures, output

#: case -> (model type, PromptTuningConfig arguments, head kind (None, "classification", "tagging"),
#: attention implementation, padded batch, save with safetensors)
CASES = {
    "bert_prompt": ("bert", {"prompt_length": 4}, None, "eager", True, False),
    "bert_prompt_after_bos": ("bert", {"prompt_length": 3, "combine": "prefix_after_bos"}, None, "eager", True,
                              True),
    "roberta_prompt": ("roberta", {"prompt_length": 5}, None, "eager", True, True),
    "bert_prompt_sdpa_unpadded": ("bert", {"prompt_length": 4}, None, "sdpa", False, True),
    "bert_prompt_head_seq_cls": ("bert", {"prompt_length": 4}, "classification", "eager", True, True),
    "roberta_prompt_head_tagging": ("roberta", {"prompt_length": 2, "combine": "prefix_after_bos"}, "tagging",
                                    "eager", True, True),
}
HEAD_ARGUMENTS = {"classification": {"num_labels": 3, "id2label": LABELS},
                  "tagging": {"num_labels": 5, "id2label": TAGS}}
TASKS = {"classification": "seq_cls", "tagging": "token_cls"}


def build(model_type: str, attention: str, with_heads: bool) -> torch.nn.Module:
    """The bare body (``BertModel``) or the ``...AdapterModel`` with the attention implementation
    chosen when the model is made (BERT cannot switch it later), initialised as make_fixtures.build_base."""
    import transformers

    family = FAMILIES[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**MODELS[model_type], attn_implementation=attention)
    if with_heads:
        return getattr(adapters, f"{family}AdapterModel")(config).eval()
    return getattr(transformers, f"{family}Model")(config).eval()


def randomize_prompt(model: torch.nn.Module, name: str) -> None:
    """Random numbers in the prompt and the head, so that each one matters."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f"prompt_tunings.{name}." in key or f"heads.{name}." in key:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))


def ids_and_mask(model_type: str, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = batch(model_type)
    return (ids, mask) if padded else (ids, torch.ones_like(ids))


def make_case(out: Path, case: str) -> None:
    model_type, options, head, attention, padded, safetensors = CASES[case]
    folder = out / case
    folder.mkdir(parents=True)
    spec: dict = {"model_type": model_type, "config": MODELS[model_type], "attention": attention}
    if head is not None:
        spec["task"] = TASKS[head]
    (folder / "model.json").write_text(json.dumps(spec))
    model = build(model_type, attention, head is not None)
    weights = base_weights(model.base_model if head is not None else model)
    weights = {k: v for k, v in weights.items() if not k.startswith("prompt_tuning.")}  # adapters' own module
    save_file(weights, str(folder / "base.safetensors"))
    if head is None:
        adapters.init(model)
    model.add_adapter("task", config=PromptTuningConfig(**options))
    if head == "classification":
        model.add_classification_head("task", **HEAD_ARGUMENTS[head])
    elif head == "tagging":
        model.add_tagging_head("task", **HEAD_ARGUMENTS[head])
    randomize_prompt(model, "task")
    model.set_active_adapters("task")
    model.eval()
    model.save_adapter(str(folder / "adapter"), "task", with_head=head is not None, use_safetensors=safetensors)
    ids, mask = ids_and_mask(model_type, padded)
    save_file({"input_ids": ids, "attention_mask": mask, "output": output(model, ids, mask)},
              str(folder / "expected.safetensors"))


def run(case: Path, adapter: str, out: str) -> None:
    """Load a folder peftkit saved with ``adapters`` (with its head, if it has one) and write its output."""
    spec = json.loads((case / "model.json").read_text())
    with_head = (Path(adapter) / "head_config.json").is_file()
    model = build(spec["model_type"], spec["attention"], with_head)
    body = model.base_model if with_head else model
    result = body.load_state_dict(load_file(str(case / "base.safetensors")), strict=False)
    assert not result.unexpected_keys and all(k.startswith("prompt_tuning.") for k in result.missing_keys), result
    if not with_head:
        adapters.init(model)
    info: dict = {}
    name = model.load_adapter(adapter, loading_info=info, use_safetensors=True)
    if info.get("missing_keys") or info.get("unexpected_keys"):
        raise SystemExit(f"{adapter}: adapters did not load every weight: {info}")
    if with_head and name not in model.heads:
        raise SystemExit(f"{adapter}: adapters did not load the head")
    model.set_active_adapters(name)
    model.eval()
    expected = load_file(str(case / "expected.safetensors"))
    save_file({"output": output(model, expected["input_ids"], expected["attention_mask"])}, out)


def main() -> None:
    import sys

    if sys.argv[1] == "--run":
        for job in json.loads(Path(sys.argv[2]).read_text()):
            run(Path(job["case"]), job["adapter"], job["out"])
        return
    run_fixtures(CASES, make_case)


if __name__ == "__main__":
    main()
