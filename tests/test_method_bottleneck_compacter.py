"""Compacter's PHM projections and MAD-X's invertible adapters: values by hand, and refusals by name."""

from __future__ import annotations

import pytest
import torch
import transformers

import peftkit
from peftkit.core.errors import ConfigError, PeftkitError
from peftkit.plugins.bottleneck.config import SeqBnConfig
from peftkit.plugins.bottleneck.phm import PHMLinear, shared_phm_tensors
from peftkit.testing_models import build_tiny, sample_inputs
from peftkit.testing import randomize


def _bert_mlm() -> transformers.BertForMaskedLM:
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)).eval()


@pytest.mark.parametrize("options", [{}, {"factorized_phm_W": False}, {"factorized_phm_rule": True, "phm_rank": 3},
                                     {"shared_phm_rule": False}, {"shared_W_phm": True, "phm_dim": 2}])
def test_a_phm_layer_is_the_sum_of_kronecker_products_of_its_rules_and_weights(options: dict) -> None:
    torch.manual_seed(0)
    config = SeqBnConfig(phm_layer=True, reduction_factor=2, **options)
    shared_tensors = shared_phm_tensors(config, 16, 8, zero_up=False, factory={"dtype": torch.float64})
    shared = torch.nn.Module()
    for key, value in shared_tensors.items():
        setattr(shared, key, value)
    layer = PHMLinear(16, 8, "down", config, zero=False, dtype=torch.float64)
    with torch.no_grad():
        for tensor in [*layer.parameters(), *layer.buffers(), *shared_tensors.values()]:
            tensor.copy_(torch.randn(tensor.shape, dtype=torch.float64))
    source = shared if config.shared_phm_rule else layer
    rule = (source.phm_rule if not config.factorized_phm_rule
            else torch.bmm(source.phm_rule_left, source.phm_rule_right))
    weights = shared if config.shared_W_phm else layer
    prefix = "W_down" if config.shared_W_phm else "W"
    weight = (getattr(weights, prefix) if not config.factorized_phm_W
              else torch.bmm(getattr(weights, f"{prefix}_left"), getattr(weights, f"{prefix}_right")))
    matrix = sum(torch.kron(rule[i], weight[i]) for i in range(config.phm_dim))
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x, shared), x @ matrix + layer.b)


def test_the_inverse_before_the_lm_head_undoes_the_block_on_the_embeddings() -> None:
    model = peftkit.adapt(_bert_mlm(), "seq_bn_inv[init_weights=false,non_linearity=gelu]")
    randomize(model, "default", seed=1, scale=0.5)
    forward = model.base_model.bert.embeddings.dropout.adapters["default"]
    inverse = model.base_model.cls.predictions.decoder.adapters["default"]
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    model.double()
    y = forward.couple(x)
    assert not torch.allclose(y, x, atol=1e-2)
    torch.testing.assert_close(inverse.uncouple(y), x)
    # the first half is shifted by F of the second, then the second by G of the new first half
    shared = model.shared_state("default")
    f = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(
        x[..., 16:], shared.inv_F_0_weight, shared.inv_F_0_bias)), shared.inv_F_2_weight, shared.inv_F_2_bias)
    torch.testing.assert_close(y[..., :16], x[..., :16] + f)


def test_the_lm_heads_output_layer_reads_the_inverse_of_its_input() -> None:
    model = peftkit.adapt(_bert_mlm(), "seq_bn_inv[init_weights=false]")
    randomize(model, "default", seed=2, scale=0.5)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    seen = {}
    transform = model.base_model.cls.predictions.transform
    handle = transform.register_forward_hook(lambda _m, _a, out: seen.update(h=out))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    handle.remove()
    decoder = model.base_model.cls.predictions.decoder
    expected = decoder.base_layer(decoder.adapters["default"].uncouple(seen["h"]))
    torch.testing.assert_close(logits, expected)


def test_a_model_without_output_embeddings_gets_the_forward_block_only() -> None:
    model = peftkit.adapt(build_tiny("bert"), "seq_bn_inv")
    roles = [site.role for site in model.adapter_record("default").sites]
    assert roles.count("inv_embedding") == 1 and "inv_output" not in roles


@pytest.mark.parametrize("spec, words", [
    ("compacter", "phm_dim=4 must divide every PHM layer's sizes.*bottleneck size 1"),
    ("seq_bn[inv_adapter=glow]", "inv_adapter='glow' is not supported.*GLOW"),
    ("seq_bn[phm_layer=true,shared_W_phm=true,reduction_factor={\"0\": 4, \"default\": 8}]",
     "shared_W_phm=true shares one weight factor"),
    ("compacter[phm_dim=0]", "phm_dim=0 must be a positive integer"),
])
def test_bad_compacter_and_invertible_options_are_refused_by_name(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        peftkit.adapt(build_tiny("bert"), spec)


def test_invertible_adapters_on_a_family_without_a_known_embedding_output_are_refused() -> None:
    with pytest.raises(ConfigError, match="inv_adapter needs the model's embedding output.*not 't5'"):
        peftkit.adapt(build_tiny("t5"), "seq_bn_inv")


def test_a_trained_lm_head_and_an_invertible_adapter_in_one_adapter_are_refused() -> None:
    with pytest.raises(ConfigError, match="inverse goes on the input of 'cls.predictions.decoder'"):
        peftkit.adapt(_bert_mlm(), "seq_bn_inv[modules_to_save=[cls]]")


def test_adapterhub_format_refuses_shared_unfactorized_weights_it_cannot_create(tmp_path) -> None:
    model = peftkit.adapt(_bert_mlm(), "compacterpp[reduction_factor=4,shared_W_phm=true,factorized_phm_W=false]")
    with pytest.raises(PeftkitError, match="shared_W_phm=true with factorized_phm_W=false"):
        model.save_adapter(str(tmp_path / "x"), format="adapters")
    assert not (tmp_path / "x").exists()


def test_compacter_saves_and_loads_its_shared_rules_once_in_peftkits_format(tmp_path) -> None:
    model = peftkit.adapt(build_tiny("gpt2"), "compacter[reduction_factor=4,init_weights=false]")
    randomize(model, "default", seed=3, scale=0.3)
    model.save_adapter(str(tmp_path / "c"))
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    assert [k for k in keys if "phm_rule" in k] == ["peftkit_shared.phm_rule"]
    again = peftkit.from_pretrained(build_tiny("gpt2"), str(tmp_path / "c"))
    inputs = sample_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits)
