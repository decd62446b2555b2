"""Helpers shared by the per-method tests (test_lora.py, test_method_*.py): the output on a tiny
model's sample inputs, seeded noise for adapters, and the checks several methods repeat.

Each check asserts what every method must do and returns what the calling test goes on to
check for its own method.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.layer import TunerLayer
from tests.tiny_models import build_tiny, output_tensor, sample_inputs


def output_of(model: Any, arch: str, **kwargs: Any) -> torch.Tensor:
    """The output tensor (logits) of ``model`` on ``sample_inputs(arch)``, without gradients."""
    with torch.no_grad():
        return output_tensor(model(**sample_inputs(arch), **kwargs))


def randomize(model: peftkit.AdaptedModel, name: str = "default", *, std: float = 0.1, seed: int = 0,
              where: Callable[[torch.Tensor], bool] | None = None) -> None:
    """Add seeded normal noise (``std``) to adapter ``name``'s parameters (those ``where`` accepts,
    default all), so that outputs differ from the base model's and between adapters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            if where is None or where(p):
                p.add_(torch.randn(p.shape, generator=gen) * std)


def adapter_modules(model: peftkit.AdaptedModel, name: str = "default") -> dict[str, torch.nn.Module]:
    """Site (module name in the base model) -> adapter ``name``'s module at that site."""
    return {n: m.adapters[name] for n, m in model.base_model.named_modules()
            if isinstance(m, TunerLayer) and name in m.adapters}


def two_adapters(arch: str, spec_a: str, spec_b: str | None = None, *,
                 noise: Callable[..., None] = randomize) -> peftkit.AdaptedModel:
    """Tiny ``arch`` with adapters "a" (``spec_a``) and "b" (``spec_b``, default ``spec_a``), each
    moved away from its init by ``noise`` with its own seed (1 and 2), in eval mode."""
    model = peftkit.adapt(build_tiny(arch), spec_a, adapter_name="a")
    model.add_adapter("b", spec_a if spec_b is None else spec_b)
    noise(model, "a", seed=1)
    noise(model, "b", seed=2)
    return model.eval()


def save_and_reload(arch: str, spec: str, folder: Path, *, noise: Callable[..., None] = randomize
                    ) -> tuple[peftkit.AdaptedModel, peftkit.AdaptedModel, dict[str, torch.Tensor]]:
    """Saves an adapter of ``spec`` on tiny ``arch``, moved away from its init by ``noise``, to
    ``folder`` and loads it onto a fresh model as "restored". Asserts that the loaded model's
    output is bit-identical. Returns (the saved model, the loaded one, the saved tensors)."""
    model = peftkit.adapt(build_tiny(arch), spec)
    noise(model)
    model.eval()
    expected = output_of(model, arch)
    model.save_adapter(str(folder))
    loaded = peftkit.from_pretrained(build_tiny(arch), str(folder), adapter_name="restored")
    assert torch.equal(output_of(loaded, arch), expected)
    return model, loaded, load_file(str(folder / "adapter_model.safetensors"))


def switch_outputs(model: peftkit.AdaptedModel, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs with adapter "a", then "b" active. Asserts that they differ and that
    switching back to "a" gives its output again, bit for bit."""
    model.set_active("a")
    out_a = output_of(model, arch)
    model.set_active("b")
    out_b = output_of(model, arch)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    model.set_active("a")
    assert torch.equal(output_of(model, arch), out_a)
    return out_a, out_b


def changed_by_a_train_step(arch: str, spec: str) -> set[str]:
    """Adds adapters "a" and "b" of ``spec`` to tiny ``arch``, trains "a" for one SGD step on the
    squared output, and asserts that the step changed something and only "a"'s parameters.
    Returns the names of the parameters that changed."""
    model = peftkit.adapt(build_tiny(arch), spec, adapter_name="a")
    model.add_adapter("b", spec)
    model.train_adapter("a")
    model.train()
    own = {id(p) for p in model.adapter_parameters("a")}
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    output_tensor(model(**sample_inputs(arch))).pow(2).mean().backward()
    optimizer.step()
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed, "a train step must change the adapter"
    assert all(id(params[n]) in own for n in changed), f"changed outside adapter 'a': {changed}"
    return changed


def merge_keeps_output(model: peftkit.AdaptedModel, arch: str, names: list[str] | None = None,
                       atol: float = 1e-4) -> torch.Tensor:
    """In eval mode, merge_adapter(names) (default: the active adapters) keeps the output (within
    ``atol``). Returns the output from before the merge."""
    model.eval()
    unmerged = output_of(model, arch)
    model.merge_adapter(names)
    torch.testing.assert_close(output_of(model, arch), unmerged, atol=atol, rtol=0)
    return unmerged


def unload_keeps_output(model: peftkit.AdaptedModel, arch: str, expected: torch.Tensor,
                        atol: float = 1e-4) -> torch.nn.Module:
    """merge_and_unload() leaves no TunerLayer behind and gives ``expected`` (within ``atol``).
    Returns the bare model."""
    inputs = sample_inputs(arch)
    bare = model.merge_and_unload()
    assert not any(isinstance(m, TunerLayer) for m in bare.modules())
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(bare(**inputs)), expected, atol=atol, rtol=0)
    return bare


def merge_cycle_keeps_outputs(model: peftkit.AdaptedModel, arch: str, atol: float = 1e-5) -> None:
    """The adapter changes the output; merging keeps it, unmerging gives the base model back (adapters disabled)
    and merge_and_unload() gives the adapted output again."""
    with model.disable_adapters():
        base = output_of(model, arch)
    unmerged = merge_keeps_output(model, arch, atol=atol)
    assert (unmerged - base).abs().max() > 1e-2, "the adapter should change the output"
    model.unmerge_adapter()
    with model.disable_adapters():
        torch.testing.assert_close(output_of(model, arch), base, atol=atol, rtol=0)
    unload_keeps_output(model, arch, unmerged, atol=atol)


# -- generation (prompt and prefix tuning) ----------------------------------------------------------------------------


def greedy_without_cache(model: Any, name: str, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by a full forward over the whole sequence at every step (no KV cache)."""
    with torch.no_grad():
        if name == "t5":
            seq = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
            for _ in range(steps):
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq, use_cache=False).logits
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            return seq
        seq = ids
        for _ in range(steps):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq


def check_greedy_generate(model: peftkit.AdaptedModel, name: str) -> None:
    """generate() on tiny ``name``: greedy decoding, with the KV cache and without, equals
    :func:`greedy_without_cache`; beam search returns every sequence asked for; and with the
    adapters disabled the generated tokens differ."""
    inputs = sample_inputs(name, seq=5)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {} if name == "t5" else {"pad_token_id": 0}
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **extra)
    assert torch.equal(generated, greedy_without_cache(model, name, ids, mask, 6))
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False,
                              **extra)
    assert torch.equal(uncached, generated)
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=3, num_return_sequences=2,
                           **extra)
    assert beams.shape[0] == 2 * ids.shape[0]
    with model.disable_adapters():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **extra)
    assert not torch.equal(generated, plain)


def method_plugin(method: Any) -> Any:
    """A plugin object that registers ``method`` (for ``peftkit.use_plugin`` in a test)."""

    class Plugin:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_methods(self, register: Any) -> None:
            register(method)

    return Plugin()


def quantized_linear_and_twin(bits: int, in_features: int = 64, out_features: int = 96, bias: bool = True
                              ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A one-layer net whose Linear is bitsandbytes-quantized (``bits`` 4 or 8, on CPU), and its float
    twin holding the dequantized weight: in training mode bitsandbytes computes on CPU exactly the
    product with the dequantized weight, so an adapter must give the same output on both."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    torch.manual_seed(0)
    twin = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=bias))
    if bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                                  quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False)
    layer.load_state_dict(twin[0].state_dict())
    quantized = torch.nn.Sequential(layer.to("cpu"))  # .to() quantizes the weight
    weight = quantized[0].weight
    with torch.no_grad():
        twin[0].weight.copy_(BF.dequantize_4bit(weight.data, weight.quant_state) if bits == 4
                             else weight.data.float() * weight.SCB.unsqueeze(1) / 127)
    return quantized, twin


def quantized_matches_twin(bits: int, spec: str, bias: bool = True) -> None:
    """Adapters "default" and "other" of ``spec`` (targeting module '0', random init) on a bitsandbytes
    ``bits``-bit Linear (with or without a bias) and on its dequantized twin, with equal tensors, give the
    same output alone and stacked (each change then runs through the quantized layer); merging into the
    quantized layer is refused."""
    quantized, twin = quantized_linear_and_twin(bits, bias=bias)
    ours, reference = peftkit.adapt(quantized, spec).train(), peftkit.adapt(twin, spec).train()
    for model in (ours, reference):
        model.add_adapter("other", spec)
    with torch.no_grad():
        for name in ("default", "other"):
            for a, b in zip(ours.adapter_parameters(name), reference.adapter_parameters(name), strict=True):
                assert a.dtype == torch.float32
                b.copy_(a)
    x = torch.randn(3, 64)
    tolerance = dict(atol=1e-4 if bits == 8 else 1e-5, rtol=1e-4)
    torch.testing.assert_close(ours(x), reference(x), **tolerance)
    stack = peftkit.Stack("default", "other")
    ours.set_active(stack)
    reference.set_active(stack)
    torch.testing.assert_close(ours(x), reference(x), **tolerance)
    try:
        ours.merge_adapter(["default"])
    except peftkit.MergeError as error:
        assert "quantized" in str(error)
    else:
        raise AssertionError("merging into a quantized layer must be refused")


