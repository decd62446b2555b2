"""AdaLoRA: PEFT's file format both ways (with a rank_pattern after budget allocation), the rank
allocation and the orthogonality regularizer against the real `peft`, and `peftkit train` shrinking
the ranks to the target."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError, ConfigError
from peftkit.plugins.adalora.callback import AdaloraCallback
from peftkit.plugins.adalora.config import AdaloraConfig
from tests.method_helpers import adapter_modules, output_of, randomize
from tests.tiny_models import build_tiny, output_tensor, sample_inputs

# The conformance suite runs adalora on llama, gpt2, bert and t5: tests/test_conformance.py (BUILTIN_SPECS).

FACTORS = ("lora_A", "lora_E", "lora_B")


def _peft_model(arch: str, **options):
    from peft import AdaLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(build_tiny(arch), AdaLoraConfig(**options))


def _peft_layers(peft_model) -> dict[str, object]:
    """Site -> PEFT's AdaLoRA module there (sites named as in the base model)."""
    from peft.tuners.adalora import AdaLoraLayer

    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
            if isinstance(module, AdaLoraLayer)}


def _backward(model, arch: str, seed: int) -> None:
    """Gradients of a seeded random projection of the logits (same for both libraries)."""
    model.zero_grad()
    logits = output_tensor(model(**sample_inputs(arch, seed=seed)))
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    (logits * weights).sum().backward()


def _peft_allocation(arch: str, steps: int, **options):
    """A PEFT model of random factors whose rank allocator ran ``steps`` steps (gradients only,
    no optimizer: the factors stay put, PEFT's masking zeroes singular values)."""
    torch.manual_seed(0)
    model = _peft_model(arch, init_lora_weights=False, **options)
    for step in range(steps):
        _backward(model, arch, seed=step)
        model.base_model.update_and_allocate(step)
    model.zero_grad()
    return model.eval()


def _our_allocation(model: peftkit.AdaptedModel, arch: str, steps: int) -> AdaloraCallback:
    callback = AdaloraCallback(model)
    model.train()
    for step in range(steps):
        _backward(model, arch, seed=step)
        callback.allocate(step)
    model.zero_grad()
    return callback


def test_registered_with_peft_type_and_exported():
    method = peftkit.get_method("adalora")
    assert (method.distribution, method.peft_type, method.can_merge) == ("peftkit", "ADALORA", True)
    assert peftkit.AdaloraConfig is AdaloraConfig


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "t5"])
def test_targets_tensor_names_and_shapes_equal_peft(arch):
    peft_model = _peft_model(arch, init_r=3, total_step=10)
    ours = peftkit.adapt(build_tiny(arch), "adalora[init_r=3,total_step=10]")
    theirs = {site: {key: tuple(getattr(m, key)["default"].shape) for key in FACTORS}
              for site, m in _peft_layers(peft_model).items()}
    assert {site: {k: tuple(t.shape) for k, t in m.tensors().items()}
            for site, m in adapter_modules(ours).items()} == theirs


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_saves_after_allocation_and_peftkit_loads_the_same_logits(arch, tmp_path):
    peft_model = _peft_allocation(arch, 4, init_r=4, target_r=2, tinit=0, tfinal=1, total_step=4, lora_alpha=6,
                                  target_modules=["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"])
    pattern = peft_model.peft_config["default"].rank_pattern
    assert pattern and any(not all(flags) for flags in pattern.values())
    with torch.no_grad():
        expected = output_tensor(peft_model(**sample_inputs(arch)))
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["total_step"] == 4

    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path)).eval()
    assert not torch.equal(output_of(ours, arch), output_of(build_tiny(arch), arch))
    torch.testing.assert_close(output_of(ours, arch), expected, atol=1e-5, rtol=0)
    ranks = {site: m.r for site, m in adapter_modules(ours).items()}
    assert ranks == {key.removesuffix(".lora_E"): sum(flags) for key, flags in saved["rank_pattern"].items()}
    assert sum(ranks.values()) == 2 * len(ranks)  # the budget fell to target_r per layer
    ours.merge_adapter()
    torch.testing.assert_close(output_of(ours, arch), expected, atol=1e-5, rtol=0)


