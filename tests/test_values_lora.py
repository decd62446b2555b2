"""LoRA and DoRA values, not shapes: half precision against a float32 hand computation, dropout in
eval mode, merging twice, DoRA's gradients and Embedding LoRA against the real ``peft``, and
per-row routing under beam search against each row run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit
from peftkit.testing import randomize

from .tiny_models import build_tiny, output_tensor, sample_inputs

SITE = "model.layers.1.self_attn.q_proj"


def _site_io(model: peftkit.AdaptedModel, site: str) -> dict[str, torch.Tensor]:
    """The input and output of ``site`` in the next forward (filled by a hook)."""
    seen: dict[str, torch.Tensor] = {}
    model.base_model.get_submodule(site).register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    return seen


def _logits(model, **inputs):
    with torch.no_grad():
        return output_tensor(model(**inputs)).float()


# -- half precision ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_lora_equals_a_float32_hand_computation(dtype):
    model = peftkit.adapt(build_tiny("llama").to(dtype), "lora[r=4,alpha=12,init_weights=false]")
    randomize(model, "default", seed=3, scale=0.3)
    layer = model.base_model.get_submodule(SITE)
    lora = layer.adapters["default"]
    assert layer.base_layer.weight.dtype == dtype and lora.lora_A.dtype == torch.float32  # trained in float32
    seen = _site_io(model, SITE)
    model.eval()
    _logits(model, **sample_inputs("llama"))
    x, out = seen["x"], seen["out"]
    assert out.dtype == dtype
    x32 = x.float()
    expected = x32 @ layer.base_layer.weight.float().T + 3.0 * (x32 @ lora.lora_A.T) @ lora.lora_B.T  # alpha/r = 3
    delta = expected - x32 @ layer.base_layer.weight.float().T
    assert delta.abs().max() > 0.05 * expected.abs().max()  # the adapter's share is far above the rounding
    eps = torch.finfo(dtype).eps
    tolerance = 4 * eps * (x32.abs() @ layer.base_layer.weight.float().abs().T + delta.abs()).max()
    assert (out.float() - expected).abs().max() <= tolerance, (
        f"{dtype}: differs from the float32 hand computation by {(out.float() - expected).abs().max():.3g}, "
        f"more than half-precision rounding ({tolerance:.3g})")


# -- dropout in eval mode ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, hand", [
    ("lora[r=4,alpha=8,dropout=0.5,init_weights=false]", "lora"),
    ("seq_bn[reduction_factor=4,dropout=0.5,init_weights=false]", "bottleneck"),
])
def test_dropout_is_the_identity_in_eval_mode(spec, hand):
    model = peftkit.adapt(build_tiny("llama"), spec)
    randomize(model, "default", seed=4, scale=0.3)
    site = SITE if hand == "lora" else "model.layers.1.mlp.down_proj"
    layer = model.base_model.get_submodule(site)
    adapter = layer.adapters["default"]
    seen = _site_io(model, site)
    model.eval()
    torch.manual_seed(0)
    first = _logits(model, **sample_inputs("llama"))
    torch.manual_seed(1)
    assert torch.equal(_logits(model, **sample_inputs("llama")), first)
    with torch.no_grad():
        h = layer.base_layer(seen["x"])
        if hand == "lora":
            expected = h + 2.0 * (seen["x"] @ adapter.lora_A.T) @ adapter.lora_B.T
        else:
            down = F.relu(h @ adapter.adapter_down.weight.T + adapter.adapter_down.bias)
            expected = h + down @ adapter.adapter_up.weight.T + adapter.adapter_up.bias
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
    model.train()  # and in training the dropout does act
    with torch.no_grad():
        model(**sample_inputs("llama"))
    assert not torch.allclose(seen["out"], expected, atol=1e-3)


# -- merging twice -----------------------------------------------------------------------------------------------------


def test_merging_an_already_merged_adapter_is_a_no_op():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4,init_weights=false]")
    model.eval()
    inputs = sample_inputs("llama")
    unmerged = _logits(model, **inputs)
    weight = model.base_model.get_submodule(SITE).base_layer.weight
    original = weight.detach().clone()
    model.merge_adapter()
    once = weight.detach().clone()
    lora = model.base_model.get_submodule(SITE).adapters["default"]
    torch.testing.assert_close(once - original, lora.delta_weight(model.base_model.get_submodule(SITE).base_layer))
    model.merge_adapter()
    model.merge_adapter(["default"])
    assert torch.equal(weight, once), "a second merge added the adapter's change again"
    torch.testing.assert_close(_logits(model, **inputs), unmerged, atol=1e-5, rtol=1e-5)
    bare = model.merge_and_unload()  # merges what is active: already merged, so nothing more
    assert torch.equal(bare.get_submodule(SITE).weight, once)
    torch.testing.assert_close(_logits(bare, **inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_unmerging_twice_restores_the_base_once():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4,init_weights=false]")
    weight = model.base_model.get_submodule(SITE).base_layer.weight
    original = weight.detach().clone()
    model.merge_adapter()
    model.unmerge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(weight, original, atol=1e-6, rtol=0)


# -- DoRA's gradients against PEFT's -----------------------------------------------------------------------------------


LLAMA_DORA_SITES = [f"model.layers.{i}.{p}" for i in range(2)
                    for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


def _assert_dora_grads_equal(ours, theirs, sites: list[str] = LLAMA_DORA_SITES) -> None:
    """Every DoRA tensor's gradient at ``sites`` (default: the q/v/down projections of a tiny Llama): peftkit's
    equals PEFT's."""
    compared = 0
    for site in sites:
        mine = ours.base_model.get_submodule(site).adapters["default"].tensors()
        peft_layer = theirs.base_model.model.get_submodule(site)
        peft_params = {"lora_A.weight": peft_layer.lora_A["default"].weight,
                       "lora_B.weight": peft_layer.lora_B["default"].weight,
                       "lora_magnitude_vector": peft_layer.lora_magnitude_vector["default"].weight}
        for key, param in peft_params.items():
            assert param.grad is not None and mine[key].grad is not None, f"{site} {key}: no gradient"
            assert param.grad.abs().max() > 0
            torch.testing.assert_close(mine[key].grad.reshape(param.grad.shape), param.grad, atol=1e-6, rtol=1e-4,
                                       msg=lambda m, site=site, key=key: f"{site} {key}: {m}")
            compared += 1
    assert compared == 3 * len(sites)