def four_bit_site(spec: str) -> tuple[Any, torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(adapter "default" of ``spec`` targeting module '0', the 4-bit layer, what that layer computes) for a
    bitsandbytes NF4 Linear (64 -> 96, with a bias, float32 compute dtype) in training mode.

    On CPU such a layer computes ``F.linear(v.float(), W, b)`` with the dequantized W and returns it in
    ``v``'s own dtype (checked here for bfloat16 and float64 inputs): an input the adapter hands over in
    another dtype is rounded before or after the product, so the returned function tells exactly which."""
    import torch.nn.functional as F

    quantized, twin = quantized_linear_and_twin(4)
    model = peftkit.adapt(quantized, spec).train()
    site = dict(model.tuner_layers())["0"]
    weight, bias = twin[0].weight.detach(), twin[0].bias.detach()

    def computes(v: torch.Tensor) -> torch.Tensor:
        return F.linear(v.float(), weight, bias).to(v.dtype)

    for dtype in (torch.bfloat16, torch.float64):
        v = torch.randn(2, 64, dtype=dtype)
        assert torch.equal(site.base_layer(v).detach(), computes(v))
    return site.adapters["default"], site.base_layer, computes


def adapted_after_seed(model: torch.nn.Module, spec: Any, seed: int = 0) -> peftkit.AdaptedModel:
    """``peftkit.adapt(model, spec)`` with the adapter drawn after ``torch.manual_seed(seed)``, in eval mode
    (the draw a PEFT model made after the same seed is compared with)."""
    torch.manual_seed(seed)
    return peftkit.adapt(model, spec).eval()


def peft_model_after_seed(model: torch.nn.Module, config: Any, seed: int = 0) -> Any:
    """PEFT's ``get_peft_model(model, config)`` drawn after ``torch.manual_seed(seed)``, in eval mode; PEFT's
    notes (fan_in_fan_out set for GPT-2's Conv1D) silenced."""
    import warnings

    import peft

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config).eval()


def draw_peft_parameters(model: torch.nn.Module, name_part: str, seed: int) -> None:
    """Replace every parameter of a PEFT model whose name holds ``name_part`` by N(0, 1) draws from a generator
    seeded with ``seed`` (an adapter moved away from its init, so that it changes the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name_part in name:
                param.copy_(torch.randn(param.shape, generator=gen))


def loaded_in_peft(folder: str | Path, model: torch.nn.Module) -> Any:
    """The adapter folder loaded by PEFT onto ``model``, in eval mode; PEFT's note about the extra "peftkit"
    key of peftkit's adapter_config.json silenced."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(folder)).eval()


def peft_tensors_by_site(model: torch.nn.Module, keys: Any, buffers: bool = False
                         ) -> dict[str, dict[str, torch.Tensor]]:
    """site (the base model's module name) -> {key: tensor} of a PEFT model's adapter tensors whose names hold
    ``.<key>.`` for one of ``keys`` (PEFT's names are also the file keys), buffers included with ``buffers``."""
    named = [*model.named_parameters(), *(model.named_buffers() if buffers else ())]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named:
        key = next((k for k in keys if f".{k}." in name), None)
        if key is not None:
            site = name.removeprefix("base_model.model.").split(f".{key}.")[0]
            out.setdefault(site, {})[key] = tensor
    return out


def peft_file_loads_alike(peft_model: Any, arch: str, folder: Path) -> peftkit.AdaptedModel:
    """Saves ``peft_model`` (a PEFT model on tiny ``arch``, moved away from its init, in eval mode) to
    ``folder`` and loads it onto a fresh model with peftkit; asserts the same logits unmerged, merged
    in both libraries, and unmerged again. Returns peftkit's model (unmerged)."""
    expected = output_of(peft_model, arch)
    assert not torch.allclose(expected, output_of(build_tiny(arch), arch), atol=1e-4)
    peft_model.save_pretrained(str(folder))
    model = peftkit.from_pretrained(build_tiny(arch), str(folder))
    torch.testing.assert_close(output_of(model, arch), expected, atol=2e-6, rtol=1e-5)
    peft_model.merge_adapter()
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, arch), output_of(peft_model, arch), atol=1e-5, rtol=1e-5)
    peft_model.unmerge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, arch), expected, atol=1e-5, rtol=1e-5)
    return model