def test_peftkit_saves_after_allocation_and_peft_loads_the_same_logits(tmp_path):
    from peft import PeftModel

    arch = "llama"
    ours = peftkit.adapt(build_tiny(arch), "adalora[init_r=4,target_r=2,tfinal=1,total_step=4,init_weights=false,"
                                           "alpha=4,target_modules=['q_proj','v_proj','up_proj']]")
    callback = _our_allocation(ours, arch, 4)
    pattern = callback.finish()
    assert pattern and any(not all(flags) for flags in pattern.values())
    ours.eval()
    expected = output_of(ours, arch)
    ours.save_adapter(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == pattern and saved["peft_type"] == "ADALORA"
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for key, flags in pattern.items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(flags), 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(build_tiny(arch), str(tmp_path)).eval()
    torch.testing.assert_close(output_of(theirs, arch), expected, atol=1e-5, rtol=0)
    merged = theirs.merge_and_unload()
    torch.testing.assert_close(output_of(merged, arch), expected, atol=1e-5, rtol=0)
    # and back: the folder loads in peftkit with the same shapes
    again = peftkit.from_pretrained(build_tiny(arch), str(tmp_path)).eval()
    assert torch.equal(output_of(again, arch), expected)


@pytest.mark.parametrize("options", [dict(tinit=1, tfinal=2, deltaT=2, total_step=9),
                                     dict(tinit=0, tfinal=0, deltaT=1, total_step=6)])
def test_schedule_scores_and_masks_equal_peft_rank_allocator(options, tmp_path):
    """Same weights and gradients in both libraries: the same budgets, scores and masked triplets. In float64:
    peftkit's fused layer sums its products in another order than PEFT, and these random factors (every entry
    drawn from N(0, 1)) amplify float32 rounding to 0.3% of a gradient (both libraries as far from float64)."""
    arch = "gpt2"
    common = dict(init_r=4, target_r=2, beta1=0.8, beta2=0.9, **options)
    torch.manual_seed(0)
    peft_model = _peft_model(arch, init_lora_weights=False, **common)
    peft_model.save_pretrained(tmp_path)
    peft_model.double()
    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path)).double()
    ours.train_adapter("default")
    allocator = AdaloraCallback(ours).start()
    theirs = peft_model.base_model.rankallocator
    for step in range(options["total_step"] + 2):
        assert allocator.budget(step) == theirs.budget_schedule(step), step
    peft_layers, our_layers = _peft_layers(peft_model), adapter_modules(ours)
    for step in range(options["total_step"]):
        _backward(peft_model, arch, seed=step)
        _backward(ours, arch, seed=step)
        peft_model.base_model.update_and_allocate(step)
        allocator.step(step)
        for site, module in our_layers.items():
            theirs_e = peft_layers[site].lora_E["default"].detach()
            torch.testing.assert_close(module.lora_E.detach(), theirs_e, atol=1e-6, rtol=0)
            assert torch.equal(module.lora_E == 0, theirs_e == 0), (step, site)
            if step < options["total_step"] - options["tfinal"] and (site, "lora_A") in allocator.importance:
                name = f"{site}.lora_A.default"  # PEFT names them in the base model
                torch.testing.assert_close(allocator.importance[(site, "lora_A")], theirs.exp_avg_ipt[name],
                                           atol=1e-7, rtol=1e-4)
    kept = {f"{site}.lora_E": flags.tolist() for site, flags in allocator.kept.items()}
    pattern = peft_model.peft_config["default"].rank_pattern
    assert kept == {key.replace(".default", ""): flags for key, flags in pattern.items()}
    assert sum(sum(flags) for flags in kept.values()) <= allocator.budget(options["total_step"])[0] + 1


def test_orthogonality_regularizer_equals_peft_and_joins_the_loss(tmp_path):
    arch = "gpt2"
    torch.manual_seed(0)
    peft_model = _peft_model(arch, init_r=4, init_lora_weights=False, total_step=10, orth_reg_weight=0.3,
                             task_type="CAUSAL_LM").eval()
    peft_model.save_pretrained(tmp_path)
    inputs = {**sample_inputs(arch), "labels": sample_inputs(arch)["input_ids"]}
    with torch.no_grad():  # PEFT adds its regularizer to the loss the transformers model returns
        peft_term = peft_model(**inputs).loss - peft_model.get_base_model()(**inputs).loss

    ours = peftkit.from_pretrained(build_tiny(arch), str(tmp_path))
    ours.train_adapter("default")
    ours.train()
    term = peftkit.get_method("adalora").training_loss(ours, "default")
    torch.testing.assert_close(term, peft_term, atol=1e-5, rtol=1e-5)
    assert term.item() > 0

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout masks each time
        return ours(**inputs).loss

    # through transformers.Trainer's path: the callbacks add it to the loss the model returns
    plain = loss()
    callbacks = peftkit.training_callbacks(ours)
    assert [type(c).__name__ for c in callbacks] == ["AdaloraCallback", "LossTermCallback"]
    callbacks[1].on_train_begin(None, None, None)
    torch.testing.assert_close(loss(), plain + term)
    callbacks[1].on_train_end(None, None, None)
    torch.testing.assert_close(loss(), plain)
    ours.eval()
    assert peftkit.get_method("adalora").training_loss(ours, "default") is not None  # asked directly, it answers


