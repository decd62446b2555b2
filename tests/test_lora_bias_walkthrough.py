"""LoRA's ``lora_bias`` (PEFT's: the update is ``scale * (B A x + b)``) walked through as a user would, from
docs/methods/lora.md, docs/train.md and docs/hub.md.

On the real MiniLM, through the CLI (``peftkit.cli.run``) with the embedded hub under a fresh ``$PEFTKIT_HOME``:
``peftkit train`` with ``lora[lora_bias=true]`` trains the biases and saves ``lora_B.bias``, PEFT loads the folder
with peftkit's logits, ``peftkit compose --merge`` writes a model with the unmerged logits, and ``peftkit merge``
refuses such a member by name and writes nothing.

Hot-swapping (lora.md's Hot-swapping section): two lora_bias adapters of different alphas were refused ("its setting
scale is 2.0 in the folder and 1.0 in the loaded adapter") although the docs say another alpha is folded in, and as
PEFT's ``hotswap_adapter`` swaps them; now the new scale is folded into B and its bias. A lora_bias adapter and a
plain one were refused naming only a tensor (``lora_B.bias``); the refusal now names the option.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import peftkit
from peftkit.core.errors import AdapterLoadError
from tests.method_helpers import output_of
from tests.tiny_models import build_tiny, minilm_path

BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
WORDS = {"positive": ["great", "wonderful", "brilliant", "superb"], "negative": ["awful", "dull", "terrible", "poor"]}
THINGS = ["the movie", "the food", "the service", "this book"]
TEXTS = ["the movie was great.", "the food was awful and the service was dull."]


def _cli(*argv: str) -> tuple[int, str]:
    from peftkit.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(argv))
    return code, out.getvalue() + err.getvalue()


def _write_data(path: Path) -> Path:
    rows = [{"text": f"{thing} was {word}.", "label": label}
            for label, words in WORDS.items() for word in words for thing in THINGS]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _ok(step: tuple[int, str]) -> str:
    code, output = step
    assert code == 0, output[-3000:]
    return output


def _classifier():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def _logits(model: nn.Module) -> torch.Tensor:
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(minilm_path())(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``peftkit train`` of a lora_bias LoRA on MiniLM (a few steps), pushed to the embedded hub."""
    root = tmp_path_factory.mktemp("lora-bias")
    data = _write_data(root / "train.jsonl")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PEFTKIT_HOME", str(root / "home"))
        env.delenv("PEFTKIT_HUB", raising=False)
        common = ("train", minilm_path(), "--task", "seq-cls", "--data", str(data), "--max-steps", "3",
                  "--batch-size", "8", "--lr", "3e-3", "--base-model", BASE_ID, "-q")
        _ok(_cli(*common, "--method", "lora[r=4,lora_bias=true]", "--out", str(root / "biased")))
        _ok(_cli(*common, "--method", "lora[r=4]", "--out", str(root / "plain")))
        _ok(_cli("hub", "push", str(root / "biased"), "alice/biased", "-q"))
        yield {"root": root, "biased": root / "biased", "plain": root / "plain"}


