"""The plugin manager with plugin objects registered for one test (``peftkit.use_plugin``).

Each hook has a ``test_hook_<hookname>`` here (tests/test_docs_hooks.py checks
that none is missing). Failures of a plugin (wrong API version, signature,
registration) are checked to be recorded with a message that names the
plugin and the fix, and to leave the core working.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import click
import pytest
import torch

import peftkit
from peftkit import AdapterConfig, ArchitectureSpec, LayerAdapter, Method
from peftkit.cli import main, run
from peftkit.cli_plugins import add_plugin_commands
from peftkit.core.errors import PluginError, TargetError
from peftkit.core.plugins import get_registry, parse_spec
from tests.tiny_models import build_tiny, output_tensor, sample_inputs


@dataclass
class BiasConfig(AdapterConfig):
    method: ClassVar[str] = "test_bias"


class BiasAdapter(LayerAdapter):
    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.test_bias = torch.nn.Parameter(torch.full((base.weight.shape[0],), 0.5))

    def delta(self, x, h, base):
        return self.test_bias.expand_as(h)


class BiasMethod(Method):
    name = "test_bias"
    config_class = BiasConfig
    description = "test: a trained output bias"

    def create_layer_adapter(self, site, base_layer, config, model):
        return BiasAdapter(base_layer)


class MethodPlugin:
    PEFTKIT_PLUGIN_API = 1

    @peftkit.hookimpl
    def peftkit_register_methods(self, register):
        register(BiasMethod())


def _lora_is_intact() -> None:
    registry = get_registry()
    assert registry.methods["lora"].distribution == "peftkit"
    assert not registry.records["lora"].broken


# -- one test per hook ---------------------------------------------------------------------


def test_hook_peftkit_register_methods(tiny_llama):
    inputs = sample_inputs("llama")
    with torch.no_grad():
        base_out = output_tensor(tiny_llama(**inputs)).clone()
    with peftkit.use_plugin(MethodPlugin(), name="bias-plugin") as record:
        assert record.errors == [] and record.methods == ["test_bias"]
        assert record.hooks == ["peftkit_register_methods"]
        listed = {m["name"]: m for m in peftkit.list_methods()}
        assert listed["test_bias"]["plugin"] == "bias-plugin"
        model = peftkit.adapt(tiny_llama, "test_bias[target_modules=['o_proj']]")
        assert model.trainable_parameters()[0] == 2 * 32  # one bias per o_proj output, 2 layers
        with torch.no_grad():
            assert not torch.allclose(output_tensor(model(**inputs)), base_out)
    with pytest.raises(PluginError, match="unknown tuning method 'test_bias'"):
        peftkit.adapt(build_tiny("llama"), "test_bias")
    _lora_is_intact()


def _consensus(deltas, weights, **options):  # the example of docs/plugins.md
    stacked = torch.stack([w * d for d, w in zip(deltas, weights)])
    agree = (stacked.sign() == stacked[0].sign()).all(dim=0)
    return stacked.sum(dim=0) * agree


class MergePlugin:
    PEFTKIT_PLUGIN_API = 1

    @peftkit.hookimpl
    def peftkit_register_merge_strategies(self, register):
        register("consensus", _consensus)


def test_hook_peftkit_register_merge_strategies(tiny_llama):
    model = peftkit.AdaptedModel(tiny_llama)
    for name in ("a", "b"):
        model.add_adapter(name, "lora[r=2,init_weights=false,target_modules=['q_proj']]")
    with peftkit.use_plugin(MergePlugin(), name="merge-plugin") as record:
        assert record.errors == [] and record.merge_strategies == ["consensus"]
        model.merge_adapters(["a", "b"], [0.5, 2.0], name="merged", strategy="consensus", rank=32)
    for _, layer in model.tuner_layers():
        a, b, merged = (layer.adapters[n].delta_weight(layer.base_layer) for n in ("a", "b", "merged"))
        expected = _consensus([a, b], [0.5, 2.0])
        assert 0 < int((expected == 0).sum()) < expected.numel()  # the strategy did something
        assert torch.allclose(merged, expected, atol=1e-5)
    assert "consensus" not in get_registry().merge_strategies
    with pytest.raises(peftkit.MergeError, match="unknown merge strategy 'consensus'"):
        model.merge_adapters(["a", "b"], name="again", strategy="consensus")


def _tiny_falcon():
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    return FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=128, new_decoder_architecture=False)).eval()


class FalconPlugin:
    """The example of docs/plugins.md: a model family peftkit does not know."""

    PEFTKIT_PLUGIN_API = 1

    @peftkit.hookimpl
    def peftkit_register_architectures(self, register):
        register(ArchitectureSpec(
            "falcon",
            defaults={"lora": ("query_key_value",), "ia3": ("query_key_value", "dense_4h_to_h")},
            points={
                "attention": r".*\.h\.\d+\.self_attention",
                "attention_output": r".*\.h\.\d+\.self_attention\.dense",
                "ffn_input": r".*\.h\.\d+\.mlp",
                "ffn_output": r".*\.h\.\d+\.mlp\.dense_4h_to_h",
            },
        ))
        # Extending a built-in family: LLaMA keeps its defaults and gains one for test_bias.
        register(ArchitectureSpec("llama", defaults={"test_bias": ("o_proj",)}))


def test_hook_peftkit_register_architectures():
    with pytest.raises(TargetError, match="peftkit_register_architectures"):
        peftkit.adapt(_tiny_falcon(), "seq_bn")
    with peftkit.use_plugin(FalconPlugin(), name="falcon-plugin") as record, \
            peftkit.use_plugin(MethodPlugin(), name="bias-plugin"):
        assert record.errors == [] and record.architectures == ["falcon", "llama"]
        lora = peftkit.adapt(_tiny_falcon(), "lora[r=2]")
        assert [s.name for s in lora.adapter_record("default").sites] == [
            "transformer.h.0.self_attention.query_key_value", "transformer.h.1.self_attention.query_key_value"]
        bottleneck = peftkit.adapt(_tiny_falcon(), "seq_bn")
        assert [s.name for s in bottleneck.adapter_record("default").sites] == [
            "transformer.h.0.mlp.dense_4h_to_h", "transformer.h.1.mlp.dense_4h_to_h"]
        llama = get_registry().architectures["llama"]
        assert llama.default_targets("test_bias") == ("o_proj",)
        assert llama.default_targets("lora") == ("q_proj", "v_proj")
        assert "ffn_output" in llama.points
        model = peftkit.adapt(build_tiny("llama"), "test_bias")
        assert all(s.name.endswith("o_proj") for s in model.adapter_record("default").sites)
    registry = get_registry()
    assert "falcon" not in registry.architectures
    assert registry.architectures["llama"].default_targets("test_bias") is None
    assert registry.architectures["llama"].default_targets("lora") == ("q_proj", "v_proj")


def test_hook_peftkit_register_hub_backends(tmp_path, tiny_llama):
    from peftkit.hub_client.local import LocalBackend
    from peftkit.hub_client.resolve import open_hub

    class TeamShare(LocalBackend):
        """A team's shared folder, addressed as teamshare://<name>."""

        def __init__(self, url, token=None, **options):
            super().__init__(tmp_path / "shares" / url.split("://", 1)[1])

    class HubPlugin:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_hub_backends(self, register):
            register("teamshare", TeamShare)
            register("Not A Scheme", TeamShare)

    folder = tmp_path / "adapter"
    peftkit.adapt(tiny_llama, "loha[r=2]").save_adapter(folder)
    with peftkit.use_plugin(HubPlugin(), name="hub-plugin") as record:
        assert record.hub_backends == ["teamshare"]
        assert len(record.errors) == 1 and "takes a URL scheme such as 's3'" in record.errors[0]
        with open_hub("teamshare://nlp") as hub:
            assert isinstance(hub, TeamShare) and hub.root == tmp_path / "shares" / "nlp"
            files = {p.name: p for p in folder.iterdir()}
            hub.push("team/loha", files, private=None, commit_message="add", revision="main")
            info = hub.info("team/loha")
            assert sorted(f.path for f in info.files) == sorted(files)
    with pytest.raises(peftkit.PeftkitError, match="no hub backend for 'teamshare'"):
        open_hub("teamshare://nlp")


