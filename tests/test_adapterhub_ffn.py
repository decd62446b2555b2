"""AdapterHub's LoRA and IA3 outside self-attention, against the real ``adapters`` 1.3.0, both ways.

tests/adapterhub/make_ffn_fixtures.py (run in ``.venv-adapters``, cached) saves LoRAConfig with
``intermediate_lora`` / ``output_lora`` (gated too), IA3Config with ``alpha`` other than 1, ``output_lora``
and ``leave_out``, on BERT, RoBERTa, Llama and GPT-2: each loads with ``adapters``' outputs, and what
peftkit saves from it (or makes itself) gives ``adapters`` the same outputs (tests/adapterhub/run_saved.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from tests.adapterhub_venv import cached_fixtures, run_in_venv, saved_both_ways, with_changed_options
from tests.test_adapterhub_reft import base_of  # the same case layout (make_fixtures.py's)

pytestmark = pytest.mark.slow

ATOL = 1e-5
CASES = ["bert_lora_ffn", "roberta_lora_output_only", "bert_lora_ffn_gated", "llama_lora_ffn", "gpt2_lora_ffn",
         "gpt2_lora_ffn_gated", "gpt2_lora_leave_out", "bert_ia3_alpha", "roberta_ia3_output_only", "llama_ia3",
         "llama_ia3_leave_out", "gpt2_ia3", "gpt2_ia3_kv", "gpt2_ia3_ffn", "gpt2_ia3_default", "gpt2_lora_fused_ffn"]


@pytest.fixture(scope="module")
def fixtures() -> Path:
    return cached_fixtures("ffn-", "make_ffn_fixtures.py", "make_fixtures.py")


def output(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = expected["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", CASES)
def test_adapters_folder_loads_with_the_same_outputs(fixtures: Path, name: str) -> None:
    case = fixtures / name
    expected = load_file(str(case / "expected.safetensors"))
    assert not torch.allclose(output(base_of(case), expected), expected["output"], atol=1e-3)  # the adapter acts
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    torch.testing.assert_close(output(model, expected), expected["output"], atol=ATOL, rtol=0)


#: case -> (the modules adapted, by their names in the model; the layer left out has none)
SITES = {
    "bert_lora_ffn": ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value",
                      "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"],
    "gpt2_lora_ffn": ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"],
    "llama_ia3": [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.k_proj", "self_attn.v_proj",
                                                                     "mlp.up_proj", "mlp.down_proj")],
}


@pytest.mark.parametrize("name", sorted(SITES))
def test_the_layers_adapters_adapts_are_the_ones_adapted(fixtures: Path, name: str) -> None:
    """Not attention.output.dense (BERT) nor attn.c_proj (GPT-2), whose names the feed-forward targets also match,
    and no layer of leave_out."""
    case = fixtures / name
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    sites = [site for site, layer in model.base_model.named_modules() if "default" in getattr(layer, "adapters", {})]
    assert sorted(sites) == sorted(SITES[name])


def test_gpt2_fused_lora_beside_the_mlp_has_one_rank_per_q_k_v_at_c_attn(fixtures: Path, tmp_path: Path) -> None:
    """r=2 at the MLP's layers, 3r (with 3 alpha: the same scale) at the fused layer; saved back as r=2."""
    case = fixtures / "gpt2_lora_fused_ffn"
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    ranks = {site: layer.adapters["default"].tensors()["lora_A.weight"].shape[0]
             for site, layer in model.base_model.named_modules() if "default" in getattr(layer, "adapters", {})}
    assert ranks == {"transformer.h.0.attn.c_attn": 6, "transformer.h.0.mlp.c_fc": 2, "transformer.h.0.mlp.c_proj": 2}
    model.save_adapter(str(tmp_path / "out"), format="adapters")
    options = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["config"]
    assert {k: options[k] for k in ("r", "alpha", "attn_matrices", "intermediate_lora", "output_lora", "leave_out")} \
        == {"r": 2, "alpha": 4, "attn_matrices": ["q", "k", "v"], "intermediate_lora": True, "output_lora": True,
            "leave_out": [1]}


def test_ia3_alpha_is_folded_into_the_vectors_and_saved_as_1(fixtures: Path, tmp_path: Path) -> None:
    case = fixtures / "bert_ia3_alpha"
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    theirs = load_file(str(case / "adapter" / "adapter.safetensors"))
    key = "encoder.layer.0.attention.self.key"
    ours = model.base_model.get_submodule(key).adapters["default"].tensors()["ia3_l"]
    torch.testing.assert_close(ours, 2 * theirs[f"{key}.loras.task.lora_B"])
    model.save_adapter(str(tmp_path / "out"), format="adapters")
    options = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["config"]
    assert (options["alpha"], options["leave_out"], options["output_lora"]) == (1, [1], True)


