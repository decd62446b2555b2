"""The import rules of docs/architecture.md, read from the source with ``ast``.

Every import counts: at module level, inside functions, relative or absolute,
and under ``if TYPE_CHECKING:``. The folders are
mapped to their import names by pyproject.toml's ``package-dir``, as setuptools
maps them; the example plugin (examples/peftkit-loha) is checked as a plugin.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ("peftkit_loha", ROOT / "examples" / "peftkit-loha" / "peftkit_loha")
#: What a plugin may import besides the plugin API and its own package.
PLUGIN_THIRD_PARTY = ("torch", "transformers", "safetensors")
PLUGIN_API = "peftkit.plugin_api"


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    #: (imported module, imported names or None, line, under TYPE_CHECKING)
    imports: list[tuple[str, tuple[str, ...] | None, int, bool]] = field(default_factory=list)
    #: (module alias target, attribute, line): ``alias._name`` where alias is an imported peftkit module
    attributes: list[tuple[str, str, int]] = field(default_factory=list)


def package_roots() -> dict[str, Path]:
    """Import name -> folder, from pyproject.toml's package-dir mapping (plus the example plugin)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    roots[EXAMPLE_PLUGIN[0]] = EXAMPLE_PLUGIN[1]
    return roots


def module_files() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__), for every module of every mapped package."""
    roots = package_roots()
    out: dict[str, tuple[Path, bool]] = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [package, *rel.parts]
            sub = ".".join(parts[:-1]) if rel.name == "__init__" else ".".join(parts)
            if any(p in ("__pycache__",) for p in rel.parts):
                continue
            # A sub-folder mapped to its own package (registry/web) is read under that name only.
            owner = max((p for p in roots if sub == p or sub.startswith(p + ".")), key=len)
            if owner != package:
                continue
            out[sub] = (path, rel.name == "__init__")
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def read_module(name: str, path: Path, is_package: bool, known: set[str]) -> Module:
    module = Module(name, path, is_package)
    tree = ast.parse(path.read_text(), str(path))
    guarded = _type_checking_lines(tree)
    package = name if is_package else name.rpartition(".")[0]
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module.imports.append((alias.name, None, node.lineno, node.lineno in guarded))
                if alias.asname and alias.name in known:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = tuple(a.name for a in node.names)
            plain = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:  # "from . import hookspecs": the submodule is what is imported
                    module.imports.append((sub, None, node.lineno, node.lineno in guarded))
                    aliases[alias.asname or alias.name] = sub
                else:
                    plain.append(alias.name)
            if plain or not names:
                module.imports.append((source, tuple(plain), node.lineno, node.lineno in guarded))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module.attributes.append((aliases[node.value.id], node.attr, node.lineno))
    return module


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    files = module_files()
    known = set(files)
    return {name: read_module(name, path, is_package, known) for name, (path, is_package) in files.items()}


def _part(name: str) -> str:
    """The architecture part a peftkit module belongs to: core, plugins, hub_client, hub_rules, registry or face."""
    if name == PLUGIN_API:
        return "plugin_api"
    if name == EXAMPLE_PLUGIN[0] or name.startswith(EXAMPLE_PLUGIN[0] + "."):
        return "plugins"
    for part in ("core", "plugins", "hub_client", "hub_rules", "registry"):
        prefix = f"peftkit.{part}"
        if name == prefix or name.startswith(prefix + "."):
            return part
    return "face" if name == "peftkit" or name.startswith("peftkit.") else "outside"


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _where(module: Module, line: int) -> str:
    return f"{module.path.relative_to(ROOT)}:{line}"


def _violations(modules: dict[str, Module], part: str, refused) -> list[str]:
    return [f"{_where(m, line)} imports {target}" for m in modules.values() if _part(m.name) == part
            for target, _, line, _ in m.imports if refused(m, target)]


def test_the_parts_are_found(modules):
    parts = {_part(name) for name in modules}
    assert parts == {"face", "plugin_api", "core", "plugins", "hub_client", "hub_rules", "registry"}
    assert {"peftkit.core.plugins", "peftkit.plugins.lora.method", "peftkit.registry.hub_api",
            "peftkit.hub_client.api", "peftkit_loha.method"} <= set(modules)
    # Function-level and relative imports are read: Method.sites imports find_targets inside the method.
    assert any(t == "peftkit.core.targets" for t, *_ in modules["peftkit.core.method"].imports)


def test_core_never_imports_hub_client_registry_or_the_face(modules):
    """The core may import the hub rules (a leaf importing nothing of peftkit, so no cycle can pass through it:
    test_the_hub_rules_import_nothing_of_peftkit), and nothing else outside itself."""
    assert _violations(modules, "core", lambda m, t: _part(t) in ("hub_client", "registry", "face",
                                                                  "plugin_api", "plugins")) == []
    # The one rule the core and the registry share is held once: the core reads PEFT's types from the hub rules.
    assert any(t == "peftkit.hub_rules.peft_types" for t, *_ in modules["peftkit.core.peft_format"].imports)


def test_registry_never_imports_torch_or_the_rest_of_peftkit(modules):
    heavy = ("torch", "transformers", "safetensors", "peft")
    assert _violations(modules, "registry", lambda m, t: _top(t) in heavy
                       or _part(t) in ("core", "plugins", "face", "plugin_api", "hub_client")) == []


#: The one hub client module that may import the registry, and what of it: the embedded hub is a registry
#: store used in-process. Nothing else of the hub client imports the registry (never its server).
EMBEDDED_HUB = ("peftkit.hub_client.local", {"peftkit.registry.store", "peftkit.registry.errors"})


def test_the_hub_client_imports_only_the_registry_store(modules):
    def refused(m: Module, target: str) -> bool:
        if _part(target) != "registry":
            return False
        return m.name != EMBEDDED_HUB[0] or target not in EMBEDDED_HUB[1]

    assert _violations(modules, "hub_client", refused) == []


def test_the_hub_rules_import_nothing_of_peftkit(modules):
    """What the hub client and the registry share (name rules, card fields, the data folder) depends on neither."""
    def refused(m: Module, target: str) -> bool:
        return not (_part(target) == "hub_rules" or _top(target) == "yaml" or _top(target) in sys.stdlib_module_names)

    assert _violations(modules, "hub_rules", refused) == []


def test_the_architecture_test_catches_a_hub_client_importing_the_registry(modules):
    fake = Module("peftkit.hub_client.fake", ROOT / "hub_client" / "fake.py", False,
                  imports=[("peftkit.registry.names", ("is_commit_sha",), 1, False)])
    local = Module(EMBEDDED_HUB[0], ROOT / "hub_client" / "local.py", False,
                   imports=[("peftkit.registry", ("RegistryStore",), 1, False)])
    with pytest.raises(AssertionError):
        test_the_hub_client_imports_only_the_registry_store({"peftkit.hub_client.fake": fake})
    with pytest.raises(AssertionError):  # the package's __init__ would import the server too
        test_the_hub_client_imports_only_the_registry_store({EMBEDDED_HUB[0]: local})


def _plugin_package(name: str) -> str:
    """A plugin's own package: peftkit.plugins.lora for peftkit.plugins.lora.layer, peftkit_loha for its modules."""
    parts = name.split(".")
    return parts[0] if parts[0] == EXAMPLE_PLUGIN[0] else ".".join(parts[:3])


