"""LoRA+: peftkit.lora_plus_optimizer's parameter groups (as peft's create_loraplus_optimizer makes
them), one SGD step checked by hand, and `peftkit train --lora-plus-ratio`."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.cli import run
from peftkit.core.errors import ConfigError
from peftkit.lora_plus import lora_plus_groups
from tests.tiny_models import build_tiny, output_tensor, sample_inputs
from tests.train_helpers import model_folder, rows_for, torch_threads, write_jsonl

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _loss(model) -> torch.Tensor:
    return output_tensor(model(**sample_inputs("llama"))).square().mean()


def test_groups_match_peft_create_loraplus_optimizer():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    theirs = get_peft_model(build_tiny("llama"), LoraConfig(r=4, target_modules=TARGETS))
    peft_groups = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8,
                                            loraplus_weight_decay=0.01).param_groups
    ours = peftkit.adapt(build_tiny("llama"), f"lora[r=4,target_modules={TARGETS}]".replace("'", '"'))
    ours.train_adapter("default")
    groups = lora_plus_groups(ours, lr=1e-3, ratio=8, weight_decay=0.01)
    expected = [(g["lr"], g["weight_decay"], sorted(tuple(p.shape) for p in g["params"]))
                for g in peft_groups if g["params"]]
    assert [(g["lr"], g["weight_decay"], sorted(tuple(p.shape) for p in g["params"])) for g in groups] == expected
    by_lr = {g["lr"]: g["names"] for g in groups}
    assert all("lora_A" in n for n in by_lr[1e-3]) and all("lora_B" in n for n in by_lr[8e-3])
    assert all("lora_embedding" in n for n in by_lr[1e-6])  # PEFT's default lr for LoRA on embeddings


def test_one_sgd_step_moves_b_with_the_ratioed_lr():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4,init_weights=false]")
    model.train_adapter("default")
    optimizer = peftkit.lora_plus_optimizer(model, lr=0.1, ratio=4, optimizer_class=torch.optim.SGD)
    _loss(model).backward()
    params = dict(model.named_parameters())
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in params.items() if p.requires_grad}
    optimizer.step()
    checked = {"A": 0, "B": 0}
    for name, (value, grad) in before.items():
        kind = "B" if "lora_B" in name else "A"
        lr = 0.1 * 4 if kind == "B" else 0.1
        torch.testing.assert_close(params[name].detach(), value - lr * grad)
        checked[kind] += 1 if grad.abs().max() > 0 else 0
    assert checked["A"] > 0 and checked["B"] > 0


def test_refuses_bad_ratio_and_models_without_lora():
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    model.train_adapter("default")
    with pytest.raises(ConfigError, match="ratio"):
        peftkit.lora_plus_optimizer(model, lr=1e-3, ratio=0)
    ia3 = peftkit.adapt(build_tiny("llama"), "ia3")
    ia3.train_adapter("default")
    with pytest.raises(ConfigError, match=r"LoRA\+ \(lora_plus_ratio, --lora-plus-ratio\) trains LoRA's B factors "
                                          r"faster, and the model has no trainable LoRA factors .*leave LoRA\+ out"):
        peftkit.lora_plus_optimizer(ia3, lr=1e-3, ratio=4)  # says so to a Python and a CLI user alike


def test_train_option_gives_the_trainer_the_lora_plus_groups(tmp_path):
    from transformers import TrainerCallback

    seen: list[list[float]] = []

    class Groups(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen.append(sorted({g["lr"] for g in optimizer.param_groups}))

    folder = model_folder(tmp_path / "bert", "bert", "bert")
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    with torch_threads(1):
        result = peftkit.train(str(folder), "lora[r=4]", data, task="seq-cls", out=tmp_path / "o", max_steps=1,
                               lr=1e-3, lr_scheduler="constant", lora_plus_ratio=16, save_steps=0, quiet=True, base_model="org/tiny-bert",
                               callbacks=[Groups()])
    assert result.global_step == 1 and seen == [[1e-3, 1.6e-2]]


def test_cli_refuses_a_non_positive_ratio(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 2))
    code = run(["train", "m", "--task", "seq-cls", "--data", str(data), "--out", str(tmp_path / "o"),
                "--lora-plus-ratio", "0"])
    assert code == 2 and "--lora-plus-ratio" in capsys.readouterr().err
