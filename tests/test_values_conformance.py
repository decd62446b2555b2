"""The conformance suite's value checks fail a third-party method with the bug each one targets.

Each broken method below is LoRA with one defect, registered for the test with
``peftkit.use_plugin`` exactly as a plugin would be; the suite must fail it in
the right check, with a message naming what differs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.plugins.lora.config import LoraConfig
from peftkit.plugins.lora.layer import LoraLinear
from peftkit.plugins.lora.method import LoraMethod
from peftkit.testing import check_method

from .method_helpers import method_plugin


class _DefectiveLinear(LoraLinear):
    defect = ""

    def delta(self, x: torch.Tensor, h: torch.Tensor, base: Any) -> torch.Tensor:
        if self.defect == "random_in_eval":  # a dropout that ignores eval mode
            x = F.dropout(x, 0.5, training=True)
        elif self.defect == "dropout_option_in_eval" and self.dropout is not None:
            x = F.dropout(x, self.dropout.p, training=True)  # the config's dropout, even in eval
        return super().delta(x, h, base)

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: Any) -> torch.Tensor:
        return h + self.delta(x, h, base)

    def low_rank(self, forward: bool = False) -> Any:
        if self.defect == "stack_fast_path" and forward:  # the factors composition batches are not delta()'s
            a, b, scale = super().low_rank(forward)
            return a, b, 2 * scale
        return None if forward else super().low_rank(forward)


class _DefectiveLora(LoraMethod):
    defect = ""
    peft_type = None

    def create_layer_adapter(self, site: Any, base_layer: Any, config: Any, model: Any) -> Any:
        adapter = _DefectiveLinear(base_layer, config.r, config.alpha / config.r, config.dropout, config.init_weights,
                                   config.use_dora)
        adapter.defect = self.defect
        return adapter

    def config_to_file(self, config: Any) -> dict[str, Any]:
        return {"peft_type": self.name.upper(), **config.to_dict()}

    def config_from_file(self, data: dict[str, Any]) -> Any:
        return self.config_class.from_dict({k: v for k, v in data.items() if k != "peft_type"})


def _plugin(defect: str) -> tuple[Any, str]:
    name = f"defective_{defect}"
    config_class = type(f"Defective{defect.title()}Config", (LoraConfig,), {"method": name, "__module__": __name__})
    method_class = type(f"Defective{defect.title()}", (_DefectiveLora,),
                        {"name": name, "config_class": config_class, "defect": defect})
    return method_plugin(method_class()), f'{name}[r=2,target_modules=["q_proj","v_proj"]]'


# identity_at_init=False for the stack: without an identity-at-init adapter c to stack with, the
# hand sum of stack(a, b) is the only check that sees the fast path disagree with delta().
@pytest.mark.parametrize("defect, check, identity, message", [
    ("random_in_eval", "deterministic", None, r"two eval-mode forwards differ \(max diff"),
    ("dropout_option_in_eval", "deterministic", None,
     r"eval-mode output with dropout=0\.5 vs without \(same weights\): dropout must act in training only"),
    ("stack_fast_path", "block_stack", False,
     r"stack\(a, b\) at site model\.layers\.0\.self_attn\.q_proj vs the hand sum h \+ delta_a \+ delta_b"),
])
def test_the_value_checks_fail_a_method_with_their_bug(defect, check, identity, message):
    plugin, spec = _plugin(defect)
    with peftkit.use_plugin(plugin, name=f"defective-{defect}") as record:
        assert not record.errors, record.errors
        with pytest.raises(AssertionError, match=message):
            check_method(spec, architectures=("llama",), checks=[check], identity_at_init=identity)


def test_the_same_method_without_a_defect_passes_the_value_checks():
    plugin, spec = _plugin("none")
    with peftkit.use_plugin(plugin, name="defective-none"):
        report = check_method(spec, architectures=("llama",), checks=["deterministic", "merge", "block_stack"])
    assert [r.status for r in report.results] == ["passed"] * 3