def test_plugins_import_only_the_plugin_api(modules):
    def refused(m: Module, target: str) -> bool:
        if target == PLUGIN_API or target == "__future__":
            return False
        own = _plugin_package(m.name)
        if target == own or target.startswith(own + "."):
            return False
        return not (_top(target) in PLUGIN_THIRD_PARTY or _top(target) in sys.stdlib_module_names)

    assert _violations(modules, "plugins", refused) == []


def test_the_plugin_api_imports_only_the_core(modules):
    api = modules[PLUGIN_API]
    outside = [t for t, *_ in api.imports if _top(t) == "peftkit" and _part(t) != "core"]
    assert outside == []


def test_every_name_of_the_plugin_api_loads():
    import peftkit.plugin_api as plugin_api

    missing = [name for name in plugin_api.__all__ if not hasattr(plugin_api, name)]
    assert missing == []
    with pytest.raises(AttributeError, match="`peftkit docs plugins#the-plugin-api` lists the plugin API"):
        plugin_api.TunerLayerr  # noqa: B018


def builtin_method_names(modules: dict[str, Module]) -> set[str]:
    """The ``name = "..."`` of every Method subclass in the built-in plugins."""
    names = set()
    for m in modules.values():
        if m.name.startswith("peftkit.plugins."):
            for node in ast.walk(ast.parse(m.path.read_text())):
                if isinstance(node, ast.ClassDef):
                    for stmt in node.body:
                        if isinstance(stmt, ast.Assign) and [ast.unparse(t) for t in stmt.targets] == ["name"] \
                                and isinstance(stmt.value, ast.Constant):
                            names.add(stmt.value.value)
    return names


