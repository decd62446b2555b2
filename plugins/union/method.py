"""The union method: its sites are its parts' sites; at a shared site the parts run in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftkit.plugin_api import ALL_BLOCKS, AdapterConfig, ConfigError, Method, Site, TargetError

from .adapterhub import UnionAdapterHub
from .config import MamConfig, UnionConfig, UniPeltConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from peftkit.plugin_api import ArchitectureSpec


@dataclass(frozen=True)
class UnionSite(Site):
    """A site of the union, with the site each part asked for there (index of the part, its Site)."""

    parts: tuple[tuple[int, Site], ...] = ()


class UnionMethod(Method):
    name = "union"
    config_class = UnionConfig
    description = ("Several methods as one adapter (AdapterHub's ConfigUnion): 'prefix_tuning|par_bn'; "
                   "parts sharing a module run in order")
    # Whether a union merges or composes depends on its parts; it never merges (fold its parts' effects
    # by keeping them as separate adapters), and the core's rules for input-rewriting parts (prefix or
    # prompt tuning) apply to the whole union.
    can_merge = False
    joins_specs = True  # serves "prefix_tuning|par_bn" specs
    # not split(): a prefix part adds tokens that every position attends to
    supported_blocks = ALL_BLOCKS - {"split"}
    identity_at_init = False  # a prefix part starts random; pass identity_at_init to peftkit.testing per spec
    adapterhub = UnionAdapterHub()  # AdapterHub's ConfigUnion (UniPELTConfig, MAMConfig): its parts' translations

    # -- injection -------------------------------------------------------------------------------

    def sites(self, model: "nn.Module", config: AdapterConfig, arch: "ArchitectureSpec | None") -> list[Site]:
        assert isinstance(config, UnionConfig)
        by_name: dict[str, list[tuple[int, Site]]] = {}
        for index, (method, part) in enumerate(config.part_configs()):
            for site in method.sites(model, part, arch):
                by_name.setdefault(site.name, []).append((index, site))
        sites = []
        for name, parts in by_name.items():
            inputs = {site.input_from for _, site in parts}
            if len(inputs) > 1:
                methods = [config.parts[i]["method"] for i, _ in parts]  # type: ignore[index]
                raise TargetError(f"union: {' and '.join(methods)} both adapt {name!r} but read different inputs "
                                  f"(the module's own and {sorted(i for i in inputs if i)[0]!r}); narrow one part's "
                                  f"target_modules, or add them as two adapters and stack them")
            sites.append(UnionSite(name, input_from=inputs.pop(), role=parts[0][1].role, parts=tuple(parts)))
        return sites

    def create_layer_adapter(self, site: Site, base_layer: "nn.Module", config: AdapterConfig,
                             model: "nn.Module") -> "nn.Module | None":
        from .layer import UnionLayerAdapter

        assert isinstance(config, UnionConfig) and isinstance(site, UnionSite)
        parts = config.part_configs()
        made = {}
        for index, part_site in site.parts:
            method, part = parts[index]
            adapter = method.create_layer_adapter(part_site, base_layer, part, model)
            if adapter is not None:
                made[method.name] = adapter
        return UnionLayerAdapter(made) if made else None

    def create_model_adapter(self, model: "nn.Module", config: AdapterConfig,
                             arch: "ArchitectureSpec | None") -> "nn.Module | None":
        from .layer import UnionModelAdapter

        assert isinstance(config, UnionConfig)
        made, filled = {}, []
        try:
            for method, part in config.part_configs():
                adapter = method.create_model_adapter(model, part, arch)
                if adapter is not None:
                    made[method.name] = adapter
                filled.append({"method": method.name, **part.to_dict()})  # methods may fill fields in (prefix geometry)
            if len(made) > 1:
                raise ConfigError(f"union: {' and '.join(made)} both change the model's inputs; a union holds at "
                                  f"most one such part (add the other as its own adapter and stack them)")
        except BaseException:
            for adapter in made.values():  # parts made before the refusal may have hooked the model (gated prefix)
                adapter.removed(model)
            raise
        config.parts = filled  # type: ignore[assignment]  # the record's own copy: saved as completed
        return UnionModelAdapter(made) if made else None

    # -- files -----------------------------------------------------------------------------------

    def config_to_file(self, config: AdapterConfig) -> dict[str, Any]:
        assert isinstance(config, UnionConfig)
        parts = []
        for method, part in config.part_configs():
            data = method.config_to_file(part)
            data.pop("peft_type", None)
            # Which distribution made each part, so that a missing one can be named when loading.
            made_by = {"plugin": method.distribution, "plugin_version": method.distribution_version}
            parts.append({"method": method.name, **data, **{k: v for k, v in made_by.items() if v}})
        return {"peft_type": self.name.upper(), "parts": parts, "modules_to_save": config.modules_to_save}

    def config_from_file(self, data: dict[str, Any]) -> AdapterConfig:
        from peftkit.plugin_api import get_registry

        raw_parts = data.get("parts")
        if not isinstance(raw_parts, list) or not all(isinstance(p, dict) and "method" in p for p in raw_parts):
            raise ConfigError(f"{self.name} adapter_config.json: 'parts' must be a list of objects with a 'method'")
        from peftkit.plugin_api import PluginError, unknown_method_message

        registry = get_registry()
        parts = []
        for raw in raw_parts:
            values = dict(raw)
            name = values.pop("method")
            plugin, version = values.pop("plugin", None), values.pop("plugin_version", None)
            if name not in registry.methods:
                raise PluginError(f"union part: {unknown_method_message(name, registry, plugin, version)}")
            method = registry.get_method(name)
            parts.append({"method": method.name, **method.config_from_file(values).to_dict()})
        rest = {k: v for k, v in data.items() if k not in ("peft_type", "parts")}
        return self.config_class.from_dict({"parts": parts, **rest})

    # -- introspection -----------------------------------------------------------------------------

    def expected_parameter_count(self, model: "nn.Module", config: AdapterConfig, sites: list[Site]) -> int | None:
        assert isinstance(config, UnionConfig)
        total = 0
        for index, (method, part) in enumerate(config.part_configs()):
            own = [s for site in sites if isinstance(site, UnionSite) for i, s in site.parts if i == index]
            count = method.expected_parameter_count(model, part, own)
            if count is None:
                return None
            total += count
        return total


class MamMethod(UnionMethod):
    name = "mam"
    config_class = MamConfig
    known_as = {"mamadapter": "the mix-and-match adapter is mam"}
    joins_specs = False  # a preset: "a|b" specs make a union
    description = "Mix-and-match adapter: prefix tuning + a parallel bottleneck adapter, as one adapter (union)"
    supported_blocks = frozenset({"stack"})  # its prefix changes the model's inputs (see prefix tuning)


class UniPeltMethod(UnionMethod):
    name = "unipelt"
    config_class = UniPeltConfig
    known_as = {"unipeltconfig": "AdapterHub's UniPELTConfig is unipelt"}
    joins_specs = False  # a preset: "a|b" specs make a union
    description = ("UniPELT: gated prefix tuning + a gated bottleneck adapter + a gated LoRA, as one adapter "
                   "(union)")
    supported_blocks = frozenset({"stack"})  # its prefix changes the model's inputs (see prefix tuning)