@pytest.mark.slow
def test_train_saves_trained_biases_that_peft_loads_with_the_same_logits(trained: dict[str, Any]) -> None:
    from peft import PeftModel

    tensors = load_file(str(trained["biased"] / "adapter_model.safetensors"))
    biases = {key: value for key, value in tensors.items() if key.endswith("lora_B.bias")}
    assert len(biases) == 12  # query and value in 6 layers
    assert all(value.abs().max() > 0 for value in biases.values())  # they start at 0: trained
    config = json.loads((trained["biased"] / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    ours = _logits(peftkit.from_pretrained(_classifier(), str(trained["biased"])))
    theirs = _logits(PeftModel.from_pretrained(_classifier(), str(trained["biased"])))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compose_merge_gives_the_unmerged_logits(trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForSequenceClassification

    monkeypatch.setenv("PEFTKIT_HOME", str(trained["root"] / "home"))
    out = trained["root"] / "merged"
    _ok(_cli("compose", minilm_path(), "alice/biased", "--out", str(out), "--merge", "-q"))
    merged = _logits(AutoModelForSequenceClassification.from_pretrained(str(out)))
    unmerged = _logits(peftkit.from_pretrained(_classifier(), str(trained["biased"])))
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_weight_space_merge_refuses_a_lora_bias_member_and_writes_nothing(trained: dict[str, Any]) -> None:
    out = trained["root"] / "weight-merged"
    code, output = _cli("merge", minilm_path(), str(trained["plain"]), str(trained["biased"]), "-o", str(out),
                        "--strategy", "linear", "-q")
    assert code == 1
    assert f"member '{trained['biased']}' has lora_bias=true" in output  # refused before the base model loads
    assert not out.exists()


# -- hot-swapping ---------------------------------------------------------------------------------------------------


def _saved_lora(path: Path, seed: int, **options: Any) -> Path:
    """A tiny BERT's LoRA on query and value with random factors (and biases), saved to ``path``."""
    torch.manual_seed(seed)
    config = peftkit.LoraConfig(r=4, target_modules=["query", "value"], init_weights=False, **options)
    peftkit.adapt(build_tiny("bert"), config).save_adapter(str(path))
    return path


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def _saved_conv_lora(path: Path, seed: int, alpha: float) -> Path:
    torch.manual_seed(seed)
    config = peftkit.LoraConfig(r=2, alpha=alpha, target_modules=["0", "2"], lora_bias=True, init_weights=False)
    peftkit.adapt(_conv_net(), config).save_adapter(str(path))
    return path


def test_hotswap_between_lora_bias_adapters_of_different_alphas_equals_a_fresh_load(tmp_path: Path) -> None:
    first = _saved_lora(tmp_path / "first", 1, alpha=4, lora_bias=True)
    second = _saved_lora(tmp_path / "second", 2, alpha=16, lora_bias=True)
    model = peftkit.from_pretrained(build_tiny("bert"), str(first))
    bias = next(p for n, p in model.named_parameters() if n.endswith("lora_bias"))
    model.hotswap_adapter(str(second), "default")
    expected = output_of(peftkit.from_pretrained(build_tiny("bert"), str(second)), "bert")
    torch.testing.assert_close(output_of(model, "bert"), expected, atol=1e-5, rtol=0)
    assert next(p for n, p in model.named_parameters() if n.endswith("lora_bias")) is bias  # swapped in place


def test_hotswap_of_conv_lora_bias_adapters_of_different_alphas_equals_a_fresh_load(tmp_path: Path) -> None:
    first, second = _saved_conv_lora(tmp_path / "first", 1, 2), _saved_conv_lora(tmp_path / "second", 2, 8)
    model = peftkit.from_pretrained(_conv_net(), str(first))
    model.hotswap_adapter(str(second), "default")
    x = torch.randn(2, 3, 5, 5)
    expected = peftkit.from_pretrained(_conv_net(), str(second))(x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loaded, swapped", [(True, False), (False, True)])
def test_hotswap_between_lora_bias_and_plain_lora_is_refused_by_the_option(tmp_path: Path, loaded: bool,
                                                                            swapped: bool) -> None:
    first = _saved_lora(tmp_path / "first", 1, lora_bias=loaded)
    second = _saved_lora(tmp_path / "second", 2, lora_bias=swapped)
    model = peftkit.from_pretrained(build_tiny("bert"), str(first))
    before = output_of(model, "bert")
    with pytest.raises(AdapterLoadError, match=f"has lora_bias={str(swapped).lower()} and the loaded adapter "
                                               f"lora_bias={str(loaded).lower()}"):
        model.hotswap_adapter(str(second), "default")
    torch.testing.assert_close(output_of(model, "bert"), before, atol=0, rtol=0)


def test_padding_a_lora_bias_adapter_for_hotswapping_is_refused_naming_lora_bias(tmp_path: Path) -> None:
    from peftkit.core.errors import AdapterError

    model = peftkit.from_pretrained(build_tiny("bert"), str(_saved_lora(tmp_path / "first", 1, lora_bias=True)))
    with pytest.raises(AdapterError, match=r"low_rank\(\) gives None: DoRA, lora_bias, or a convolution"):
        model.prepare_for_hotswap(target_rank=8)
