"""LoRA's ``trainable_token_indices`` as a PEFT user adding special tokens meets it: resize, adapt, train beside
the real ``peft`` from the same start, generate, merge, hot-swap, compose, LoRA+, hubs; and PEFT's folders saved
after a vocabulary resize, which carry the resized embeddings (``save_embedding_layers="auto"``)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError, MergeError
from peftkit.hub_client import api as hub
from tests.hub_helpers import HubUnderTest, any_hub, hub_env  # noqa: F401
from tests.tiny_models import VOCAB, build_tiny, minilm_path

peft = pytest.importorskip("peft")

NEW = [VOCAB, VOCAB + 1]  # two added special tokens
BATCH = torch.tensor([[VOCAB, 5, 6, 7, VOCAB + 1, 9], [VOCAB, 20, 21, VOCAB + 1, 22, 23]])
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def _resized(arch: str, seed: int = 0, mean_resizing: bool = True, source: Path | None = None) -> torch.nn.Module:
    """The tiny model with the two tokens added (``seed`` draws their rows); ``source``: a folder holding the
    model before the resize, recorded as its name, so that PEFT finds the base vocabulary there."""
    model = build_tiny(arch)
    if source is not None:
        model.config._name_or_path = model.name_or_path = str(source)
    torch.manual_seed(seed)
    model.resize_token_embeddings(VOCAB + 2, mean_resizing=mean_resizing)
    return model


def _spec(arch: str, **extra: str) -> str:
    options = ["r=4", f"target_modules=[{','.join(TARGETS[arch])}]", f"trainable_token_indices={NEW}"]
    return f"lora[{','.join(options + [f'{k}={v}' for k, v in extra.items()])}]"


def _logits(model: torch.nn.Module, batch: torch.Tensor = BATCH) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def _train(model: torch.nn.Module, steps: int = 3) -> None:
    """A few Adam steps in eval mode (GPT-2's dropout would draw differently in peftkit and PEFT)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        opt.step()


def _randomized(model: peftkit.AdaptedModel, seed: int) -> peftkit.AdaptedModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_beside_peft_from_one_start_generates_and_merges_the_same(arch) -> None:
    start = _resized(arch)
    ours = peftkit.adapt(copy.deepcopy(start), _spec(arch))
    theirs = peft.get_peft_model(copy.deepcopy(start),
                                 peft.LoraConfig(r=4, target_modules=TARGETS[arch], trainable_token_indices=NEW))
    with torch.no_grad():  # the same A (B starts at zero, the rows at the embedding's)
        for name, module in theirs.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module.lora_A["default"].weight.copy_(ours.base_model.get_submodule(name).adapters["default"].lora_A)
    rows_before = ours.get_input_embeddings().base_layer.weight[NEW].clone()
    _train(ours)
    _train(theirs)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-5)
    rows = ours.get_input_embeddings().adapters["default"].token_adapter.tensors()["trainable_tokens_delta"]
    assert (rows - rows_before).norm(dim=1).min() > 0.01  # the new tokens' rows were trained
    prompt = BATCH[:, :3]
    expected = theirs.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=0), expected)
    merged = ours.merge_and_unload()
    torch.testing.assert_close(_logits(merged), _logits(theirs.merge_and_unload()), rtol=0, atol=1e-5)
    if arch == "gpt2":
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


@pytest.mark.parametrize("arch, config", [
    ("llama", "rows"),   # lm_head.weight and embed_tokens.token_adapter.base_layer.weight
    ("gpt2", "rows"),    # wte's and the tied lm_head's token_adapter.base_layer.weight, the rows again at lm_head
    ("llama", "plain"),  # a LoRA without rows: embed_tokens.weight and lm_head.weight
    ("gpt2", "tokens"),  # the trainable_tokens method: wte's and lm_head's base_layer.weight
])
def test_a_peft_folder_saved_after_a_resize_carries_the_embeddings_and_loads(tmp_path, arch, config) -> None:
    """PEFT saves the whole embeddings when the vocabulary differs from the base model's config.json it finds
    (here a local folder), under keys peftkit refused as unexpected. Loaded onto a resize that drew other rows
    (mean_resizing=False), the file's embeddings replace them: PEFT's logits."""
    build_tiny(arch).save_pretrained(tmp_path / "base")
    rows = NEW if config == "rows" else None
    method = peft.TrainableTokensConfig(token_indices=NEW, init_weights=False) if config == "tokens" else \
        peft.LoraConfig(r=4, target_modules=TARGETS[arch], trainable_token_indices=rows, init_lora_weights=False)
    theirs = peft.get_peft_model(_resized(arch, source=tmp_path / "base"), method)
    with pytest.warns(UserWarning, match="embedding layer has been resized"):
        theirs.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert any(key.endswith("lm_head.weight") or "base_layer.weight" in key for key in saved)
    expected = _logits(theirs)
    ours = peftkit.from_pretrained(_resized(arch, seed=7, mean_resizing=False), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-5)
    with pytest.raises(AdapterLoadError, match=r"resize_token_embeddings\(130\)"):
        peftkit.from_pretrained(_grown(arch), str(tmp_path / "peft"))
    _info_shows_the_embeddings_apart(tmp_path / "peft", theirs)