def test_dora_gradients_equal_pefts_with_the_norm_a_constant(tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    ours.train_adapter("default")
    inputs = sample_inputs("llama")
    for model in (theirs, ours):
        model.train()
        output_tensor(model(**inputs)).float().pow(2).mean().backward()
    _assert_dora_grads_equal(ours, theirs)


def test_dora_with_dropout_in_training_equals_pefts_output_and_gradients(tmp_path):
    """PEFT puts the dropped-out input through the whole DoRA term (W x_d too); both draw one mask per site
    in the same order, so the same seed gives the same masks."""
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                            lora_dropout=0.3, init_lora_weights=False,
                                                            task_type="CAUSAL_LM"))
    with torch.no_grad():  # magnitudes off the initial row norms, so that m / n - 1 is not 0
        for name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn_like(param))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    ours.train_adapter("default")
    inputs = sample_inputs("llama")
    outputs = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(5)
        out = output_tensor(model(**inputs)).float()
        out.pow(2).mean().backward()
        outputs.append(out.detach())
    torch.manual_seed(5)
    ours.eval()
    with torch.no_grad():
        assert (output_tensor(ours(**inputs)) - outputs[1]).abs().max() > 1e-3  # dropout acted
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    _assert_dora_grads_equal(ours, theirs)


def test_dora_on_convolutions_with_dropout_in_training_equals_pefts_output_and_gradients(tmp_path):
    from tests.test_lora_conv import batch, conv_net, CONVS

    theirs = get_peft_model(conv_net(2), LoraConfig(r=4, lora_alpha=8, target_modules=CONVS, use_dora=True,
                                                    lora_dropout=0.3, init_lora_weights=False))
    with torch.no_grad():  # magnitudes off the initial norms, so that m / n - 1 is not 0
        for name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.randn_like(param))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.AdaptedModel(conv_net(2))
    ours.load_adapter(str(tmp_path), "default")
    ours.train_adapter("default")
    x = batch(2)
    outputs = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(5)
        out = model(x)
        out.pow(2).mean().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    _assert_dora_grads_equal(ours, theirs, CONVS)


