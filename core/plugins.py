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
import difflib
import importlib
import inspect
import os
import re
import sys
import threading
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterator

import pluggy

from . import hookspecs
from .architectures import ArchitectureSpec
from .config import AdapterConfig
from .errors import ConfigError, PluginError
from .method import Method
from .shorthand import parse_shorthand, split_top_level
from .suggestions import method_by_any_case, method_suggestion

BUILTIN_DISTRIBUTION = "peftkit"
ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME

#: Built-in plugin modules, used only when peftkit runs from a source tree
#: without its distribution metadata (normally they come from entry points).
_BUILTIN_FALLBACK = {
    "lora": "peftkit.plugins.lora",
    "prefix_tuning": "peftkit.plugins.prefix_tuning",
    "prompt_tuning": "peftkit.plugins.prompt_tuning",
    "bottleneck": "peftkit.plugins.bottleneck",
    "bitfit": "peftkit.plugins.bitfit",
    "union": "peftkit.plugins.union",
    "ia3": "peftkit.plugins.ia3",
    "lokr": "peftkit.plugins.lokr",
    "vera": "peftkit.plugins.vera",
    "oft": "peftkit.plugins.oft",
    "adalora": "peftkit.plugins.adalora",
    "boft": "peftkit.plugins.boft",
    "reft": "peftkit.plugins.reft",
    "trainable_tokens": "peftkit.plugins.trainable_tokens",
    "fourierft": "peftkit.plugins.fourierft",
    "ln_tuning": "peftkit.plugins.ln_tuning",
    "hra": "peftkit.plugins.hra",
    "miss": "peftkit.plugins.miss",
    "vblora": "peftkit.plugins.vblora",
    "randlora": "peftkit.plugins.randlora",
    "c3a": "peftkit.plugins.c3a",
    "shira": "peftkit.plugins.shira",
    "road": "peftkit.plugins.road",
    "beft": "peftkit.plugins.beft",
    "glora": "peftkit.plugins.glora",
    "delora": "peftkit.plugins.delora",
    "gralora": "peftkit.plugins.gralora",
    "hira": "peftkit.plugins.hira",
    "adaption_prompt": "peftkit.plugins.adaption_prompt",
    "builtin_architectures": "peftkit.core.architectures",
    "builtin_merges": "peftkit.core.merge_strategies",
    "builtin_hub_backends": "peftkit.hub_client.backends",
}