def test_hook_peftkit_register_commands(capsys):
    class CommandPlugin:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_commands(self, cli):
            @cli.command("greet-test")
            @click.argument("who")
            def greet(who):
                click.echo(f"hi {who}")

            @cli.command("methods")  # not its own: must be refused
            def methods():
                click.echo("hijacked")

    class RaisingCommands:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_commands(self, cli):
            cli.add_command(click.Command("half-added"))
            raise RuntimeError("no commands today")

    original_methods = main.commands["methods"]
    try:
        with peftkit.use_plugin(CommandPlugin(), name="cmd-plugin") as record, \
                peftkit.use_plugin(RaisingCommands(), name="raising-cmds") as raising:
            add_plugin_commands(main)
            add_plugin_commands(main)  # a second run() in one process: a plugin may replace its own
            assert record.commands == ["greet-test"]
            assert main.commands["methods"] is original_methods
            assert len(record.errors) == 1 and "tried to replace the command 'methods'" in record.errors[0]
            assert "half-added" not in main.commands
            assert "raised in peftkit_register_commands: RuntimeError: no commands today" in raising.errors[0]
            assert "could not add its commands" in capsys.readouterr().err
            assert run(["greet-test", "ada"]) == 0
            assert capsys.readouterr().out == "hi ada\n"
            assert run(["methods", "--json"]) == 0
            assert '"lora"' in capsys.readouterr().out
    finally:
        main.commands.pop("greet-test", None)
        main.commands["methods"] = original_methods


