"""Prompt tuning in AdapterHub's placement (``prompt_tuning[placement=embedding_output]``), against the real
``adapters`` 1.3.0 both ways, and on its own.

tests/adapterhub/make_prompt_fixtures.py runs in ``.venv-adapters`` (``make adapters-venv``): it saves
prompt-tuning adapters of BERT and RoBERTa (bare bodies, a classification head, a tagging head; both
``combine`` values) with their outputs on a padded batch (cached under the venv, keyed by the scripts'
hashes), and with ``--run`` loads the folders peftkit saved. ``adapters`` joins its prompt to the embedding
block's output; with sdpa attention it lets the prompt's positions attend the padding (see the script),
so padded cases run adapters with eager attention, which peftkit matches with either attention.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError, PeftkitError
from peftkit.testing_models import build_tiny
from tests.adapterhub_venv import cached_fixtures, run_in_venv, saved_both_ways, with_changed_options

ATOL = 1e-5
CASES = ["bert_prompt", "bert_prompt_after_bos", "roberta_prompt", "bert_prompt_sdpa_unpadded",
         "bert_prompt_head_seq_cls", "roberta_prompt_head_tagging"]
LABELS = {"bert_prompt_head_seq_cls": ["neg", "neu", "pos"],
          "roberta_prompt_head_tagging": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}
FAMILIES = {"bert": "Bert", "roberta": "Roberta"}
TASKS = {None: "Model", "seq_cls": "ForSequenceClassification", "token_cls": "ForTokenClassification"}


@pytest.fixture(scope="module")
def prompt_fixtures() -> Path:
    return cached_fixtures('prompt-', 'make_prompt_fixtures.py', 'make_fixtures.py', 'make_prefix_fixtures.py',
                           'make_reft_fixtures.py')


def base_of(case: Path, attention: str | None = None) -> torch.nn.Module:
    """The case's model (transformers' task model for a head case, two labels as a user starts) with the
    case's body weights, and the case's attention implementation unless ``attention`` is given."""
    spec = json.loads((case / "model.json").read_text())
    family = FAMILIES[spec["model_type"]]
    config = getattr(transformers, f"{family}Config")(**spec["config"],
                                                      attn_implementation=attention or spec["attention"])
    model = getattr(transformers, f"{family}{TASKS[spec.get('task')]}")(config)
    body = load_file(str(case / "base.safetensors"))
    if getattr(model.base_model, "pooler", None) is None:  # a token classifier has none
        body = {k: v for k, v in body.items() if not k.startswith("pooler.")}
    model.base_model.load_state_dict(body)
    return model.eval()


def output(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_adapters_prompt_folder_loads_with_the_same_outputs(prompt_fixtures: Path, name: str) -> None:
    case = prompt_fixtures / name
    expected = load_file(str(case / "expected.safetensors"))
    options = json.loads((case / "adapter" / "adapter_config.json").read_text())["config"]
    model = peftkit.from_pretrained(base_of(case), str(case / "adapter"))
    config = model.adapter_record("default").config
    assert (config.placement, config.combine, config.num_virtual_tokens) == (
        "embedding_output", options["combine"], options["prompt_length"])
    torch.testing.assert_close(output(model, expected), expected["output"], atol=ATOL, rtol=0)
    if name in LABELS:
        assert model.adapter_labels("default") == LABELS[name]
    with model.disable_adapters():  # the base model (and its own head)
        plain = output(model, expected)
    assert plain.shape != expected["output"].shape or not torch.allclose(plain, expected["output"], atol=1e-3)


@pytest.mark.slow
def test_peftkit_with_sdpa_attention_computes_adapters_eager_result_on_padded_rows(prompt_fixtures: Path) -> None:
    """peftkit masks the padding for every position whatever the attention; the padded row equals the same
    sentence without padding."""
    case = prompt_fixtures / "bert_prompt"
    expected = load_file(str(case / "expected.safetensors"))
    model = peftkit.from_pretrained(base_of(case, attention="sdpa"), str(case / "adapter"))
    torch.testing.assert_close(output(model, expected), expected["output"], atol=ATOL, rtol=0)
    real = int(expected["attention_mask"][1].sum())
    alone = {"input_ids": expected["input_ids"][1:, :real], "attention_mask": expected["attention_mask"][1:, :real]}
    prompt = model.adapter_record("default").config.num_virtual_tokens
    torch.testing.assert_close(output(model, alone)[0], expected["output"][1, :prompt + real], atol=ATOL, rtol=0)


def shuffle(model: peftkit.AdaptedModel, seed: int) -> None:
    """Move the prompt and any head copy away from where they started, so that each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters("default"):
            param.add_(0.3 * torch.randn(param.shape, generator=gen))