#: The warning for a plugin that imports torch while peftkit loads it (only the first such plugin of a process
#: is seen: torch is loaded after it).
_TORCH_AT_LOAD = ("plugin {name!r} imports torch when peftkit loads it, so every peftkit command, even "
                  "`peftkit --help`, waits for torch; import torch inside the functions that need it, not at the "
                  "top of {module} or the modules it imports (`peftkit docs plugins#4-the-entry-point-module`)")


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
    commands: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Problems that leave the plugin working (it imports torch when loaded).
    warnings: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)

    @property
    def broken(self) -> bool:
        return bool(self.errors)

    @property
    def origin(self) -> str:
        """Where the plugin comes from: "peftkit-loha 1.0.0", or its module without a distribution."""
        if self.distribution is None:
            return self.module
        return f"{self.distribution} {self.version}" if self.version else self.distribution

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
            "commands": self.commands,
            "status": "broken" if self.broken else "ok",
            "errors": self.errors,
            "warnings": self.warnings,
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
        #: The PEFTKIT_PLUGINS allow-list in force when plugins were loaded (None: all).
        self.allow_list: set[str] | None = None
        #: Installed plugins left out by the allow-list: (entry point, distribution, version).
        self.skipped: list[tuple[str, str | None, str | None]] = []

    # -- loading -------------------------------------------------------------

    def add_plugin(self, obj: Any, name: str, *, distribution: str | None = None,
                   version: str | None = None, builtin: bool = False) -> PluginRecord:
        """Register one plugin object (a module or any object with hookimpls).

        Problems never raise (except a name that is already loaded): they are
        recorded in the returned record's ``errors``, with the fix.
        """
        if name in self.records:
            raise PluginError(f"a plugin named {name!r} is already loaded "
                              f"({self.records[name].distribution or self.records[name].module}); "
                              f"register this one under another name")
        record = PluginRecord(name=name, module=getattr(obj, "__name__", type(obj).__name__),
                              distribution=distribution, version=version, builtin=builtin)
        self.records[name] = record
        api = getattr(obj, "PEFTKIT_PLUGIN_API", None)
        record.api_version = api if isinstance(api, int) and not isinstance(api, bool) else None
        error = _api_error(name, record, api)
        if error:
            record.errors.append(error)
            return record
        error = self._signature_error(obj, record)
        if error:
            record.errors.append(error)
            return record
        try:
            self.pm.register(obj, name=name)
        except ValueError as exc:  # the same object already registered under another name
            record.errors.append(f"plugin {name!r} could not be registered: {exc}")
            return record
        except pluggy.PluginValidationError as exc:
            record.errors.append(f"plugin {name!r} implements a hook with a wrong signature: {exc}; "
                                 f"see `peftkit docs plugins#hook-reference` for each hook's signature")
            return record
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(obj)
            record.errors.append(f"plugin {name!r} implements an unknown hook: {exc}; "
                                 + (_hook_name_fixes(obj, self.pm)
                                    or "`peftkit docs plugins#hook-reference` lists the hooks"))
            return record
        record.hooks = [impl_name for impl_name, caller in vars(self.pm.hook).items()
                        if not impl_name.startswith("_")
                        and any(impl.plugin_name == name for impl in caller.get_hookimpls())]
        undecorated = sorted(attr for attr in _public_attrs(obj) if attr.startswith("peftkit_")
                             and callable(getattr(obj, attr, None))
                             and self.pm.parse_hookimpl_opts(obj, attr) is None)
        if undecorated:
            record.errors.append(
                f"plugin {name!r} defines {', '.join(undecorated)} without the @peftkit.hookimpl marker, so "
                f"peftkit never calls it; decorate it with @peftkit.hookimpl")
        elif not record.hooks:
            record.errors.append(
                f"plugin {name!r} implements no peftkit hook; its entry point must name the module that "
                f"holds the @peftkit.hookimpl functions (now: {record.module})")
        self._run_register_hooks(name, record)
        return record

    def _signature_error(self, obj: Any, record: PluginRecord) -> str | None:
        """Name the hook, the plugin's signature and the expected one when they do not fit.

        pluggy accepts a hookimpl taking a subset of the hookspec's arguments;
        an argument the hookspec does not have is an error.
        """
        for attr in _public_attrs(obj):
            if self.pm.parse_hookimpl_opts(obj, attr) is None:
                continue
            spec = getattr(hookspecs, attr, None)
            if spec is None:
                continue  # an unknown hook name: check_pending() reports it
            function = getattr(obj, attr)
            try:
                params = inspect.signature(function).parameters
            except (TypeError, ValueError):
                continue
            expected = list(inspect.signature(spec).parameters)
            extra = [p for p in params if p not in expected]
            if extra:
                return (f"plugin {record.name!r} implements {attr}({', '.join(params)}), but the hook is "
                        f"{attr}({', '.join(expected)}): unknown argument(s) {', '.join(map(repr, extra))}. "
                        f"Fix its signature in {record.module} (see `peftkit docs plugins#{attr}`)")
        return None

    def _run_register_hooks(self, plugin_name: str, record: PluginRecord) -> None:
        """Call this plugin's register hooks, each isolated from the others."""
        plan: list[tuple[str, Callable[..., None]]] = [
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
                register = _bind_register(adder, record, hook_name)
                kwargs = {"register": register} if "register" in impl.argnames else {}
                try:
                    impl.function(**kwargs)
                except Exception as exc:  # a plugin's bug must not take the core down
                    record.errors.append(f"plugin {plugin_name!r} raised in {hook_name}: "
                                         f"{type(exc).__name__}: {exc}")
                    record.tracebacks.append(traceback.format_exc())

    def _claim(self, record: PluginRecord, kind: str, key: str) -> bool:
        owner = self.owner.get((kind, key))
        if owner is not None and owner != record.name:
            first = self.records.get(owner)
            by = f" ({first.origin})" if first is not None else ""
            record.errors.append(
                f"plugin {record.name!r} ({record.origin}) registers {kind} {key!r}, which plugin {owner!r}{by} "
                f"already provides; {owner!r} keeps it and this registration was skipped. Fix: give the {kind} "
                f"another name in {record.distribution or record.module}, or uninstall one of the two")
            return False
        self.owner[(kind, key)] = record.name
        return True

    def _register_method(self, record: PluginRecord, method: Any) -> None:
        if isinstance(method, type):
            record.errors.append(f"plugin {record.name!r} registered the class {method.__name__}; register an "
                                 f"instance: register({method.__name__}())")
            return
        if not isinstance(method, Method):
            record.errors.append(f"plugin {record.name!r} registered {method!r}, which is not a "
                                 f"peftkit.Method; subclass peftkit.Method and register an instance")
            return
        name = method.name
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
            record.errors.append(f"plugin {record.name!r} registered {type(method).__name__} with name "
                                 f"{name!r}; a method name is letters, digits, '_' and '-' "
                                 f"(set the class attribute name = \"...\")")
            return
        config_class = method.config_class
        if not (isinstance(config_class, type) and issubclass(config_class, AdapterConfig)) \
                or config_class is AdapterConfig:
            record.errors.append(f"plugin {record.name!r}: method {name!r} needs its own config_class, a "
                                 f"dataclass subclassing peftkit.AdapterConfig")
            return
        if config_class.method != name:
            record.errors.append(f"plugin {record.name!r}: method {name!r} uses {config_class.__name__}, whose "
                                 f"method is {config_class.method!r}; set method: ClassVar[str] = {name!r} "
                                 f"on {config_class.__name__}")
            return
        if self._claim(record, "method", name):
            method.plugin_name = record.name
            method.distribution = record.distribution
            method.distribution_version = record.version
            self.methods[name] = method
            record.methods.append(name)

    def _register_merge_strategy(self, record: PluginRecord, name: str, fn: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name or not callable(fn):
            record.errors.append(f"plugin {record.name!r}: register(name, fn) takes a strategy name and a "
                                 f"function, got ({name!r}, {fn!r})")
            return
        if self._claim(record, "merge strategy", name):
            self.merge_strategies[name] = fn
            record.merge_strategies.append(name)

    def _register_architecture(self, record: PluginRecord, spec: ArchitectureSpec) -> None:
        if not isinstance(spec, ArchitectureSpec):
            record.errors.append(f"plugin {record.name!r} registered {spec!r} as an architecture; register "
                                 f"a peftkit.ArchitectureSpec(model_type, defaults=..., points=...)")
            return
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
        if not isinstance(scheme, str) or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or not callable(factory):
            record.errors.append(f"plugin {record.name!r}: register(scheme, factory) takes a URL scheme such "
                                 f"as 's3' and a callable, got ({scheme!r}, {factory!r})")
            return
        if self._claim(record, "hub backend", scheme):
            self.hub_backends[scheme] = factory
            record.hub_backends.append(scheme)

    def load_entry_points(self) -> None:
        """Load every plugin of the ``peftkit`` entry-point group the allow-list lets in.

        Built-ins load first, so a third-party plugin can never take a
        built-in method's name; third-party plugins load in name order.
        """
        allow = _allow_list()
        self.allow_list = allow
        entry_points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP),
                              key=lambda e: (_dist_name(e) != BUILTIN_DISTRIBUTION, e.name))
        seen_builtin = False
        for ep in entry_points:
            dist = _dist_name(ep)
            version = ep.dist.version if ep.dist is not None else None
            builtin = dist == BUILTIN_DISTRIBUTION
            seen_builtin |= builtin
            if not builtin and allow is not None and not _allowed(ep.name, dist, allow):
                self.skipped.append((ep.name, dist, version))
                continue
            if ep.name in self.records:
                other = self.records[ep.name]
                if other.distribution != dist:
                    key = f"{ep.name} ({dist})"
                    self.records[key] = PluginRecord(
                        name=key, module=ep.value, distribution=dist, version=version, errors=[
                            f"distribution {dist} declares plugin {ep.name!r}, a name that {other.distribution} "
                            f"already uses; it was not loaded. Rename its entry point in {dist}'s pyproject.toml "
                            f"([project.entry-points.peftkit]), or uninstall one of them"])
                continue  # else: the same distribution seen twice on sys.path
            if not builtin and not seen_builtin:
                self._load_fallback_builtins()
                seen_builtin = True
            torch_was_loaded = "torch" in sys.modules
            try:
                obj = ep.load()
            except Exception as exc:
                record = PluginRecord(name=ep.name, module=ep.value, distribution=dist, version=version,
                                      builtin=builtin)
                record.errors.append(f"plugin {ep.name!r} ({record.origin}) failed to import: "
                                     f"{type(exc).__name__}: {exc}; reinstall or upgrade it "
                                     f"(pip install -U {dist or ep.name}), uninstall it, or leave it out "
                                     f"with PEFTKIT_PLUGINS")
                record.tracebacks.append(traceback.format_exc())
                self.records[ep.name] = record
                continue
            record = self.add_plugin(obj, ep.name, distribution=dist, version=version, builtin=builtin)
            if not torch_was_loaded and "torch" in sys.modules:
                record.warnings.append(_TORCH_AT_LOAD.format(name=ep.name, module=ep.value))
        if not seen_builtin:
            self._load_fallback_builtins()

    def _load_fallback_builtins(self) -> None:
        """Built-ins when peftkit runs from a bare source tree, without distribution metadata."""
        version = _own_version()
        for name, module in _BUILTIN_FALLBACK.items():
            if name not in self.records:
                self.add_plugin(importlib.import_module(module), name,
                                distribution=BUILTIN_DISTRIBUTION, version=version, builtin=True)

    # -- queries -------------------------------------------------------------

    def get_method(self, name: str) -> Any:
        """The method ``name``; case does not matter (``LoRA``, ``IA3``) when it picks one method."""
        method = self.methods.get(name)
        if method is None:
            method = self.methods.get(method_by_any_case(name, self.methods) or "")
        if method is None:
            raise PluginError(unknown_method_message(name, self))
        return method


