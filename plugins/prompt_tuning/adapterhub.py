"""Prompt tuning in AdapterHub's format (``adapters``' PromptTuningConfig), for encoder models.

``adapters`` joins its prompt to the output of the model's embedding block (after the position
embeddings and LayerNorm), in front (``combine="prefix"``) or after the first token
(``"prefix_after_bos"``): peftkit's ``placement="embedding_output"`` with the same ``combine``. The
prompt is one tensor on the model's body, ``<body>prompt_tuning.prompt_tunings.<name>.prompt_embedding.weight``
(P x hidden). The init options only matter when ``adapters`` creates an adapter: a saved folder
says ``prompt_init="random_uniform"`` so that loading it never needs a tokenizer. ``adapters`` 1.3.0
has prompt tuning for encoders only (not Llama, GPT-2 or encoder-decoder models).
"""

from __future__ import annotations

from typing import Any, Mapping

from peftkit.plugin_api import AdapterHubFormat, ConfigError

#: The module ``adapters`` keeps prompts in, on the model's body, and its dict of prompts.
POOL = "prompt_tuning"
PROMPTS = "prompt_tunings"
#: The prompt's tensor below ``<POOL>.<PROMPTS>.<name>.``.
TENSOR = "prompt_embedding.weight"
COMBINES = ("prefix", "prefix_after_bos")
#: Model families ``adapters`` 1.3.0 has prompt tuning for, among those peftkit saves for.
ENCODERS = ("bert", "roberta")


class PromptTuningAdapterHub(AdapterHubFormat):
    module_dict = PROMPTS

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == "prompt_tuning"

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        combine = options.get("combine", "prefix")
        if combine not in COMBINES:
            raise ConfigError(f"AdapterHub prompt tuning option combine={combine!r} is not supported by peftkit "
                              f"(one of {', '.join(COMBINES)})")
        return {"num_virtual_tokens": int(options.get("prompt_length", 10)), "placement": "embedding_output",
                "combine": combine}

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        if config.placement != "embedding_output":
            raise ConfigError(f"placement={config.placement!r}: AdapterHub's prompt joins the embedding block's "
                              f"output (placement='embedding_output'), where this adapter's joins the input "
                              f"embeddings")
        if model_type not in ENCODERS:
            raise ConfigError(f"adapters 1.3.0 has prompt tuning for encoder models only "
                              f"({', '.join(ENCODERS)} among those peftkit saves for), not {model_type!r}")
        return {"architecture": "prompt_tuning", "combine": config.combine, "init_weights_seed": None,
                "prompt_init": "random_uniform", "prompt_init_text": None,
                "prompt_length": config.num_virtual_tokens}

    def model_tensors_in(self, tensors: Mapping[str, Any], name: str,
                         options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        key = f"{POOL}.{PROMPTS}.{name}.{TENSOR}"
        found = [k for k in tensors if k == key or k.endswith("." + key)]
        if len(found) != 1:
            raise ConfigError(f"the folder has {'no' if not found else len(found)} prompt of adapter {name!r} "
                              f"(keys ending in {key!r})")
        prompt = tensors[found[0]]
        length = int(options.get("prompt_length", 10))
        if prompt.dim() != 2 or prompt.shape[0] != length:
            raise ConfigError(f"the prompt of adapter {name!r} has shape {tuple(prompt.shape)}, not "
                              f"(prompt_length={length}, hidden)")
        return {"prompt_embeddings": prompt}, set(found)

    def model_tensors_out(self, model: Any, tensors: Mapping[str, Any], name: str,
                          options: Mapping[str, Any]) -> dict[str, Any] | None:
        body = getattr(model, "base_model", model)
        prefix = next((f"{n}." for n, m in model.named_children() if m is body), "")
        prompt = tensors["prompt_embeddings"][: int(options["prompt_length"])]
        return {f"{prefix}{POOL}.{PROMPTS}.{name}.{TENSOR}": prompt.contiguous()}
