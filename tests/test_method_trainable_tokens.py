"""Trainable tokens (PEFT's TRAINABLE_TOKENS): the same outputs, gradients and files as the real ``peft``.

Tiny Llama (untied output layer) and GPT-2 (lm_head tied to the input embedding) from tests/tiny_models.py.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit.core.composition import Stack
from peftkit.core.errors import ConfigError, MergeError, PeftkitError
from tests.tiny_models import build_tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[0, 3, 5, 9, 7, 3, 100], [5, 5, 1, 2, 7, 0, 0]])
INDICES = [0, 3, 5, 7]  # 0 is Llama's padding_idx: its row gets no gradient, in PEFT as here
ARCHS = ("llama", "gpt2")


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_model(arch: str, **options: object) -> nn.Module:
    config = peft.TrainableTokensConfig(token_indices=INDICES, init_weights=False, **options)
    torch.manual_seed(1)
    return peft.get_peft_model(build_tiny(arch), config)


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_as_the_base_model_and_adapts_the_input_embedding(arch: str) -> None:
    base = build_tiny(arch)
    expected = _logits(base)
    model = peftkit.adapt(base, f"trainable_tokens[token_indices={INDICES}]")
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    tied = arch == "gpt2"
    sites = {site: type(layer.adapters["default"]).__name__ for site, layer in model.tuner_layers()}
    embedding = "transformer.wte" if tied else "model.embed_tokens"
    assert set(sites) == ({embedding, "lm_head"} if tied else {embedding})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == len(INDICES) * 32  # one set of rows, also when the output layer is tied


@pytest.mark.parametrize("arch", ARCHS)
def test_a_folder_peft_saves_loads_with_peft_logits(arch: str, tmp_path) -> None:
    theirs = _peft_model(arch)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path / "peft"))
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-5)
    assert (_logits(ours) - _logits(build_tiny(arch))).abs().max() > 1e-2  # the rows changed the logits


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_what_peftkit_saves_with_the_same_fields_and_keys(arch: str, tmp_path) -> None:
    theirs = _peft_model(arch)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.adapt(build_tiny(arch), f"trainable_tokens[token_indices={INDICES},init_weights=false]")
    ours.save_pretrained(tmp_path / "ours")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "token_indices", "target_modules", "init_weights"):
        assert our_config[key] == peft_config[key], key
    peft_weights = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_weights = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in our_weights.items()} == {k: v.shape for k, v in peft_weights.items()}
    loaded = peft.PeftModel.from_pretrained(build_tiny(arch), str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(loaded), _logits(ours), rtol=0, atol=1e-5)


def test_a_peft_config_object_is_read_as_its_folder() -> None:
    model = peftkit.adapt(build_tiny("llama"), peft.TrainableTokensConfig(token_indices=[3, 5]))
    config = model.adapter_record("default").config
    assert (config.token_indices, config.target_modules) == ([3, 5], "model.embed_tokens")


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_equal_peft_and_reach_only_the_chosen_rows(arch: str) -> None:
    theirs = _peft_model(arch)
    ours = peftkit.adapt(build_tiny(arch), f"trainable_tokens[token_indices={INDICES},init_weights=false]")
    rows = next(p for p in ours.parameters() if p.requires_grad)
    delta = theirs.base_model.model.get_input_embeddings().trainable_tokens_delta["default"]
    with torch.no_grad():
        rows.copy_(delta)
    for model in (theirs, ours):  # eval mode: GPT-2's dropout would draw differently
        model(input_ids=IDS, labels=IDS).loss.backward()
    torch.testing.assert_close(rows.grad, delta.grad, rtol=1e-5, atol=1e-7)
    assert rows.grad[0].abs().sum() == 0 if arch == "llama" else rows.grad[0].abs().sum() > 0  # padding_idx
    assert all(p.grad is None for p in ours.base_model.parameters())  # the base embedding gets none


def test_max_norm_and_gradients_scaled_by_frequency_equal_peft() -> None:
    """The embedding's max_norm and scale_grad_by_freq, as PEFT's F.embedding on the patched weight applies them:
    the new rows are renormalized (never the parameter itself) and each row's gradient is divided by its own
    count in the batch (every position looks up a row, the others' a zero row of their own: its count must not
    reach the new rows')."""
    def with_options(model: nn.Module) -> nn.Module:
        embedding = model.get_input_embeddings()
        embedding.max_norm, embedding.scale_grad_by_freq = 0.05, True
        return model

    torch.manual_seed(1)
    theirs = peft.get_peft_model(with_options(build_tiny("llama")),
                                 peft.TrainableTokensConfig(token_indices=INDICES, init_weights=False))
    ours = peftkit.adapt(with_options(build_tiny("llama")),
                         f"trainable_tokens[token_indices={INDICES},init_weights=false]")
    rows = next(p for p in ours.parameters() if p.requires_grad)
    delta = theirs.base_model.model.get_input_embeddings().trainable_tokens_delta["default"]
    with torch.no_grad():
        rows.copy_(delta)
    before = rows.detach().clone()
    weights = torch.randn(*IDS.shape, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (theirs, ours):  # at the embedding: max_norm renormalizes the base weight in place (ours, as
        embedded = model.get_input_embeddings()(IDS)  # the bare model does), a copy of it in PEFT
        (embedded * weights).sum().backward()
        outputs.append(embedded.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rows.grad, delta.grad, rtol=1e-5, atol=1e-7)
    assert rows.grad[1:].abs().sum() > 0 and torch.equal(rows.detach(), before)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_the_chosen_rows(arch: str) -> None:
    base = build_tiny(arch)
    before = base.get_input_embeddings().weight.detach().clone()
    model = peftkit.adapt(base, f"trainable_tokens[token_indices={INDICES}]")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    merged = model.merge_and_unload()
    after = merged.get_input_embeddings().weight.detach()
    changed = sorted(int(i) for i in torch.nonzero((after - before).abs().sum(dim=1)).flatten())
    assert changed == ([3, 5, 7] if arch == "llama" else INDICES)  # Llama's padding row 0 gets no gradient
    if arch == "gpt2":
        assert merged.lm_head.weight is merged.get_input_embeddings().weight  # still tied


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_merge_and_unload(arch: str) -> None:
    base = build_tiny(arch)
    weight = base.get_input_embeddings().weight.detach().clone()
    model = peftkit.adapt(base, f"trainable_tokens[token_indices={INDICES},init_weights=false]")
    unmerged = _logits(model)
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), unmerged, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(model.base_model.get_input_embeddings().weight, weight)
    torch.testing.assert_close(_logits(model.merge_and_unload()), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_with_disjoint_ids_stack_as_peft_activates_both(arch: str, tmp_path) -> None:
    """Two folders PEFT saved, stacked, equal the base model with both adapters' rows written into its
    weight (and PEFT's own output with both active, on Llama: with a tied output layer PEFT wraps it twice
    and its forward fails, but its files load here)."""
    torch.manual_seed(2)
    theirs = peft.get_peft_model(build_tiny(arch), peft.TrainableTokensConfig(token_indices=[3, 5],
                                                                               init_weights=False))
    theirs.add_adapter("other", peft.TrainableTokensConfig(token_indices=[7, 9], init_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    ours.load_adapter(str(tmp_path / "other"), "other")
    ours.set_active(Stack("default", "other"))
    expected = build_tiny(arch)
    with torch.no_grad():
        for name, indices in (("default", [3, 5]), ("other", [7, 9])):
            rows = theirs.base_model.model.get_input_embeddings().trainable_tokens_delta[name]
            expected.get_input_embeddings().weight.index_copy_(0, torch.tensor(indices), rows)
    torch.testing.assert_close(_logits(ours), _logits(expected), rtol=0, atol=1e-5)
    if arch == "llama":
        theirs.base_model.set_adapter(["default", "other"])
        torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-5)
    ours.merge_adapter(["default", "other"])
    torch.testing.assert_close(_logits(ours.merge_and_unload(["default", "other"])), _logits(expected),
                               rtol=0, atol=1e-5)


def test_overlapping_ids_are_refused_in_a_stack_and_in_a_merge() -> None:
    model = peftkit.adapt(build_tiny("llama"), "trainable_tokens[token_indices=[3,5],init_weights=false]")
    model.add_adapter("other", "trainable_tokens[token_indices=[5,9],init_weights=false]")
    model.set_active(Stack("default", "other"))
    with pytest.raises(PeftkitError, match=r"token ids \[5\] are trained by two adapters stacked"):
        _logits(model)
    model.set_active("default")
    model.merge_adapter(["default"])
    with pytest.raises(MergeError, match=r"token ids \[5\] are trained by two adapters merged"):
        model.merge_adapter(["other"])


@pytest.mark.parametrize("spec, message", [
    ("trainable_tokens", "token_indices is empty"),
    ("trainable_tokens[token_indices=[3,3]]", r"names \[3\] more than once"),
    ("trainable_tokens[token_indices=[3,500]]", r"token ids \[500\] are outside model.embed_tokens's 128 rows"),
    ("trainable_tokens[token_indices=[3],target_modules=[input_layernorm]]", "is a LlamaRMSNorm"),
])
def test_bad_configs_are_refused_with_the_fix(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


class _Scaled(nn.Embedding):
    """An embedding that scales its output (Gemma's Gemma3TextScaledWordEmbedding)."""

    def __init__(self) -> None:
        super().__init__(20, 8, padding_idx=1)
        self.embed_scale = 3.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = _Scaled()
        self.out = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(input_ids))


def test_an_embed_scale_is_applied_to_the_new_rows_as_peft_does() -> None:
    torch.manual_seed(0)
    base = _Tiny()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(_Tiny(), peft.TrainableTokensConfig(token_indices=[1, 2], target_modules=["embed"],
                                                                     init_weights=False))
    ids = torch.tensor([[1, 2, 3, 4, 2]])
    ours = peftkit.adapt(base, "trainable_tokens[token_indices=[1,2],target_modules=[embed]]")
    with torch.no_grad():
        next(p for p in ours.parameters() if p.requires_grad).copy_(
            theirs.base_model.model.embed.trainable_tokens_delta["default"])
        torch.testing.assert_close(ours(ids), theirs(ids), rtol=0, atol=1e-6)


def test_a_lora_and_token_rows_train_together_and_route_per_row() -> None:
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4,target_modules=[q_proj,v_proj]]", "lora")
    model.add_adapter("tokens", "trainable_tokens[token_indices=[3,5],init_weights=false]")
    model.train_adapter(["lora", "tokens"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("rows_0" in n for n in trainable) and any("lora_B" in n for n in trainable)
    model(input_ids=IDS, labels=IDS).loss.backward()
    model.set_active(None)
    routed = _logits_routed(model, ["tokens", "__base__"])
    model.set_active("tokens")
    torch.testing.assert_close(routed[0], _logits(model, IDS[:1])[0], rtol=0, atol=1e-6)
    model.set_active(None)
    torch.testing.assert_close(routed[1], _logits(model, IDS[1:])[0], rtol=0, atol=1e-6)


def _logits_routed(model: nn.Module, names: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, adapter_names=names).logits


def test_a_table_of_ids_per_module_saves_in_peftkits_own_type(tmp_path) -> None:
    spec = 'trainable_tokens[token_indices={"embed_tokens":[3,5]},init_weights=false]'
    model = peftkit.adapt(build_tiny("llama"), spec)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEFTKIT_TRAINABLE_TOKENS"
    loaded = peftkit.from_pretrained(build_tiny("llama"), str(tmp_path))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