def test_the_core_names_no_plugin(modules):
    """No method-name check in the core (``method.name in ELEMENTWISE_METHODS``, ``get_method("union")``):
    what differs between methods is a capability declared on Method or LayerAdapter."""
    names = builtin_method_names(modules)
    assert {"lora", "ia3", "bitfit", "union", "seq_bn"} <= names

    def named(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Constant) and n.value in names for n in ast.walk(node))

    found = []
    for m in modules.values():
        if _part(m.name) != "core":
            continue
        for node in ast.walk(ast.parse(m.path.read_text())):
            if isinstance(node, ast.Compare) and named(node):
                found.append(f"{_where(m, node.lineno)}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in (
                    "get_method", "frozenset", "set") and any(named(a) for a in node.args):
                found.append(f"{_where(m, node.lineno)}: {ast.unparse(node)}")
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
                    isinstance(e, ast.Constant) and e.value in names for e in node.elts):
                found.append(f"{_where(m, node.lineno)}: {ast.unparse(node)}")  # a list of methods to check against
    assert found == []


def test_every_name_of_the_plugin_api_is_documented():
    import peftkit.plugin_api as plugin_api

    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text[text.index("## The plugin API"):]
    assert [name for name in plugin_api.__all__ if f"`{name}" not in section] == []


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_uses_another_modules_underscore_names(modules):
    found = []
    for m in modules.values():
        for target, names, line, _ in m.imports:
            if target != m.name and target in modules:
                found += [f"{_where(m, line)} imports {target}.{n}" for n in names or () if _private(n)]
        for target, attr, line in m.attributes:
            if target != m.name and _private(attr):
                found.append(f"{_where(m, line)} uses {target}.{attr}")
    assert found == []


def import_graph(modules: dict[str, Module], type_checking: bool = True) -> dict[str, set[str]]:
    """Module -> the peftkit modules it imports: every import, or with ``type_checking=False`` those that run
    (``if TYPE_CHECKING:`` imports left out)."""
    return {name: {t for t, _, _, guarded in m.imports if t in modules and t != name and (type_checking or not guarded)}
            for name, m in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(out)


def test_the_cycle_finder_finds_a_cycle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_in_an_import_cycle(modules):
    """No import cycle anywhere, through imports inside functions and imports for type checking too
    (docs/architecture.md says how the design keeps it so: blocks are data run by an executor, layers reach it
    through their state, the registry is asked by what sits above it, a model is handed to what acts on it,
    typed by the protocol of what they use of it)."""
    assert import_cycles(import_graph(modules)) == []


def test_the_cycle_check_counts_imports_for_type_checking(modules):
    """An import under ``if TYPE_CHECKING:`` from a feature module back up to core/model.py closes a cycle (the
    one that AdaptedModelProtocol opened), and the check finds it; counting only what runs, it would not."""
    graph = import_graph(modules)
    graph["peftkit.core.fusion"] = graph["peftkit.core.fusion"] | {"peftkit.core.model"}
    assert any("peftkit.core.model" in cycle and "peftkit.core.fusion" in cycle for cycle in import_cycles(graph))
    modules = dict(modules)
    fusion = modules["peftkit.core.fusion"]
    modules["peftkit.core.fusion"] = Module(fusion.name, fusion.path, fusion.is_package,
                                            [*fusion.imports, ("peftkit.core.model", ("AdaptedModel",), 1, True)])
    assert import_cycles(import_graph(modules, type_checking=False)) == []
    assert import_cycles(import_graph(modules)) != []


#: The modules behind AdaptedModel's features, which type the model they are handed as AdaptedModelProtocol.
FEATURE_MODULES = ("adapterhub_fusion", "composition_api", "composition_io", "fusion", "hotswap", "merging",
                   "peft_embeddings", "serialization")


def _protocol_members() -> dict[str, object]:
    from peftkit.core.adapted_protocol import AdaptedModelProtocol

    names = {n for n in vars(AdaptedModelProtocol) if not n.startswith("_")} | set(
        AdaptedModelProtocol.__annotations__)
    return {name: vars(AdaptedModelProtocol).get(name) for name in names}


def _parameters(member: object) -> list[tuple[str, object, object]]:
    import inspect

    function = member.fget if isinstance(member, property) else member
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()][1:]


