"""ReFT (reft, loreft, noreft, direft): the intervention's formula by hand, its positions with padding,
composition, generation with a KV cache, training, and refusals.

The AdapterHub format against the real ``adapters`` is in test_adapterhub_reft.py; the conformance
suite runs the four methods in test_conformance.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.nn.utils.parametrizations import orthogonal

import peftkit
from peftkit.core.composition import Average, BatchSplit, Parallel, Stack
from peftkit.core.errors import CompositionError, ConfigError, PeftkitError
from peftkit.plugins.reft.batch import BATCH_KEY, position_index
from peftkit.plugins.reft.units import HouseholderFrame
from tests.method_helpers import adapter_modules, randomize
from tests.tiny_models import build_tiny

IDS = torch.tensor([[5, 9, 14, 3, 22, 7, 11], [8, 4, 19, 30, 6, 12, 2]])
RIGHT_PADDED = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
LEFT_PADDED = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])


def adapted(arch: str, spec: str, *names: str, seed: int = 0) -> peftkit.AdaptedModel:
    model = peftkit.AdaptedModel(build_tiny(arch))
    for i, name in enumerate(names or ("default",)):
        model.add_adapter(name, spec)
        randomize(model, name, std=0.3, seed=seed + i)
    model.set_active(names[0] if names else "default")
    return model.eval()


class SiteRecorder:
    """The base layer's output h and the site's output at every ReFT site during a forward."""

    def __init__(self, model: peftkit.AdaptedModel) -> None:
        self.base: dict[str, torch.Tensor] = {}
        self.out: dict[str, torch.Tensor] = {}
        self.handles = []
        for site, layer in model.tuner_layers():
            self.handles.append(layer.base_layer.register_forward_hook(self.keep(self.base, site)))
            self.handles.append(layer.register_forward_hook(self.keep(self.out, site)))

    @staticmethod
    def keep(into: dict[str, torch.Tensor], site: str) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            into[site] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def run(model: peftkit.AdaptedModel, mask: torch.Tensor | None = None) -> SiteRecorder:
    recorder = SiteRecorder(model)
    with torch.no_grad():
        model(input_ids=IDS, **({"attention_mask": mask} if mask is not None else {}))
    recorder.close()
    return recorder


def by_hand(unit: Any, h: torch.Tensor) -> torch.Tensor:
    """h + R^T (act(W h + b) - R h), R, W, b read from the unit (no dropout: eval)."""
    rows = unit.projection.weight.detach()
    source = unit.learned_source(h)
    if unit.activation is not None:
        source = {"tanh": torch.tanh, "relu": torch.relu}[unit.activation](source)
    if unit.subtract_projection:
        source = source - h @ rows.T
    return h + source @ rows


@pytest.mark.parametrize("arch,mask", [("bert", RIGHT_PADDED), ("llama", LEFT_PADDED), ("gpt2", None)])
def test_interventions_at_the_first_and_last_real_tokens_follow_the_formula(arch: str, mask: Any) -> None:
    model = adapted(arch, "loreft[prefix_positions=2,suffix_positions=1,r=3]")
    seen = run(model, mask)
    real = mask if mask is not None else torch.ones_like(IDS)
    for site, module in adapter_modules(model).items():
        h, out = seen.base[site], seen.out[site]
        expected = h.clone()
        for row in range(IDS.shape[0]):
            tokens = real[row].nonzero().flatten().tolist()
            with torch.no_grad():
                for pos in tokens[:2]:
                    expected[row, pos] = by_hand(module.units["0"], h[row, pos])
                expected[row, tokens[-1]] = by_hand(module.units["1"], h[row, tokens[-1]])
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        assert (out != h).any(dim=-1).sum() == 6  # 3 positions per row changed, nothing else
        rows = module.units["0"].projection.weight.detach()
        torch.testing.assert_close(rows @ rows.T, torch.eye(3), atol=1e-5, rtol=0)  # orthonormal rows


def test_direft_tied_with_an_activation_and_chosen_layers() -> None:
    model = adapted("llama", "direft[prefix_positions=1,suffix_positions=2,tied_weights=true,r=2,"
                             "non_linearity=tanh,layers=[1]]")
    modules = adapter_modules(model)
    assert list(modules) == ["model.layers.1"]
    module = modules["model.layers.1"]
    assert list(module.units) == ["0"] and not module.units["0"].subtract_projection
    assert not hasattr(module.units["0"].projection, "parametrizations")  # no orthogonality
    seen = run(model, LEFT_PADDED)
    h, out = seen.base["model.layers.1"], seen.out["model.layers.1"]
    expected = h.clone()
    with torch.no_grad():
        for row, positions in ((0, (0, 5, 6)), (1, (3, 5, 6))):
            for pos in positions:
                expected[row, pos] = by_hand(module.units["0"], h[row, pos])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_positions_of_short_rows_overlap_and_padding() -> None:
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 1, 1]]).bool()  # the last row: a soft prompt before left padding
    first, last = position_index(real, 5, 6, prefix=2, suffix=2, device=torch.device("cpu"))
    # 6 marks a skipped position (past the end); a row of one real token has one prefix and one
    # suffix position (the same token: the suffix's result is kept), an all-padding row none.
    assert first.tolist() == [[0, 1], [2, 3], [0, 6], [6, 6], [0, 1]]
    assert last.tolist() == [[4, 5], [3, 4], [6, 0], [6, 6], [4, 5]]
    first, last = position_index(None, 1, 3, prefix=5, suffix=0, device=torch.device("cpu"))
    assert first.tolist() == [[0, 1, 2]] and last.shape == (1, 0)


def test_overlapping_prefix_and_suffix_keep_the_suffix_result() -> None:
    model = adapted("bert", "reft[prefix_positions=3,suffix_positions=2,r=2]")
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    seen = run(model, mask)
    site, module = next(iter(adapter_modules(model).items()))
    h, out = seen.base[site][1], seen.out[site][1]
    with torch.no_grad():
        torch.testing.assert_close(out[0], by_hand(module.units["0"], h[0]), atol=1e-5, rtol=0)
        for pos in (1, 2):  # prefix and suffix: the suffix unit's result, computed from h
            torch.testing.assert_close(out[pos], by_hand(module.units["1"], h[pos]), atol=1e-5, rtol=0)
    assert torch.equal(out[3:], h[3:])  # padding untouched


def test_orthogonal_frame_is_torchs_parametrization_and_survives_weight_decay() -> None:
    reference = orthogonal(torch.nn.Linear(16, 3, bias=False))
    original = reference.parametrizations.weight.original.detach().clone()
    frame = HouseholderFrame(reference.parametrizations.weight[0].base.detach().clone())
    torch.testing.assert_close(frame(original), reference.weight.detach(), atol=0, rtol=0)
    # The diagonal gets no gradient; weight decay shrinks it. torch reads its integer part (0 here:
    # R's rows vanish), peftkit its sign.
    decayed = original.clone()
    decayed.diagonal().mul_(0.5)
    torch.testing.assert_close(frame(decayed), frame(original), atol=0, rtol=0)

    model = adapted("llama", "loreft[r=2]")
    model.train_adapter("default")
    model.train()
    original_before = {m.units["0"].projection: m.units["0"].projection.parametrizations.weight.original.detach()
                       .clone() for m in adapter_modules(model).values()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        model(input_ids=IDS).logits.pow(2).mean().backward()
        optimizer.step()
    for module in adapter_modules(model).values():
        rows = module.units["0"].projection.weight.detach()
        torch.testing.assert_close(rows @ rows.T, torch.eye(2), atol=1e-5, rtol=0)
        # and the step ended with the diagonal back at -1, which torch's reading (adapters') agrees with
        projection = module.units["0"].projection
        assert torch.equal(projection.parametrizations.weight.original.diagonal(), -torch.ones(2))
        assert bool((projection.parametrizations.weight.original != original_before[projection]).any())


def test_stack_applies_interventions_in_order_and_average_averages_their_changes() -> None:
    model = adapted("bert", "reft[prefix_positions=2,suffix_positions=1,r=2]", "a", "b")
    model.set_active(Stack("a", "b"))
    stacked = run(model, RIGHT_PADDED)
    model.set_active(Average("a", "b", weights=[3.0, 1.0]))
    averaged = run(model, RIGHT_PADDED)
    model.set_active("a")
    run(model, RIGHT_PADDED)  # the positions of this batch, for the calls by hand below
    a, b = adapter_modules(model, "a"), adapter_modules(model, "b")
    for site in a:
        x = h = stacked.base[site]
        with torch.no_grad():
            torch.testing.assert_close(stacked.out[site], b[site](x, a[site](x, h, None), None), atol=1e-5, rtol=0)
            h = averaged.base[site]
            expected = h + 0.75 * (a[site](h, h, None) - h) + 0.25 * (b[site](h, h, None) - h)
            torch.testing.assert_close(averaged.out[site], expected, atol=1e-5, rtol=0)


def test_row_splits_are_refused_naming_what_reft_supports() -> None:
    model = adapted("bert", "reft", "a", "b")
    for block in (BatchSplit("a", "b", sizes=[1, 1]), Parallel("a", "b")):
        with pytest.raises(CompositionError, match="average, fuse, stack"):
            model.set_active(block)
    with pytest.raises(CompositionError, match="batch_split"):
        model(input_ids=IDS, adapter_names=["a", "b"])


def test_fuse_learns_over_interventions() -> None:
    model = adapted("llama", "reft[suffix_positions=1]", "a", "b")
    fuse = peftkit.Fuse("a", "b", name="ab")
    model.add_fusion(fuse)
    model.set_active(fuse)
    model.train_adapter(fuse)
    model.train()
    model(input_ids=IDS).logits.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion_parameters("ab"))


def test_generate_with_a_kv_cache_intervenes_on_the_prompt_only() -> None:
    prefix_only = adapted("llama", "loreft[prefix_positions=2,r=2]")
    kwargs = dict(input_ids=IDS, attention_mask=LEFT_PADDED, max_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = prefix_only.generate(**kwargs)
    assert torch.equal(cached, prefix_only.generate(**kwargs, use_cache=False))
    with prefix_only.disable_adapters():
        assert not torch.equal(cached, prefix_only.generate(**kwargs))

    model = adapted("llama", "loreft[prefix_positions=1,suffix_positions=2,r=2]")
    step = dict(input_ids=torch.tensor([[17], [23]]),
                attention_mask=torch.cat([LEFT_PADDED, torch.ones(2, 1, dtype=torch.long)], dim=1))
    with torch.no_grad():
        cache = model(input_ids=IDS, attention_mask=LEFT_PADDED, use_cache=True).cache  # transformers 5
        same_cache = copy.deepcopy(cache)
        adapted_step = model(**step, cache=cache).logits
        with model.disable_adapters():  # the next token sees the intervened prompt but is not intervened
            plain_step = model(**step, cache=same_cache).logits
    torch.testing.assert_close(adapted_step, plain_step, atol=0, rtol=0)


def test_dropout_acts_in_training_on_intervened_positions_only() -> None:
    model = adapted("bert", "reft[prefix_positions=2,dropout=0.5]")
    model.train()
    seen = run(model, RIGHT_PADDED)
    for site in seen.base:
        assert torch.equal(seen.out[site][:, 2:], seen.base[site][:, 2:])
    model.eval()
    torch.manual_seed(0)
    first = model(input_ids=IDS).logits
    torch.manual_seed(1)
    assert torch.equal(first, model(input_ids=IDS).logits)


def test_delete_adapter_removes_the_mask_reader() -> None:
    base = build_tiny("llama")
    hooks = dict(base._forward_pre_hooks)
    model = peftkit.AdaptedModel(base)
    model.add_adapter("a", "reft")
    model.add_adapter("b", "noreft[suffix_positions=2]")
    assert BATCH_KEY in base.__dict__ and len(base._forward_pre_hooks) == len(hooks) + 1
    model.delete_adapter("a")
    assert BATCH_KEY in base.__dict__
    model.delete_adapter("b")
    assert BATCH_KEY not in base.__dict__ and dict(base._forward_pre_hooks) == hooks


@pytest.mark.parametrize("spec,message", [
    ("reft[prefix_positions=0]", "both 0"),
    ("reft[target_modules=[q_proj]]", "choose them with layers"),
    ("reft[layers=[0,5]]", r"names \[5\], but the model has 2 layers"),
    ("loreft[r=32]", "below the hidden size 32"),
    ("reft[non_linearity=softplus]", "not one of"),
    ("reft[dropout=1.0]", r"must be in \[0, 1\)"),
])
def test_bad_options_are_refused_with_the_fix(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        peftkit.adapt(build_tiny("llama"), spec)


def test_models_without_one_list_of_layers_and_bad_masks_are_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one list.*encoder.block, decoder.block"):
        peftkit.adapt(build_tiny("t5"), "reft")
    model = adapted("bert", "reft")
    with pytest.raises(PeftkitError, match="2-D"):
        model(input_ids=IDS, attention_mask=RIGHT_PADDED[:, None, None, :].float())
    with model.disable_adapters():  # the mask is read whatever is active, but refused only when ReFT runs
        model(input_ids=IDS, attention_mask=RIGHT_PADDED[:, None, None, :].float())
    model(input_ids=IDS)
    module = next(iter(adapter_modules(model).values()))
    with pytest.raises(PeftkitError, match="cannot run inside a row split|outside the model's forward"):
        module(torch.zeros(1, 3, 32), torch.zeros(1, 3, 32), None)


def test_presets_are_reft_with_adapters_defaults() -> None:
    for name, orthogonality, subtract in (("loreft", True, True), ("noreft", False, True),
                                          ("direft", False, False)):
        config = peftkit.adapt(build_tiny("gpt2"), name).adapter_record("default").config
        assert (config.orthogonality, config.subtract_projection) == (orthogonality, subtract)
        assert (config.layers, config.prefix_positions, config.suffix_positions, config.r, config.dropout) == (
            "all", 3, 0, 1, 0.05)


@pytest.mark.slow
def test_loreft_learns_the_minilm_sentiment_task() -> None:
    """docs/methods/reft.md's figure: LoReFT's defaults (r=1 at the first 3 tokens of every layer, 4,614
    parameters) under a frozen random head, as tests/test_learning.py runs the other methods."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit.testing import sentiment_task, train_classifier
    from tests.tiny_models import minilm_path

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    torch.manual_seed(0)
    model = peftkit.AdaptedModel(base)
    model.add_adapter("default", "loreft", default_head=False)
    model.train_adapter("default")
    assert model.trainable_parameters()[0] == 4614
    result = train_classifier(model, sentiment_task(), AutoTokenizer.from_pretrained(minilm_path()), lr=3e-2,
                              epochs=3, seed=0)
    assert result.accuracy >= 0.9, f"held-out accuracy {result.accuracy:.3f} (chance 0.5)"


