"""More decoder cases of AdapterHub's format against the real ``adapters`` 1.3.0: GPT-2's LoRA on
the fused ``c_attn`` (``attn_matrices``) and par_bn on GPT-2 and Llama, loaded with the same logits
and saved back so that ``adapters`` gives them again. Fixtures: tests/adapterhub/make_decoder_fixtures.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftkit
from tests.adapterhub_venv import cached_fixtures, run_in_venv
from peftkit.core.errors import PeftkitError

pytestmark = pytest.mark.slow

ATOL = 1e-5



@pytest.fixture(scope="module")
def fixtures() -> Path:
    return cached_fixtures('decoders-', 'make_decoder_fixtures.py', 'make_fixtures.py')


def _base(case: Path) -> torch.nn.Module:
    spec = json.loads((case / "model.json").read_text())
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}[spec["model_type"]]
    config = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}[spec["model_type"]]
    model = cls(config(**spec["config"]))
    result = model.load_state_dict(load_file(str(case / "base.safetensors")), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    return model.eval()


def _logits(model: torch.nn.Module, case: Path) -> torch.Tensor:
    ids = load_file(str(case / "expected.safetensors"))["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _tiny_gpt2(layers: int) -> peftkit.AdaptedModel:
    config = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=50)
    return peftkit.AdaptedModel(transformers.GPT2LMHeadModel(config))


CASES = ["gpt2_lora", "gpt2_lora_qkv", "gpt2_lora_k", "gpt2_par_bn", "llama_par_bn"]


@pytest.mark.parametrize("name", CASES)
def test_loads_with_adapters_logits_and_saves_back_to_the_same(fixtures: Path, tmp_path: Path, name: str) -> None:
    case = fixtures / name
    expected = load_file(str(case / "expected.safetensors"))["output"]
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    torch.testing.assert_close(_logits(model, case), expected, atol=ATOL, rtol=0)
    with torch.no_grad():
        bare = _base(case)(input_ids=load_file(str(case / "expected.safetensors"))["input_ids"]).logits
    assert (bare - expected).abs().max() > 1e-3  # the adapter matters
    saved = tmp_path / "saved"
    model.save_adapter(str(saved), "default", format="adapters")
    again = peftkit.from_pretrained(_base(case), str(saved))
    torch.testing.assert_close(_logits(again, case), expected, atol=ATOL, rtol=0)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"case": str(case), "adapter": str(saved), "out": str(tmp_path / "out.safetensors")}]))
    run_in_venv(["run_saved.py", str(jobs)])
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["output"], expected, atol=ATOL, rtol=0)


def test_a_gpt2_lora_loaded_from_adapters_is_one_block_diagonal_lora_on_c_attn(fixtures: Path) -> None:
    case = fixtures / "gpt2_lora"
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    config = model.adapter_record("default").config
    assert (config.r, config.alpha, list(config.target_modules)) == (12, 24, ["c_attn"])  # 3 r, 3 alpha: same scale
    tensors = model.base_model.transformer.h[0].attn.c_attn.adapters["default"].tensors()
    a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
    assert a[4:8].abs().max() == 0 and a[:4].abs().max() > 0  # k's rows: attn_matrices q, v
    assert b[32:64].abs().max() == 0 and b[:32, 4:].abs().max() == 0 and b[64:, :8].abs().max() == 0


def test_a_gpt2_lora_that_mixes_q_k_and_v_is_refused_when_saved_in_adapters_format(fixtures: Path,
                                                                                    tmp_path: Path) -> None:
    case = fixtures / "gpt2_lora"
    model = peftkit.from_pretrained(_base(case), str(case / "adapter"))
    layer = model.base_model.transformer.h[1].attn.c_attn.adapters["default"]
    with torch.no_grad():
        next(p for n, p in layer.named_parameters() if "lora_B" in n)[40, 0] = 0.5  # k's rows, q's rank
    with pytest.raises(PeftkitError, match="cannot save adapter 'default' in AdapterHub's format: at "
                                           r".*h\.1\.attn\.c_attn: lora_B on the fused c_attn mixes q, k and v"):
        model.save_adapter(str(tmp_path / "out"), "default", format="adapters")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_a_gpt2_lora_whose_rank_is_no_multiple_of_3_is_refused_by_name(tmp_path: Path) -> None:
    model = _tiny_gpt2(1)
    model.add_adapter("default", "lora[r=4,target_modules=[\"c_attn\"]]")
    with pytest.raises(PeftkitError, match=r"r a multiple of 3"):
        model.save_adapter(str(tmp_path / "out"), "default", format="adapters")


def test_par_bn_reading_the_block_input_is_refused_on_a_decoder_by_the_option_name(tmp_path: Path) -> None:
    model = _tiny_gpt2(1)
    model.add_adapter("default", "par_bn")
    with pytest.raises(PeftkitError, match=r"use par_bn\[read_residual=true\]"):
        model.save_adapter(str(tmp_path / "out"), "default", format="adapters")


def test_read_residual_reads_the_input_of_ln_2_on_gpt2() -> None:
    model = _tiny_gpt2(2)
    model.add_adapter("default", "par_bn[read_residual=true]")
    layer = model.base_model.transformer.h[1].mlp.c_proj
    assert layer.input_sources == {"default": "transformer.h.1.ln_2"}
