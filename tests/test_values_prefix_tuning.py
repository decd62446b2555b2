"""Prefix tuning against a separate run of the base model on a KV cache filled by hand.

The prefix tensor is PEFT's flat ``(P, num_layers * 2 * token_dim)`` layout: per layer the key then the
value of each virtual token. Here it is cut up with plain indexing (no call into the adapter's code),
written into a transformers cache, and the base model runs on that cache with the mask extended by P ones
and the positions the option asks for; the adapted model must give the same output.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache

import peftkit
from peftkit.testing import randomize

from .tiny_models import build_tiny, output_tensor, sample_inputs

P = 3


def _blocks(flat: torch.Tensor, layers: int, heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The flat prefix's per-layer (key, value) blocks, each (heads, P, head_dim)."""
    token_dim = flat.shape[1] // (2 * layers)
    out = []
    for block in range(layers):
        key = flat[:, 2 * block * token_dim:(2 * block + 1) * token_dim]
        value = flat[:, (2 * block + 1) * token_dim:(2 * block + 2) * token_dim]
        out.append(tuple(t.reshape(flat.shape[0], heads, -1).transpose(0, 1) for t in (key, value)))
    return out


def _hand_cache(model, prefixes: list[torch.Tensor], batch: int, dtype: torch.dtype, *, heads: int,
                order: list[int] | None = None) -> DynamicCache:
    """A cache holding ``prefixes`` one after the other at every layer (layer i reads block order[i])."""
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.num_layers
    cache = DynamicCache()
    per_prefix = [_blocks(flat.detach(), layers, heads) for flat in prefixes]
    for layer in range(layers):
        block = order[layer] if order else layer
        keys = torch.cat([blocks[block][0] for blocks in per_prefix], dim=1)
        values = torch.cat([blocks[block][1] for blocks in per_prefix], dim=1)
        cache.update(keys.unsqueeze(0).expand(batch, -1, -1, -1).to(dtype),
                     values.unsqueeze(0).expand(batch, -1, -1, -1).to(dtype), layer)
    return cache


def _ones_before(mask: torch.Tensor, count: int) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], count, dtype=mask.dtype), mask], dim=1)


def _adapted(arch: str, spec: str, seed: int = 4):
    model = peftkit.adapt(build_tiny(arch), spec)
    randomize(model, "default", seed=seed, scale=0.5)
    return model.eval()


def _prefix(model, name: str = "default") -> torch.Tensor:
    return model.model_adapter(name).flat().detach()


@pytest.mark.parametrize("arch, heads, dtype", [("llama", 2, torch.float32), ("gpt2", 4, torch.float32),
                                                ("llama", 2, torch.bfloat16)])
def test_a_decoder_prefix_equals_the_base_model_on_a_hand_filled_cache(arch, heads, dtype):
    """Also in bfloat16: the prefix is kept in float32 and written in the model's dtype. Positional
    input ids, inputs_embeds and explicit position ids (moved by P, as the model moves its own) give the
    same as the keyword call."""
    base = build_tiny(arch).to(dtype)
    model = peftkit.adapt(base, f"prefix_tuning[num_virtual_tokens={P}]").eval()
    assert model.model_adapter("default").prompt_embeddings.dtype == torch.float32
    inputs = sample_inputs(arch)
    inputs["attention_mask"][0, :2] = 0  # left padding in row 0
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch, length = ids.shape
    positions = torch.arange(length).expand(batch, -1) + 5
    with torch.no_grad():
        adapted = output_tensor(model(**inputs))
        positional = output_tensor(model(ids, attention_mask=mask))
        embeds = output_tensor(model(inputs_embeds=base.get_input_embeddings()(ids), attention_mask=mask))
        moved = output_tensor(model(**inputs, position_ids=positions))
        with model.disable_adapters():
            def expected(**extra):
                cache = _hand_cache(base, [_prefix(model)], batch, dtype, heads=heads)
                return output_tensor(base(input_ids=ids, attention_mask=_ones_before(mask, P), past_key_values=cache,
                                          **extra))
            by_hand, by_hand_moved = expected(), expected(position_ids=positions + P)
            plain = output_tensor(base(**inputs))
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapted, by_hand, **tolerance)
    assert not torch.allclose(adapted.float(), plain.float(), atol=1e-2)
    torch.testing.assert_close(positional, adapted)
    torch.testing.assert_close(embeds, adapted)
    torch.testing.assert_close(moved, by_hand_moved, **tolerance)
    assert not torch.allclose(moved.float(), adapted.float(), atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_stacked_prefixes_are_written_one_after_the_other_in_stack_order(arch):
    """Stack("a", "b"): one cache holds a's prefix then b's (T5: in the decoder's self-attention cache)."""
    model = peftkit.AdaptedModel(build_tiny(arch))
    model.add_adapter("a", "prefix_tuning[num_virtual_tokens=2]")
    model.add_adapter("b", f"prefix_tuning[num_virtual_tokens={P}]")
    model.set_active(peftkit.Stack("a", "b"))
    model.eval()
    inputs = sample_inputs(arch)
    layers = model.base_model.config.num_layers if arch == "t5" else 2
    order = [(2 * i) % layers for i in range(layers)] if arch == "t5" else None
    with torch.no_grad():
        adapted = output_tensor(model(**inputs))
        with model.disable_adapters():
            cache = _hand_cache(model.base_model, [_prefix(model, "a"), _prefix(model, "b")],
                                inputs["input_ids"].shape[0], torch.float32, heads=4 if arch == "t5" else 2,
                                order=order)
            if arch == "t5":
                mask = {"decoder_attention_mask": _ones_before(torch.ones_like(inputs["decoder_input_ids"]), 2 + P)}
                cache = EncoderDecoderCache(cache, DynamicCache())
            else:
                mask = {"attention_mask": _ones_before(inputs["attention_mask"], 2 + P)}
            expected = output_tensor(model.base_model(**{**inputs, **mask}, past_key_values=cache))
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)