def test_activation_checkpointing_and_deepcopy_keep_the_positions() -> None:
    """Recomputed layers (activation checkpointing, in backward) use the forward's positions; a deep copy
    of the model reads its own mask (its copy of the mask reader goes with it)."""
    model = peftkit.adapt(build_tiny("llama"), "loreft[prefix_positions=2,suffix_positions=2,r=2,dropout=0.0]")

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        copied = copy.deepcopy(model)
        if checkpointing:
            copied.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        copied.train_adapter("default")
        copied.train()
        copied(input_ids=IDS, attention_mask=LEFT_PADDED, use_cache=False).logits.pow(2).mean().backward()
        return {n: p.grad for n, p in copied.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 12
    for name, grad in plain.items():
        assert torch.equal(grad, checkpointed[name]), name
    assert model.base_model.__dict__[BATCH_KEY].shape is None  # the original never ran: the copies read their own


def test_a_soft_prompt_added_first_counts_as_tokens_added_later_is_refused() -> None:
    prompt_first = peftkit.AdaptedModel(build_tiny("llama"))
    prompt_first.add_adapter("p", "prompt_tuning[num_virtual_tokens=3]")
    prompt_first.add_adapter("r", "loreft[suffix_positions=1]")
    prompt_first.set_active(Stack("p", "r"))
    with torch.no_grad():
        assert prompt_first(input_ids=IDS, attention_mask=LEFT_PADDED).logits.shape == (2, 10, 128)
    batch = prompt_first.base_model.__dict__[BATCH_KEY]
    assert batch.shape == (2, 10) and batch.real.sum(dim=1).tolist() == [10, 7]  # the 3 virtual tokens count
    first, last = batch.positions(torch.zeros(2, 10, 32), 4, 1)  # the mask has a gap in the second row
    assert first.tolist() == [[0, 1, 2, 3], [0, 1, 2, 6]] and last.tolist() == [[9], [9]]
    reft_first = peftkit.AdaptedModel(build_tiny("llama"))
    reft_first.add_adapter("r", "loreft[suffix_positions=1]")
    reft_first.add_adapter("p", "prompt_tuning[num_virtual_tokens=3]")
    reft_first.set_active(Stack("p", "r"))
    with pytest.raises(PeftkitError, match="added to the model before the first ReFT adapter"):
        reft_first(input_ids=IDS, attention_mask=LEFT_PADDED)


def old_layout_file(model: peftkit.AdaptedModel, folder: Any) -> None:
    """Rewrite a saved folder's weights as peftkit wrote them before R was saved compactly: the frame
    ``adapters`` keeps (``...original`` and the hidden x hidden ``...0.base``) in place of R."""
    from safetensors.torch import save_file

    from peftkit.core.serialization import adapter_tensors

    live = adapter_tensors(model, "default", live=True)
    save_file({k: v.detach().contiguous() for k, v in live.items()}, str(folder / "adapter_model.safetensors"))


def test_own_format_saves_r_itself_and_loads_it_to_the_same_outputs_and_training(tmp_path: Any) -> None:
    """peftkit's format saves R (r x hidden), not the hidden x hidden frame: a file of the trained numbers
    only; loading rebuilds a frame giving R bit for bit, from which training moves R, orthonormal."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()
    model = peftkit.AdaptedModel(copy.deepcopy(base))
    model.add_adapter("default", "loreft[r=2,suffix_positions=1]")
    randomize(model, "default", std=0.3, seed=3)
    model.set_active("default")
    model.eval()
    model.save_adapter(str(tmp_path / "new"), "default")
    model.save_adapter(str(tmp_path / "old"), "default")
    old_layout_file(model, tmp_path / "old")
    saved = load_file(str(tmp_path / "new" / "adapter_model.safetensors"))
    assert not [k for k in saved if "parametrizations" in k]
    trained = sum(p.numel() for p in model.adapter_parameters("default"))
    assert sum(t.numel() for t in saved.values()) == trained == 2 * 2 * (2 * 2 * 128 + 2)
    new_size = (tmp_path / "new" / "adapter_model.safetensors").stat().st_size
    old_size = (tmp_path / "old" / "adapter_model.safetensors").stat().st_size
    assert new_size < 0.05 * old_size, (new_size, old_size)

    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=LEFT_PADDED).logits
    for kind in ("new", "old"):  # files with the frame (peftkit's before R was saved alone) still load
        loaded = peftkit.AdaptedModel(copy.deepcopy(base))
        loaded.load_adapter(str(tmp_path / kind), "default")
        loaded.eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=IDS, attention_mask=LEFT_PADDED).logits, expected), kind
    new_loaded = peftkit.AdaptedModel(copy.deepcopy(base))
    new_loaded.load_adapter(str(tmp_path / "new"), "default")
    modules = adapter_modules(new_loaded)
    before = {site: m.units["1"].projection.weight.detach().clone() for site, m in modules.items()}
    new_loaded.train_adapter("default")
    new_loaded.train()
    optimizer = torch.optim.AdamW([p for p in new_loaded.parameters() if p.requires_grad], lr=0.05)
    new_loaded(input_ids=IDS, attention_mask=LEFT_PADDED).logits.pow(2).mean().backward()
    original = modules["model.layers.0"].units["1"].projection.parametrizations.weight.original
    assert original.grad is not None and bool(original.grad.abs().sum() > 0)
    optimizer.step()
    for site, module in modules.items():
        rows = module.units["1"].projection.weight.detach()
        assert not torch.allclose(rows, before[site], atol=1e-4), site
        torch.testing.assert_close(rows @ rows.T, torch.eye(2), atol=1e-5, rtol=0)


def test_a_saved_r_that_is_not_orthonormal_or_of_another_shape_is_refused(tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    model = adapted("bert", "loreft[r=2]")
    model.save_adapter(str(tmp_path), "default")
    weights = tmp_path / "adapter_model.safetensors"
    saved = load_file(str(weights))
    key = "base_model.model.bert.encoder.layer.1.units.0.projection.weight"
    for value, message in ((saved[key] * 1.1, "R's rows are not orthonormal"),
                           (saved[key][:1], r"is \(1, 32\) in the file and \(2, 32\)")):
        save_file({**saved, key: value.contiguous()}, str(weights))
        fresh = peftkit.AdaptedModel(build_tiny("bert"))
        with pytest.raises(peftkit.AdapterLoadError, match=f"bert.encoder.layer.1.*{message}"):
            fresh.load_adapter(str(tmp_path), "default")
        assert not fresh.adapters and not adapter_modules(fresh)  # nothing half-loaded


def test_orthonormal_projection_gradient_has_the_parameters_strides():
    """At r = 1 the frame's transposed gradient ((1, n) with strides (1, 1)) counts as contiguous and was kept as
    it came; DDP's bucket copy compares strides exactly and warned each step (tests/test_train_distributed.py). Also on a
    deep copy (the fix is in the forward, not a hook on the tensor)."""
    from peftkit.plugins.reft.units import orthonormal_projection

    for r in (1, 3):
        projection = copy.deepcopy(orthonormal_projection(8, r, torch.float32, frame_seed=0))
        projection(torch.randn(2, 8)).sum().backward()
        original = projection.parametrizations.weight.original
        assert original.grad.stride() == (8, 1) and original.grad.abs().sum() > 0