def unknown_method_message(name: str, registry: Registry, distribution: str | None = None,
                           version: str | None = None) -> str:
    """Why method ``name`` is not available, and what to do about it.

    ``distribution``/``version`` are the plugin recorded in an adapter's file,
    when the method is needed to load one.
    """
    known = ", ".join(sorted(registry.methods)) or "none"
    msg = f"unknown tuning method {name!r}; installed methods: {known}."
    for record in registry.records.values():
        if record.broken and distribution is not None and record.distribution == distribution:
            return (msg + f" {distribution} is installed but its plugin {record.name!r} is broken: "
                    f"{record.errors[0]} (details: peftkit plugins --verbose)")
    for ep_name, dist, _ in registry.skipped:
        if (distribution is not None and dist == distribution) or ep_name == name:
            return (msg + f" Plugin {ep_name!r} ({dist}) is installed but not loaded: PEFTKIT_PLUGINS="
                    f"{os.environ.get('PEFTKIT_PLUGINS', '')!r} does not list it; add {ep_name!r} to it")
    if distribution:
        made_by = f"{distribution} {version}" if version else distribution
        major = major_version(version)
        pin = f"{distribution}>={major}" if major > 0 else distribution
        msg += f" This adapter was made with the plugin {made_by}: install it (pip install '{pin}')"
    else:
        suggestion = method_suggestion(name, registry.methods)
        if suggestion:
            msg += f" {suggestion} Otherwise, to use {name!r},"
        else:
            msg += f" To use {name!r},"
        msg += " install the plugin distribution that provides it (see `peftkit docs plugins#managing-plugins`)"
    broken = [r for r in registry.records.values() if r.broken]
    if broken:  # the plugin that should provide it may be one of them: say why each is broken
        msg += "; broken plugins: " + "; ".join(f"{r.name} ({r.errors[0]})" for r in broken) \
            + " (run `peftkit plugins`)"
    return msg


