"""Adapters on quantized base layers (QLoRA): bitsandbytes' 4-bit and 8-bit linear layers, on CPU.

The reference for every check is the same tiny model with float layers whose weights are the
quantized layers' dequantized weights: in training mode bitsandbytes computes exactly that product
on CPU, so an adapter on the quantized model must give what it gives on the reference. (The models
have no dropout, so training mode changes nothing else. In eval mode, on CPUs with AVX512-BF16,
bitsandbytes switches to a packed bfloat16 kernel: close, not equal; one test runs it.)
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.base_layers import linear_features, quantization_of
from peftkit.core.errors import ConfigError, MergeError
from tests.method_helpers import greedy_without_cache, output_of, randomize
from tests.tiny_models import VOCAB, sample_inputs

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra: pip install -e .[test]")


def _llama() -> torch.nn.Module:
    """The tiny test Llama, but with hidden size 64: bitsandbytes' packed CPU kernel (used in eval mode on
    CPUs with AVX512-BF16) needs an input width of at least its block size, 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, pad_token_id=0))


def _quantized(bits: int = 4, where: str = "layers",
               double_quant: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Llama whose linear layers under ``where`` are bitsandbytes layers, and its float twin;
    ``double_quant``: 4-bit scales quantized again (bitsandbytes' default; transformers' is off)."""
    import bitsandbytes.functional as BF

    model = _llama()
    reference = copy.deepcopy(model)
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or where not in f"{name}.{child_name}":
                continue
            if bits == 4:
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4",
                                          compress_statistics=double_quant)
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False)
            layer.load_state_dict(child.state_dict())
            layer = layer.to("cpu")  # quantizes the weight
            setattr(parent, child_name, layer)
            if bits == 4:
                weight = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            else:
                weight = layer.weight.data.float() * layer.weight.SCB.unsqueeze(1) / 127
            getattr(reference.get_submodule(name), child_name).weight.data.copy_(weight)
    return model.train(), reference.train()


def _copy_adapters(source: peftkit.AdaptedModel, target: peftkit.AdaptedModel) -> None:
    """Give ``target`` ``source``'s adapter weights (their random inits differ: creation order uses the RNG)."""
    with torch.no_grad():
        for name in source.adapters:
            pairs = list(zip(source.adapter_parameters(name), target.adapter_parameters(name), strict=True))
            for a, b in pairs:
                b.copy_(a)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def test_layers_are_recognized_and_sized() -> None:
    model, _ = _quantized(4)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert quantization_of(q_proj) == "4-bit (bitsandbytes)"
    assert linear_features(q_proj) == (64, 64)  # the packed weight is (2048, 1)
    assert tuple(q_proj.weight.shape) != (64, 64)
    model8, _ = _quantized(8)
    assert quantization_of(model8.model.layers[0].mlp.up_proj) == "8-bit (bitsandbytes)"
    assert quantization_of(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_quantized_model_equals_lora_on_its_float_twin(bits: int) -> None:
    quantized, reference = _quantized(bits)
    spec = "lora[r=4,target_modules=all-linear]"
    q_model, f_model = peftkit.adapt(quantized, spec), peftkit.adapt(reference, spec)
    base_out = output_of(q_model, "llama")  # LoRA starts at zero: the quantized base's own output
    _close(base_out, output_of(f_model, "llama"), atol=1e-4 if bits == 8 else 1e-5)
    randomize(q_model, seed=1)
    _copy_adapters(q_model, f_model)
    layer = q_model.base_model.model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].lora_A.dtype == torch.float32 and layer.adapters["default"].lora_A.shape == (4, 64)
    out = output_of(q_model, "llama")
    _close(out, output_of(f_model, "llama"), atol=1e-4 if bits == 8 else 1e-5)
    assert not torch.allclose(out, base_out, atol=1e-4)


def test_training_changes_only_the_adapter_and_the_quantized_weights_stay(tmp_path: Path) -> None:
    quantized, reference = _quantized(4)
    model = peftkit.adapt(quantized, "lora[r=4,target_modules=all-linear]")
    randomize(model, seed=2)
    packed = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.dtype.is_floating_point}
    assert packed
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    inputs = sample_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, packed[n]) for n, p in model.base_model.named_parameters() if n in packed)
    expected = output_of(model, "llama")

    # QLoRA's deployment path: the adapter loads onto the unquantized base (here: its float twin).
    model.save_adapter(str(tmp_path / "a"))
    on_float = peftkit.AdaptedModel(reference)
    on_float.load_adapter(str(tmp_path / "a"), "default")
    _close(output_of(on_float, "llama"), expected)
    again, _ = _quantized(4)
    on_quantized = peftkit.AdaptedModel(again)
    on_quantized.load_adapter(str(tmp_path / "a"), "default")
    assert torch.equal(output_of(on_quantized, "llama"), expected)


