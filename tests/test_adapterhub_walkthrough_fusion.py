"""An ``adapters`` user's folders in peftkit, as docs/migrating.md moves them: AdapterFusion folders
(``save_adapter_fusion``) load with ``model.load_fusion``, a head saved beside another head whose name begins
alike loads as its own, and ``Average`` of LoRAs has the translation the page gives; checked against the real
``adapters`` 1.3.0 (tests/adapterhub/make_walkthrough_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import peftkit
from peftkit import Average, Fuse
from peftkit.core.errors import AdapterLoadError
from tests.adapterhub_venv import cached_fixtures

pytestmark = pytest.mark.slow
FAMILIES = {"bert": "Bert", "roberta": "Roberta"}


@pytest.fixture(scope="module")
def fixtures() -> Path:
    return cached_fixtures("walkthrough-", "make_walkthrough_fixtures.py", "make_fixtures.py")


def _case(folder: Path, task: str = "Model", **extra: object) -> tuple[peftkit.AdaptedModel, dict, dict]:
    spec = json.loads((folder / "model.json").read_text())
    family = FAMILIES[spec["model_type"]]
    config = getattr(transformers, f"{family}Config")(**spec["config"], **extra)
    base = getattr(transformers, f"{family}{task}")(config)
    prefix = "" if task == "Model" else f"{base.base_model_prefix}."
    weights = {prefix + k: v for k, v in load_file(str(folder / "base.safetensors")).items()}
    result = base.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys
    setup = json.loads((folder / "setup.json").read_text())
    return peftkit.AdaptedModel(base.eval()), setup, load_file(str(folder / "expected.safetensors"))


def _hidden(model: peftkit.AdaptedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


@pytest.mark.parametrize("case", ["fusion_seq_bn", "fusion_double_seq_bn_roberta", "fusion_static",
                                  "fusion_residual_before", "fusion_pfeiffer", "fusion_pfeiffer_query_before_ln"])
def test_an_adapterhub_fusion_folder_loads_with_load_fusion_and_gives_adapters_outputs(fixtures: Path,
                                                                                        case: str) -> None:
    model, setup, expected = _case(fixtures / case)
    for name in setup["adapters"]:
        model.load_adapter(str(fixtures / case / name), name, activate=False)
    record = model.load_fusion(str(fixtures / case / "fusion"), activate=True)
    assert record.name == "_".join(setup["adapters"])  # as peftkit names Fuse(a, b)
    assert model.active_composition == Fuse(*setup["adapters"])
    got = _hidden(model, expected["input_ids"])
    torch.testing.assert_close(got, expected["output"], atol=1e-5, rtol=0)
    model.set_active(Average(*setup["adapters"]))  # the fusion's weights matter: not a plain average
    assert (_hidden(model, expected["input_ids"]) - expected["output"]).abs().max() > 1e-3


def test_a_fusion_over_adapterhubs_default_seq_bn_queries_what_its_members_read(fixtures: Path,
                                                                                tmp_path: Path) -> None:
    """AdapterHub's default SeqBnConfig reads LN(h + r): its fusion's query does too (query_from=
    "adapter_input"), kept when peftkit saves and loads the fusion again; a query on h differs."""
    model, setup, expected = _case(fixtures / "fusion_pfeiffer")
    for name in setup["adapters"]:
        model.load_adapter(str(fixtures / "fusion_pfeiffer" / name), name, activate=False)
    record = model.load_fusion(str(fixtures / "fusion_pfeiffer" / "fusion"), activate=True)
    assert record.config.query_from == "adapter_input"
    model.save_fusion(str(tmp_path / "ours"), record.name)
    model.delete_fusion(record.name)
    again = model.load_fusion(str(tmp_path / "ours"), activate=True)
    torch.testing.assert_close(_hidden(model, expected["input_ids"]), expected["output"], atol=1e-5, rtol=0)
    again.config.query_from = "output"  # the config the fusion layers share
    assert (_hidden(model, expected["input_ids"]) - expected["output"]).abs().max() > 1e-3


def test_a_fusion_over_members_that_differ_in_original_ln_before_is_refused(fixtures: Path) -> None:
    model, setup, _ = _case(fixtures / "fusion_mixed_ln_before")
    for name in setup["adapters"]:
        model.load_adapter(str(fixtures / "fusion_mixed_ln_before" / name), name, activate=False)
    with pytest.raises(AdapterLoadError, match=r"differ in original_ln_before \(a: False, b: True\).*train_fusion"):
        model.load_fusion(str(fixtures / "fusion_mixed_ln_before" / "fusion"))
    assert model.fusions == {}  # nothing left behind


def test_an_adapterhub_fusion_needs_its_members_first_and_says_how(fixtures: Path) -> None:
    model, _, _ = _case(fixtures / "fusion_seq_bn")
    with pytest.raises(AdapterLoadError, match=r"fuses adapters 'a', 'b'.*load_adapter\(folder, name"):
        model.load_fusion(str(fixtures / "fusion_seq_bn" / "fusion"))


@pytest.mark.parametrize("spec", ["par_bn", "lora", "seq_bn_inv"])
def test_an_adapterhub_fusion_over_members_of_another_method_is_refused(fixtures: Path, spec: str) -> None:
    """Only methods whose AdapterHub format says fusion_member (the plain sequential bottleneck adapters) are what
    adapters' fusion attends over as peftkit computes it."""
    model, setup, _ = _case(fixtures / "fusion_seq_bn")
    for name in setup["adapters"]:
        model.add_adapter(name, spec)
    with pytest.raises(AdapterLoadError, match=rf"adapter 'a' is '{spec}', which is no member peftkit reads an "
                                               rf"AdapterHub fusion over"):
        model.load_fusion(str(fixtures / "fusion_seq_bn" / "fusion"))
    assert model.fusions == {}


