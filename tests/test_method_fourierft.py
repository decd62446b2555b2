"""FourierFT (PEFT's FOURIERFT) on tiny Llama, GPT-2 and BERT: the same outputs, gradients and files as the
real ``peft``, merging, several adapters, and PEFT's options peftkit refuses by name.

The conformance suite runs fourierft[n_frequency=64,scaling=10] on llama, gpt2, bert and t5:
tests/test_conformance.py (BUILTIN_SPECS).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.composition import Average, Stack
from peftkit.core.errors import AdapterLoadError, ConfigError
from peftkit.plugins.fourierft.config import FourierFTConfig
from peftkit.plugins.fourierft.layer import FUSED_FROM_TOKENS, spectral_positions
from tests.method_helpers import adapter_modules, loaded_in_peft, output_of
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")

#: PEFT FourierFTConfig options per case: Linear (llama, bert with a trained head) and GPT-2's Conv1D.
PEFT_CASES = [
    ("llama", dict(n_frequency=200, scaling=10.0, target_modules=["q_proj", "v_proj", "down_proj"])),
    ("gpt2", dict(n_frequency=300, scaling=5.0, target_modules=["c_attn", "c_fc"], random_loc_seed=3)),
    ("bert", dict(n_frequency=100, scaling=50.0, n_frequency_pattern={"value": 40}, task_type="SEQ_CLS")),
]
#: The same in a peftkit spec (no task_type: peftkit reads the task from the model's class).
OUR_SPECS = {
    "llama": "fourierft[n_frequency=200,scaling=10,target_modules=[q_proj,v_proj,down_proj]]",
    "gpt2": "fourierft[n_frequency=300,scaling=5,target_modules=[c_attn,c_fc],random_loc_seed=3]",
    "bert": "fourierft[n_frequency=100,scaling=50,n_frequency_pattern={\"value\":40},modules_to_save=[classifier]]",
}


def _peft_model(arch: str, **options: object) -> torch.nn.Module:
    """A PEFT FourierFT model (random spectrum: PEFT's default init), in eval mode; the head of a
    classifier moved off its init so that saving it matters."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out is set from GPT-2's Conv1D, with a warning
        model = peft.get_peft_model(build_tiny(arch), peft.FourierFTConfig(**options)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    return model


def _peft_from(folder: str, arch: str) -> torch.nn.Module:
    return loaded_in_peft(folder, build_tiny(arch))


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_a_peft_folder_loads_with_peft_outputs_merged_and_unmerged(tmp_path, arch, options):
    theirs = _peft_model(arch, **options)
    expected = output_of(theirs, arch)
    assert (expected - output_of(build_tiny(arch), arch)).abs().max() > 1e-2
    theirs.save_pretrained(str(tmp_path))
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    torch.testing.assert_close(output_of(ours, arch), expected, rtol=0, atol=1e-5)
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(output_of(ours, arch), output_of(theirs, arch), rtol=0, atol=1e-5)
    torch.testing.assert_close(output_of(ours, arch), expected, rtol=0, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(output_of(ours, arch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_peft_loads_what_peftkit_saves_with_the_same_outputs_fields_and_keys(tmp_path, arch, options):
    theirs = _peft_model(arch, **options)
    theirs.save_pretrained(str(tmp_path / "peft"))
    torch.manual_seed(1)
    ours = peftkit.adapt(build_tiny(arch), OUR_SPECS[arch]).eval()
    expected = output_of(ours, arch)
    ours.save_adapter(str(tmp_path / "ours"))
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "n_frequency", "scaling", "random_loc_seed", "init_weights", "n_frequency_pattern",
                "fan_in_fan_out", "bias"):
        assert our_config[key] == peft_config[key], key
    peft_keys = {k: v.shape for k, v in load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    our_keys = {k: v.shape for k, v in load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).items()}
    assert our_keys == peft_keys  # the coefficients only (and the head): no positions
    torch.testing.assert_close(output_of(_peft_from(str(tmp_path / "ours"), arch), arch), expected,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch,options", PEFT_CASES)
def test_the_spectral_positions_and_the_weight_change_are_pefts(arch, options):
    theirs = _peft_model(arch, **options)
    ours = peftkit.adapt(build_tiny(arch), OUR_SPECS[arch])
    peft_layers = {name.removeprefix("base_model.model."): module for name, module in theirs.named_modules()
                   if isinstance(module, peft.tuners.fourierft.FourierFTLayer)}
    our_layers = adapter_modules(ours)
    assert set(our_layers) == set(peft_layers)
    for name, layer in our_layers.items():
        peft_layer = peft_layers[name]
        rows, columns = peft_layer.indices["default"]
        assert torch.equal(layer.spectral_positions, rows * layer.in_features + columns), name
        with torch.no_grad():
            layer.fourierft_spectrum.copy_(peft_layer.fourierft_spectrum["default"])
        expected = peft_layer.get_delta_weight("default")  # a complex ifft2; peftkit's real one rounds otherwise
        torch.testing.assert_close(layer.delta_out_in(), expected, rtol=0, atol=2e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("shape", [(6, 8), (7, 5), (8, 9), (5, 6)])
def test_the_half_spectrum_node_is_the_complex_transform_in_float64(shape):
    """dW and the coefficients' gradient from plugins/fourierft/spectrum.py against Re(ifft2(S)) under
    autograd, in float64, on odd and even sides, with coefficients at the zero frequency, on the middle
    column and row, and beyond the half."""
    from peftkit.plugins.fourierft.spectrum import HalfSpectrumSites, inverse_spectrum_change

    out_features, in_features = shape
    generator = torch.Generator().manual_seed(sum(shape))
    specials = torch.tensor([0, in_features // 2, (out_features // 2) * in_features])
    drawn = torch.randperm(out_features * in_features, generator=generator)[: out_features * in_features // 2]
    positions = torch.unique(torch.cat([specials, drawn]))
    coefficients = torch.randn(len(positions), dtype=torch.float64, generator=generator, requires_grad=True)
    spectrum = torch.zeros(out_features * in_features, dtype=torch.float64).index_put((positions,), coefficients)
    expected = torch.fft.ifft2(spectrum.view(shape)).real * 3.5
    got = inverse_spectrum_change(coefficients, HalfSpectrumSites.of(positions, shape), 3.5)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    seed = torch.randn(shape, dtype=torch.float64, generator=generator)
    want, = torch.autograd.grad(expected, coefficients, seed)
    have, = torch.autograd.grad(inverse_spectrum_change(coefficients, HalfSpectrumSites.of(positions, shape), 3.5),
                                coefficients, seed)
    torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-14)


def test_positions_are_drawn_from_the_seed_alone():
    first = spectral_positions(777, 16, 32, 100)
    assert torch.equal(first, spectral_positions(777, 16, 32, 100))
    assert not torch.equal(first, spectral_positions(778, 16, 32, 100))
    assert len(set(first.tolist())) == 100 and int(first.max()) < 16 * 32  # distinct entries of the spectrum
    base = build_tiny("llama")
    before = torch.get_rng_state()
    peftkit.adapt(base, "fourierft[n_frequency=10,init_weights=true]")
    assert torch.equal(torch.get_rng_state(), before)  # zero init draws nothing from torch's global generator


@pytest.mark.parametrize("length", [6, 20])  # 2 x 20 tokens: one product with W + dW (forward_alone)
@pytest.mark.parametrize("arch,options", PEFT_CASES[:2])
def test_gradients_after_a_backward_equal_pefts(arch, options, length):
    theirs = _peft_model(arch, **options)
    ours = peftkit.adapt(build_tiny(arch), OUR_SPECS[arch])
    peft_spectra = {name.removeprefix("base_model.model.").removesuffix(".fourierft_spectrum.default"): p
                    for name, p in theirs.named_parameters() if "fourierft_spectrum" in name}
    our_layers = adapter_modules(ours)
    with torch.no_grad():
        for name, layer in our_layers.items():
            layer.fourierft_spectrum.copy_(peft_spectra[name])
    ids = torch.randint(1, 120, (2, length), generator=torch.Generator().manual_seed(length))
    assert (2 * length >= FUSED_FROM_TOKENS) == (length == 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    for model in (theirs, ours):  # eval mode: GPT-2's dropout would draw differently
        model(input_ids=ids, labels=ids).loss.backward()
    for name, layer in our_layers.items():
        assert layer.fourierft_spectrum.grad.abs().max() > 0, name
        torch.testing.assert_close(layer.fourierft_spectrum.grad, peft_spectra[name].grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in ours.base_model.parameters() if not p.requires_grad)


def test_a_peft_config_object_is_read_as_its_folder():
    model = peftkit.adapt(build_tiny("gpt2"), peft.FourierFTConfig(n_frequency=20, scaling=2.0))
    config = model.adapter_record("default").config
    assert isinstance(config, FourierFTConfig)
    assert (config.n_frequency, config.scaling, config.target_modules) == (20, 2.0, ["mlp.c_proj"])
    assert set(adapter_modules(model)) == {"transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"}


def test_default_targets_are_pefts_per_model_family():
    assert set(adapter_modules(peftkit.adapt(build_tiny("llama"), "fourierft[n_frequency=8]"))) == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert set(adapter_modules(peftkit.adapt(build_tiny("gpt2"), "fourierft[n_frequency=8]"))) == {
        f"transformer.h.{i}.mlp.c_proj" for i in (0, 1)}  # PEFT's FourierFT default for GPT-2, not LoRA's c_attn


def test_init_weights_true_starts_as_the_base_and_the_default_does_not():
    base = output_of(build_tiny("llama"), "llama")
    zero = peftkit.adapt(build_tiny("llama"), "fourierft[n_frequency=50,init_weights=true]")
    torch.testing.assert_close(output_of(zero, "llama"), base, rtol=0, atol=0)
    drawn = peftkit.adapt(build_tiny("llama"), "fourierft[n_frequency=50,scaling=10]")
    assert (output_of(drawn, "llama") - base).abs().max() > 1e-2
    assert sum(p.numel() for p in drawn.parameters() if p.requires_grad) == 4 * 50


def test_merge_equals_unmerged_and_merge_and_unload_keeps_the_outputs():
    model = peftkit.adapt(build_tiny("gpt2"), OUR_SPECS["gpt2"]).eval()
    expected = output_of(model, "gpt2")
    model.merge_adapter()
    torch.testing.assert_close(output_of(model, "gpt2"), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(output_of(model, "gpt2"), expected, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(output_of(merged, "gpt2"), expected, rtol=0, atol=1e-5)


def test_the_kept_weight_change_follows_training_steps_loads_and_dtype_moves(tmp_path):
    """Forwards without gradients reuse the weight change until the spectrum changes (an optimizer step,
    an in-place write, a load, a move to another dtype)."""
    model = peftkit.adapt(build_tiny("llama"), "fourierft[n_frequency=50,scaling=10]")
    before = output_of(model, "llama")
    assert torch.equal(output_of(model, "llama"), before)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[1, 5, 9, 17]])
    model(input_ids=ids, labels=ids).loss.backward()
    kept = [layer.__dict__.get("_kept_weight_change") for layer in adapter_modules(model).values()]
    assert kept and not any(kept)  # the training forward dropped what evaluation had kept
    optimizer.step()
    after = output_of(model, "llama")
    assert (after - before).abs().max() > 1e-4
    model.save_adapter(str(tmp_path))
    assert torch.equal(output_of(peftkit.from_pretrained(build_tiny("llama"), str(tmp_path)), "llama"), after)
    model.to(torch.float64)
    torch.testing.assert_close(output_of(model, "llama").float(), after, rtol=0, atol=1e-5)
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            layer.fourierft_spectrum.zero_()
    torch.testing.assert_close(output_of(model, "llama"), output_of(build_tiny("llama").double(), "llama"),
                               rtol=0, atol=1e-12)


def test_two_adapters_switch_stack_and_average_as_sums_of_their_changes():
    model = peftkit.adapt(build_tiny("llama"), "fourierft[n_frequency=60,scaling=10]", adapter_name="a")
    model.add_adapter("b", "fourierft[n_frequency=80,scaling=10,random_loc_seed=1]")
    model.eval()
    base = output_of(build_tiny("llama"), "llama")
    model.set_active("a")
    out_a = output_of(model, "llama")
    model.set_active("b")
    out_b = output_of(model, "llama")
    assert (out_a - out_b).abs().max() > 1e-2 and (out_a - base).abs().max() > 1e-2
    model.set_active(Stack("a", "b"))
    stacked = output_of(model, "llama")
    model.set_active(Average(["a", "b"]))
    averaged = output_of(model, "llama")
    merged_ab = peftkit.adapt(build_tiny("llama"), "fourierft[n_frequency=60,scaling=10]", adapter_name="a")
    merged_ab.add_adapter("b", "fourierft[n_frequency=80,scaling=10,random_loc_seed=1]")
    for name in ("a", "b"):
        for site, layer in adapter_modules(merged_ab, name).items():
            with torch.no_grad():
                layer.fourierft_spectrum.copy_(adapter_modules(model, name)[site].fourierft_spectrum)
    merged_ab.eval().set_active(Stack("a", "b"))
    merged_ab.merge_adapter()  # both changes folded into the weights: the stack's output
    torch.testing.assert_close(output_of(merged_ab, "llama"), stacked, rtol=0, atol=1e-5)
    assert (averaged - stacked).abs().max() > 1e-3


def test_a_second_adapter_can_be_saved_and_loaded_in_peft_as_the_same_adapter(tmp_path):
    model = peftkit.adapt(build_tiny("llama"), "fourierft[n_frequency=30,scaling=10]", adapter_name="a")
    model.add_adapter("b", "fourierft[n_frequency=40,scaling=20,random_loc_seed=9]")
    model.eval().set_active("b")
    expected = output_of(model, "llama")
    model.save_adapter(str(tmp_path / "b"), "b")
    torch.testing.assert_close(output_of(_peft_from(str(tmp_path / "b"), "llama"), "llama"), expected,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("field,value", [("bias", "all"), ("bias", "fourier_only"), ("layers_pattern", "layers")])
def test_pefts_options_peftkit_lacks_are_refused_by_name(tmp_path, field, value):
    options = dict(n_frequency=20, target_modules=["q_proj"])
    if field == "layers_pattern":
        options["layers_to_transform"] = [0]
    theirs = _peft_model("llama", **options, **{field: value})
    theirs.save_pretrained(str(tmp_path))
    refusal = rf"PEFT setting {field}='{value}' is not supported by peftkit's fourierft"
    with pytest.raises(AdapterLoadError, match=refusal):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


def test_a_folder_without_a_seed_is_refused_naming_it(tmp_path):
    _peft_model("llama", n_frequency=20).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "random_loc_seed": None}))
    with pytest.raises(AdapterLoadError, match="random_loc_seed=None .* set an integer seed"):
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))


@pytest.mark.parametrize("spec,message", [
    ("fourierft[n_frequency=2000]", r"n_frequency=2000 is more than layer 'model.layers.0.self_attn.q_proj' has "
                                    r"spectral entries \(32 x 32 = 1024\) \(so do 3 more layers\); lower n_frequency "
                                    r"to at most 512"),
    ("fourierft[n_frequency=600,target_modules=[v_proj]]", r'\(16 x 32 = 512\).*n_frequency_pattern=\{"v_proj":512\}'),
    ("fourierft[n_frequency=0]", r"n_frequency=0 must be a positive integer"),
    ('fourierft[n_frequency_pattern={"q_proj":-1}]', r"n_frequency_pattern\['q_proj'\]=-1 must be a positive integer"),
    ("fourierft[random_loc_seed=18446744073709551616]", r"random_loc_seed=18446744073709551616 must be an integer in"),
    ("fourierft[target_modules=[embed_tokens]]", r"'model.embed_tokens' is an Embedding; FourierFT adapts Linear"),
])
def test_bad_settings_are_refused_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_every_too_small_kind_of_layer_is_named_at_once_and_the_suggested_pattern_works():
    """all-linear on Llama: k_proj and v_proj (grouped-query attention) are both too small for 1000."""
    with pytest.raises(ConfigError) as refusal:
        peftkit.adapt(build_tiny("llama"), "fourierft[target_modules=all-linear]")
    message = str(refusal.value)
    assert "(so do 3 more layers)" in message and "at most 512" in message
    suggestion = message.split("n_frequency_pattern=")[1]
    assert json.loads(suggestion) == {"k_proj": 512, "v_proj": 512}
    model = peftkit.adapt(build_tiny("llama"), f"fourierft[target_modules=all-linear,n_frequency_pattern={suggestion}]")
    assert {layer.n_frequency for layer in adapter_modules(model).values()} == {512, 1000}


def test_peft_also_refuses_more_coefficients_than_entries():
    """The n_frequency bound is PEFT's, not peftkit's: a PEFT user gets no folder peftkit cannot load."""
    with pytest.raises(ValueError, match="n_frequency"):
        _peft_model("llama", n_frequency=2000)


def test_merge_adapters_folds_two_fourierft_adapters_into_a_lora_with_their_summed_change():
    model = peftkit.adapt(build_tiny("llama"), "fourierft[n_frequency=50,scaling=10]", adapter_name="a")
    model.add_adapter("b", "fourierft[n_frequency=60,scaling=10,random_loc_seed=2]")
    model.eval().set_active(Stack("a", "b"))
    stacked = output_of(model, "llama")
    record = model.merge_adapters(["a", "b"], weights=[1.0, 1.0], name="m")
    assert record.method.name == "lora"
    model.set_active("m")
    torch.testing.assert_close(output_of(model, "llama"), stacked, rtol=0, atol=1e-4)