# -- a faulty plugin is recorded, with the fix; the core keeps working ---------------------------


@pytest.mark.parametrize("api, expected", [
    (None, "does not declare the plugin API it was written for; add PEFTKIT_PLUGIN_API = 1"),
    ("1", "declares PEFTKIT_PLUGIN_API = '1'; it must be an integer"),
    (2, "written for peftkit plugin API 2, this peftkit implements API 1; it was not loaded. Fix: upgrade peftkit"),
    (0, "written for peftkit plugin API 0, this peftkit implements API 1; it was not loaded. Fix: upgrade the plugin"),
])
def test_incompatible_plugin_api_is_refused_with_the_fix(api, expected):
    plugin = MethodPlugin()
    plugin.PEFTKIT_PLUGIN_API = api
    with peftkit.use_plugin(plugin, name="api-plugin") as record:
        assert record.broken and expected in record.errors[0]
        assert "'api-plugin'" in record.errors[0]
        assert "test_bias" not in get_registry().methods  # never registered
        # The method it would provide is unknown, and the error says why its plugin did not load.
        with pytest.raises(PluginError, match=r"unknown tuning method 'test_bias'.*broken plugins: api-plugin "
                                              r"\(.*" + re.escape(expected)):
            parse_spec("test_bias")
    _lora_is_intact()


def test_wrong_hook_signature_names_the_expected_one():
    class WrongSignature:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_methods(self, registry):
            raise AssertionError("must not be called")

    with peftkit.use_plugin(WrongSignature(), name="wrong-sig") as record:
        (error,) = record.errors
        assert ("implements peftkit_register_methods(registry), but the hook is "
                "peftkit_register_methods(register)") in error
        assert "`peftkit docs plugins#peftkit_register_methods`" in error
        assert record.hooks == []


def test_a_hook_taking_fewer_arguments_is_valid():
    calls = []

    class NoArgs:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_methods(self):
            calls.append("called")

    with peftkit.use_plugin(NoArgs(), name="no-args") as record:
        assert record.errors == [] and calls == ["called"]


def test_misspelled_and_undecorated_hooks_are_reported():
    class Misspelled:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_method(self, register):  # missing "s"
            pass

    class Undecorated:
        PEFTKIT_PLUGIN_API = 1

        def peftkit_register_methods(self, register):
            register(BiasMethod())

    class Empty:
        PEFTKIT_PLUGIN_API = 1

    with peftkit.use_plugin(Misspelled(), name="misspelled") as record:
        assert "implements an unknown hook" in record.errors[0] and "peftkit_register_method" in record.errors[0]
        assert record.errors[0].endswith("did you mean: peftkit_register_method -> peftkit_register_methods?")
    # The unknown hook is gone again: the next plugin registers normally.
    with peftkit.use_plugin(Undecorated(), name="undecorated") as record:
        assert record.errors == ["plugin 'undecorated' defines peftkit_register_methods without the "
                                 "@peftkit.hookimpl marker, so peftkit never calls it; decorate it with "
                                 "@peftkit.hookimpl"]
    with peftkit.use_plugin(Empty(), name="empty") as record:
        assert "implements no peftkit hook" in record.errors[0]
    with peftkit.use_plugin(MethodPlugin(), name="fine") as record:
        assert record.errors == []


