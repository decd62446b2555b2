"""Hugging Face PEFT pushes a LoRA adapter to the registry and loads it back with from_pretrained.

PEFT calls huggingface_hub's module-level functions, whose endpoint is fixed
when huggingface_hub is imported (HF_ENDPOINT). So the client side runs in a
child process whose environment points at our server; the server runs here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.registry_conftest_helpers import running_registry, subprocess_env

pytest.importorskip("peft")
pytest.importorskip("transformers")

_CLIENT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from huggingface_hub import HfApi, constants
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    token, workdir = sys.argv[1], sys.argv[2]
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lora).eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    folder = os.path.join(workdir, "adapter")
    model.save_pretrained(folder)
    # PEFT's own card lacks a hub base model id for a model built from a config: write ours.
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("---\\nlibrary_name: peft\\nbase_model: peftkit-tests/tiny-llama\\ntags:\\n- lora\\n"
                "- base_model:adapter:peftkit-tests/tiny-llama\\npipeline_tag: text-generation\\n---\\n"
                "# A tiny LoRA for tests\\n")
    api = HfApi(token=token)  # endpoint from HF_ENDPOINT
    api.create_repo("alice/tiny-llama-lora")
    commit = api.upload_folder(folder_path=folder, repo_id="alice/tiny-llama-lora", commit_message="Add LoRA")

    fresh = LlamaForCausalLM(cfg)
    fresh.load_state_dict(base_state)
    fresh.eval()
    with torch.no_grad():
        base_logits = fresh(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(fresh, "alice/tiny-llama-lora").eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    print(json.dumps({
        "endpoint": constants.ENDPOINT,
        "commit": commit.oid,
        "max_diff": float((got - expected).abs().max()),
        "adapter_effect": float((expected - base_logits).abs().max()),
        "files": sorted(os.listdir(folder)),
    }))
    """
)


def test_peft_push_and_from_pretrained(tmp_path: Path) -> None:
    with running_registry(tmp_path / "reg", users={"alice": True}) as (store, server, tokens):
        proc = subprocess.run(
            [sys.executable, "-c", _CLIENT, tokens["alice"], str(tmp_path)],
            env=subprocess_env(hf_home=tmp_path / "hf", endpoint=server.url),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["endpoint"] == server.url
        assert result["adapter_effect"] > 1e-4, "init_lora_weights=False must change the output"
        assert result["max_diff"] < 1e-5, result
        assert store.resolve_revision("alice/tiny-llama-lora") == result["commit"]
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {
            f.path for f in store.list_files("alice/tiny-llama-lora")
        }
        # from_pretrained fetched the weights from us, and the upload is searchable the Hub's way.
        assert server.stats["GET resolve"] >= 2
        hits = store.search(tags=["peft", "base_model:adapter:peftkit-tests/tiny-llama"], visible_to=())
        assert [h.repo_id for h in hits] == ["alice/tiny-llama-lora"]
        info = hits[0]
        assert info.methods == ("lora",) and "text-generation" in info.tasks and info.downloads >= 1