def shuffle(model: peftkit.AdaptedModel, seed: int) -> None:
    """Move every adapter tensor, but GPT-2's fused lora_B, whose blocks off the diagonal must stay zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site, layer in model.base_model.named_modules():
            if "default" not in getattr(layer, "adapters", {}):
                continue
            for key, tensor in layer.adapters["default"].tensors().items():
                if not (site.endswith("c_attn") and key == "lora_B.weight"):
                    tensor.add_(0.3 * torch.randn(tensor.shape, generator=gen))


_BERT_LEFT_OUT = ",".join(f"layer.1.{m}" for m in ("attention.self.query", "intermediate.dense", "output.dense"))
#: label -> (case whose base model and batch are used, the spec peftkit saves; None: the case's own adapter)
SAVED = {
    **{f"{name}_reloaded": (name, None) for name in CASES},
    "bert_lora_made": ("bert_lora_ffn", "lora[r=4,alpha=8,init_weights=false,target_modules=[query,intermediate.dense,"
                                        f"output.dense],exclude_modules=[attention.output.dense,{_BERT_LEFT_OUT}]]"),
    "llama_lora_made": ("llama_lora_ffn", "lora[r=2,init_weights=false,target_modules=[mlp.down_proj,up_proj]]"),
    "gpt2_lora_made": ("gpt2_lora_ffn", "lora[r=2,alpha=4,init_weights=false,use_gating=true,target_modules="
                                        "[c_fc,mlp.c_proj],exclude_modules=[h.0.mlp.c_fc,h.0.mlp.c_proj]]"),
    "gpt2_ia3_made": ("gpt2_ia3", "ia3[init_ia3_weights=false,target_modules=[c_attn,c_fc],feedforward_modules=[],"
                                  "exclude_modules=[h.1.attn.c_attn,h.1.mlp.c_fc]]"),
    "llama_ia3_made": ("llama_ia3", "ia3[init_ia3_weights=false,target_modules=[v_proj,down_proj,up_proj],"
                                    "feedforward_modules=[]]"),
    "gpt2_ia3_fused_made": ("gpt2_ia3_default", "ia3[init_ia3_weights=false,target_modules=[c_attn,c_fc],"
                                                "feedforward_modules=[]]"),
}


def test_saved_in_adapters_format_adapters_computes_the_same(fixtures: Path, tmp_path: Path) -> None:
    jobs, ours = saved_both_ways(fixtures, SAVED, base_of, shuffle, output, tmp_path, ATOL)
    options = json.loads((tmp_path / "bert_lora_made" / "adapter_config.json").read_text())["config"]
    assert {k: options[k] for k in ("attn_matrices", "intermediate_lora", "output_lora", "leave_out")} == {
        "attn_matrices": ["q"], "intermediate_lora": True, "output_lora": True, "leave_out": [1]}
    run_in_venv(["run_saved.py", str(jobs)])
    for label in SAVED:
        theirs = load_file(str(tmp_path / f"{label}.safetensors"))["output"]
        torch.testing.assert_close(theirs, ours[label], atol=ATOL, rtol=0, msg=lambda m, label=label: f"{label}: {m}")


@pytest.mark.parametrize("name, change, words", [
    ("bert_ia3_alpha", {"use_gating": True}, "IA3 option use_gating=True is not supported"),
    ("bert_lora_ffn", {"leave_out": [-1]}, "LoRA option leave_out=\\[-1\\] is not supported"),
    ("llama_lora_ffn", {"use_dora": True}, "LoRA option use_dora=True is not supported"),
])
def test_options_peftkit_cannot_place_are_refused_by_name(fixtures: Path, tmp_path: Path, name: str, change: dict,
                                                          words: str) -> None:
    case = fixtures / name
    folder = with_changed_options(case / "adapter", tmp_path, change)
    with pytest.raises(peftkit.AdapterLoadError, match=words):
        peftkit.from_pretrained(base_of(case), str(folder))


@pytest.mark.parametrize("name, spec, words", [
    ("bert_lora_ffn", "lora[target_modules=[query,output.dense]]", "exclude_modules must be a list naming .*"
                                                                   "\\['attention.output.dense'\\]"),
    ("bert_lora_ffn", "lora[target_modules=[query],layers_to_transform=[1]]", "layers_to_transform=\\[1\\].*exclude_"),
    ("bert_lora_ffn", "lora[target_modules=[query,value],exclude_modules=[layer.0.attention.self.query]]",
     "leaves whole layers out.*'layer.0.attention.self.query', 'layer.0.attention.self.value'"),
    ("gpt2_lora_ffn", "lora[target_modules=[c_proj]]", "target_modules=\\['c_proj'\\].*mlp.c_proj"),
    ("gpt2_lora_ffn", "lora[r=3,target_modules=[c_attn,c_fc]]", "rank_pattern=\\{\\}.*\\{'c_attn': 9\\}"),
    ("llama_ia3", "ia3[target_modules=[k_proj,down_proj],feedforward_modules=[down_proj]]",
     "feedforward_modules=\\['down_proj'\\]"),
])
def test_configs_adapters_cannot_hold_are_refused_when_saving(fixtures: Path, tmp_path: Path, name: str, spec: str,
                                                              words: str) -> None:
    model = peftkit.adapt(base_of(fixtures / name), spec)
    with pytest.raises(peftkit.PeftkitError, match=words):
        model.save_adapter(str(tmp_path / "out"), format="adapters")
    assert not (tmp_path / "out" / "adapter_config.json").exists()
