"""The ``adapter_names`` of merge_adapter, merge_and_unload, save_pretrained and prepare_for_hotswap: a list of
names (PEFT), or one name as a plain string (AdapterHub's ``merge_adapter(name)``), never read letter by letter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftkit.core.errors import AdapterError
import peftkit
from tests.method_helpers import output_of, randomize
from tests.tiny_models import build_tiny


def _two() -> peftkit.AdaptedModel:
    """Adapters "default" and "second" (a name longer than one letter, so reading it letter by letter fails)."""
    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]")
    model.add_adapter("second", "lora[r=4]")
    randomize(model, "default", seed=1)
    randomize(model, "second", seed=2)
    return model.eval()


@pytest.mark.parametrize("names", ["second", ["second"], ("second",)])
def test_merge_adapter_takes_one_name_or_a_list(names) -> None:
    model = _two()
    model.set_active("second")
    expected = output_of(model, "llama")
    model.merge_adapter(names)
    assert model.merged_adapters == ["second"]
    model.set_active(None)  # merged into the weights, so the bare model now computes it
    assert torch.allclose(output_of(model, "llama"), expected, atol=1e-5)


def test_merge_and_unload_takes_one_name() -> None:
    model = _two()
    model.set_active("second")
    expected = output_of(model, "llama")
    base = model.merge_and_unload("second")
    assert torch.allclose(output_of(base, "llama"), expected, atol=1e-5)


def test_save_pretrained_takes_one_name(tmp_path: Path) -> None:
    model = _two()
    model.save_pretrained(str(tmp_path / "one"), "second")
    assert (tmp_path / "one" / "adapter_config.json").is_file()
    assert not [p for p in (tmp_path / "one").iterdir() if p.is_dir()]  # no folder per other adapter


def test_save_pretrained_without_default_puts_the_first_at_the_root_where_peft_loads_it(tmp_path: Path) -> None:
    """docs/format.md: PEFT would write every non-default adapter to a sub-folder; peftkit the first at the root."""
    from peft import PeftModel

    model = peftkit.adapt(build_tiny("llama"), "lora[r=4]", "first")
    model.add_adapter("second", "lora[r=4]")
    randomize(model, "first", seed=1)
    model.eval()
    expected = output_of(model, "llama")
    model.save_pretrained(str(tmp_path / "all"))
    assert sorted(p.name for p in (tmp_path / "all").iterdir() if p.is_dir()) == ["second"]
    theirs = PeftModel.from_pretrained(build_tiny("llama"), str(tmp_path / "all")).eval()
    torch.testing.assert_close(output_of(theirs, "llama"), expected, atol=1e-6, rtol=1e-5)


def test_prepare_for_hotswap_takes_one_name() -> None:
    model = _two()
    model.prepare_for_hotswap(8, "second")
    assert model.adapters["second"].r == 8 and model.adapters["default"].r == 4


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload", "save_pretrained", "prepare_for_hotswap"])
def test_names_that_are_not_strings_are_refused_with_the_fix(call: str, tmp_path: Path) -> None:
    model = _two()
    args = {"merge_adapter": (), "merge_and_unload": (), "save_pretrained": (str(tmp_path / "x"),),
            "prepare_for_hotswap": (8,)}[call]
    with pytest.raises(AdapterError, match=r"takes adapter names \(strings\), not 2; pass a name or a list"):
        getattr(model, call)(*args, ["second", 2])
    assert model.merged_adapters == [] and not (tmp_path / "x").exists()