#: label -> (case whose base model and batch are used, the spec peftkit makes; None: the case's folder reloaded)
SAVED = {
    "bert_reloaded": ("bert_prompt", None),
    "tagger_after_bos_reloaded": ("roberta_prompt_head_tagging", None),
    "roberta_made": ("roberta_prompt", "prompt_tuning[num_virtual_tokens=2,placement=embedding_output]"),
    "bert_made_after_bos": ("bert_prompt_after_bos", "prompt_tuning[num_virtual_tokens=3,placement=embedding_output,"
                                                     "combine=prefix_after_bos]"),
    "bert_made_classifier": ("bert_prompt_head_seq_cls", "prompt_tuning[num_virtual_tokens=5,"
                                                         "placement=embedding_output]"),
}


@pytest.mark.slow
def test_peftkit_saves_prompt_tuning_in_adapters_format_that_adapters_computes_alike(prompt_fixtures: Path,
                                                                                      tmp_path: Path) -> None:
    jobs, ours = saved_both_ways(prompt_fixtures, SAVED, base_of, shuffle, output, tmp_path, ATOL)
    options = json.loads((tmp_path / "bert_made_after_bos" / "adapter_config.json").read_text())["config"]
    assert options == {"architecture": "prompt_tuning", "combine": "prefix_after_bos", "init_weights_seed": None,
                       "prompt_init": "random_uniform", "prompt_init_text": None, "prompt_length": 3}
    assert sorted(p.name for p in (tmp_path / "bert_made_classifier").iterdir()) == [
        "adapter.safetensors", "adapter_config.json", "head_config.json", "model_head.safetensors"]
    run_in_venv(["make_prompt_fixtures.py", "--run", str(jobs)])
    for label in SAVED:
        theirs = load_file(str(tmp_path / f"{label}.safetensors"))["output"]
        torch.testing.assert_close(theirs, ours[label], atol=ATOL, rtol=0, msg=lambda m, label=label: f"{label}: {m}")


@pytest.mark.slow
def test_peft_placement_is_refused_by_its_option_name(prompt_fixtures: Path, tmp_path: Path) -> None:
    model = peftkit.adapt(base_of(prompt_fixtures / "bert_prompt"), "prompt_tuning[num_virtual_tokens=3]")
    with pytest.raises(PeftkitError, match="placement='input_embeddings'.*placement='embedding_output'"):
        model.save_adapter(str(tmp_path / "x"), format="adapters")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("change, words", [
    ({"combine": "suffix"}, "AdapterHub prompt tuning option combine='suffix'"),
    ({"prompt_length": 6}, r"has shape \(4, 32\), not \(prompt_length=6, hidden\)"),
])
def test_adapters_prompt_folders_peftkit_cannot_compute_are_refused_by_name(prompt_fixtures: Path, tmp_path: Path,
                                                                            change: dict, words: str) -> None:
    case = prompt_fixtures / "bert_prompt"
    folder = with_changed_options(case / "adapter", tmp_path, change)
    with pytest.raises(AdapterLoadError, match=words):
        peftkit.from_pretrained(base_of(case), str(folder))


# -- the placement on its own (no adapters venv) ---------------------------------------------------------------


def tiny_bert_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64, num_labels=5)
    return transformers.BertForTokenClassification(config).eval()


@pytest.mark.parametrize("combine, first", [("prefix", 0), ("prefix_after_bos", 1)])
def test_the_prompt_joins_the_embedding_output_raw_and_widens_mask_and_token_labels(combine: str, first: int) -> None:
    """``first``: how many tokens come before the prompt."""
    base = tiny_bert_classifier()
    model = peftkit.adapt(base, f"prompt_tuning[num_virtual_tokens=2,placement=embedding_output,combine={combine}]")
    seen: dict[str, torch.Tensor] = {}
    layer = base.bert.encoder.layer[0]
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.update(hidden=args[0]))
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = torch.randint(0, 5, (2, 6))
    with torch.no_grad():
        with model.disable_adapters():  # positions 0..5 for the tokens, and LayerNorm: the prompt gets neither
            embedded = base.bert.embeddings(input_ids=ids)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    handle.remove()
    prompt = model.model_adapter("default").prompt_embeddings
    joined = torch.cat([embedded[:, :first], prompt.expand(2, -1, -1), embedded[:, first:]], 1)
    torch.testing.assert_close(seen["hidden"], joined)
    assert out.logits.shape == (2, 8, 5)
    # The loss leaves out the prompt's rows (and, as BertForTokenClassification does, nothing else).
    rows = torch.cat([out.logits[:, :first], out.logits[:, first + 2:]], 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(rows.reshape(-1, 5), labels.reshape(-1)))
    # The padded row equals its sentence alone: the widened mask masks the padding, and only it.
    with torch.no_grad():
        alone = model(input_ids=ids[1:, :4]).logits  # no mask: every position attended
        embeds = model(inputs_embeds=base.bert.embeddings.word_embeddings(ids[1:, :4])).logits
    torch.testing.assert_close(out.logits[1, :6], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(embeds, alone, atol=ATOL, rtol=0)


def test_sequence_labels_stay_and_what_cannot_be_widened_is_refused() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64, num_labels=3)
    model = peftkit.adapt(transformers.BertForSequenceClassification(config).eval(),
                          "prompt_tuning[num_virtual_tokens=4,placement=embedding_output]")
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    with pytest.raises(PeftkitError, match=r"attention_mask must be a 2-D \(batch, length\) tensor"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 5, 5))
    adapter = model.model_adapter("default")
    with pytest.raises(PeftkitError, match="the module at the point 'embedding_output' returned Tensor, not"):
        adapter.point_output("embedding_output", torch.zeros(2, 32))
    assert repr(adapter).endswith("(virtual_tokens=4, hidden=32, rows=4, placement=embedding_output)")
    after_bos = peftkit.adapt(transformers.BertModel(config), "prompt_tuning[num_virtual_tokens=1,"
                                                              "placement=embedding_output,combine=prefix_after_bos]")
    assert "placement=embedding_output, after the first token)" in repr(after_bos.model_adapter("default"))