def _api_error(name: str, record: PluginRecord, api: Any) -> str | None:
    """The refusal message for a missing or incompatible PEFTKIT_PLUGIN_API, with the fix."""
    ours = hookspecs.PLUGIN_API_VERSION
    who = record.origin
    if api is None:
        return (f"plugin {name!r} ({who}) does not declare the plugin API it was written for; "
                f"add PEFTKIT_PLUGIN_API = {ours} to {record.module}")
    if record.api_version is None:
        return (f"plugin {name!r} ({who}) declares PEFTKIT_PLUGIN_API = {api!r}; it must be an integer, "
                f"e.g. PEFTKIT_PLUGIN_API = {ours}")
    if api == ours:
        return None
    if api > ours:
        fix = (f"upgrade peftkit (pip install -U peftkit), or install a release of "
               f"{record.distribution or name} written for API {ours}")
    else:
        fix = (f"upgrade the plugin (pip install -U {record.distribution or name}); if no release supports "
               f"API {ours} yet, use a peftkit that implements API {api}")
    return (f"plugin {name!r} ({who}) was written for peftkit plugin API {api}, this peftkit implements "
            f"API {ours}; it was not loaded. Fix: {fix}")


def _bind_register(adder: Callable[..., None], record: PluginRecord, hook_name: str) -> Callable[..., None]:
    """The ``register`` callback handed to one plugin's hook; a call with the
    wrong arguments names the hook and its register() signature."""
    params = list(inspect.signature(adder).parameters)[1:]  # drop "record"

    def register(*args: Any, **kwargs: Any) -> None:
        try:
            inspect.signature(adder).bind(record, *args, **kwargs)
        except TypeError:
            given = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
            raise PluginError(f"in {hook_name}, call register({', '.join(params)}); got "
                              f"register({', '.join(given)}) (see `peftkit docs plugins#{hook_name}`)") from None
        adder(record, *args, **kwargs)

    return register