def test_merging_into_quantized_layers_is_refused_and_leaves_nothing_merged() -> None:
    # Only the MLP is quantized: the refusal comes before any layer (the float attention ones too) changes.
    quantized, _ = _quantized(4, where="mlp")
    model = peftkit.adapt(quantized, "lora[r=4,target_modules=all-linear]")
    randomize(model, seed=3)
    before = output_of(model, "llama")
    weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if "base_layer" in n}
    with pytest.raises(MergeError, match=r"weights are quantized \(4-bit \(bitsandbytes\)\).*load the base model "
                                         r"unquantized"):
        model.merge_adapter()
    assert model.merged_adapters == []
    assert all(torch.equal(p, weights[n]) for n, p in model.base_model.named_parameters() if n in weights)
    assert torch.equal(output_of(model, "llama"), before)
    with pytest.raises(MergeError, match="quantized"):
        model.merge_and_unload()
    assert torch.equal(output_of(model, "llama"), before)


def test_dora_on_a_quantized_layer_is_refused_clearly() -> None:
    quantized, _ = _quantized(4)
    model = peftkit.AdaptedModel(quantized)
    before = output_of(model, "llama")
    with pytest.raises(ConfigError, match=r"DoRA rescales the base weight's rows, but .* is quantized"):
        model.add_adapter("d", "lora[r=4,use_dora=true]")
    assert model.adapters == {} and torch.equal(output_of(model, "llama"), before)


def test_ia3_bottleneck_and_routing_on_a_quantized_model() -> None:
    quantized, reference = _quantized(4)
    q_model, f_model = peftkit.AdaptedModel(quantized), peftkit.AdaptedModel(reference)
    for model in (q_model, f_model):
        model.add_adapter("ia3", "ia3")  # k, v (output scaling) and down_proj (input scaling)
        model.add_adapter("bn", "seq_bn[reduction_factor=4]")
        model.add_adapter("lora", "lora[r=4]")
        for seed, name in enumerate(("ia3", "bn", "lora")):
            randomize(model, name, std=0.3, seed=seed)
    _copy_adapters(q_model, f_model)
    for active in ("ia3", "bn", "stack(ia3, lora)", "average(ia3, bn)"):
        q_model.set_active(active)
        f_model.set_active(active)
        _close(output_of(q_model, "llama"), output_of(f_model, "llama"))
    inputs = sample_inputs("llama", batch=3)
    names = ["ia3", "__base__", "lora"]
    with torch.no_grad():
        routed = q_model(**inputs, adapter_names=names).logits
        for row, name in enumerate(names):
            q_model.set_active(None if name == "__base__" else name)
            alone = q_model(**{k: v[row:row + 1] for k, v in inputs.items()}).logits
            _close(routed[row:row + 1], alone)


def test_inference_in_eval_mode_runs_bitsandbytes_cpu_kernel_close_to_the_reference() -> None:
    quantized, reference = _quantized(4)
    spec = "lora[r=4,target_modules=all-linear]"
    q_model, f_model = peftkit.adapt(quantized, spec), peftkit.adapt(reference, spec)
    randomize(q_model, seed=5)
    _copy_adapters(q_model, f_model)
    q_model.eval(), f_model.eval()
    torch.testing.assert_close(output_of(q_model, "llama"), output_of(f_model, "llama"), rtol=0.05, atol=0.02)
    inputs = sample_inputs("llama")
    generated = q_model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # the cached generate() decodes what full forwards of the quantized model decode, token for token
    full_forwards = greedy_without_cache(q_model, "llama", inputs["input_ids"], inputs["attention_mask"], 3)
    assert torch.equal(generated, full_forwards)
    with q_model.disable_adapters():
        assert not torch.equal(q_model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0), generated)
    q_model.train(), f_model.train()  # where bitsandbytes computes the dequantized product exactly
    assert torch.equal(q_model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0),
                       f_model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0))


