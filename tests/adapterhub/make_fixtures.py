"""Run in the second virtualenv (``make adapters-venv``): adapters saved by AdapterHub's ``adapters``.

Usage: python make_fixtures.py OUT_FOLDER

For each case, OUT_FOLDER/<case>/ holds ``model.json`` (the base model's config values, and
with a prediction head its ``task``: ``seq_cls`` or ``token_cls``), ``base.safetensors`` (the
weights of the model's body: both libraries start from the same numbers), ``adapter/`` (the
folder ``adapters`` saved) and ``expected.safetensors`` (input ids and the adapted model's last
hidden state, or with a head (and for decoders, used with their LM head) its logits). Adapter and head weights are drawn at random so that
every tensor matters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters import (DoubleSeqBnConfig, IA3Config, LoRAConfig, ParBnConfig, PrefixTuningConfig, PromptTuningConfig,
                      SeqBnConfig)

MODELS = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 vocab_size=100, max_position_embeddings=128),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    vocab_size=100, max_position_embeddings=130, pad_token_id=1),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=100, max_position_embeddings=128),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=128),
}
#: model type -> the prefix of its transformers classes (``BertModel``, ``BertConfig``).
FAMILIES = {"bert": "Bert", "roberta": "Roberta", "llama": "Llama", "gpt2": "GPT2"}
#: Decoders are used with their language-model head, as one uses them (outputs: logits).
LM_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}

#: case name -> (model type, adapters config, save with safetensors)
CASES = {
    "bert_double_seq_bn": ("bert", lambda: DoubleSeqBnConfig(reduction_factor=4), True),
    "bert_double_seq_bn_ln_learned_bin": (
        "bert", lambda: DoubleSeqBnConfig(reduction_factor=4, ln_before=True, scaling="learned",
                                          non_linearity="gelu"), False),
    "bert_seq_bn": ("bert", lambda: SeqBnConfig(original_ln_before=False, non_linearity="tanh",
                                                reduction_factor={"0": 4, "default": 8}), True),
    "bert_seq_bn_leave_out": ("bert", lambda: SeqBnConfig(original_ln_before=False, leave_out=[1]), True),
    "bert_par_bn": ("bert", lambda: ParBnConfig(reduction_factor=2), True),
    "bert_lora": ("bert", lambda: LoRAConfig(r=4, alpha=8), True),
    "bert_pfeiffer": ("bert", lambda: SeqBnConfig(), True),
    # adapters cannot write safetensors with ln_before (its LayerNorm is registered twice)
    "bert_pfeiffer_post_add_ln_before": ("bert", lambda: SeqBnConfig(residual_before_ln="post_add", ln_before=True),
                                         False),
    "bert_pfeiffer_normed_ln_after": ("bert", lambda: SeqBnConfig(residual_before_ln=False, ln_after=True,
                                                                  adapter_residual_before_ln=True), True),
    "bert_seq_bn_ln_after": ("bert", lambda: SeqBnConfig(original_ln_before=False, ln_after=True), True),
    "roberta_double_seq_bn_original_ln": ("roberta", lambda: DoubleSeqBnConfig(original_ln_before=True), True),
    "bert_par_bn_ln_after": ("bert", lambda: ParBnConfig(ln_after=True), True),
    "bert_ia3": ("bert", lambda: IA3Config(), True),
    "roberta_ia3_qv": ("roberta", lambda: IA3Config(attn_matrices=["q", "v"], intermediate_lora=False), True),
    "roberta_double_seq_bn": ("roberta", lambda: DoubleSeqBnConfig(reduction_factor=8), True),
    "roberta_lora": ("roberta", lambda: LoRAConfig(r=2, alpha=16, attn_matrices=["q", "k", "v"]), True),
    "llama_seq_bn": ("llama", lambda: SeqBnConfig(original_ln_before=False, reduction_factor=4), True),
    "llama_double_seq_bn": ("llama", lambda: DoubleSeqBnConfig(reduction_factor=4), True),
    "llama_lora": ("llama", lambda: LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"]), True),
    "gpt2_double_seq_bn": ("gpt2", lambda: DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu_new"), True),
    "llama_pfeiffer": ("llama", lambda: SeqBnConfig(reduction_factor=4), True),
    "gpt2_double_seq_bn_original_ln": ("gpt2", lambda: DoubleSeqBnConfig(reduction_factor=4, original_ln_before=True,
                                                                         residual_before_ln=False), True),
    # no peftkit method computes these (see docs/format.md): kept to check the refusal
    "bert_prefix_tuning": ("bert", lambda: PrefixTuningConfig(prefix_length=4), False),  # shared tensors
    "bert_prompt_tuning": ("bert", lambda: PromptTuningConfig(prompt_length=4), True),
}


LABELS = {0: "neg", 1: "neu", 2: "pos"}
TAGS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}

#: case name -> (model type, adapters config, head: "flex" classification/tagging keyword arguments
#: on the AdapterModel class, or "static" for transformers' ForSequenceClassification class)
HEAD_CASES = {
    "bert_head_seq_cls": ("bert", lambda: SeqBnConfig(), ("classification", {"num_labels": 3, "id2label": LABELS})),
    "bert_head_seq_cls_pooler": ("bert", lambda: LoRAConfig(r=4), (
        "classification", {"num_labels": 3, "id2label": LABELS, "layers": 1, "use_pooler": True})),
    "roberta_head_seq_cls": ("roberta", lambda: DoubleSeqBnConfig(reduction_factor=8), (
        "classification", {"num_labels": 3, "id2label": LABELS})),
    "bert_head_tagging": ("bert", lambda: LoRAConfig(r=4), ("tagging", {"num_labels": 5, "id2label": TAGS})),
    "roberta_head_tagging": ("roberta", lambda: SeqBnConfig(), ("tagging", {"num_labels": 5, "id2label": TAGS})),
    "bert_head_static_seq_cls": ("bert", lambda: SeqBnConfig(), ("static", {"num_labels": 3, "id2label": LABELS})),
    "llama_head_causal_lm": ("llama", lambda: LoRAConfig(r=4), ("causal_lm", {})),
}


def build_base(model_type: str) -> torch.nn.Module:
    import transformers

    family = FAMILIES[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**MODELS[model_type])
    return getattr(transformers, LM_CLASSES.get(model_type, f"{family}Model"))(config).eval()


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights for base.safetensors: a tied output layer (GPT-2's lm_head) is left out."""
    tied = getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head")
    return {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def load_base(model: torch.nn.Module, path: str) -> None:
    """Load base.safetensors into ``model`` (a tied output layer follows its embedding)."""
    result = model.load_state_dict(load_file(path), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result


def output_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).contiguous()


def randomize(model: torch.nn.Module, name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    # lm_head: adapters saves a causal LM's output layer as a static head (GPT-2's is tied: not listed here)
    markers = (f".adapters.{name}.", f".loras.{name}.", f"heads.{name}.", "classifier.", "lm_head.")
    with torch.no_grad():
        for key, param in model.named_parameters():
            if not any(m in key for m in markers):
                continue
            noise = torch.randn(param.shape, generator=gen)
            if key.endswith(".scaling"):
                param.fill_(1.5)
            elif param.dim() == 1 and "norm" in key and key.endswith(".weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.2 * noise)


def make_case(out: Path, case: str) -> None:
    model_type, make_config, safetensors = CASES[case]
    folder = out / case
    folder.mkdir(parents=True)
    model = build_base(model_type)
    spec = {"model_type": model_type, "config": MODELS[model_type]}
    if model_type in LM_CLASSES:
        spec["task"] = "causal_lm"
    (folder / "model.json").write_text(json.dumps(spec))
    save_file(base_weights(model), str(folder / "base.safetensors"))
    adapters.init(model)
    model.add_adapter("task", config=make_config())
    randomize(model, "task")
    model.set_active_adapters("task")
    model.save_adapter(str(folder / "adapter"), "task", use_safetensors=safetensors)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    save_file({"input_ids": ids, "output": output_of(model, ids)}, str(folder / "expected.safetensors"))


def build_with_head(model_type: str, kind: str, kwargs: dict, body: torch.nn.Module) -> torch.nn.Module:
    """A model with a prediction head whose body holds ``body``'s weights."""
    import transformers
    from transformers import BertConfig, BertForSequenceClassification

    import adapters as library

    if kind == "static":
        model = BertForSequenceClassification(BertConfig(**MODELS[model_type], num_labels=kwargs["num_labels"],
                                                         id2label=kwargs["id2label"]))
        model.bert.load_state_dict(body.base_model.state_dict())
        adapters.init(model)
        return model.eval()
    config = getattr(transformers, f"{FAMILIES[model_type]}Config")(**MODELS[model_type])
    model = getattr(library, f"{FAMILIES[model_type]}AdapterModel")(config)
    result = model.base_model.load_state_dict(body.base_model.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("prompt_tuning.") for k in result.missing_keys), result
    return model.eval()


def add_head(model: torch.nn.Module, kind: str, kwargs: dict, name: str) -> None:
    if kind == "classification":
        model.add_classification_head(name, **kwargs)
    elif kind == "tagging":
        model.add_tagging_head(name, **kwargs)
    elif kind == "causal_lm":  # as adapters converts a ForCausalLM's lm_head (add_causal_lm_head adds 2 layers)
        from adapters.heads import CausalLMHead

        model.add_prediction_head(CausalLMHead(model, name, layers=1, bias=False, **kwargs))


def make_head_case(out: Path, case: str) -> None:
    model_type, make_config, (kind, kwargs) = HEAD_CASES[case]
    folder = out / case
    folder.mkdir(parents=True)
    body = build_base(model_type)
    task = {"tagging": "token_cls", "causal_lm": "causal_lm"}.get(kind, "seq_cls")
    (folder / "model.json").write_text(json.dumps({"model_type": model_type, "config": MODELS[model_type],
                                                   "task": task}))
    save_file(base_weights(body), str(folder / "base.safetensors"))
    model = build_with_head(model_type, kind, kwargs, body)
    model.add_adapter("task", config=make_config())
    add_head(model, kind, kwargs, "task")
    randomize(model, "task")
    model.set_active_adapters("task")
    model.save_adapter(str(folder / "adapter"), "task", with_head=True, use_safetensors=True)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    save_file({"input_ids": ids, "output": logits.contiguous()}, str(folder / "expected.safetensors"))


def main() -> None:
    out = Path(sys.argv[1])
    for case in CASES:
        make_case(out, case)
    for case in HEAD_CASES:
        make_head_case(out, case)


if __name__ == "__main__":
    main()