def test_bad_registrations_name_the_hook_and_the_fix():
    @dataclass
    class OtherConfig(AdapterConfig):
        method: ClassVar[str] = "something_else"

    class MismatchedConfig(BiasMethod):
        name = "test_mismatch"
        config_class = OtherConfig

    class BadRegistrations:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_methods(self, register):
            register(BiasMethod)  # the class, not an instance
            register(MismatchedConfig())
            register("lora")
            register(BiasMethod(), "extra argument")

        @peftkit.hookimpl
        def peftkit_register_architectures(self, register):
            register({"model_type": "falcon"})

    with peftkit.use_plugin(BadRegistrations(), name="bad-reg") as record:
        errors = "\n".join(record.errors)
        assert "registered the class BiasMethod; register an instance: register(BiasMethod())" in errors
        assert "uses OtherConfig, whose method is 'something_else'; set method: ClassVar[str] = 'test_mismatch'" \
            in errors
        assert "registered 'lora', which is not a peftkit.Method" in errors
        assert "raised in peftkit_register_methods: PluginError: in peftkit_register_methods, call " \
               "register(method); got register(" in errors
        assert "register a peftkit.ArchitectureSpec" in errors
        assert record.methods == [] and record.architectures == []
    _lora_is_intact()


def test_a_taken_method_name_keeps_the_first_owner():
    class LoraImpostor(BiasMethod):
        name = "lora"

    @dataclass
    class ImpostorConfig(AdapterConfig):
        method: ClassVar[str] = "lora"

    LoraImpostor.config_class = ImpostorConfig

    class Impostor:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_methods(self, register):
            register(LoraImpostor())
            register(BiasMethod())  # the plugin's other registrations go on

    with peftkit.use_plugin(Impostor(), name="impostor") as record:
        (error,) = record.errors
        assert error.startswith("plugin 'impostor' (")
        assert "registers method 'lora', which plugin 'lora' (peftkit " in error
        assert "Fix: give the method another name" in error
        assert record.methods == ["test_bias"]
        _lora_is_intact()
    _lora_is_intact()


def test_a_raising_hook_is_isolated(tiny_llama):
    class Raising:
        PEFTKIT_PLUGIN_API = 1

        @peftkit.hookimpl
        def peftkit_register_methods(self, register):
            register(BiasMethod())
            raise ValueError("oops after one registration")

        @peftkit.hookimpl
        def peftkit_register_merge_strategies(self, register):
            register("still_here", lambda deltas, weights, **o: deltas[0])

    with peftkit.use_plugin(Raising(), name="raising") as record:
        assert record.errors == ["plugin 'raising' raised in peftkit_register_methods: ValueError: oops after "
                                 "one registration"]
        assert "Traceback" in record.tracebacks[0] and "oops" in record.tracebacks[0]
        assert record.methods == ["test_bias"] and record.merge_strategies == ["still_here"]
        assert peftkit.adapt(tiny_llama, "lora[r=2]").adapter_record("default").method.name == "lora"


def test_use_plugin_refuses_a_name_that_is_loaded():
    with pytest.raises(PluginError, match="a plugin named 'lora' is already loaded"):
        with peftkit.use_plugin(MethodPlugin(), name="lora"):
            pass
    _lora_is_intact()
    assert "test_bias" not in get_registry().methods


def test_the_source_tree_fallback_lists_every_builtin_entry_point():
    """Without distribution metadata peftkit loads its built-ins from a list: it must match pyproject's."""
    import importlib.metadata

    from peftkit.core.plugins import _BUILTIN_FALLBACK

    declared = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="peftkit")
                if ep.value.startswith("peftkit.")}
    assert declared == _BUILTIN_FALLBACK