def test_train_quantize_4bit_is_qlora_in_one_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`peftkit train --quantize 4bit`: the base loads as NF4 bitsandbytes layers, a LoRA trains on top
    (transformers' Trainer accepts the wrapper), and the adapter loads onto the unquantized base."""
    from peftkit.cli import run
    from tests.train_helpers import rows_for, torch_threads, word_tokenizer, write_jsonl

    folder = tmp_path / "llama"
    _llama().save_pretrained(folder)
    word_tokenizer("llama").save_pretrained(folder)
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("causal-lm", 16))
    with torch_threads(1):
        code = run(["train", str(folder), "--task", "causal-lm", "--method", "lora[r=4,target_modules=all-linear]",
                    "--data", str(data), "--eval", str(data), "--out", str(tmp_path / "out"), "--quantize", "4bit",
                    "--max-steps", "3", "--save-steps", "0", "--lr", "1e-2", "--quiet", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = __import__("json").loads(captured.out)
    assert result["run"]["options"]["quantize"] == "4bit" and result["global_step"] == 3
    assert math.isfinite(result["eval_metrics"]["eval_loss"])  # it evaluated (in eval mode) after training
    float_base = peftkit.AdaptedModel(_llama())
    float_base.load_adapter(str(tmp_path / "out"), "default")
    trained = next(p for n, p in float_base.named_parameters() if n.endswith("q_proj.adapters.default.lora_B"))
    assert trained.abs().sum() > 0  # it trained (B starts at zero)

    with pytest.raises(peftkit.PeftkitError, match="quantize='4bit' applies when train"):
        peftkit.train(_llama(), "lora", data, task="causal-lm", out=tmp_path / "o2", quantize="4bit")
    with pytest.raises(peftkit.PeftkitError, match="quantize must be one of 4bit, 8bit"):
        peftkit.train(str(folder), "lora", data, task="causal-lm", out=tmp_path / "o3", quantize="3bit")


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_training_after_an_evaluation_gets_the_same_gradients(double_quant: bool) -> None:
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel (no backward) in eval mode; an
    AdaptedModel put back in training mode undoes that, so gradients through the layers stay right.
    (The repacking rounds the quantization scales to bfloat16 once, hence the tolerance.) Without double
    quantization (transformers' default) bitsandbytes' own undoing left the scales in the packed layout."""
    from peftkit.core.base_layers import packed_for_cpu_inference

    quantized, _ = _quantized(4, double_quant=double_quant)
    model = peftkit.adapt(quantized, "lora[r=4,target_modules=all-linear]")
    randomize(model, seed=6)
    inputs = sample_inputs("llama")

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    output_of(model, "llama")
    packed = len(packed_for_cpu_inference(model))
    after = gradients()
    assert not packed_for_cpu_inference(model)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, rtol=0.02, atol=2e-3)
    if packed:  # this CPU has the kernel: the check above is the one that matters
        assert packed == 14


def test_peft_loads_the_adapter_onto_its_own_quantized_model_with_identical_logits(tmp_path: Path) -> None:
    """The real peft package, with its bitsandbytes LoRA layers, on the same model loaded in 4-bit by
    transformers (as users load it)."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _llama().save_pretrained(tmp_path / "base")

    def load() -> torch.nn.Module:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config,
                                                    device_map={"": "cpu"}).train()

    model = peftkit.adapt(load(), "lora[r=4,alpha=8,target_modules=all-linear]")
    randomize(model, seed=7)
    model.save_adapter(str(tmp_path / "a"))
    theirs = peft.PeftModel.from_pretrained(load(), str(tmp_path / "a"))
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"  # peft's own 4-bit LoRA layer
    theirs.train()
    with torch.no_grad():
        expected = theirs(**sample_inputs("llama")).logits
    assert torch.equal(output_of(model, "llama"), expected)
