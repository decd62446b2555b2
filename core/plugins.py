"""Plugin discovery and the registries filled by plugins.

Plugins come from the ``peftkit`` entry-point group (built-in methods too).
``PEFTKIT_PLUGINS`` is an allow-list: unset loads every installed plugin, an
empty value loads the built-ins only, and ``a,b`` loads the built-ins plus the
plugins whose entry-point or distribution name is listed.

A plugin that fails to import, declares an incompatible plugin-API version,
implements a hook with a wrong name or signature, raises inside a hook, or
registers a name that is already taken never takes the core down: it is
recorded as broken with its error, and ``peftkit plugins`` lists it.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterator

import pluggy

from . import hookspecs
from .errors import PluginError

BUILTIN_DISTRIBUTION = "peftkit"
ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME

#: Built-in plugin modules, used only when peftkit runs from a source tree
#: without its distribution metadata (normally they come from entry points).
_BUILTIN_FALLBACK = {
    "lora": "peftkit.plugins.lora",
    "builtin_architectures": "peftkit.core.architectures",
}


@dataclass
class PluginRecord:
    """What ``peftkit plugins`` reports about one plugin."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    api_version: int | None = None
    builtin: bool = False
    hooks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    merge_strategies: list[str] = field(default_factory=list)
    architectures: list[str] = field(default_factory=list)
    hub_backends: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return bool(self.errors)

    def to_dict(self, verbose: bool = False) -> dict[str, Any]:
        data = {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "api_version": self.api_version,
            "builtin": self.builtin,
            "hooks": sorted(self.hooks),
            "methods": self.methods,
            "merge_strategies": self.merge_strategies,
            "architectures": self.architectures,
            "hub_backends": self.hub_backends,
            "status": "broken" if self.broken else "ok",
            "errors": self.errors,
        }
        if verbose:
            data["tracebacks"] = self.tracebacks
        return data


class Registry:
    """Everything the loaded plugins registered, and who registered it."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.methods: dict[str, Any] = {}
        self.merge_strategies: dict[str, Callable[..., Any]] = {}
        self.architectures: dict[str, Any] = {}
        self.hub_backends: dict[str, Callable[..., Any]] = {}
        self.owner: dict[tuple[str, str], str] = {}  # (kind, name) -> plugin name

    # -- loading -------------------------------------------------------------

    def add_plugin(self, obj: Any, name: str, *, distribution: str | None = None,
                   version: str | None = None, builtin: bool = False) -> PluginRecord:
        """Register one plugin object (a module or any object with hookimpls)."""
        record = PluginRecord(name=name, module=getattr(obj, "__name__", type(obj).__name__),
                              distribution=distribution, version=version, builtin=builtin)
        self.records[name] = record
        api = getattr(obj, "PEFTKIT_PLUGIN_API", None)
        record.api_version = api if isinstance(api, int) else None
        if api is None:
            record.errors.append(
                f"plugin {name!r} does not declare the plugin API it was written for; "
                f"add PEFTKIT_PLUGIN_API = {hookspecs.PLUGIN_API_VERSION} to {record.module}")
            return record
        if api != hookspecs.PLUGIN_API_VERSION:
            record.errors.append(
                f"plugin {name!r} ({distribution or record.module} {version or ''}) was written for "
                f"peftkit plugin API {api}, this peftkit implements API {hookspecs.PLUGIN_API_VERSION}; "
                f"upgrade the plugin (pip install -U {distribution or name}) or install a peftkit that "
                f"supports API {api}")
            return record
        try:
            self.pm.register(obj, name=name)
        except ValueError as exc:  # already registered under this name
            record.errors.append(f"plugin {name!r} could not be registered: {exc}")
            return record
        except pluggy.PluginValidationError as exc:
            record.errors.append(f"plugin {name!r} implements a hook with a wrong signature: {exc}; "
                                 f"see docs/plugins.md for each hook's signature")
            return record
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(obj)
            record.errors.append(f"plugin {name!r} implements an unknown hook: {exc}; "
                                 f"the hooks are listed in docs/plugins.md")
            return record
        record.hooks = [impl_name for impl_name, caller in vars(self.pm.hook).items()
                        if not impl_name.startswith("_")
                        and any(impl.plugin_name == name for impl in caller.get_hookimpls())]
        self._run_register_hooks(name, record)
        return record

    def _run_register_hooks(self, plugin_name: str, record: PluginRecord) -> None:
        """Call this plugin's register hooks, each isolated from the others."""
        plan = [
            ("peftkit_register_methods", self._register_method),
            ("peftkit_register_merge_strategies", self._register_merge_strategy),
            ("peftkit_register_architectures", self._register_architecture),
            ("peftkit_register_hub_backends", self._register_hub_backend),
        ]
        for hook_name, adder in plan:
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                if impl.plugin_name != plugin_name:
                    continue

                def register(*args: Any, _adder: Callable[..., None] = adder) -> None:
                    _adder(record, *args)

                try:
                    impl.function(register=register)
                except Exception as exc:  # a plugin's bug must not take the core down
                    record.errors.append(f"plugin {plugin_name!r} raised in {hook_name}: "
                                         f"{type(exc).__name__}: {exc}")
                    record.tracebacks.append(traceback.format_exc())

    def _claim(self, record: PluginRecord, kind: str, key: str) -> bool:
        owner = self.owner.get((kind, key))
        if owner is not None and owner != record.name:
            record.errors.append(
                f"plugin {record.name!r} registers {kind} {key!r}, which plugin {owner!r} already "
                f"provides; the first one is kept. Rename it in {record.name!r}, or uninstall one of them")
            return False
        self.owner[(kind, key)] = record.name
        return True

    def _register_method(self, record: PluginRecord, method: Any) -> None:
        name = getattr(method, "name", None)
        if not isinstance(name, str) or not name:
            record.errors.append(f"plugin {record.name!r} registered a method without a name: {method!r}")
            return
        if self._claim(record, "method", name):
            method.plugin_name = record.name
            method.distribution = record.distribution
            method.distribution_version = record.version
            self.methods[name] = method
            record.methods.append(name)

    def _register_merge_strategy(self, record: PluginRecord, name: str, fn: Callable[..., Any]) -> None:
        if self._claim(record, "merge strategy", name):
            self.merge_strategies[name] = fn
            record.merge_strategies.append(name)

    def _register_architecture(self, record: PluginRecord, spec: Any) -> None:
        key = spec.model_type
        existing = self.architectures.get(key)
        if existing is not None and self.owner.get(("architecture", key)) != record.name:
            # Plugins may extend a family: later specs fill in what earlier ones leave empty.
            self.architectures[key] = existing.extended_by(spec)
        else:
            self.architectures[key] = spec
            self.owner[("architecture", key)] = record.name
        record.architectures.append(key)

    def _register_hub_backend(self, record: PluginRecord, scheme: str, factory: Callable[..., Any]) -> None:
        if self._claim(record, "hub backend", scheme):
            self.hub_backends[scheme] = factory
            record.hub_backends.append(scheme)

    def load_entry_points(self) -> None:
        allow = _allow_list()
        seen_builtin = False
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            builtin = dist == BUILTIN_DISTRIBUTION
            seen_builtin |= builtin
            if not builtin and allow is not None and ep.name not in allow and (dist or "") not in allow:
                continue
            if ep.name in self.records:
                continue  # the same distribution seen twice on sys.path
            try:
                obj = ep.load()
            except Exception as exc:
                record = PluginRecord(name=ep.name, module=ep.value, distribution=dist, version=version,
                                      builtin=builtin)
                record.errors.append(f"plugin {ep.name!r} ({dist} {version}) failed to import: "
                                     f"{type(exc).__name__}: {exc}; reinstall or upgrade it "
                                     f"(pip install -U {dist or ep.name}) or uninstall it")
                record.tracebacks.append(traceback.format_exc())
                self.records[ep.name] = record
                continue
            self.add_plugin(obj, ep.name, distribution=dist, version=version, builtin=builtin)
        if not seen_builtin:
            # peftkit runs from a bare source tree, without distribution metadata.
            version = _own_version()
            for name, module in _BUILTIN_FALLBACK.items():
                if name not in self.records:
                    self.add_plugin(importlib.import_module(module), name,
                                    distribution=BUILTIN_DISTRIBUTION, version=version, builtin=True)

    # -- queries -------------------------------------------------------------

    def get_method(self, name: str) -> Any:
        try:
            return self.methods[name]
        except KeyError:
            raise PluginError(unknown_method_message(name, self)) from None


