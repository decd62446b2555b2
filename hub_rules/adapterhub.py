"""How hubs index AdapterHub's repos (folders of the ``adapters`` library, formerly adapter-transformers).

AdapterHub's repos on the Hugging Face Hub describe themselves by card tags, not PEFT's fields:
``adapter-transformers`` (the Hub's library name for them), the model type (``bert``) and
``adapterhub:<task>/<subtask>`` (``adapterhub:sentiment/sst-2``); their ``adapter_config.json``
names the base model as ``model_name`` and the method by its options under ``"config"``. The
registry's index reads those, so a search by base model, method, task or library finds them
like any adapter. Imports nothing of peftkit (the registry and the hub client share it).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

#: The card's ``library_name`` (and tag) of AdapterHub repos on the Hugging Face Hub.
LIBRARY = "adapter-transformers"
#: Tags naming the library: the Hub's, and the package's own name.
LIBRARY_TAGS = frozenset({"adapter-transformers", "adapters"})
#: Prefix of AdapterHub's task tags: ``adapterhub:<task>/<subtask>``.
TASK_TAG_PREFIX = "adapterhub:"


def is_adapterhub_config(data: Mapping[str, Any]) -> bool:
    """Whether an ``adapter_config.json``'s content is AdapterHub's (options under ``"config"``, no
    ``peft_type``, no peftkit record): the rule peftkit's loader uses too."""
    return (isinstance(data.get("config"), dict) and "peft_type" not in data and "peftkit" not in data
            and ("version" in data or "model_class" in data))


def method_of(options: Mapping[str, Any]) -> str | None:
    """peftkit's method name for an AdapterHub config's options (its ``"config"`` dict), for the index.

    The loader asks the installed plugins (``Method.adapterhub``); the index, which loads no plugin,
    names the built-in method that reads them."""
    architecture = options.get("architecture")
    if architecture in (None, "bottleneck"):
        if options.get("is_parallel"):
            return "par_bn"
        return "double_seq_bn" if options.get("mh_adapter") else "seq_bn"
    if architecture == "lora":
        return "ia3" if options.get("composition_mode") == "scale" else "lora"
    if architecture in ("prefix_tuning", "prompt_tuning"):
        return str(architecture)
    if architecture == "reft":  # LoReFT, NoReFT and DiReFT alike: presets of peftkit's reft
        return "reft"
    return None


def tasks_from_tags(tags: Iterable[str]) -> list[str]:
    """The tasks of ``adapterhub:<task>/<subtask>`` tags (``sentiment`` of ``adapterhub:sentiment/sst-2``)."""
    tasks = []
    for tag in tags:
        if tag.lower().startswith(TASK_TAG_PREFIX):
            task = tag[len(TASK_TAG_PREFIX):].split("/", 1)[0].strip()
            if task and task not in tasks:
                tasks.append(task)
    return tasks