def test_the_reparametrization_is_embedding_linear_tanh_linear_and_zero_init_starts_at_zero():
    model = _adapted("llama", f"prefix_tuning[num_virtual_tokens={P},prefix_projection=true,encoder_hidden_size=12]")
    adapter = model.model_adapter("default")
    e = adapter.embedding.weight.detach()
    w1, b1 = adapter.transform[0].weight.detach(), adapter.transform[0].bias.detach()
    w2, b2 = adapter.transform[2].weight.detach(), adapter.transform[2].bias.detach()
    assert w1.shape == (12, 16)
    torch.testing.assert_close(adapter.flat().detach(), torch.tanh(e @ w1.T + b1) @ w2.T + b2)
    for options in (",prefix_projection=true", ""):
        zero = peftkit.adapt(build_tiny("llama"), f"prefix_tuning[num_virtual_tokens={P},init_weights=\"zero\"{options}]")
        flat = zero.model_adapter("default").flat()
        assert flat.shape == (P, 2 * 2 * 16) and torch.count_nonzero(flat) == 0
    plain = peftkit.adapt(build_tiny("llama"), f"prefix_tuning[num_virtual_tokens={P}]").model_adapter("default")
    assert plain.embedding is None and plain.transform is None and not plain.reparametrized
    torch.manual_seed(0)
    drawn = peftkit.adapt(build_tiny("llama"), "prefix_tuning[num_virtual_tokens=20]").model_adapter("default").flat().detach()
    assert abs(float(drawn.std()) - 1.0) < 0.1 and abs(float(drawn.mean())) < 0.1  # N(0, 1), as PEFT draws it


def test_ejecting_a_frozen_reparametrized_prefix_keeps_it_frozen_and_its_values():
    model = _adapted("llama", f"prefix_tuning[num_virtual_tokens={P},prefix_projection=true]")
    adapter = model.model_adapter("default")
    adapter.requires_grad_(False)
    before = adapter.flat().detach().clone()
    adapter.eject()
    assert not adapter.prompt_embeddings.requires_grad
    assert torch.equal(adapter.tensors()["prompt_embeddings"], before)
    assert adapter.extra_repr() == "virtual_tokens=3, layers=2, kv_heads=2, head_dim=8, flat"


def test_the_reparametrized_adapter_says_so_in_its_repr():
    adapter = peftkit.adapt(build_tiny("gpt2"), "prefix_tuning[num_virtual_tokens=4,prefix_projection=true]"
                            ).model_adapter("default")
    assert adapter.extra_repr() == "virtual_tokens=4, layers=2, kv_heads=4, head_dim=8, reparametrized"


