"""Run in the second virtualenv: load with ``adapters`` folders peftkit saved in AdapterHub's format.

Usage: python run_saved.py JOBS_JSON

JOBS_JSON lists ``{"case": CASE_FOLDER, "adapter": ADAPTER_FOLDER, "out": OUT_FILE}``. CASE_FOLDER
is one make_fixtures.py wrote (base weights, inputs); OUT_FILE receives the adapted model's last
hidden state on those inputs, or with a head in the folder (``head_config.json``) the logits of the
``...AdapterModel`` class that loaded it (safetensors, key ``output``). Exits non-zero when
``adapters`` leaves any weight of a folder unloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

import adapters
from make_fixtures import build_base, build_with_head, load_base, output_of


def run(case: Path, adapter: str, out: str) -> None:
    model_type = json.loads((case / "model.json").read_text())["model_type"]
    model = build_base(model_type)
    load_base(model, str(case / "base.safetensors"))
    head_config = Path(adapter) / "head_config.json"
    head = head_config.is_file()
    if head and json.loads(head_config.read_text())["config"] is not None:
        model = build_with_head(model_type, "flex", {}, model)
    else:  # a static head: the model's own class
        adapters.init(model)
    info: dict = {}
    name = model.load_adapter(adapter, loading_info=info, use_safetensors=True)  # peftkit writes no pickle
    if info.get("missing_keys") or info.get("unexpected_keys"):
        raise SystemExit(f"{adapter}: adapters did not load every weight: {info}")
    if head and hasattr(model, "heads") and name not in model.heads:
        raise SystemExit(f"{adapter}: adapters did not load the head")
    model.set_active_adapters(name)
    ids = load_file(str(case / "expected.safetensors"))["input_ids"]
    save_file({"output": output_of(model, ids)}, out)


def main() -> None:
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run(Path(job["case"]), job["adapter"], job["out"])


if __name__ == "__main__":
    main()
