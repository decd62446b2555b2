"""AdapterHub's ReFT (``adapters``' ReftConfig, LoReftConfig, NoReftConfig, DiReftConfig) as reft.

``adapters`` keeps a layer's interventions at ``<layer>.reft_layer.refts.<name>.units.<i>`` with
the tensor names peftkit's layer uses, so the tensors pass unchanged. Two differences:

- ``adapters`` makes two units per layer unless ``tied_weights`` (0: prefix, 1: suffix) even when
  prefix or suffix positions are 0; peftkit makes only those that act. An unused unit's tensors
  are skipped on loading and written as copies of the used one on saving.
- ``subtract_projection`` is a class attribute of ``adapters``' configs, not a field: ``adapters``
  1.3.0 does not write it, and reads every folder as ``subtract_projection=True`` (a key in the
  file is dropped too). peftkit reads a folder the same way, so a DiReFT adapter saved by
  ``adapters`` loads (in both libraries) with the projection subtracted, and refuses to save a
  DiReFT adapter in this format, which ``adapters`` would read as another function.
"""

from __future__ import annotations

from typing import Any, Mapping

from peftkit.plugin_api import AdapterHubFormat, ConfigError

from .config import NON_LINEARITIES, unit_indices

#: The options ``adapters`` 1.3 writes for a ReftConfig, with LoReftConfig's values.
REFT_DEFAULTS: dict[str, Any] = {
    "architecture": "reft", "dropout": 0.05, "dtype": None, "init_weights_seed": None, "layers": "all",
    "non_linearity": None, "orthogonality": True, "output_reft": True, "prefix_positions": 3, "r": 1,
    "suffix_positions": 0, "tied_weights": False,
}
#: Options peftkit reads with only one value.
REQUIRED = {"output_reft": True, "dtype": None}
#: Options passed to peftkit's config unchanged.
PASSED = ("layers", "prefix_positions", "suffix_positions", "r", "orthogonality", "tied_weights", "dropout",
          "init_weights_seed")


class ReftAdapterHub(AdapterHubFormat):
    module_dict = "refts"

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == "reft"

    def module_for(self, site: str, model_type: str | None) -> str:
        return f"{site}.reft_layer"

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        self.refuse_changed(options, REQUIRED, "ReFT")
        activation = options.get("non_linearity")
        if activation is not None and str(activation).lower() not in NON_LINEARITIES:
            raise ConfigError(f"AdapterHub ReFT non_linearity={activation!r} is not supported by peftkit "
                              f"({', '.join(NON_LINEARITIES)} or null)")
        values = {key: options.get(key, REFT_DEFAULTS[key]) for key in PASSED}
        values["non_linearity"] = activation
        values["subtract_projection"] = True  # what adapters 1.3.0 computes from any saved folder
        return values

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        if not config.subtract_projection:
            raise ConfigError("subtract_projection=false (DiReFT): adapters 1.3.0 reads every saved ReFT adapter "
                              "with subtract_projection=true (its configs do not keep the option), so it would "
                              "compute another function")
        return {**REFT_DEFAULTS, **{key: getattr(config, key) for key in PASSED},
                "non_linearity": config.non_linearity}

    def key_in(self, rest: str, options: Mapping[str, Any]) -> str | None:
        index = unit_of(rest)
        return rest if index is None or index in used_units(options) else None

    def keys_out(self, key: str, options: Mapping[str, Any]) -> list[str]:
        index = unit_of(key)
        if index is None or options.get("tied_weights"):
            return [key]
        tail = key.split(".", 2)[2]
        unused = [i for i in (0, 1) if i not in used_units(options)]
        return [key, *(f"units.{i}.{tail}" for i in unused)]


def unit_of(key: str) -> int | None:
    """The unit index of a tensor key ``units.<i>.<...>``."""
    head, index, *_ = key.split(".", 2) + [""]
    return int(index) if head == "units" and index.isdigit() else None


def used_units(options: Mapping[str, Any]) -> tuple[int, ...]:
    return unit_indices(bool(options.get("tied_weights")), int(options.get("prefix_positions", 3)),
                        int(options.get("suffix_positions", 0)))