@pytest.mark.parametrize("arch, heads", [("llama", 2), ("roberta", 4)])
def test_from_zero_positions_keep_the_real_tokens_numbered_as_without_a_prefix(arch, heads):
    """AdapterHub's placement: the real tokens keep the positions the model gives them without a prefix
    (RoBERTa: counted after padding_idx, padding tokens at padding_idx), also when a cache holding real
    tokens is continued."""
    model = _adapted(arch, f"prefix_tuning[num_virtual_tokens={P},token_positions=\"from_zero\"]")
    base = model.base_model
    inputs = sample_inputs(arch)
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    batch, length = ids.shape
    if arch == "roberta":
        ids[0, -2:], mask[0, -2:] = 1, 0  # right padding with RoBERTa's padding id
        positions = torch.tensor([[2, 3, 4, 5, 6, 7, 1, 1], list(range(2, 10))])
    else:
        positions = torch.arange(length).expand(batch, -1)
    with torch.no_grad():
        adapted = output_tensor(model(input_ids=ids, attention_mask=mask))
        embeds = output_tensor(model(inputs_embeds=base.get_input_embeddings()(ids), attention_mask=mask))
        with model.disable_adapters():
            def run(**extra):
                cache = _hand_cache(base, [_prefix(model)], batch, torch.float32, heads=heads)
                return output_tensor(base(attention_mask=_ones_before(mask, P), past_key_values=cache, **extra))
            expected = run(input_ids=ids, position_ids=positions)
            counted = run(inputs_embeds=base.get_input_embeddings()(ids),
                          position_ids=torch.arange(2, 2 + length).expand(batch, -1) if arch == "roberta"
                          else positions)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeds, counted, atol=1e-5, rtol=1e-5)
    if arch == "llama":
        with torch.no_grad():
            first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
            rest = output_tensor(model(input_ids=ids[:, 5:], cache=first.cache, attention_mask=mask))
            given = output_tensor(model(input_ids=ids, attention_mask=mask, position_ids=positions + 3))
            with model.disable_adapters():
                expected_given = run(input_ids=ids, position_ids=positions + 3)
        torch.testing.assert_close(rest, adapted[:, 5:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(given, expected_given, atol=1e-5, rtol=1e-5)  # explicit ids are kept as given


@pytest.mark.parametrize("embedded", [False, True])
def test_from_zero_positions_continue_after_the_real_tokens_already_cached(embedded):
    """A RoBERTa decoder counts positions after padding_idx: continuing a cache of 5 real tokens, the next
    tokens get the positions they have in one full forward (from ids, or from inputs_embeds)."""
    from transformers import RobertaConfig, RobertaForCausalLM

    torch.manual_seed(0)
    base = RobertaForCausalLM(RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=128, max_position_embeddings=130,
                                            pad_token_id=1, is_decoder=True)).eval()
    model = peftkit.adapt(base, f"prefix_tuning[num_virtual_tokens={P},token_positions=\"from_zero\"]")
    randomize(model, "default", seed=4, scale=0.5)
    ids = sample_inputs("roberta")["input_ids"]
    source = {"inputs_embeds": base.get_input_embeddings()(ids).detach()} if embedded else {"input_ids": ids}
    with torch.no_grad():
        full = output_tensor(model(**source))
        first = model(**{k: v[:, :5] for k, v in source.items()}, use_cache=True)
        rest = output_tensor(model(**{k: v[:, 5:] for k, v in source.items()}, cache=first.cache))
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=1e-5)


def _t5_expected(model, inputs: dict, decoder_mask: torch.Tensor) -> torch.Tensor:
    """T5 with a hand cache: decoder layer i reads block 2i mod num_layers (PEFT's layout), the encoder
    none; the decoder's mask gets P ones in front."""
    base = model.base_model
    layers = base.config.num_layers
    batch = inputs["input_ids"].shape[0]
    self_cache = _hand_cache(base, [_prefix(model)], batch, torch.float32, heads=4,
                             order=[(2 * i) % layers for i in range(layers)])
    cache = EncoderDecoderCache(self_cache, DynamicCache())
    return output_tensor(base(**inputs, decoder_attention_mask=_ones_before(decoder_mask, P), past_key_values=cache))


def test_t5_prefix_goes_to_the_decoder_self_attention_with_its_mask_extended():
    model = _adapted("t5", f"prefix_tuning[num_virtual_tokens={P}]")
    inputs = sample_inputs("t5")
    decoder_ids = inputs["decoder_input_ids"]
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[0, -1] = 0
    with torch.no_grad():
        adapted = output_tensor(model(**inputs, decoder_attention_mask=decoder_mask))
        with model.disable_adapters():
            expected = _t5_expected(model, inputs, decoder_mask)
            unmasked = _t5_expected(model, inputs, torch.ones_like(decoder_ids))
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected[0], unmasked[0], atol=1e-4)  # the padded decoder position matters


