"""AdapterHub's ``ConfigUnion`` (``UniPELTConfig``, ``MAMConfig``) as a union, both ways.

``adapters`` writes a union's options as ``{"architecture": "union", "configs": [...]}``: each part's own
options, in order. Each part is read and written by the installed method that reads such a folder
alone (its ``Method.adapterhub``); the core translates the site tensors part by part
(:meth:`UnionAdapterHub.parts`), and the one model-level part (a prefix) through its own hooks.
"""

from __future__ import annotations

from typing import Any, Mapping

from peftkit.plugin_api import AdapterHubFormat, ConfigError

ARCHITECTURE = "union"


def _reader(options: Mapping[str, Any]) -> Any:
    """The installed method that reads a part's options (a method declaring its own translation first, as for
    a folder of that part alone)."""
    from peftkit.plugin_api import get_registry

    found = [m for m in get_registry().methods.values() if m.adapterhub is not None and m.adapterhub.claims(options)]
    own = [m for m in found if "adapterhub" in type(m).__dict__]
    if not found:
        raise ConfigError(f"no installed peftkit method reads the union part with architecture="
                          f"{options.get('architecture')!r}")
    return (own or found)[0]


def _configs(options: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    configs = options.get("configs")
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise ConfigError("AdapterHub union option 'configs' must be a list of the parts' options")
    return configs


class UnionAdapterHub(AdapterHubFormat):
    """A union: its parts' translations, one after the other."""

    def claims(self, options: Mapping[str, Any]) -> bool:
        return options.get("architecture") == ARCHITECTURE

    def parts(self, options: Mapping[str, Any]) -> list[tuple[str, AdapterHubFormat, Mapping[str, Any]]]:
        return [(method.name, method.adapterhub, part) for part in _configs(options) for method in [_reader(part)]]

    def config_values(self, options: Mapping[str, Any], model_type: str | None) -> dict[str, Any]:
        parts = []
        for name, fmt, part in self.parts(options):
            parts.append({"method": name, **fmt.config_values(part, model_type)})
        return {"parts": parts}

    def options(self, config: Any, model_type: str | None) -> dict[str, Any]:
        configs = []
        for method, part in config.part_configs():
            if method.adapterhub is None:
                raise ConfigError(f"its part {method.name!r} has no AdapterHub translation")
            configs.append(method.adapterhub.options(part, model_type))
        return {"architecture": ARCHITECTURE, "configs": configs}

    def model_tensors_in(self, tensors: Mapping[str, Any], name: str,
                         options: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
        out: dict[str, Any] = {}
        used: set[str] = set()
        for prefix, fmt, part in self.parts(options):
            own, taken = fmt.model_tensors_in(tensors, name, part)
            out.update({f"{prefix}.{key}": tensor for key, tensor in own.items()})
            used |= taken
        return out, used

    def model_tensors_out(self, model: Any, tensors: Mapping[str, Any], name: str,
                          options: Mapping[str, Any]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for prefix, fmt, part in self.parts(options):
            own = {key[len(prefix) + 1:]: t for key, t in tensors.items() if key.startswith(prefix + ".")}
            if not own:
                continue
            written = fmt.model_tensors_out(model, own, name, part)
            if written is None:
                return None
            out.update(written)
        return out