def test_peftkit_train_shrinks_every_layer_to_the_target_budget(tmp_path):
    from peftkit.cli import run
    from tests.train_helpers import model_folder, rows_for, torch_threads, write_jsonl

    folder = model_folder(tmp_path / "bert", "bert", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 16))
    out = tmp_path / "out"
    with torch_threads(1):
        code = run(["train", str(folder), "--method", "adalora[init_r=4,target_r=2,tfinal=2]",
                    "--task", "seq-cls", "--data", str(data), "--out", str(out), "--labels", "pos,neg",
                    "--max-steps", "6", "--batch-size", "4", "--save-steps", "0", "--quiet"])
    assert code == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["total_step"] == 6  # taken from the run's max steps
    pattern = saved["rank_pattern"]
    assert pattern and all(len(flags) == 4 for flags in pattern.values())
    assert sum(sum(flags) for flags in pattern.values()) == 2 * len(pattern)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    for key, flags in pattern.items():
        site = key.removesuffix(".lora_E")
        assert tensors[f"base_model.model.{site}.lora_A"].shape[0] == sum(flags)
    loaded = peftkit.from_pretrained(build_tiny("bert"), str(out))
    assert sorted(m.r for m in adapter_modules(loaded).values()) == sorted(sum(f) for f in pattern.values())


def test_config_checks_name_the_fix():
    with pytest.raises(ConfigError, match="leave no steps"):
        AdaloraConfig(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(ConfigError, match="beta1"):
        AdaloraConfig(beta1=1.0)
    with pytest.raises(ConfigError, match="one flag per initial triplet"):
        AdaloraConfig(init_r=3, rank_pattern={"q_proj.lora_E": [True, False]})
    model = peftkit.adapt(build_tiny("gpt2"), "adalora")
    with pytest.raises(ConfigError, match="set total_step"):
        AdaloraCallback(model).start()


def test_peft_settings_peftkit_lacks_are_refused_by_name(tmp_path):
    method = peftkit.get_method("adalora")
    config = method.config_from_file({"peft_type": "ADALORA", "r": 8, "init_r": 6, "lora_alpha": 16,
                                      "total_step": 5, "use_dora": False})
    assert (config.init_r, config.alpha, config.total_step) == (6, 16, 5)
    with pytest.raises(ConfigError, match="use_rslora"):
        method.config_from_file({"peft_type": "ADALORA", "use_rslora": True})


def test_a_train_step_changes_the_adapter_and_randomized_save_load_is_exact(tmp_path):
    model = peftkit.adapt(build_tiny("bert"), "adalora[init_r=3,dropout=0.1]")
    randomize(model)
    model.eval()
    expected = output_of(model, "bert")
    model.save_adapter(str(tmp_path))
    loaded = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path)).eval()
    assert torch.equal(output_of(loaded, "bert"), expected)
    with pytest.raises(AdapterLoadError):
        peftkit.from_pretrained(build_tiny("gpt2"), str(tmp_path))