def test_a_head_saved_beside_a_head_whose_name_begins_alike_loads_as_its_own(fixtures: Path) -> None:
    """adapters' save_adapter(path, "t") also writes heads.t2.* (it picks heads by "heads.t" in the key)."""
    folder = fixtures / "heads_prefix"
    assert any(k.startswith("heads.t2.") for k in torch.load(folder / "t" / "pytorch_model_head.bin",
                                                             weights_only=True))
    for name, labels in (("t", 3), ("t2", 4)):
        model, _, expected = _case(folder, "ForSequenceClassification", num_labels=2)
        model.load_adapter(str(folder / name), name)
        assert model.adapter_labels(name) == [f"{name}_{i}" for i in range(labels)]
        with torch.no_grad():
            ids = expected["input_ids"]
            got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(got, expected[name], atol=1e-5, rtol=0)


def test_adapterhubs_average_of_loras_is_peftkits_average_with_the_base_as_the_page_says(fixtures: Path) -> None:
    """adapters' Average(a, b, weights=[w_a, w_b]) divides the normalized weights by N again: for LoRA it is
    average(a, b, __base__, weights=[w_a/N, w_b/N, 1 - 1/N]) (docs/migrating.md)."""
    model, setup, expected = _case(fixtures / "average_lora")
    for name in setup["adapters"]:
        model.load_adapter(str(fixtures / "average_lora" / name), name, activate=False)
    weights = [w / sum(setup["weights"]) for w in setup["weights"]]
    count = len(weights)
    model.set_active(Average(*setup["adapters"], "__base__", weights=[w / count for w in weights] + [1 - 1 / count]))
    torch.testing.assert_close(_hidden(model, expected["input_ids"]), expected["output"], atol=1e-5, rtol=0)
    model.set_active(Average(*setup["adapters"], weights=setup["weights"]))  # the plain one differs
    assert (_hidden(model, expected["input_ids"]) - expected["output"]).abs().max() > 1e-3