def test_embedding_output_prompt_trains_saves_in_peftkit_format_and_unloads(tmp_path: Path) -> None:
    base = tiny_bert_classifier()
    model = peftkit.adapt(base, "prompt_tuning[num_virtual_tokens=3,placement=embedding_output]", trainable=True)
    ids = torch.randint(3, 100, (4, 6), generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(3))
    prompt = model.model_adapter("default").prompt_embeddings
    before = prompt.detach().clone()
    optimizer = torch.optim.SGD(model.adapter_parameters("default"), lr=0.5)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and not torch.equal(prompt.detach(), before)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    model.save_adapter(str(tmp_path / "own"))
    data = json.loads((tmp_path / "own" / "adapter_config.json").read_text())
    assert data["peft_type"] == "PROMPT_TUNING_EMBEDDING_OUTPUT"  # PEFT has no placement: it must not load it
    assert data["placement"] == "embedding_output" and "combine" not in data
    again = peftkit.from_pretrained(tiny_bert_classifier(), str(tmp_path / "own"))
    assert again.adapter_record("default").config.placement == "embedding_output"
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours, atol=ATOL, rtol=0)
        again.delete_adapter("default")
        assert again(input_ids=ids).logits.shape == (4, 6, 5)  # no prompt once deleted
        unloaded = again.merge_and_unload()
    assert not unloaded.bert.embeddings.dropout._forward_hooks  # the point's hook goes with the wrapper


def test_placement_options_that_do_not_fit_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="combine='prefix_after_bos' needs placement='embedding_output'"):
        peftkit.adapt(tiny_bert_classifier(), "prompt_tuning[combine=prefix_after_bos]")
    for name in ("gpt2", "t5"):
        with pytest.raises(ConfigError, match=f"placement='embedding_output' .* is for encoder models .*{name}"):
            peftkit.adapt(build_tiny(name), "prompt_tuning[placement=embedding_output]")


def test_with_an_invertible_adapter_at_the_same_point_the_prompt_joins_after_it_in_either_adding_order() -> None:
    """AdapterHub's order after the embedding block: the invertible adapter, then the prompt. The point's hook
    follows the module there as peftkit wraps and unwraps it; a deep copy keeps its own hook."""
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=64)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    specs = {"lang": "seq_bn_inv[reduction_factor=4]",
             "prompt": "prompt_tuning[num_virtual_tokens=2,placement=embedding_output]"}
    outputs = []
    for first, second in (("lang", "prompt"), ("prompt", "lang")):
        torch.manual_seed(0)
        model = peftkit.adapt(transformers.BertModel(config).eval(), specs[first], adapter_name=first, trainable=False)
        model.add_adapter(second, specs[second])
        for seed, name in enumerate(("lang", "prompt")):
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in model.adapter_parameters(name):
                    param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        model.set_active("stack(lang, prompt)")
        with torch.no_grad():
            outputs.append(model(input_ids=ids).last_hidden_state)
            embedded = model.base_model.embeddings(input_ids=ids)
            with model.disable_adapters():
                plain = model.base_model.embeddings(input_ids=ids)
        prompt = model.model_adapter("prompt").prompt_embeddings
        assert torch.equal(embedded[:, :2], prompt.expand(2, -1, -1))  # the prompt itself is left as it is
        assert not torch.allclose(embedded[:, 2:], plain)  # the invertible adapter changed the tokens' rows
        copy = deepcopy(model)
        with torch.no_grad():
            torch.testing.assert_close(copy(input_ids=ids).last_hidden_state, outputs[-1])
        model.delete_adapter("lang")  # unwraps the point's module: the hook moves back onto it
        model.set_active("prompt")
        with torch.no_grad():
            assert model(input_ids=ids).last_hidden_state.shape == (2, 7, 32)
    torch.testing.assert_close(outputs[0], outputs[1])