def test_peftkit_train_adds_the_regularizer_to_its_loss(tmp_path):
    """One step from the same seed with orth_reg_weight 0 and 2: the logged loss differs by the
    regularizer of the initial factors (near 2 * sqrt(init_r): Q and P start close to zero)."""
    from tests.train_helpers import model_folder, rows_for, torch_threads, write_jsonl

    folder = model_folder(tmp_path / "bert", "bert", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    losses = {}
    for weight in (0.0, 2.0):
        with torch_threads(1):
            result = peftkit.train(str(folder), f"adalora[init_r=4,orth_reg_weight={weight}]", str(data),
                                   task="seq-cls", out=tmp_path / f"out{weight}", labels=["pos", "neg"],
                                   max_steps=1, batch_size=4, save_steps=0, quiet=True, base_model="tiny/bert")
        losses[weight] = result.train_metrics["train_loss"]
    model = peftkit.from_pretrained(build_tiny("bert"), str(tmp_path / "out2.0"))  # after one small step
    model.train_adapter("default")
    model.train()
    term = peftkit.get_method("adalora").training_loss(model, "default").item()
    assert 3.5 < term < 4.0
    assert losses[2.0] - losses[0.0] == pytest.approx(term, abs=0.02)


def test_a_plain_transformers_trainer_allocates_with_training_callbacks(tmp_path):
    """transformers.Trainer with peftkit.training_callbacks(model): the ranks fall to the target and the
    regularizer joins the loss the model returns (two runs from the same seed, with and without it)."""
    from transformers import Trainer, TrainingArguments

    rows = [{**{k: v[0] for k, v in sample_inputs("gpt2", batch=1, seed=i).items()},
             "labels": sample_inputs("gpt2", batch=1, seed=i)["input_ids"][0]} for i in range(8)]
    first_loss, term = {}, None
    for weight in (0.5, 0.0):
        spec = f"adalora[init_r=4,target_r=1,tfinal=1,total_step=4,orth_reg_weight={weight}]"
        model = peftkit.adapt(build_tiny("gpt2"), spec)
        model.train_adapter("default")
        if weight:
            term = peftkit.get_method("adalora").training_loss(model.train(), "default").item()
        args = TrainingArguments(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2,
                                 learning_rate=1e-2, report_to="none", save_strategy="no",
                                 remove_unused_columns=False, use_cpu=True, logging_steps=1, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=peftkit.training_callbacks(model))
        trainer.train()
        first_loss[weight] = trainer.state.log_history[0]["loss"]
        pattern = model.adapter_record("default").config.rank_pattern
        kept = [sum(flags) for flags in pattern.values()]
        assert len(kept) == 2 and sum(kept) == 2  # gpt2: c_attn in 2 layers, target_r=1 each on average
        assert [m.r for m in adapter_modules(model).values()] == kept
    assert 0.9 < term < 1.0  # 0.5 * mean(||Q Q^T - I||, ||P^T P - I||), near 0.5 * sqrt(4) for small factors
    assert first_loss[0.5] - first_loss[0.0] == pytest.approx(term, abs=1e-4)


def test_the_demo_training_loop_drives_the_allocation():
    """peftkit.testing.train_classifier calls a peftkit model's training callbacks as the Trainer does."""
    from peftkit.testing import train_classifier
    from peftkit.testing_task import TextTask
    from tests.train_helpers import rows_for, word_tokenizer

    rows = [(r["text"], int(r["label"] == "pos")) for r in rows_for("seq-cls", 16)]
    task = TextTask("toy", ("neg", "pos"), rows, rows[:4])
    model = peftkit.adapt(build_tiny("bert"), "adalora[init_r=4,target_r=2,tfinal=1]")
    result = train_classifier(model, task, word_tokenizer("bert"), lr=1e-2, epochs=1, batch_size=4)
    config = model.adapter_record("default").config
    assert result.steps == config.total_step == 4
    assert sum(m.r for m in adapter_modules(model).values()) == 2 * len(config.rank_pattern) == 8


def test_conv2d_and_linear_layers_load_from_peft_with_the_same_outputs(tmp_path):
    import torch.nn as nn
    from peft import AdaLoraConfig, get_peft_model

    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    def net() -> ConvNet:
        torch.manual_seed(0)
        return ConvNet().eval()

    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = get_peft_model(net(), AdaLoraConfig(init_r=3, target_modules=["conv", "fc"], total_step=5,
                                                     init_lora_weights=False)).eval()
    with torch.no_grad():
        expected = theirs(x)
    theirs.save_pretrained(tmp_path)
    ours = peftkit.from_pretrained(net(), str(tmp_path)).eval()
    assert adapter_modules(ours)["conv"].lora_A.shape == (3, 3 * 9)
    with torch.no_grad():  # all-random factors give outputs in the hundreds: compare relative to them
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-6)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-6)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="grouped Conv2d"):
        peftkit.adapt(grouped, "adalora[target_modules=['0']]")
