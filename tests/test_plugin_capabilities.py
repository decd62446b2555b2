"""Optional capabilities a method declares instead of the core naming it (docs/plugins.md,
"Optional capabilities"), checked with a third-party method registered for one test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

import peftkit
from peftkit.core.errors import ConfigError, PluginError
from peftkit.core.plugins import parse_spec
from peftkit.core.plugins import Registry, get_registry
from peftkit.plugin_api import AdapterConfig, Method, hookimpl


@dataclass
class ScaleConfig(AdapterConfig):
    method: ClassVar[str] = "test_scale"


class ScaleMethod(Method):
    name = "test_scale"
    config_class = ScaleConfig
    known_as = {"scalevector": "a scaling vector is test_scale here: test_scale[...]"}


class ScalePlugin:
    PEFTKIT_PLUGIN_API = peftkit.PLUGIN_API_VERSION

    @hookimpl
    def peftkit_register_methods(self, register):
        register(ScaleMethod())


def test_a_plugins_known_as_is_suggested_for_an_unknown_method():
    with pytest.raises(PluginError) as info:
        peftkit.get_method("ScaleVector")
    assert "test_scale" not in str(info.value)
    with peftkit.use_plugin(ScalePlugin(), name="scale-plugin") as record:
        assert record.errors == []
        with pytest.raises(PluginError, match=r"a scaling vector is test_scale here: test_scale\[\.\.\.\]\."):
            peftkit.get_method("Scale-Vector")
    with pytest.raises(PluginError) as info:  # gone with its plugin
        peftkit.get_method("ScaleVector")
    assert "test_scale" not in str(info.value)


def test_a_method_declares_nothing_by_default():
    method = ScaleMethod()
    assert (method.merge_low_rank, method.merge_elementwise, method.joins_specs, method.can_merge) == \
        (False, False, False, False)


def test_the_built_in_methods_declare_their_capabilities():
    methods = get_registry().methods
    assert sorted(m for m in methods if methods[m].merge_low_rank) == ["lora"]
    assert sorted(m for m in methods if methods[m].merge_elementwise) == ["bitfit", "ia3", "ln_tuning"]
    assert [m for m in methods if methods[m].joins_specs] == ["union"]


def test_joined_specs_need_a_method_that_joins_them():
    method, config = parse_spec("prefix_tuning[num_virtual_tokens=2]|par_bn")
    assert method.name == "union" and len(config.parts) == 2
    with pytest.raises(ConfigError, match=r"joins several methods with '\|'.*the built-in 'union'.*peftkit plugins"):
        parse_spec("lora|bitfit", registry=Registry())  # a registry with no plugin loaded


def test_default_targets_come_from_the_methods_own_plugins():
    registry = get_registry()
    assert "llama" in registry.records["lora"].architectures
    assert registry.architectures["llama"].default_targets("lora") == ("q_proj", "v_proj")
    assert registry.architectures["t5"].default_targets("ia3_feedforward") == ("wo",)
    # The core's own family specs hold insertion points only.
    from peftkit.core.architectures import BUILTIN_ARCHITECTURES

    assert all(spec.defaults == {} and spec.points for spec in BUILTIN_ARCHITECTURES)