def _info_shows_the_embeddings_apart(folder: Path, theirs) -> None:
    """`peftkit info` counts the adapter's own parameters (what PEFT trains), and names the base embeddings the
    folder carries with the vocabulary a model needs for it."""
    import json

    from click.testing import CliRunner

    from peftkit.cli import main

    result = CliRunner().invoke(main, ["info", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    tied_copy = 0  # PEFT saves a tied lm_head's rows again, beside the input embedding's (one trained tensor)
    if theirs.config.tie_word_embeddings:
        saved = load_file(folder / "adapter_model.safetensors")
        tied_copy = sum(t.numel() for k, t in saved.items() if "lm_head." in k and k.endswith("trainable_tokens_delta"))
    assert info["parameters"] == theirs.get_nb_trainable_parameters()[0] + tied_copy
    assert info["base_embeddings"] and all(shape[0] == VOCAB + 2 for shape in info["base_embeddings"].values())
    text = CliRunner().invoke(main, ["info", str(folder)]).output
    assert f"model.resize_token_embeddings({VOCAB + 2})" in text and "embeddings:" in text


def _grown(arch: str) -> torch.nn.Module:
    """The tiny model resized past the adapter's vocabulary."""
    model = build_tiny(arch)
    model.resize_token_embeddings(VOCAB + 4)
    return model


def test_peft_saving_the_real_minilm_after_adding_tokens_loads_in_peftkit(tmp_path) -> None:
    """all-MiniLM-L6-v2 with two special tokens added: PEFT reads the model's config.json (30522 tokens), saves
    the resized word embeddings beside the rows, and peftkit loads the folder onto a fresh resize."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<alpha>", "<omega>"]})
    ids = tokenizer.convert_tokens_to_ids(["<alpha>", "<omega>"])

    def resized(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        return model.eval()

    lora = peft.LoraConfig(r=4, target_modules=["query", "value"], trainable_token_indices=ids,
                           init_lora_weights=False, task_type="SEQ_CLS")
    theirs = peft.get_peft_model(resized(0), lora).eval()
    with pytest.warns(UserWarning, match="embedding layer has been resized"):
        theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.bert.embeddings.word_embeddings.token_adapter.base_layer.weight" in \
        load_file(tmp_path / "peft" / "adapter_model.safetensors")
    batch = tokenizer(["<alpha> the team read it", "<omega> the team read it"], return_tensors="pt")
    with torch.no_grad():
        expected = theirs(**batch).logits
        ours = peftkit.from_pretrained(resized(1), str(tmp_path / "peft")).eval()
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=0, atol=1e-5)


def test_a_base_model_without_the_new_tokens_is_refused_naming_the_option_and_the_size(tmp_path) -> None:
    model = peftkit.adapt(_resized("llama"), _spec("llama"))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterLoadError) as refused:
        peftkit.from_pretrained(build_tiny("llama"), str(tmp_path / "a"))
    message = str(refused.value)
    assert f"trainable_token_indices {NEW} are past the input embedding's {VOCAB} rows" in message
    assert "resize_token_embeddings(len(tokenizer))" in message and f"at least {VOCAB + 2} rows" in message


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hot_swapping_rows_takes_the_same_ids_and_refuses_others_by_name(tmp_path, arch) -> None:
    """PEFT 0.21's hotswap_adapter fails on these folders (KeyError), or keeps the old rows when the new folder
    has none; peftkit swaps rows for the same ids and refuses the rest."""
    folders = {}
    for seed, (name, spec) in enumerate([("rows", _spec(arch, init_weights="false")),
                                         ("rows2", _spec(arch, init_weights="false")),
                                         ("other_ids", _spec(arch, init_weights="false").replace(str(NEW), "[3,4]")),
                                         ("plain", f"lora[r=4,target_modules=[{','.join(TARGETS[arch])}]]")]):
        model = _randomized(peftkit.adapt(_resized(arch), spec), seed)
        model.save_pretrained(tmp_path / name)
        folders[name] = (str(tmp_path / name), _logits(model))
    model = peftkit.from_pretrained(_resized(arch), folders["rows"][0])
    model.hotswap_adapter(folders["rows2"][0], "default")
    torch.testing.assert_close(_logits(model), folders["rows2"][1], rtol=0, atol=1e-6)
    with pytest.raises(AdapterLoadError, match=r"trains token ids \[3, 4\] here and the loaded one \[128, 129\]"):
        model.hotswap_adapter(folders["other_ids"][0], "default")
    with pytest.raises(AdapterLoadError, match="cannot be set to add nothing"):
        model.hotswap_adapter(folders["plain"][0], "default")
    plain = peftkit.from_pretrained(_resized(arch), folders["plain"][0])
    with pytest.raises(AdapterLoadError, match="adapts .* and 'default' does not"):
        plain.hotswap_adapter(folders["rows"][0], "default")


def test_composition_stacks_and_averages_and_refuses_what_cannot_be_one_adapter() -> None:
    model = _randomized(peftkit.adapt(_resized("llama"), _spec("llama", init_weights="false"), adapter_name="a"), 1)
    model.add_adapter("b", "lora[r=4,target_modules=[q_proj,v_proj],init_weights=false]")
    model.add_adapter("c", _spec("llama", init_weights="false"))
    model.set_active("stack(a, b)")
    stacked = _logits(model)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(_logits(merged), stacked, rtol=0, atol=1e-5)
    model.set_active("stack(a, c)")
    with pytest.raises(Exception, match=r"token ids \[128, 129\] are trained by two adapters stacked"):
        _logits(model)
    model.set_active("average(a, b)")
    _logits(model)
    with pytest.raises(MergeError) as refused:
        model.merge_and_unload()
    assert "a (lora) has trainable_token_indices: it replaces embedding rows" in str(refused.value)
    assert "has no low-rank weight change" not in str(refused.value)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_plus_puts_the_rows_in_peft_s_group(arch) -> None:
    """PEFT's create_loraplus_optimizer leaves the rows (not an embedding LoRA, not a B) at the base rate."""
    from peft.optimizers import create_loraplus_optimizer

    ours = peftkit.adapt(_resized(arch), _spec(arch))
    theirs = peft.get_peft_model(_resized(arch),
                                 peft.LoraConfig(r=4, target_modules=TARGETS[arch], trainable_token_indices=NEW))

    def rows_rate(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        names = {id(p): n for n, p in model.named_parameters()}
        return next(group["lr"] for group in optimizer.param_groups for p in group["params"]
                    if "lora" not in names[id(p)])

    assert rows_rate(ours, peftkit.lora_plus_optimizer(ours, lr=1e-3, ratio=16)) == 1e-3
    assert rows_rate(theirs, create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)) \
        == 1e-3


def test_pushed_and_pulled_through_a_hub_with_the_tokenizer(tmp_path,
                                                          any_hub: HubUnderTest) -> None:  # noqa: F811
    model = _randomized(peftkit.adapt(_resized("gpt2"), _spec("gpt2", init_weights="false")), 3)
    model.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "tokenizer_config.json").write_text("{}")  # a tokenizer's files travel with the adapter
    hub.push(str(tmp_path / "a"), "alice/chat-rows", hub=any_hub.address, base_model="org/tiny-gpt2",
             progress=False)
    pulled = Path(hub.pull("alice/chat-rows", hub=any_hub.address, progress=False))
    assert (pulled / "tokenizer_config.json").is_file()
    loaded = peftkit.load(_resized("gpt2", seed=4), "alice/chat-rows", hub=any_hub.address, progress=False)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-6)


def test_the_hub_card_counts_a_resized_peft_folder_without_its_embeddings(tmp_path, hub_env) -> None:  # noqa: F811
    """The card of a PEFT folder saved after a resize gives PEFT's trainable count, as `peftkit info` does, not
    the whole embeddings the folder carries as well."""
    build_tiny("llama").save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(_resized("llama", source=tmp_path / "base"),
                                 peft.LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="embedding layer has been resized"):
        theirs.save_pretrained(tmp_path / "peft")
    (tmp_path / "peft" / "README.md").unlink()  # PEFT's card is kept as it is; without one peftkit writes it
    address = f"local:{hub_env / 'local-hub'}"
    hub.push(str(tmp_path / "peft"), "alice/resized", hub=address, base_model="org/tiny-llama", progress=False)
    card = (Path(hub.pull("alice/resized", hub=address, progress=False)) / "README.md").read_text()
    counts = re.findall(r"trainable parameters: ([0-9,]+)", card)
    assert counts == [f"{theirs.get_nb_trainable_parameters()[0]:,}"]