def test_t5_batch_comes_from_whichever_decoder_input_is_given_and_a_cache_is_continued():
    """Encoder outputs computed once (as generate() does) with decoder embeddings or labels only; a decoder
    cache that holds real positions is continued, not filled again."""
    model = _adapted("t5", f"prefix_tuning[num_virtual_tokens={P}]")
    base = model.base_model
    inputs = sample_inputs("t5")
    decoder_ids = inputs["decoder_input_ids"]
    with torch.no_grad():
        full = output_tensor(model(**inputs))
        encoded = base.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        common = dict(encoder_outputs=encoded, attention_mask=inputs["attention_mask"])
        from_embeds = output_tensor(model(**common, decoder_inputs_embeds=base.get_input_embeddings()(decoder_ids)))
        labels = torch.cat([decoder_ids[:, 1:], decoder_ids[:, :1]], dim=1)
        shifted = base._shift_right(labels)
        from_labels = output_tensor(model(**common, labels=labels))
        with_ids = output_tensor(model(**common, decoder_input_ids=shifted))
        first = model(**inputs | {"decoder_input_ids": decoder_ids[:, :2]}, use_cache=True)
        rest = output_tensor(model(**inputs | {"decoder_input_ids": decoder_ids[:, 2:]}, cache=first.cache))
    torch.testing.assert_close(from_embeds, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_labels, with_ids, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest, full[:, 2:], atol=1e-5, rtol=1e-5)


def test_bart_prefix_has_the_decoder_layer_count_and_goes_to_its_self_attention():
    """BART's decoder text config from transformers says decoder_layers=12 whatever the model has; the
    prefix reads the model's own (2 here): a forward used to fail with an IndexError in the cache."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    model = peftkit.adapt(BartForConditionalGeneration(config), f"prefix_tuning[num_virtual_tokens={P}]")
    randomize(model, "default", seed=4, scale=0.5)
    model.eval()
    assert model.model_adapter("default").geometry.num_layers == 2
    ids = torch.randint(3, 100, (2, 5))
    decoder_ids = torch.randint(3, 100, (2, 4))
    with torch.no_grad():
        adapted = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
        with model.disable_adapters():
            blocks = _blocks(_prefix(model), 2, 4)  # decoder layer i reads block 2i mod 2 (PEFT's layout)
            self_cache = DynamicCache()
            for layer in range(2):
                self_cache.update(*(t.unsqueeze(0).expand(2, -1, -1, -1) for t in blocks[0]), layer)
            expected = model.base_model(input_ids=ids, decoder_input_ids=decoder_ids,
                                        decoder_attention_mask=_ones_before(torch.ones_like(decoder_ids), P),
                                        past_key_values=EncoderDecoderCache(self_cache, DynamicCache())).logits
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-5)


def test_from_zero_positions_count_from_the_start_unless_embeddings_number_by_padding_idx_themselves():
    """An embeddings module with a ``padding_idx`` but without transformers' RoBERTa numbering function
    (``create_position_ids_from_input_ids``) gets plain positions start..start+n-1, as does one with the
    function but no ``padding_idx``; with both, the real tokens are numbered after ``padding_idx``."""
    from peftkit.plugins.prefix_tuning.layer import positions_from_zero

    ids = torch.tensor([[5, 6, 1, 7], [8, 9, 10, 11]])
    plain = torch.tensor([[3, 4, 5, 6], [3, 4, 5, 6]])

    def model_with(**embedding_attributes) -> torch.nn.Module:
        model = torch.nn.Module()
        model.embeddings = torch.nn.Module()
        for name, value in embedding_attributes.items():
            setattr(model.embeddings, name, value)
        return model

    def numbering(input_ids, padding_idx, start):  # RoBERTa's: cumulative count of non-padding tokens
        mask = input_ids.ne(padding_idx).int()
        return (torch.cumsum(mask, dim=1) + start) * mask + padding_idx

    assert torch.equal(positions_from_zero(model_with(padding_idx=1), {"input_ids": ids}, 3), plain)
    assert torch.equal(positions_from_zero(model_with(padding_idx=None, create_position_ids_from_input_ids=numbering),
                                           {"input_ids": ids}, 3), plain)
    both = model_with(padding_idx=1, create_position_ids_from_input_ids=numbering)
    assert torch.equal(positions_from_zero(both, {"input_ids": ids}, 3), torch.tensor([[5, 6, 1, 7], [5, 6, 7, 8]]))
    embeds = torch.zeros(2, 4, 8)
    assert torch.equal(positions_from_zero(both, {"inputs_embeds": embeds}, 3), torch.tensor([[5, 6, 7, 8]] * 2))