def test_adapted_model_provides_every_member_of_its_protocol_with_the_same_parameters():
    import torch.nn as nn

    from peftkit.core.model import AdaptedModel

    members = _protocol_members()
    assert {"base_model", "adapter_state", "adapter_record", "tuner_layers", "set_active"} <= set(members)
    model = AdaptedModel(nn.Sequential(nn.Linear(2, 2)))
    for name, member in members.items():
        if member is None:  # an attribute the protocol declares
            assert hasattr(model, name), name
            continue
        own = getattr(AdaptedModel, name)
        assert isinstance(own, property) == isinstance(member, property), name
        assert _parameters(own) == _parameters(member), name


def _uses_of_protocol_parameters(tree: ast.AST) -> list[tuple[str, int]]:
    """(attribute, line) for every ``p.attribute`` in a function whose parameter p is typed as the protocol."""
    uses = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        arguments = [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs]
        typed = {a.arg for a in arguments if a.annotation is not None
                 and "AdaptedModelProtocol" in ast.unparse(a.annotation)}
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in typed:
                uses.append((node.attr, node.lineno))
    return uses


def test_the_feature_modules_use_only_what_the_protocol_lists(modules):
    """What fusion, merging, serialization and the rest use of the model they are handed is in
    AdaptedModelProtocol (the mixin's own methods on ``self`` count as uses too), and none of them names
    ``AdaptedModel`` in an import."""
    members = set(_protocol_members())
    unlisted, importing = [], []
    for short in FEATURE_MODULES:
        module = modules[f"peftkit.core.{short}"]
        tree = ast.parse(module.path.read_text())
        unlisted += [f"{_where(module, line)} uses model.{attr}" for attr, line in _uses_of_protocol_parameters(tree)
                     if attr not in members]
        importing += [_where(module, line) for target, names, line, _ in module.imports
                      if target == "peftkit.core.model" or "AdaptedModel" in (names or ())]
    assert unlisted == [] and importing == []


def test_the_protocol_check_finds_an_unlisted_use():
    tree = ast.parse('def f(model: "AdaptedModelProtocol", n):\n    return model._records[n], n.other\n')
    assert _uses_of_protocol_parameters(tree) == [("_records", 2)]


if __name__ == "__main__":  # python tests/test_architecture.py: print today's import cycles
    found = {name: read_module(name, path, pkg, set(module_files())) for name, (path, pkg) in module_files().items()}
    for cycle in import_cycles(import_graph(found)):
        print(" <-> ".join(cycle))


def core_layers_from_the_docs() -> dict[str, tuple[int, int]]:
    """docs/architecture.md's bottom-up listing of the core: module -> (its line, its place on the line)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("the bottom up", 1)[1].split("```", 2)[1]
    places: dict[str, tuple[int, int]] = {}
    for row, line in enumerate(block.strip().splitlines()):
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        for column, name in enumerate(n.strip() for n in names.split(",")):
            if name and name != "...":
                places[f"peftkit.core.{name}"] = (row, column)
    return places


def test_the_core_layers_architecture_md_lists_hold(modules):
    """Each module listed imports (at run time, in a function or for type checking) only listed modules on lines
    above its own or to its left on its own line, as the page says."""
    places = core_layers_from_the_docs()
    assert len(places) > 20 and all(name in modules for name in places), sorted(set(places) - set(modules))
    graph = import_graph(modules)
    wrong = [f"{name} imports {target}" for name, place in places.items() for target in sorted(graph[name])
             if target in places and places[target] >= place]
    assert wrong == []
