"""Where prompt tuning puts its soft prompt, checked value by value against a hand construction: the
later generation steps of a decoder (mask widened by P ones, positions moved by P), the encoder input
``generate()`` gets for T5 (prompt in front of the embedded ids, mask from the pad token), and the
``embedding_output`` placement (prompt joined to the embedding block's output, in front or after the
first token, with the mask and labels widened at the same place)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from peftkit.plugin_api import ConfigError, PeftkitError
from peftkit.plugins.prompt_tuning.layer import IGNORE_INDEX, PromptTuning

from .tiny_models import build_tiny

P = 3


@pytest.fixture(scope="module")
def llama():
    return build_tiny("llama").eval()


@pytest.fixture(scope="module")
def t5():
    return build_tiny("t5").eval()


def _prompt(hidden: int, **options) -> PromptTuning:
    torch.manual_seed(0)
    return PromptTuning(P, hidden, init_weight=torch.randn(P, hidden), **options)


def _ones(batch: int) -> torch.Tensor:
    return torch.ones(batch, P, dtype=torch.long)


def _cache_of_length(length: int) -> DynamicCache:
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, length, 2), torch.zeros(2, 1, length, 2), 0)
    return cache


def test_defaults_are_a_plain_decoder_prompt_of_p_rows():
    module = PromptTuning(P, 4)
    assert tuple(module.prompt_embeddings.shape) == (P, 4)
    assert (module.is_encoder_decoder, module.after_embeddings, module.after_bos) == (False, False, False)
    assert module.output_points() == ()
    assert module.extra_repr() == f"virtual_tokens={P}, hidden=4, rows={P}"


def test_the_prompt_takes_the_dtype_asked_for():
    module = _prompt(4)
    half = module.prompt(2, torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half, module.prompt_embeddings.detach().to(torch.float16).expand(2, -1, -1))


@pytest.mark.parametrize("submodules", [1, 2])
def test_the_prompt_is_the_first_p_rows_repeated_over_the_batch(submodules):
    """Rows are told apart from the hidden size: here hidden == P, and an encoder-decoder's parameter has
    2P rows, of which the forward reads the first P."""
    torch.manual_seed(0)
    weight = torch.randn(P * submodules, P)
    module = PromptTuning(P, P, num_transformer_submodules=submodules, init_weight=weight)
    prompt = module.prompt(2, torch.float32)
    assert prompt.shape == (2, P, P)
    for row in prompt:
        assert torch.equal(row, weight[:P])


def test_a_later_step_widens_the_mask_and_moves_the_positions(llama):
    module = _prompt(llama.config.hidden_size)
    ids = torch.tensor([[5, 6], [7, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    positions = torch.tensor([[7, 8], [7, 8]])
    args, kwargs = module.prepare(llama, (ids,), dict(attention_mask=mask, position_ids=positions,
                                                      past_key_values=_cache_of_length(P + 8)))
    assert args == ()
    assert torch.equal(kwargs["input_ids"], ids)  # only the new tokens: the prompt is in the cache
    assert kwargs.get("inputs_embeds") is None
    assert torch.equal(kwargs["attention_mask"], torch.cat([_ones(2), mask], dim=1))
    assert torch.equal(kwargs["position_ids"], positions + P)


def test_a_forward_without_cache_use_starts_afresh_even_with_a_cache(llama):
    module = _prompt(llama.config.hidden_size)
    ids = torch.tensor([[5, 6, 9]])
    mask = torch.tensor([[1, 1, 1]])
    _, kwargs = module.prepare(llama, (), dict(input_ids=ids, attention_mask=mask, use_cache=False,
                                               past_key_values=_cache_of_length(4)))
    embedded = llama.get_input_embeddings()(ids)
    assert kwargs["input_ids"] is None
    torch.testing.assert_close(kwargs["inputs_embeds"], torch.cat([module.prompt(1, embedded.dtype), embedded], 1))
    assert torch.equal(kwargs["attention_mask"], torch.cat([_ones(1), mask], dim=1))


def test_a_static_cache_is_refused(llama):
    module = _prompt(llama.config.hidden_size)
    cache = StaticCache(config=llama.config, max_cache_len=16)
    with pytest.raises(PeftkitError, match=f"{P} virtual tokens"):
        module.prepare(llama, (), dict(input_ids=torch.tensor([[5, 6]]), past_key_values=cache))


def test_the_encoder_input_gets_the_prompt_but_decoder_labels_stay(t5):
    module = _prompt(t5.config.d_model, is_encoder_decoder=True)
    ids = torch.tensor([[5, 6, 7]])
    labels = torch.tensor([[8, 9, 10]])  # same length as the input: still the decoder's, not padded
    _, kwargs = module.prepare(t5, (), dict(input_ids=ids, labels=labels))
    embedded = t5.get_input_embeddings()(ids)
    torch.testing.assert_close(kwargs["inputs_embeds"], torch.cat([module.prompt(1, embedded.dtype), embedded], 1))
    assert torch.equal(kwargs["labels"], labels)
    encoded = object()
    _, later = module.prepare(t5, (), dict(encoder_outputs=encoded, decoder_input_ids=labels))
    assert later["encoder_outputs"] is encoded and "inputs_embeds" not in later


@pytest.mark.parametrize("how", ["positional", "inputs", "input_ids"])
def test_generate_gets_the_prompted_encoder_input_and_a_mask_from_the_pad_token(t5, how):
    module = _prompt(t5.config.d_model, is_encoder_decoder=True)
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])  # pad id 0 (T5's) in the first row
    args, kwargs = {"positional": ((ids,), {}), "inputs": ((), {"inputs": ids}),
                    "input_ids": ((), {"input_ids": ids})}[how]
    kwargs["max_new_tokens"] = 2
    labels = torch.tensor([[4, 1, 0], [5, 1, 0]])  # the decoder's target, as long as the input here: not padded
    kwargs["labels"] = labels
    given = dict(kwargs)
    new_args, new_kwargs = module.prepare_generate(t5, args, kwargs)
    embedded = t5.get_input_embeddings()(ids)
    assert new_args == ()
    assert "inputs" not in new_kwargs and new_kwargs["input_ids"] is None
    assert new_kwargs["max_new_tokens"] == 2 and torch.equal(new_kwargs["labels"], labels)
    torch.testing.assert_close(new_kwargs["inputs_embeds"], torch.cat([module.prompt(2, embedded.dtype), embedded], 1))
    assert torch.equal(new_kwargs["attention_mask"], torch.cat([_ones(2), (ids != 0).long()], dim=1))
    assert kwargs.keys() == given.keys() and "inputs_embeds" not in kwargs  # the caller's dict is left alone


def test_generate_keeps_a_given_mask_and_counts_all_ones_without_a_pad_token(t5):
    module = _prompt(t5.config.d_model, is_encoder_decoder=True)
    ids = torch.tensor([[0, 5, 6]])
    mask = torch.tensor([[0, 0, 1]])
    _, kwargs = module.prepare_generate(t5, (ids,), dict(attention_mask=mask))
    assert torch.equal(kwargs["attention_mask"], torch.cat([_ones(1), mask], dim=1))
    saved = t5.generation_config.pad_token_id
    t5.generation_config.pad_token_id = None
    try:
        _, kwargs = module.prepare_generate(t5, (ids,), {})
    finally:
        t5.generation_config.pad_token_id = saved
    assert torch.equal(kwargs["attention_mask"], torch.ones(1, P + 3, dtype=torch.long))
    saved = t5.generation_config
    del t5.generation_config  # a model without any generation config: every token counts
    try:
        _, kwargs = module.prepare_generate(t5, (ids,), {})
    finally:
        t5.generation_config = saved
    assert torch.equal(kwargs["attention_mask"], torch.ones(1, P + 3, dtype=torch.long))


def test_generate_refuses_ambiguous_inputs_and_given_encoder_outputs(t5):
    module = _prompt(t5.config.d_model, is_encoder_decoder=True)
    ids = torch.tensor([[5, 6]])
    with pytest.raises(PeftkitError, match="first argument"):
        module.prepare_generate(t5, (ids, ids), {})
    with pytest.raises(PeftkitError, match="first argument"):
        module.prepare_generate(t5, (ids,), {"inputs": ids})
    with pytest.raises(PeftkitError, match="encoder_outputs"):
        module.prepare_generate(t5, (), {"input_ids": ids, "encoder_outputs": (torch.zeros(1, 2, 4),)})


def test_generate_on_a_decoder_is_left_alone(llama):
    module = _prompt(llama.config.hidden_size)
    args, kwargs = (torch.tensor([[5]]),), {"max_new_tokens": 1}
    assert module.prepare_generate(llama, args, kwargs) == (args, kwargs)


@pytest.mark.parametrize("after_bos", [False, True])
def test_embedding_output_joins_the_prompt_and_widens_mask_and_labels_at_the_same_place(llama, after_bos):
    module = _prompt(4, after_embeddings=True, after_bos=after_bos)
    ids = torch.tensor([[2, 5, 6], [2, 7, 0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])  # a 0 first: "after the first token" differs from "in front"
    labels = torch.tensor([[-100, 5, 6], [-100, 7, -100]])
    _, kwargs = module.prepare(llama, (ids,), dict(attention_mask=mask, labels=labels))
    assert torch.equal(kwargs["input_ids"], ids)  # the embedding block reads the L tokens unchanged
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    joined = module.point_output("embedding_output", hidden)
    head = module.prompt(2, torch.float32)
    pad = torch.full((2, P), IGNORE_INDEX)
    if after_bos:
        expected = torch.cat([hidden[:, :1], head, hidden[:, 1:]], 1)
        expected_mask = torch.cat([mask[:, :1], _ones(2), mask[:, 1:]], 1)
        expected_labels = torch.cat([labels[:, :1], pad, labels[:, 1:]], 1)
    else:
        expected = torch.cat([head, hidden], 1)
        expected_mask = torch.cat([_ones(2), mask], 1)
        expected_labels = torch.cat([pad, labels], 1)
    assert torch.equal(joined, expected)
    assert module.point_output("embedding_output", hidden.half()).dtype == torch.float16
    assert torch.equal(kwargs["attention_mask"], expected_mask)
    assert torch.equal(kwargs["labels"], expected_labels)
    assert module.output_points() == ("embedding_output",)
    where = ", placement=embedding_output" + (", after the first token" if after_bos else "")
    assert module.extra_repr() == f"virtual_tokens={P}, hidden=4, rows={P}{where}"


def test_embedding_output_leaves_sequence_level_labels_and_refuses_other_outputs(llama):
    module = _prompt(4, after_embeddings=True)
    ids = torch.tensor([[2, 5, 6], [2, 7, 0]])
    labels = torch.tensor([1, 0])  # one label a sequence: nothing to widen
    _, kwargs = module.prepare(llama, (), dict(input_ids=ids, labels=labels))
    assert torch.equal(kwargs["labels"], labels) and kwargs.get("attention_mask") is None
    with pytest.raises(PeftkitError, match="embedding_output"):
        module.point_output("embedding_output", torch.zeros(2, 3))


def test_the_first_step_shifts_given_positions_token_types_and_labels(llama):
    module = _prompt(llama.config.hidden_size)
    embeds = torch.randn(2, 4, llama.config.hidden_size, dtype=torch.float16)  # given embeddings, half precision
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]], dtype=torch.int32)
    token_types = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    labels = torch.arange(2 * 4 * 2).reshape(2, 4, 2)  # token-level labels with a trailing dimension
    _, kwargs = module.prepare(llama, (), dict(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                               token_type_ids=token_types, labels=labels))
    assert kwargs["inputs_embeds"].dtype == torch.float16
    assert torch.equal(kwargs["inputs_embeds"], torch.cat([module.prompt(2, torch.float16), embeds], 1))
    assert torch.equal(kwargs["attention_mask"], torch.cat([_ones(2), mask], 1))
    assert kwargs["position_ids"].dtype == torch.int32
    head = torch.arange(P, dtype=torch.int32).expand(2, P)
    assert torch.equal(kwargs["position_ids"], torch.cat([head, positions + P], 1))
    assert torch.equal(kwargs["token_type_ids"], torch.cat([torch.zeros(2, P, dtype=torch.long), token_types], 1))
    assert torch.equal(kwargs["labels"], torch.cat([torch.full((2, P, 2), IGNORE_INDEX), labels], 1))


def test_sample_vocab_draws_from_the_whole_vocabulary_including_id_0():
    from peftkit.plugins.prompt_tuning.layer import initial_prompt

    class TwoWords(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(2, 3)

        def get_input_embeddings(self):
            return self.table

    model = TwoWords()
    torch.manual_seed(0)
    rows = initial_prompt(model, "sample_vocab", 64)
    table = model.table.weight.detach()
    assert all(any(torch.equal(row, table[i]) for i in (0, 1)) for row in rows)
    assert any(torch.equal(row, table[0]) for row in rows)  # 64 draws from {0, 1}: id 0 appears
    assert initial_prompt(model, "random", 4) is None


def test_embedding_output_finds_the_length_in_inputs_embeds_and_labels_with_trailing_dimensions(llama):
    module = _prompt(4, after_embeddings=True)
    labels = torch.arange(2 * 3 * 2).reshape(2, 3, 2)
    _, kwargs = module.prepare(llama, (), dict(inputs_embeds=torch.zeros(2, 3, 4), labels=labels))
    assert torch.equal(kwargs["labels"], torch.cat([torch.full((2, P, 2), IGNORE_INDEX), labels], 1))
    mask = torch.tensor([[1, 0]])
    _, kwargs = module.prepare(llama, (), dict(attention_mask=mask, labels=labels))  # no length to compare with
    assert torch.equal(kwargs["attention_mask"], torch.cat([_ones(1), mask], 1))
    assert torch.equal(kwargs["labels"], labels)
    flat = torch.tensor([5, 6, 7])  # ids without a batch dimension: no length either
    _, kwargs = module.prepare(llama, (), dict(input_ids=flat, labels=labels))
    assert torch.equal(kwargs["labels"], labels)


class _Words(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, 3)

    def get_input_embeddings(self):
        return self.table


def test_text_init_repeats_the_tokens_of_the_text_and_refuses_ids_past_the_vocabulary():
    from peftkit.plugins.prompt_tuning.layer import initial_prompt

    from .tiny_models import minilm_path

    model = _Words(103)
    rows = initial_prompt(model, "text", 5, text=None, tokenizer_name_or_path=minilm_path())
    ids = torch.tensor([101, 102, 101, 102, 101])  # no text: [CLS] [SEP], repeated to 5 rows
    assert torch.equal(rows, model.table.weight.detach()[ids])
    with pytest.raises(ConfigError, match="102"):  # id 102 needs 103 entries
        initial_prompt(_Words(102), "text", 2, text="", tokenizer_name_or_path=minilm_path())


def test_text_init_never_runs_a_tokenizer_folders_own_code_but_passes_other_options(tmp_path):
    import json
    import shutil

    from peftkit.plugins.prompt_tuning.layer import initial_prompt
    from transformers import AutoTokenizer

    from .tiny_models import minilm_path

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json"):
        shutil.copy(f"{minilm_path()}/{name}", tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "marker.MarkerTokenizer"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "marker.py").write_text("from transformers import BertTokenizerFast\n\n\n"
                                        "class MarkerTokenizer(BertTokenizerFast):\n"
                                        "    def __call__(self, text, **kwargs):\n"
                                        "        return {'input_ids': [7, 7, 7]}\n")
    model = _Words(30522)
    table = model.table.weight.detach()
    rows = initial_prompt(model, "text", 3, text="hi", tokenizer_name_or_path=str(tmp_path),
                          tokenizer_kwargs={"trust_remote_code": True})
    assert torch.equal(rows, table[torch.tensor([101, 7632, 102])])  # the folder's marker code did not run
    cased = AutoTokenizer.from_pretrained(minilm_path(), do_lower_case=False)("HI")["input_ids"]
    assert cased != [101, 7632, 102]  # the option changes the tokens, so passing it on is visible
    rows = initial_prompt(model, "text", len(cased), text="HI", tokenizer_name_or_path=minilm_path(),
                          tokenizer_kwargs={"do_lower_case": False, "trust_remote_code": True})
    assert torch.equal(rows, table[torch.tensor(cased)])


def test_text_init_from_an_uncached_hub_id_fails_fast_offline(monkeypatch):
    from peftkit.core.errors import ModelSourceError
    from peftkit.plugins.prompt_tuning.layer import initial_prompt

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="nobody-here/no-tokenizer"):
        initial_prompt(_Words(8), "text", 2, text="a", tokenizer_name_or_path="nobody-here/no-tokenizer")
    with pytest.raises(ConfigError, match="tokenizer ''"):  # none given: named as empty, not made up
        initial_prompt(_Words(8), "text", 2, text="a", tokenizer_name_or_path=None)
