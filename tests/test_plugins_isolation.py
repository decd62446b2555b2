"""Broken plugins as real installed distributions never take peftkit down.

The fixture distributions of tests/plugin_fixtures/ are pip-installed into a
temporary folder (``pip install --target``); peftkit then finds them through
their ``peftkit`` entry points, in a subprocess with that folder on
PYTHONPATH, or in this process through a fresh ``Registry`` with the folder
on sys.path. Also: the PEFTKIT_PLUGINS allow-list, and loading an adapter
whose plugin is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peftkit.core.errors import AdapterLoadError
from peftkit.core.plugins import Registry
from tests.plugin_fixtures import ROOT, clean_env, install_target

BROKEN = {"broken_import", "dup_method", "future_api", "bad_signature"}


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_target(tmp_path_factory.mktemp("plugins") / "site")


def peftkit_cli(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=clean_env(PYTHONPATH=str(site), **env))


def fresh_registry(site: Path, monkeypatch: pytest.MonkeyPatch, allow: str | None = None) -> Registry:
    monkeypatch.syspath_prepend(str(site))
    if allow is None:
        monkeypatch.delenv("PEFTKIT_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("PEFTKIT_PLUGINS", allow)
    registry = Registry()
    registry.load_entry_points()
    return registry


def test_broken_plugins_are_listed_and_the_core_keeps_working(fixtures_dir):
    methods = peftkit_cli(fixtures_dir, "methods", "--json")
    assert methods.returncode == 0, methods.stderr
    by_name = {m["name"]: m for m in json.loads(methods.stdout)}
    assert by_name["lora"]["distribution"] == "peftkit"  # not the fixture's impostor "lora"
    assert by_name["hello"]["distribution"] == "peftkit-hello" and by_name["hello"]["version"] == "1.2.0"

    listing = peftkit_cli(fixtures_dir, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert {n for n, r in rows.items() if r["status"] == "broken"} == BROKEN
    assert rows["hello"]["status"] == "ok" and rows["hello"]["commands"] == ["hello"]
    assert rows["lora"]["status"] == "ok" and rows["lora"]["methods"] == ["lora"]
    errors = {name: rows[name]["errors"][0] for name in BROKEN}
    assert errors["broken_import"].startswith("plugin 'broken_import' (peftkit-broken-import 0.3.0) failed to "
                                              "import: ModuleNotFoundError: No module named "
                                              "'peftkit_dependency_that_is_not_installed'")
    assert "pip install -U peftkit-broken-import" in errors["broken_import"]
    assert "PEFTKIT_PLUGINS" in errors["broken_import"]
    assert errors["dup_method"].startswith("plugin 'dup_method' (peftkit-dup-method 0.3.0) registers method "
                                           "'lora', which plugin 'lora' (peftkit ")
    assert "give the method another name in peftkit-dup-method" in errors["dup_method"]
    assert errors["future_api"].startswith("plugin 'future_api' (peftkit-future-api 0.3.0) was written for "
                                           "peftkit plugin API 2, this peftkit implements API 1")
    assert "upgrade peftkit" in errors["future_api"]
    assert "implements peftkit_register_methods(registry), but the hook is peftkit_register_methods(register)" \
        in errors["bad_signature"]
    assert "tracebacks" not in rows["broken_import"]


def test_plugins_table_shows_errors_and_verbose_tracebacks(fixtures_dir):
    table = peftkit_cli(fixtures_dir, "plugins")
    assert table.returncode == 0
    lines = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert lines["broken_import"][4] == "broken" and lines["hello"][4] == "ok"
    assert "broken_import: plugin 'broken_import' (peftkit-broken-import 0.3.0) failed to import" in table.stderr
    assert "run `peftkit plugins --verbose` for tracebacks" in table.stderr
    assert "Traceback" not in table.stderr

    verbose = peftkit_cli(fixtures_dir, "plugins", "--verbose")
    assert verbose.returncode == 0
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "import peftkit_dependency_that_is_not_installed" in verbose.stderr

    inspect = peftkit_cli(fixtures_dir, "plugins", "inspect", "peftkit-broken-import", "--verbose")
    assert inspect.returncode == 0
    assert "status: broken" in inspect.stdout and "Traceback" in inspect.stdout


def test_a_plugin_that_imports_torch_when_loaded_is_named(fixtures_dir):
    """Loading plugins is part of every peftkit command: one importing torch at module level makes even
    `peftkit --help` wait for torch. It keeps working, and `peftkit plugins` says which one and how to fix it."""
    listing = peftkit_cli(fixtures_dir, "plugins", "--json")
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["eager_torch"]["status"] == "ok" and rows["eager_torch"]["merge_strategies"] == ["eager_torch_sum"]
    assert [name for name, r in rows.items() if r["warnings"]] == ["eager_torch"]
    warning = rows["eager_torch"]["warnings"][0]
    assert warning.startswith("plugin 'eager_torch' imports torch when peftkit loads it")
    assert "top of peftkit_eager_torch" in warning and "(`peftkit docs plugins#4-the-entry-point-module`)" in warning

    table = peftkit_cli(fixtures_dir, "plugins")
    assert table.returncode == 0 and "eager_torch: warning: plugin 'eager_torch' imports torch" in table.stderr
    inspect = peftkit_cli(fixtures_dir, "plugins", "inspect", "eager_torch")
    assert "warning: plugin 'eager_torch' imports torch" in inspect.stdout

    without = peftkit_cli(fixtures_dir, "plugins", "--json", PEFTKIT_PLUGINS="hello")
    assert not any(r["warnings"] for r in json.loads(without.stdout))


def test_a_plugin_command_runs(fixtures_dir):
    result = peftkit_cli(fixtures_dir, "hello", "ada")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello, ada, from peftkit-hello\n"


def test_every_hook_of_an_installed_plugin_registers(fixtures_dir, monkeypatch):
    registry = fresh_registry(fixtures_dir, monkeypatch)
    record = registry.records["hello"]
    assert (record.distribution, record.version, record.api_version, record.errors) == ("peftkit-hello", "1.2.0",
                                                                                         1, [])
    assert record.hooks == sorted(record.hooks) and len(record.hooks) == 5
    assert registry.methods["hello"].distribution == "peftkit-hello"
    assert registry.merge_strategies["hello_mean"]([2.0, 4.0], [1, 1]) == 3.0
    assert registry.architectures["hello_net"].default_targets("hello") == ("proj",)
    assert registry.hub_backends["hello"]("hello://x").url == "hello://x"


@pytest.mark.parametrize("allow, loaded", [
    ("", set()),
    ("hello", {"hello"}),
    ("peftkit-hello, future_api", {"hello", "future_api"}),
    ("PEFTKIT_HELLO", {"hello"}),  # distribution names compare in normal form
])
def test_allow_list(fixtures_dir, monkeypatch, allow, loaded):
    registry = fresh_registry(fixtures_dir, monkeypatch, allow)
    third_party = {n for n, r in registry.records.items() if not r.builtin and r.distribution != "peftkit-loha"}
    assert third_party == loaded
    assert "lora" in registry.methods and registry.records["lora"].builtin
    skipped = {name for name, _, _ in registry.skipped}
    assert skipped >= ({"hello"} | BROKEN) - loaded
    assert not skipped & loaded


def test_allow_list_from_the_cli(fixtures_dir):
    result = peftkit_cli(fixtures_dir, "plugins", "--json", PEFTKIT_PLUGINS="hello,nosuchplugin")
    assert result.returncode == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["hello"]["status"] == "ok"
    assert all(rows[name]["status"] == "skipped" for name in BROKEN)
    table = peftkit_cli(fixtures_dir, "plugins", PEFTKIT_PLUGINS="hello,nosuchplugin")
    assert "PEFTKIT_PLUGINS lists 'nosuchplugin', which no installed plugin" in table.stderr


_SAVE_HELLO_ADAPTER = """
import sys, peftkit
from tests.tiny_models import build_tiny
model = peftkit.adapt(build_tiny("llama"), "hello[target_modules=['o_proj']]")
model.save_adapter(sys.argv[1])
"""


def test_loading_an_adapter_whose_plugin_is_missing_names_the_distribution(fixtures_dir, tmp_path, monkeypatch):
    folder = tmp_path / "hello-adapter"
    made = subprocess.run([sys.executable, "-c", _SAVE_HELLO_ADAPTER, str(folder)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=clean_env(PYTHONPATH=f"{fixtures_dir}:{ROOT}"))
    assert made.returncode == 0, made.stderr
    saved = json.loads((folder / "adapter_config.json").read_text())["peftkit"]
    assert (saved["plugin"], saved["plugin_version"]) == ("peftkit-hello", "1.2.0")

    from peftkit import AdaptedModel
    from tests.tiny_models import build_tiny

    model = AdaptedModel(build_tiny("llama"))
    with pytest.raises(AdapterLoadError) as error:
        model.load_adapter(str(folder))
    assert "unknown tuning method 'hello'" in str(error.value)
    assert "made with the plugin peftkit-hello 1.2.0: install it (pip install 'peftkit-hello>=1')" \
        in str(error.value)
    assert model.adapters == {}

    # Installed but left out by PEFTKIT_PLUGINS: the message says so instead.
    from peftkit.core import serialization

    registry = fresh_registry(fixtures_dir, monkeypatch, allow="")
    monkeypatch.setattr(serialization, "get_registry", lambda: registry)
    with pytest.raises(AdapterLoadError, match=r"Plugin 'hello' \(peftkit-hello\) is installed but not loaded: "
                                               r"PEFTKIT_PLUGINS=''"):
        model.load_adapter(str(folder))