# -- Embedding LoRA against PEFT, both ways ----------------------------------------------------------------------------


def _embedding_hand(model: peftkit.AdaptedModel, ids: torch.Tensor, scale: float) -> torch.Tensor:
    layer = model.base_model.model.embed_tokens
    a, b = layer.adapters["default"].tensors().values()  # lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
    return layer.base_layer.weight[ids] + scale * a.T[ids] @ b.T


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`")
def test_embedding_lora_saved_by_peft_gives_pefts_logits_in_peftkit(tmp_path):
    theirs = get_peft_model(build_tiny("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"],
                                                            init_lora_weights=False)).eval()
    inputs = sample_inputs("llama")
    expected = _logits(theirs, **inputs)
    assert not torch.allclose(expected, _logits(build_tiny("llama"), **inputs), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    torch.testing.assert_close(_logits(ours, **inputs), expected, atol=1e-5, rtol=1e-5)
    seen = _site_io(ours, "model.embed_tokens")
    _logits(ours, **inputs)
    torch.testing.assert_close(seen["out"], _embedding_hand(ours, inputs["input_ids"], 2.0), atol=1e-6, rtol=1e-6)


def test_embedding_lora_saved_by_peftkit_gives_the_same_logits_in_peft(tmp_path):
    ours = peftkit.adapt(build_tiny("llama"), 'lora[r=4,alpha=8,init_weights=false,target_modules=["embed_tokens"]]')
    randomize(ours, "default", seed=5, scale=0.3)
    ours.eval()
    inputs = sample_inputs("llama")
    expected = _logits(ours, **inputs)
    seen = _site_io(ours, "model.embed_tokens")
    _logits(ours, **inputs)
    torch.testing.assert_close(seen["out"], _embedding_hand(ours, inputs["input_ids"], 2.0), atol=1e-6, rtol=1e-6)
    ours.save_adapter(str(tmp_path))
    theirs = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, **inputs), expected, atol=1e-5, rtol=1e-5)


# -- routing under beam search -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_routing_with_beam_search_equals_each_row_alone_with_its_adapter(arch):
    model = peftkit.AdaptedModel(build_tiny(arch))
    for i, name in enumerate(("a", "b")):
        model.add_adapter(name, "lora[r=4,init_weights=false]")
        randomize(model, name, seed=10 + i, scale=0.5)
    model.eval()
    prompt = sample_inputs(arch, batch=3, seq=5)
    options = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True,
                   **({} if arch == "t5" else {"pad_token_id": 0}))
    routes = ["b", "a", "__base__"]
    alone = {}
    for name in ("a", "b"):
        model.set_active(name)
        alone[name] = model.generate(**prompt, **options)
    model.set_active(None)
    alone["__base__"] = model.generate(**prompt, **options)
    assert not torch.equal(alone["a"], alone["b"])  # the adapters lead the beams to different tokens
    routed = model.generate(**prompt, adapter_names=routes, **options)
    assert routed.shape == alone["a"].shape
    for row, name in enumerate(routes):
        rows = slice(2 * row, 2 * row + 2)  # num_return_sequences rows per prompt row, in order
        assert torch.equal(routed[rows], alone[name][rows]), f"row {row} ({name}) differs from its adapter alone"