def _hook_name_fixes(obj: Any, pm: pluggy.PluginManager) -> str:
    """For each hook implementation of ``obj`` whose name is no peftkit hook, the closest hook name."""
    known = [n for n in vars(hookspecs) if n.startswith("peftkit_")]
    fixes = []
    for attr in _public_attrs(obj):
        if attr not in known and pm.parse_hookimpl_opts(obj, attr) is not None:
            close = difflib.get_close_matches(attr, known, n=1)
            if close:
                fixes.append(f"{attr} -> {close[0]}")
    return f"did you mean: {', '.join(fixes)}?" if fixes else ""


def _public_attrs(obj: Any) -> list[str]:
    return [attr for attr in dir(obj) if not attr.startswith("_")]


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    return ep.dist.name if ep.dist is not None else None


def normalize_distribution(name: str) -> str:
    """PEP 503 normal form of a distribution name ("Peftkit_LoHa" -> "peftkit-loha")."""
    return re.sub(r"[-_.]+", "-", name).lower()


def major_version(version: str | None) -> int:
    head = (version or "").split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _allow_list() -> set[str] | None:
    raw = os.environ.get("PEFTKIT_PLUGINS")
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _allowed(ep_name: str, dist: str | None, allow: set[str]) -> bool:
    """Whether the allow-list names this plugin, by entry-point or distribution name."""
    wanted = {normalize_distribution(a) for a in allow}
    return ep_name in allow or (dist is not None and normalize_distribution(dist) in wanted)


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


def architecture_for(model: Any) -> ArchitectureSpec | None:
    """The registered spec for a model's ``config.model_type``, if any."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        return None
    return get_registry().architectures.get(model_type)


def parse_spec(spec: str | AdapterConfig, registry: Any = None) -> tuple[Any, AdapterConfig]:
    """Resolve a shorthand spec (or a config object) to (method, config), with the loaded
    plugins' methods (or those of ``registry``)."""
    registry = registry or get_registry()
    if isinstance(spec, AdapterConfig):
        return registry.get_method(spec.method), spec
    if not isinstance(spec, str):
        raise ConfigError(f"an adapter spec must be a string like 'lora[r=8]' or a config object, "
                          f"not {type(spec).__name__}")
    parts = split_top_level(spec, "|")
    if len(parts) > 1:  # "prefix_tuning[...]|par_bn[...]": several methods as one adapter
        method = joining_method(registry, spec)
        return method, method.make_config(parts=[part.strip() for part in parts])
    name, values = parse_shorthand(spec)
    method = registry.get_method(name)
    return method, method.make_config(**values)


def joining_method(registry: Any, spec: str) -> Any:
    """The method that serves ``a|b`` specs: the first loaded one declaring ``joins_specs``."""
    for method in registry.methods.values():
        if type(method).joins_specs:
            return method
    raise ConfigError(f"{spec!r} joins several methods with '|', which needs a method that makes one adapter of "
                      f"several (the built-in 'union'); none is loaded: check `peftkit plugins`")
