"""`peftkit train --quantize` for classifiers: the new task head loads in float (not quantized with the
base), trains with the adapter, and the saved adapter predicts on a float base and on a quantized one.

The tiny BERT has hidden size 64: bitsandbytes' packed CPU kernel (eval mode, on CPUs with AVX512-BF16)
needs an input width of at least its block size, 64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core.base_layers import quantization_of
from tests.train_helpers import rows_for, torch_threads, word_tokenizer, write_jsonl
from tests.tiny_models import VOCAB

pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the test extra: pip install -e .[test]")

_AUTO = {"seq-cls": "AutoModelForSequenceClassification", "token-cls": "AutoModelForTokenClassification"}
_KIND = {"4bit": "4-bit (bitsandbytes)", "8bit": "8-bit (bitsandbytes)"}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base BERT checkpoint (no task head: training adds a new one, as for MiniLM) and its tokenizer."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("quantized-head") / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                         vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    word_tokenizer("bert").save_pretrained(folder)
    return folder


def _load(folder: Path, task: str, quantize: str | None = None, **kwargs: object) -> torch.nn.Module:
    import transformers
    from transformers import BitsAndBytesConfig

    if quantize is not None:
        bnb = {"load_in_4bit": True} if quantize == "4bit" else {"load_in_8bit": True}
        kwargs.update(quantization_config=BitsAndBytesConfig(**bnb, **kwargs.pop("bnb", {})), device_map={"": "cpu"})
    return getattr(transformers, _AUTO[task]).from_pretrained(folder, **kwargs)


def _dequantized_twin(quantized: torch.nn.Module, twin: torch.nn.Module) -> torch.nn.Module:
    """``twin`` (the same model in float) with the quantized layers' dequantized weights."""
    import bitsandbytes.functional as BF

    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if quantization_of(module) is None:
            continue
        if hasattr(weight, "quant_state"):
            values = BF.dequantize_4bit(weight.data, weight.quant_state)
        else:
            values = weight.data.float() * weight.SCB.unsqueeze(1) / 127
        twin.get_submodule(name).weight.data.copy_(values)
    return twin


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tok = word_tokenizer("bert")
    inputs = tok(["a good movie", "the plot was awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("task", ["seq-cls", "token-cls"])
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_the_task_head_stays_in_float_trains_and_the_adapter_loads(tmp_path: Path, bert: Path, quantize: str,
                                                                   task: str) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", rows_for(task, 8))
    dev = write_jsonl(tmp_path / "dev.jsonl", rows_for(task, 4, seed=3))
    out = tmp_path / "out"
    with torch_threads(1):
        result = peftkit.train(str(bert), "lora[r=4]", data, task=task, out=out, eval_data=dev, quantize=quantize,
                               max_steps=2, batch_size=4, lr=1e-2, save_steps=0, quiet=True,
                               base_model="test/tiny-bert")
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.eval_metrics["eval_loss"]))

    # the base QLoRA loads: its layers quantized, the new head in float, trained and saved with the adapter
    base = _load(bert, task, quantize, bnb={"llm_int8_skip_modules": ["classifier"]}, num_labels=len(result.labels))
    assert quantization_of(base.bert.encoder.layer[0].attention.self.query) == _KIND[quantize]
    assert type(base.classifier) is torch.nn.Linear
    twin = peftkit.AdaptedModel.from_pretrained(_dequantized_twin(base, _load(bert, task)), str(out)).train()
    on_quantized = peftkit.AdaptedModel.from_pretrained(base, str(out)).train()  # bitsandbytes' exact CPU product
    on_float = peftkit.AdaptedModel.from_pretrained(_load(bert, task), str(out))
    assert on_float.adapter_labels("default") == result.labels == on_quantized.adapter_labels("default")
    assert _logits(on_float).shape[-1] == len(result.labels)
    torch.testing.assert_close(_logits(on_quantized), _logits(twin), rtol=1e-4, atol=1e-4)


def test_a_quantized_classifier_object_with_a_quantized_head_is_refused(tmp_path: Path, bert: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", rows_for("seq-cls", 8))
    model = _load(bert, "seq-cls", "4bit", num_labels=2)  # transformers makes a new head a bitsandbytes layer too
    assert type(model.classifier).__name__ == "Linear4bit"
    with pytest.raises(peftkit.PeftkitError, match=r"task head is quantized \(classifier: bitsandbytes Linear4bit\).*"
                                                   r"llm_int8_skip_modules=\['classifier'\]"):
        peftkit.train(model, "lora[r=4]", data, task="seq-cls", out=tmp_path / "out", tokenizer=word_tokenizer(),
                      max_steps=1, quiet=True, base_model="test/tiny-bert")


def test_an_adapter_whose_head_would_copy_a_quantized_layer_is_refused_by_name(bert: Path) -> None:
    """Adapting (or loading a classifier's adapter onto) a base whose task head was quantized with it: the head's
    trainable copy cannot be made, and the refusal names the module and the skip list that keeps it in float;
    the model is left as it was."""
    model = _load(bert, "seq-cls", "4bit", num_labels=2)
    refusal = (r"modules_to_save names 'classifier', and classifier is quantized \(bitsandbytes Linear4bit\).*"
               r"llm_int8_skip_modules=\['classifier'\]")
    with pytest.raises(peftkit.ConfigError, match=refusal):
        peftkit.adapt(model, "lora[r=4,modules_to_save=[classifier]]")
    assert type(model.classifier).__name__ == "Linear4bit" and not hasattr(model, "adapters")
    assert not any("lora" in name for name, _ in model.named_parameters())
