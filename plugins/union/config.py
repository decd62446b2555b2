"""The union's config (torch-free): several methods' configs that act as one adapter."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from peftkit.plugin_api import AdapterConfig, option, ConfigError

#: Fields of the union itself that would be ambiguous: each part chooses its own modules.
_PER_PART_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform")


@dataclass
class UnionConfig(AdapterConfig):
    """Several tuning methods trained, saved and activated as one adapter (AdapterHub's ``ConfigUnion``).

    parts: the members, each a spec string (``"prefix_tuning[num_virtual_tokens=30]"``) or a mapping
      ``{"method": "par_bn", "reduction_factor": 2}``; stored as mappings with every field filled in.
      Each method appears once. The shorthand ``"prefix_tuning[...]|par_bn[...]"`` builds a union.
    modules_to_save: as for any adapter (a task head), set on the union, not on its parts.
    """

    method: ClassVar[str] = "union"

    parts: list[Union[str, dict[str, Any]]] = option(
        default_factory=list, help='the member methods, each a spec string (e.g. "prefix_tuning[num_virtual_tokens=30]") or a mapping with "method"')

    def check(self) -> None:
        for key in _PER_PART_FIELDS:
            if getattr(self, key) is not None:
                raise ConfigError(f"union config: {key} is chosen by each part; move it into the part it is for, "
                                  f"e.g. lora[{key}=...]|par_bn")
        if len(self.parts) < 2:
            raise ConfigError(f"union config: a union needs at least two parts, got {len(self.parts)}; "
                              f"write e.g. 'prefix_tuning|par_bn', or add the one method as it is")
        normalized = [self._normalized(part) for part in self.parts]
        methods = [part["method"] for part in normalized]
        repeated = sorted({m for m in methods if methods.count(m) > 1})
        if repeated:
            raise ConfigError(f"union config: method {repeated[0]!r} appears twice; a union holds each method once "
                              f"(add a second adapter and stack them to use one method twice)")
        self.parts = normalized

    def _normalized(self, part: Any) -> dict[str, Any]:
        from peftkit.plugin_api import parse_spec

        if isinstance(part, str):
            method, config = parse_spec(part)
        else:
            values = dict(part)
            name = values.pop("method", None)
            if not isinstance(name, str):
                raise ConfigError(f"union config: part {part!r} names no method; give {{'method': 'lora', ...}} "
                                  f"or a spec string such as 'lora[r=8]'")
            from peftkit.plugin_api import get_registry

            method = get_registry().get_method(name)
            config = method.make_config(**values)
        if isinstance(config, UnionConfig):
            raise ConfigError(f"union config: a part cannot itself be a union ({method.name!r}); list its parts "
                              f"directly")
        if config.modules_to_save:
            raise ConfigError(f"union config: part {method.name!r} sets modules_to_save; set it on the union "
                              f"(union[modules_to_save=[...]] or AdaptedModel.add_adapter(..., config)) instead")
        return {"method": method.name, **config.to_dict()}

    @classmethod
    def option_details(cls) -> list[dict[str, Any]]:
        """A union's own options (its parts choose their modules), for ``peftkit methods union``."""
        return [o for o in super().option_details() if o["name"] not in _PER_PART_FIELDS]

    def part_configs(self) -> list[tuple[Any, AdapterConfig]]:
        """(method, config) for each part, in order."""
        from peftkit.plugin_api import get_registry

        registry = get_registry()
        out = []
        for part in self.parts:
            values = dict(part)  # type: ignore[arg-type]
            method = registry.get_method(values.pop("method"))
            out.append((method, method.make_config(**values)))
        return out

    def to_shorthand(self) -> str:
        """``a[...]|b[...]`` for a plain union; else ``<method>[parts=[...],...]`` (``mam`` alone for the preset)."""
        parts = [config.to_shorthand() for _, config in self.part_configs()]
        if self.method == "union" and not self.modules_to_save:
            return "|".join(parts)
        if self.method != "union" and not self.modules_to_save and self.parts == type(self)().parts:
            return self.method  # a preset with its defaults
        options = [f"parts={json.dumps(parts, separators=(',', ':'))}"]
        if self.modules_to_save:
            options.append(f"modules_to_save={json.dumps(self.modules_to_save, separators=(',', ':'))}")
        return f"{self.method}[{','.join(options)}]"


def _mam_parts() -> list[Union[str, dict[str, Any]]]:
    # AdapterHub's MAMConfig: a 30-token prefix through a reparametrization MLP of width 800, and a
    # parallel bottleneck adapter at the feed-forward block with reduction factor 2 and scaling 4.
    return ["prefix_tuning[num_virtual_tokens=30,prefix_projection=true,encoder_hidden_size=800]",
            "par_bn[reduction_factor=2,scaling=4.0]"]


@dataclass
class MamConfig(UnionConfig):
    """The mix-and-match adapter (He et al. 2022, arXiv 2110.04366): prefix tuning plus a parallel
    bottleneck adapter, with AdapterHub's defaults; ``parts`` may override them."""

    method: ClassVar[str] = "mam"

    parts: list[Union[str, dict[str, Any]]] = field(default_factory=_mam_parts)


def _unipelt_parts() -> list[Union[str, dict[str, Any]]]:
    # AdapterHub's UniPELTConfig: PrefixTuningConfig(prefix_length=10) (its MLP of width 512, tokens kept at
    # positions 0..n-1), SeqBnConfig(reduction_factor=16) (the Pfeiffer placement) and LoRAConfig(r=8, alpha=2)
    # on the query and value projections, each with use_gating=True.
    return ["prefix_tuning[num_virtual_tokens=10,prefix_projection=true,encoder_hidden_size=512,"
            "token_positions=from_zero,use_gating=true]",
            "seq_bn[reduction_factor=16,original_ln_before=true,use_gating=true]",
            "lora[r=8,alpha=2,use_gating=true]"]


@dataclass
class UniPeltConfig(UnionConfig):
    """UniPELT (Mao et al. 2022, arXiv 2110.07577): gated prefix tuning, a gated sequential bottleneck adapter
    and a gated LoRA, with AdapterHub's defaults; ``parts`` may override them."""

    method: ClassVar[str] = "unipelt"

    parts: list[Union[str, dict[str, Any]]] = field(default_factory=_unipelt_parts)