def peftkit_file_loads_alike(model: peftkit.AdaptedModel, arch: str, folder: Path) -> Any:
    """Saves peftkit's ``model`` (on tiny ``arch``, moved away from its init) to ``folder`` and loads it
    with PEFT onto a fresh model; asserts the same logits unmerged and merged in both libraries.
    Returns PEFT's model (merged)."""
    model.eval()
    expected = output_of(model, arch)
    assert not torch.allclose(expected, output_of(build_tiny(arch), arch), atol=1e-4)
    model.save_adapter(str(folder))
    peft_model = loaded_in_peft(folder, build_tiny(arch))
    torch.testing.assert_close(output_of(peft_model, arch), expected, atol=2e-6, rtol=1e-5)
    peft_model.merge_adapter()
    model.merge_adapter()
    torch.testing.assert_close(output_of(peft_model, arch), output_of(model, arch), atol=1e-5, rtol=1e-5)
    return peft_model


def frozen_layer(in_features: int, out_features: int, *, conv1d: bool = False, bias: bool = True,
                 dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A frozen base layer drawn from seed 0: ``nn.Linear`` or GPT-2's ``Conv1D`` (weight and bias
    drawn from a normal, as Conv1D's own init leaves the bias at zero), with or without a bias."""
    torch.manual_seed(0)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_features, in_features).to(dtype)
        torch.nn.init.normal_(layer.weight)
        if bias:
            torch.nn.init.normal_(layer.bias)
        else:
            layer.bias = None
    else:
        layer = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
    return layer.requires_grad_(False)


def seen_at_site(model: peftkit.AdaptedModel, site: str, arch: str = "bert", name: str = "default"
                 ) -> dict[str, torch.Tensor]:
    """What the TunerLayer at ``site`` saw in one forward of ``model`` (eval mode, no gradients) on
    ``sample_inputs(arch)``: its input ``x``, the base layer's output ``h``, its output ``out``, and
    ``source``, the input adapter ``name`` reads (``x``, or the captured input of its source module)."""
    layer = model.base_model.get_submodule(site)
    seen: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out)),
               layer.base_layer.register_forward_hook(lambda m, args, out: seen.update(h=out))]
    model.eval()
    try:
        with torch.no_grad():
            model(**sample_inputs(arch))
    finally:
        for handle in handles:
            handle.remove()
    seen["source"] = layer.input_of(name, seen["x"])
    return seen


def llama_logits(model: Any, dtype: torch.dtype) -> torch.Tensor:
    """The logits of a tiny Llama on ``sample_inputs("llama")`` (token ids: no input dtype to follow)."""
    return output_tensor(model(**sample_inputs("llama")))


def cast_after_adapting_matches_float32(model: peftkit.AdaptedModel, dtype: torch.dtype,
                                        run: Callable[[Any, torch.dtype], torch.Tensor] = llama_logits) -> None:
    """``model``, adapted in float32, cast to ``dtype`` with ``model.to``: its output (``run(model, dtype)``),
    the gradients of the trained tensors and the merged weights equal a float32 twin's holding the same
    (rounded) values, within the half type's precision (relative to each tensor's largest value)."""
    half = model.to(dtype)
    twin = copy.deepcopy(half).float()
    assert all(p.dtype == dtype for p in half.adapter_parameters("default"))
    relative = 3e-2 if dtype == torch.bfloat16 else 4e-3

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.dtype == dtype and want.abs().max() > 0
        torch.testing.assert_close(got.float(), want, atol=relative * float(want.abs().max()), rtol=0)

    outputs = [run(half, dtype), run(twin, torch.float32)]
    close(outputs[0].detach(), outputs[1].detach())
    for out in outputs:  # a sum, not a mean: float16 gradients of a mean of a tiny model's logits are subnormal
        out.float().pow(2).sum().backward()
    for p, q in zip(half.adapter_parameters("default"), twin.adapter_parameters("default"), strict=True):
        close(p.grad, q.grad)
    for m in (half, twin):
        m.merge_adapter(["default"])
    for (_, a), (_, b) in zip(half.tuner_layers(), twin.tuner_layers(), strict=True):
        close(a.base_layer.weight.detach(), b.base_layer.weight.detach())


def new_tensors(run) -> list[tuple[str, tuple[int, ...]]]:
    """(op name, shape) of every tensor ``run()`` allocates: results of ops whose storage none of the op's
    arguments holds (an ``out=`` included; an in-place op's result, or a view's, is its argument's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    fresh: list[tuple[str, tuple[int, ...]]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            held = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(result):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:
                    fresh.append((func.__name__, tuple(t.shape)))
            return result

    with Record():
        run()
    return fresh


def bytes_kept_for_backward(model: torch.nn.Module, **inputs: Any) -> int:
    """Bytes of the distinct storages other than parameters that one forward of ``model`` on ``inputs`` keeps
    for its backward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(kept.values())


def autograd_node_names(output: torch.Tensor) -> set[str]:
    """The class names of the autograd nodes ``output`` was computed through (to check which path ran)."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            stack.extend(child for child, _ in node.next_functions)
    return names