def unknown_method_message(name: str, registry: Registry, distribution: str | None = None) -> str:
    known = ", ".join(sorted(registry.methods)) or "none"
    broken = [r for r in registry.records.values() if r.broken]
    hint = (f"install the plugin that provides it (pip install {distribution})" if distribution
            else "install the plugin distribution that provides it (see `peftkit plugins`)")
    msg = f"unknown tuning method {name!r}; installed methods: {known}. To use {name!r}, {hint}"
    if broken:
        msg += "; broken plugins: " + ", ".join(r.name for r in broken) + " (run `peftkit plugins`)"
    return msg


def _allow_list() -> set[str] | None:
    raw = os.environ.get("PEFTKIT_PLUGINS")
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _own_version() -> str | None:
    try:
        return metadata.version(BUILTIN_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


_lock = threading.RLock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loading plugins on first use."""
    global _registry
    with _lock:
        if _registry is None:
            registry = Registry()
            registry.load_entry_points()
            _registry = registry
        return _registry


def reload_plugins() -> Registry:
    """Forget every loaded plugin and discover them again (after an install, or in tests)."""
    global _registry
    with _lock:
        _registry = None
    return get_registry()


@contextlib.contextmanager
def use_plugin(obj: Any, name: str | None = None) -> Iterator[PluginRecord]:
    """Register a plugin object for the duration of a ``with`` block (tests, notebooks).

    Yields the plugin's record; its ``errors`` say whether it was accepted.
    """
    registry = get_registry()
    plugin_name = name or getattr(obj, "__name__", None) or type(obj).__name__
    record = registry.add_plugin(obj, plugin_name)
    try:
        yield record
    finally:
        with contextlib.suppress(Exception):
            registry.pm.unregister(name=plugin_name)
        registry.records.pop(plugin_name, None)
        for kind_key, owner in list(registry.owner.items()):
            if owner == plugin_name:
                del registry.owner[kind_key]
                kind, key = kind_key
                table = {"method": registry.methods, "merge strategy": registry.merge_strategies,
                         "hub backend": registry.hub_backends}.get(kind)
                if table is not None:
                    table.pop(key, None)
        if record.architectures:
            # Architectures may have been merged into built-in specs: rebuild them.
            fresh = Registry()
            fresh.load_entry_points()
            registry.architectures = fresh.architectures


def get_method(name: str) -> Any:
    return get_registry().get_method(name)
