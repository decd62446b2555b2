"""Copy-paste usage snippets of an adapter page (peftkit, the peftkit CLI, PEFT, huggingface_hub).

Readers paste these into Python and a shell, so only names the registry has checked go in: the repo id,
a branch, tag or commit, the server's URL, and the base model only when it is a Hub model id. The base
model comes from the card or ``adapter_config.json``, which the adapter's author writes: a value such as
``x"); import os; os.system("...`` (or one with a newline, ending the shell's here-document) would run
on the reader's machine, so anything else shows as ``BASE_MODEL_ID``.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.hub_rules.cards import TASK_TYPE_TO_AUTO_CLASS
from peftkit.hub_rules.names import name_problem, repo_id_problem

PLACEHOLDER_BASE = "BASE_MODEL_ID"


@dataclass(frozen=True)
class Snippet:
    title: str
    code: str


def is_model_id(text: str) -> bool:
    """A Hub model id (``namespace/name``, or a one-part legacy id such as ``gpt2``): safe to quote in code."""
    return repo_id_problem(text) is None or name_problem(text) is None


def snippets(
    repo_id: str,
    *,
    endpoint: str,
    revision: str | None,
    base_model: str | None,
    peft_loads: bool,
    task_type: str | None,
    private: bool,
) -> list[Snippet]:
    """What to paste to use ``repo_id`` from this registry at ``endpoint`` (``revision``: None for main)."""
    base = base_model if base_model is not None and is_model_id(base_model) else PLACEHOLDER_BASE
    ref = f"{repo_id}@{revision}" if revision else repo_id
    token = ', token="pkr_..."' if private else ""
    out = [
        Snippet("peftkit (Python)",
                f'import peftkit\n\nmodel = peftkit.load("{base}", "{ref}", hub="{endpoint}"{token})'),
        Snippet("peftkit (command line)",
                (f"peftkit hub login --hub {endpoint}\n" if private else "")
                + f"peftkit hub pull {ref} --hub {endpoint}"),
    ]
    if peft_loads:
        auto = TASK_TYPE_TO_AUTO_CLASS.get((task_type or "").upper(), "AutoModel")
        rev = f', revision="{revision}"' if revision else ""
        out.append(Snippet(
            "PEFT (set HF_ENDPOINT before Python starts)",
            f"export HF_ENDPOINT={endpoint}\n" + ("export HF_TOKEN=pkr_...\n" if private else "")
            + f"python - <<'EOF'\nfrom transformers import {auto}\nfrom peft import PeftModel\n\n"
            f'base = {auto}.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}"{rev})\nEOF',
        ))
    rev = f', revision="{revision}"' if revision else ""
    out.append(Snippet(
        "huggingface_hub",
        "from huggingface_hub import snapshot_download\n\n"
        f'folder = snapshot_download("{repo_id}"{rev}, endpoint="{endpoint}"{token})',
    ))
    return out
