"""peftkit.testing, the conformance suite: every built-in method passes it, and it catches broken methods.

The built-in methods run through ``make_conformance_class`` exactly as a plugin author's test
module would (one pytest test per check and architecture). The broken methods below are LoRA
with one defect each, registered for a test with ``peftkit.use_plugin``; the suite must fail
each of them in the right check, with a message that says what is wrong.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import peftkit
from peftkit.core.errors import ConfigError, MergeError
from peftkit.core.plugins import parse_spec
from peftkit.plugins.lora.config import LoraConfig
from peftkit.plugins.lora.layer import LoraLinear
from peftkit.plugins.lora.method import LoraMethod
from peftkit.testing import CHECKS, CheckSkipped, check_method, make_conformance_class, run_check
from peftkit.testing_models import build_tiny

#: One spec per built-in method (and variant) the suite runs on.
BUILTIN_SPECS = {
    "lora": "lora",
    "dora": "lora[use_dora=true]",
    "rslora": "lora[use_rslora=true,r=4,alpha=8]",
    "lora_bias": "lora[lora_bias=true]",
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "par_bn_read_residual": "par_bn[read_residual=true]",  # t5: no residual point known, a reasoned skip
    "bitfit": "bitfit",
    "bitfit_add_missing": "bitfit[add_missing=true]",
    "ia3": "ia3",
    "prefix_tuning": "prefix_tuning[num_virtual_tokens=4]",
    "prompt_tuning": "prompt_tuning[num_virtual_tokens=4]",
    "p_tuning": "p_tuning[num_virtual_tokens=4,encoder_hidden_size=8]",
    "p_tuning_lstm": "p_tuning[num_virtual_tokens=4,encoder_reparameterization_type=LSTM,encoder_hidden_size=8]",
    "lokr": "lokr[r=4]",
    "vera": "vera[r=8]",
    "pvera": "pvera[r=8]",  # eval uses the mean; the training step samples
    "oft": "oft[oft_block_size=8]",
    "boft": "boft[boft_block_size=4,boft_n_butterfly_factor=2]",
    "adalora": "adalora[init_r=4]",
    "compacter": "compacter[reduction_factor=4]",
    "compacterpp": "compacterpp[reduction_factor=4]",
    "seq_bn_phm_shared": "seq_bn[phm_layer=true,reduction_factor=4,shared_W_phm=true,factorized_phm_rule=true]",
    "seq_bn_inv": "seq_bn_inv",  # t5: no embedding output point known, a reasoned skip
    "double_seq_bn_inv": "double_seq_bn_inv[reduction_factor=8]",
    "reft": "reft[prefix_positions=2,suffix_positions=2,r=2]",
    "loreft": "loreft",
    "noreft": "noreft[suffix_positions=1,non_linearity=gelu]",
    "direft": "direft[tied_weights=true,suffix_positions=1]",
    "trainable_tokens": "trainable_tokens[token_indices=[16,17,127]]",  # ids in the suite's inputs
    "fourierft": "fourierft[n_frequency=64,scaling=10]",  # the tiny layers have 512 to 2048 entries
    "ln_tuning": "ln_tuning",
    "hra": "hra[r=4]",  # gpt2: Conv1D layers, which PEFT's HRA refuses too, a reasoned skip
    "miss": "miss[r=8]",
    "miss_bat": "miss[r=8,init_weights=bat]",
    "miss_mini": "miss[r=8,init_weights=mini,mini_r=4]",
    "vblora": "vblora[num_vectors=32,vector_length=16,init_vector_bank_bound=0.5]",  # bound 0.02: BERT moves <1e-6
    "randlora": "randlora[r=8,randlora_alpha=16]",  # alpha 640: t5 outputs so large fuse rounds 2e-4 off
    "c3a": "c3a[block_size=16]",  # divides every tiny layer; gpt2: Conv1D layers, which PEFT's C3A refuses too
    "shira": "shira[r=2]",  # r*(in+out) <= in*out on every tiny layer; gpt2: Conv1D, which PEFT's SHiRA refuses
    "glora": "glora[config_D_E=vector]",  # gpt2: Conv1D layers, which PEFT's GLoRA refuses too
    "beft": "beft",  # gpt2: Conv1D layers, which PEFT's BEFT refuses too
    "road": "road[group_size=16]",  # divides every tiny layer; gpt2: Conv1D layers, which PEFT's RoAd refuses too
    "delora": "delora[r=4]",  # gpt2: Conv1D layers, which PEFT's DeLoRA refuses too
    "gralora": "gralora[r=4,hybrid_r=2,alpha=8]",  # k=2 divides every tiny layer; gpt2's Conv1D too, as PEFT
    "hira": "hira[r=4]",
    "adaption_prompt": "adaption_prompt[adapter_len=4]",  # bert, t5: model types PEFT's adaption prompts refuse
}

#: Built-in specs whose PEFT-format folders PEFT does not read back as the same adapter (found by peft_config).
PEFT_FORMAT_DEFECTS: dict[str, str] = {}

for _key, _spec in BUILTIN_SPECS.items():
    globals()[f"TestConformance_{_key}"] = make_conformance_class(_spec)


def _known_peft_format_defect(cls: type, reason: str) -> type:
    """``cls`` with its peft_config test expected to fail (strict: fixing the defect makes it pass, and fail here)."""
    check = pytest.mark.xfail(strict=True, reason=reason)(cls.__dict__["test_peft_config"])
    return type(cls.__name__, (cls,), {"test_peft_config": check})


#: Two trainable_tokens adapters may not train the same token ids in one stack (PEFT's rule), and the suite's stack
#: check stacks two adapters of one spec: their stack, with disjoint ids, is checked in test_method_trainable_tokens.py.
TestConformance_trainable_tokens = make_conformance_class(
    BUILTIN_SPECS["trainable_tokens"], checks=[check for check in CHECKS if check != "block_stack"])
#: LN tuning replaces the layer it adapts, so two in one stack are refused (each would replace the other): its stack
#: with another method, and averages of two, are checked in test_method_ln_tuning.py.
TestConformance_ln_tuning = make_conformance_class(
    BUILTIN_SPECS["ln_tuning"], checks=[check for check in CHECKS if check != "block_stack"])
#: LoRA training token rows too (PEFT's trainable_token_indices); its stack check is left out for the same reason.
TestConformance_lora_token_rows = make_conformance_class(
    "lora[trainable_token_indices=[16,17,127]]", checks=[check for check in CHECKS if check != "block_stack"])

for _key, _reason in PEFT_FORMAT_DEFECTS.items():
    globals()[f"TestConformance_{_key}"] = _known_peft_format_defect(globals()[f"TestConformance_{_key}"], _reason)

#: AdapterHub's Pfeiffer placement reads the model's own LayerNorm after the site: post-LayerNorm models only.
TestConformance_seq_bn_original_ln = make_conformance_class(
    "seq_bn[original_ln_before=true,ln_after=true]", architectures=("bert",))

#: AdapterHub's prompt placement, after the embedding block: encoders only (decoders and T5 are refused by name).
#: PEFT cannot express it (no placement or combine field): saved as PROMPT_TUNING_EMBEDDING_OUTPUT, peft_config skips.
TestConformance_prompt_tuning_embedding_output = make_conformance_class(
    "prompt_tuning[num_virtual_tokens=3,placement=embedding_output,combine=prefix_after_bos]", architectures=("bert",))

#: Unions, with whether the output equals the base right after injection (a prefix part starts random).
UNION_SPECS = {
    "union": ("lora[r=4]|seq_bn[reduction_factor=4]", True),
    "mam": ("mam", False),
    "unipelt": ("unipelt", False),
}
for _key, (_spec, _identity) in UNION_SPECS.items():
    globals()[f"TestConformance_{_key}"] = make_conformance_class(_spec, identity_at_init=_identity)


def test_every_builtin_method_is_in_the_suite_and_has_a_parameter_formula():
    builtin = {name for name, m in peftkit.get_registry().methods.items() if m.distribution == "peftkit"}
    specs = [*BUILTIN_SPECS.values(), *(spec for spec, _ in UNION_SPECS.values())]
    covered = {parse_spec(spec)[0].name for spec in specs}
    assert builtin and builtin <= covered, f"add a spec for {sorted(builtin - covered)} to BUILTIN_SPECS"
    for spec in specs:
        # GPT-2 (its Conv1D layers too) for every method that adapts it; Llama for those that, as in PEFT, adapt
        # torch's Linear layers only (HRA, MiSS, C3A)
        try:
            adapted = peftkit.adapt(build_tiny("gpt2"), spec)
        except ConfigError as exc:
            assert "Conv1D" in str(exc), f"{spec}: {exc}"
            adapted = peftkit.adapt(build_tiny("llama"), spec)
        record = adapted.adapter_record("default")
        count = record.method.expected_parameter_count(adapted.base_model, record.config, record.sites)
        assert isinstance(count, int) and count > 0, f"{spec}: expected_parameter_count() gave {count!r}"


def test_check_method_reports_passes_and_reasoned_skips():
    report = check_method("bitfit", architectures=("llama", "gpt2"), checks=["inject", "merge", "block_fuse"])
    assert [(r.check, r.architecture, r.status) for r in report.passed] == [
        ("inject", "gpt2", "passed"), ("merge", "gpt2", "passed"), ("block_fuse", "gpt2", "passed")]
    skipped = {r.architecture: r.message for r in report.skipped}
    assert set(skipped) == {"llama"} and "add_missing=true" in skipped["llama"]  # the method's own reason
    assert "3 passed, 0 failed, 3 skipped" in str(report)


def test_unclaimed_features_are_skipped_with_the_reason():
    report = check_method("prompt_tuning[num_virtual_tokens=2]", architectures=("gpt2",),
                          checks=["merge", "block_average", "block_stack"])
    messages = {r.check: r.message for r in report.skipped}
    assert "can_merge=False" in messages["merge"]
    assert "does not claim average()" in messages["block_average"]
    assert [r.check for r in report.passed] == ["block_stack"]


def test_a_spec_naming_no_installed_method_fails_at_once():
    with pytest.raises(peftkit.PluginError, match="unknown tuning method 'lorra'"):
        check_method("lorra[r=2]")
    with pytest.raises(peftkit.PluginError, match="unknown tuning method 'lorra'"):
        make_conformance_class("lorra[r=2]")


def test_unknown_check_and_architecture_are_named():
    with pytest.raises(ValueError, match="unknown conformance check 'merging'"):
        run_check("lora", "merging")
    with pytest.raises(ValueError, match="no tiny model for architecture 'gpt3'"):
        check_method("lora", architectures=("gpt3",))


def test_checks_restore_the_thread_setting():
    before = torch.get_num_threads()
    run_check("ia3", "identity", "gpt2")
    assert torch.get_num_threads() == before


def test_conformance_class_has_one_test_per_check():
    cls = make_conformance_class("ia3", checks=["inject", "merge"], architectures=("gpt2",))
    tests = sorted(n for n in vars(cls) if n.startswith("test_"))
    assert tests == ["test_inject", "test_merge", "test_supports_an_architecture"]
    assert all(f"block_{b}" in CHECKS for b in ("stack", "average", "batch_split", "parallel", "fuse"))


# -- broken methods: the suite must catch each defect ---------------------------------------------------------


class _BrokenLinear(LoraLinear):
    defect = ""

    def forward(self, x: torch.Tensor, h: torch.Tensor, base: Any) -> torch.Tensor:
        if self.defect == "ignores_h":  # recomputes the base output: drops what runs before it in a stack
            return base(x) + self.delta(x, h, base)
        if self.defect == "forward_not_delta":  # says additive, but forward is not h + delta
            return h + 2 * self.delta(x, h, base)
        if self.defect == "global_rng":  # adds an unsaved offset drawn from torch's global generator
            return super().forward(x, h, base) + self.offset
        return super().forward(x, h, base)

    def low_rank(self, forward: bool = False) -> None:
        return None  # keep composition on forward()/delta(), where the defects are

    def delta_weight(self, base: Any) -> torch.Tensor:
        delta = super().delta_weight(base)
        return 2 * delta if self.defect == "merge" else delta

    def tensors(self) -> dict[str, torch.Tensor]:
        out = super().tensors()
        if self.defect == "save":
            out.pop("lora_B.weight")
        return out


class _BrokenLora(LoraMethod):
    defect = ""
    peft_type = None

    def sites(self, model: Any, config: Any, arch: Any) -> list:
        if self.defect == "refuse":
            raise ConfigError(f"{self.name}: this method adapts no model at all")
        return super().sites(model, config, arch)

    def create_layer_adapter(self, site: Any, base_layer: Any, config: Any, model: Any) -> Any:
        scale = config.alpha / config.r
        init = False if self.defect == "identity" else config.init_weights
        adapter = _BrokenLinear(base_layer, config.r, scale, config.dropout, init, config.use_dora)
        adapter.defect = self.defect
        if self.defect == "leak":
            adapter.stolen = base_layer.weight  # registers the base weight as the adapter's own parameter
        if self.defect == "tamper":
            base_layer.weight.data.mul_(1.5)
        if self.defect == "global_rng":
            adapter.register_buffer("offset", torch.randn(base_layer.out_features) * 0.1, persistent=False)
        return adapter

    def expected_parameter_count(self, model: Any, config: Any, sites: list) -> int:
        return super().expected_parameter_count(model, config, sites) + (1 if self.defect == "count" else 0)

    def config_to_file(self, config: Any) -> dict[str, Any]:
        return {"peft_type": self.name.upper(), **config.to_dict()}

    def config_from_file(self, data: dict[str, Any]) -> Any:
        return self.config_class.from_dict({k: v for k, v in data.items() if k != "peft_type"})


def _broken(defect: str, **attributes: Any) -> tuple[Any, str]:
    name = f"broken_{defect}"
    config_class = type(f"Broken{defect.title()}Config", (LoraConfig,), {"method": name, "__module__": __name__})
    method_class = type(f"Broken{defect.title()}", (_BrokenLora,),
                        {"name": name, "config_class": config_class, "defect": defect, **attributes})

    class Plugin:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_methods(self, register: Any) -> None:
            register(method_class())

    return Plugin(), f'{name}[r=2,target_modules=["q_proj","v_proj"]]'


@pytest.mark.parametrize("defect, attributes, check, message", [
    ("count", {}, "parameter_count", r"the adapter has 448 parameters, its method's formula says 449 \(4 sites\)"),
    ("identity", {}, "identity", r"declares identity_at_init=True, but right after injection"),
    ("none", {"identity_at_init": False}, "identity", r"declares identity_at_init=False, but the output equals"),
    ("merge", {}, "merge", r"merged vs unmerged output: outputs differ by up to"),
    ("save", {}, "save_load", r"the loaded adapter's output is not bit-identical"),
    ("global_rng", {"identity_at_init": False}, "save_load",
     r"a tensor the forward uses is not saved.*torch's global random"),
    ("leak", {}, "train_step", r"the adapter owns base-model parameters \['model.layers.0.self_attn.q_proj.weight'"),
    ("tamper", {}, "inject", r"adding and deleting the adapter changed base tensors"),
    ("ignores_h", {}, "block_stack", r"stack\(a, c\) with c at its identity init vs a"),
    ("forward_not_delta", {}, "block_average", r"average\(a, a'\) of identical adapters vs a"),
    ("refuse", {}, "inject", r"refused every architecture checked \(llama\)"),
])
def test_the_suite_catches_a_broken_method(defect, attributes, check, message):
    plugin, spec = _broken(defect, **attributes)
    with peftkit.use_plugin(plugin, name=f"broken-{defect}") as record:
        assert not record.errors, record.errors
        with pytest.raises(AssertionError, match=message) as failure:
            check_method(spec, architectures=("llama",), checks=[check])
        assert f"{check}[" in str(failure.value) and "failed" in str(failure.value)


@pytest.mark.parametrize("defect, peft_type, message", [
    # PEFT's LORA config knows no `alpha` (its name is lora_alpha): it drops it, and the folder PEFT writes back
    # holds its own default scale
    ("peft_names", "LORA", r"through PEFT's adapter_config.json the adapter's output changed"),
    # the default config_from_file refuses the fields PEFT writes for the type (n_frequency, bias, ...)
    ("peft_fields", "FOURIERFT", r"the adapter_config.json PEFT writes for this adapter does not load in peftkit"),
])
def test_the_suite_catches_a_method_whose_peft_files_do_not_round_trip(defect, peft_type, message):
    plugin, _ = _broken(defect, peft_type=peft_type,
                        config_to_file=lambda self, config: {"peft_type": self.peft_type, **config.to_dict()})
    spec = f'broken_{defect}[r=2,alpha=32,target_modules=["q_proj","v_proj"]]'
    with peftkit.use_plugin(plugin, name=f"broken-{defect}") as record:
        assert not record.errors, record.errors
        with pytest.raises(AssertionError, match=message):
            check_method(spec, architectures=("llama",), checks=["peft_config"])


@pytest.mark.parametrize("defect, attributes, message", [
    # says the config is not in PEFT's format, but writes PEFT's LORA: PEFT would load it as plain LoRA
    ("claims_lora", {"peft_type": "LORA", "peft_type_of": lambda self, config: None,
                     "config_to_file": lambda self, config: {"peft_type": "LORA", **config.to_dict()}},
     r"not in PEFT's format \(broken_claims_lora.peft_type_of\(\) is None\), but its adapter_config.json says "
     r"peft_type 'LORA', a type PEFT has"),
    # a method without a peft_type whose own type is one PEFT has (HRA)
    ("hra", {"config_to_file": lambda self, config: {"peft_type": "HRA", **config.to_dict()}},
     r"says peft_type 'HRA', a type PEFT has: PEFT would load the folder as its own HRA adapter"),
    # peft_type_of and the file disagree
    ("other_type", {"peft_type": "LORA"},
     r"peft_type_of\(\) says 'LORA', but the adapter_config.json peftkit saved says peft_type 'BROKEN_OTHER_TYPE'"),
])
def test_the_suite_catches_a_folder_that_claims_the_wrong_peft_type(defect, attributes, message):
    plugin, spec = _broken(defect, **attributes)
    with peftkit.use_plugin(plugin, name=f"broken-{defect}") as record:
        assert not record.errors, record.errors
        with pytest.raises(AssertionError, match=message):
            check_method(spec, architectures=("llama",), checks=["peft_config"])


def test_a_sound_method_built_the_same_way_passes():
    """The broken methods above differ from a passing one only in their defect."""
    plugin, spec = _broken("none")
    with peftkit.use_plugin(plugin, name="broken-none"):
        report = check_method(spec, architectures=("llama",))
    assert not report.failed and len(report.passed) == len(CHECKS) - 1
    assert [(r.check, r.message) for r in report.skipped] == [
        ("peft_config", "not in PEFT's format (broken_none declares no peft_type): its folder says peft_type "
                        "'BROKEN_NONE', a type PEFT does not have, so PEFT refuses it")]


def test_the_merge_check_sees_a_merge_that_forgets_the_bias(monkeypatch):
    """The tiny models' linear layers have non-zero biases: an IA3 merge that scales the weight but not the bias
    of an output-scaled layer changes the output (with zero biases it would not)."""
    from peftkit.plugins.ia3.layer import IA3Vector

    assert any(p.abs().max() > 0 for n, p in build_tiny("gpt2").named_parameters() if n.endswith("attn.bias"))
    run_check("ia3", "merge", "gpt2")
    monkeypatch.setattr(IA3Vector, "_bias_factor", lambda self, base: None)
    with pytest.raises(AssertionError, match="merged vs unmerged output"):
        run_check("ia3", "merge", "gpt2")


def test_the_merge_check_skips_a_model_the_methods_own_check_refuses(monkeypatch):
    from peftkit.plugins.ia3.layer import IA3Vector

    def refuse(self):
        raise MergeError("a shift needs a bias, and this layer has none")

    monkeypatch.setattr(IA3Vector, "check_mergeable", refuse, raising=False)
    with pytest.raises(CheckSkipped, match=r"ia3 refuses to merge on llama: .*a shift needs a bias"):
        run_check("ia3", "merge", "llama")
