"""``peftkit plugins``: list, inspect, install and uninstall plugins.

The ``plugins`` group itself is defined in :mod:`peftkit.cli`; it calls
:func:`show_plugins` and gets the subcommands below attached. ``install`` and
``uninstall`` run pip in the interpreter that runs peftkit
(``sys.executable -m pip``), so a plugin always lands in the environment
whose peftkit will load it. Torch-free at import, like every CLI module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from importlib import metadata
from typing import Any

import click

from peftkit.api import list_methods
from peftkit.cli_output import echo_json, format_table
from peftkit.core.plugins import (BUILTIN_DISTRIBUTION, ENTRY_POINT_GROUP, PluginRecord, Registry,
                                  get_registry, normalize_distribution)


def _short_hook(hook: str) -> str:
    return hook.replace("peftkit_register_", "")


#: What a plugin can contribute besides methods: (key of PluginRecord.to_dict(), label).
_CONTRIBUTIONS = (("merge_strategies", "merge strategies"), ("architectures", "architectures"),
                  ("hub_backends", "hub backends"), ("commands", "commands"))


# -- listing ----------------------------------------------------------------------------


def plugin_rows(registry: Registry, verbose: bool = False) -> list[dict[str, Any]]:
    """Every loaded plugin as a dict (``PluginRecord.to_dict``), then the installed
    ones the ``PEFTKIT_PLUGINS`` allow-list left out, with status ``skipped``."""
    rows = [r.to_dict(verbose=verbose) for r in registry.records.values()]
    for name, dist, version in registry.skipped:
        skipped = PluginRecord(name=name, module="", distribution=dist, version=version).to_dict(verbose=verbose)
        skipped["status"] = "skipped"
        skipped["reason"] = "not listed in PEFTKIT_PLUGINS"
        rows.append(skipped)
    return rows


def unmatched_allow_list(registry: Registry) -> list[str]:
    """Names in PEFTKIT_PLUGINS that no installed plugin answers to (usually a typo)."""
    if not registry.allow_list:
        return []
    known = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        known.add(ep.name)
        if ep.dist is not None:
            known.add(normalize_distribution(ep.dist.name))
    return sorted(a for a in registry.allow_list if a not in known and normalize_distribution(a) not in known)


def show_plugins(as_json: bool, verbose: bool) -> None:
    """Body of ``peftkit plugins``: a table (errors on stderr) or JSON. Always exits 0:
    a broken plugin is reported, never fatal."""
    registry = get_registry()
    rows = plugin_rows(registry, verbose)
    if as_json:
        echo_json(rows)
        return
    table = [[r["name"], r["distribution"] or "-", r["version"] or "-",
              str(r["api_version"]) if r["api_version"] is not None else "-", r["status"],
              ",".join(r["methods"]) or "-", ",".join(_short_hook(h) for h in r["hooks"]) or "-"] for r in rows]
    click.echo(format_table(table, ["PLUGIN", "DISTRIBUTION", "VERSION", "API", "STATUS", "METHODS", "HOOKS"]))
    broken = [r for r in rows if r["status"] == "broken"]
    for r in broken:
        for error in r["errors"]:
            click.echo(f"\n{r['name']}: {error}", err=True)
        for tb in r.get("tracebacks", []):
            click.echo(tb.rstrip(), err=True)
    if broken and not verbose and any(registry.records[r["name"]].tracebacks for r in broken):
        click.echo("\n(run `peftkit plugins --verbose` for tracebacks)", err=True)
    for r in rows:
        for warning in r["warnings"]:
            click.echo(f"\n{r['name']}: warning: {warning}", err=True)
    if any(r["status"] == "skipped" for r in rows):
        allow = os.environ.get("PEFTKIT_PLUGINS", "")
        what = "the built-ins only" if not allow.strip() else "the built-ins and the plugins it lists"
        click.echo(f"\nskipped: PEFTKIT_PLUGINS={allow!r} loads {what} (name plugins or distributions, "
                   f"comma-separated; unset it to load every installed plugin)", err=True)
    for name in unmatched_allow_list(registry):
        click.echo(f"\nwarning: PEFTKIT_PLUGINS lists {name!r}, which no installed plugin or distribution "
                   f"answers to", err=True)


# -- inspect ----------------------------------------------------------------------------


def find_records(registry: Registry, name: str) -> list[PluginRecord]:
    """Loaded plugins named ``name``, or provided by the distribution ``name``."""
    if name in registry.records:
        return [registry.records[name]]
    wanted = normalize_distribution(name)
    return [r for r in registry.records.values()
            if r.distribution is not None and normalize_distribution(r.distribution) == wanted]


def describe(record: PluginRecord, verbose: bool) -> dict[str, Any]:
    """``inspect``'s view of one plugin: its record plus where it lives and what its methods are."""
    data = record.to_dict(verbose=verbose)
    module = sys.modules.get(record.module)
    data["file"] = getattr(module, "__file__", None)
    data["methods"] = [m for m in list_methods() if m["name"] in record.methods]
    return data


@click.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks of a broken plugin.")
def inspect_command(name: str, as_json: bool, verbose: bool) -> None:
    """Show one plugin in detail: NAME is a plugin name or a distribution name."""
    registry = get_registry()
    records = find_records(registry, name)
    if not records:
        for ep_name, dist, version in registry.skipped:
            if name == ep_name or (dist and normalize_distribution(dist) == normalize_distribution(name)):
                raise click.ClickException(
                    f"plugin {ep_name!r} ({dist} {version}) is installed but not loaded: PEFTKIT_PLUGINS="
                    f"{os.environ.get('PEFTKIT_PLUGINS', '')!r} does not list it")
        known = ", ".join(sorted(registry.records)) or "none"
        raise click.ClickException(f"no plugin or distribution named {name!r} is loaded; plugins: {known}. "
                                   f"Install one with `peftkit plugins install NAME`")
    described = [describe(r, verbose) for r in records]
    if as_json:
        echo_json(described if len(described) > 1 else described[0])
        return
    for i, d in enumerate(described):
        if i:
            click.echo()
        dist = f"{d['distribution']} {d['version'] or ''}".strip() if d["distribution"] else "-"
        lines = [("plugin", d["name"]), ("distribution", dist + (" (built in)" if d["builtin"] else "")),
                 ("module", d["module"] + (f"  ({d['file']})" if d["file"] else "")),
                 ("plugin API", d["api_version"] if d["api_version"] is not None else "-"),
                 ("status", d["status"]), ("hooks", ", ".join(d["hooks"]) or "-")]
        lines += [(label, ", ".join(d[key]) or "-") for key, label in _CONTRIBUTIONS]
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            click.echo(f"{key:>{width}}: {value}")
        for m in d["methods"]:
            click.echo(f"{'method':>{width}}: {m['name']}: {m['description']}")
            click.echo(f"{'':>{width}}  merge: {'yes' if m['can_merge'] else 'no'}, PEFT format: "
                       f"{'yes' if m['peft_format'] else 'no'}, blocks: {', '.join(m['blocks']) or '-'}")
            click.echo(f"{'':>{width}}  options: {', '.join(m['options'])}")
        for error in d["errors"]:
            click.echo(f"{'error':>{width}}: {error}")
        for warning in d["warnings"]:
            click.echo(f"{'warning':>{width}}: {warning}")
        for tb in d.get("tracebacks", []):
            click.echo(tb.rstrip())


# -- install / uninstall ----------------------------------------------------------------


def _pip(*args: str) -> int:
    """Run pip of this interpreter, its output going straight to the terminal."""
    return subprocess.call([sys.executable, "-m", "pip", *args])


def _plugins_in_fresh_process() -> list[dict[str, Any]]:
    """``peftkit plugins --json`` in a new interpreter: it sees what pip just installed
    (new .pth files and entry points), which this process cannot."""
    result = subprocess.run([sys.executable, "-m", "peftkit", "plugins", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"peftkit no longer starts after the install:\n{result.stderr.strip()}\n"
                                   f"Uninstall what was just installed with `peftkit plugins uninstall NAME`")
    return json.loads(result.stdout)


def _installed_plugin_keys() -> set[tuple[str, str | None, str | None]]:
    return {(ep.name, ep.dist.name if ep.dist else None, ep.dist.version if ep.dist else None)
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


@click.command("install")
@click.argument("names", nargs=-1)
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade to the newest version.")
@click.option("-e", "--editable", "editable", multiple=True, metavar="PATH",
              help="Install a local plugin folder in editable mode (repeatable).")
@click.option("--force-reinstall", is_flag=True, help="Reinstall even if it is up to date.")
@click.option("--no-deps", is_flag=True, help="Do not install the plugin's dependencies.")
@click.option("--no-build-isolation", is_flag=True, help="Build with the packages already installed.")
@click.option("--no-index", is_flag=True, help="Do not use the package index (local paths and --find-links).")
@click.option("--find-links", "-f", multiple=True, metavar="URL_OR_DIR", help="Also look for packages here.")
@click.option("--pre", is_flag=True, help="Allow pre-releases.")
@click.option("--quiet", "-q", is_flag=True, help="Less pip output.")
def install_command(names: tuple[str, ...], upgrade: bool, editable: tuple[str, ...], force_reinstall: bool,
                    no_deps: bool, no_build_isolation: bool, no_index: bool, find_links: tuple[str, ...],
                    pre: bool, quiet: bool) -> None:
    """Install plugins with pip into the environment that runs peftkit.

    NAMES are anything pip accepts: a distribution name (peftkit-loha), a
    requirement (peftkit-loha>=1,<2), a local folder, a wheel or a URL.
    Afterwards peftkit loads plugins in a fresh process and reports what
    each new one provides; a new plugin that is broken fails the command.
    """
    if not names and not editable:
        raise click.UsageError("name at least one plugin to install, e.g. peftkit plugins install peftkit-loha")
    args = ["install"]
    for flag, on in (("--upgrade", upgrade), ("--force-reinstall", force_reinstall), ("--no-deps", no_deps),
                     ("--no-build-isolation", no_build_isolation), ("--no-index", no_index), ("--pre", pre),
                     ("--quiet", quiet)):
        if on:
            args.append(flag)
    for link in find_links:
        args += ["--find-links", link]
    for path in editable:
        args += ["--editable", path]
    args += list(names)
    before = _installed_plugin_keys()
    code = _pip(*args)
    if code != 0:
        raise click.ClickException(f"pip install failed (exit code {code}); see pip's message above")
    rows = _plugins_in_fresh_process()
    new = [r for r in rows if (r["name"], r["distribution"], r["version"]) not in before
           and r["distribution"] != BUILTIN_DISTRIBUTION]
    if not new:
        click.echo("pip installed it, but it brings no new peftkit plugin (no new entry point in the "
                   f"{ENTRY_POINT_GROUP!r} group); `peftkit plugins` lists the installed ones", err=True)
        return
    broken = []
    for r in new:
        what = [f"{label} {', '.join(r[key])}" for key, label in (("methods", "methods"), *_CONTRIBUTIONS)
                if r[key]]
        status = {"ok": "", "broken": " BROKEN", "skipped": " (not loaded: not listed in PEFTKIT_PLUGINS)"}
        click.echo(f"plugin {r['name']} ({r['distribution']} {r['version']}){status.get(r['status'], '')}: "
                   f"{'; '.join(what) or 'no registrations'}")
        if r["status"] == "broken":
            broken.append(r)
            for error in r["errors"]:
                click.echo(f"  {error}", err=True)
        for warning in r["warnings"]:
            click.echo(f"  warning: {warning}", err=True)
    if broken:
        raise click.ClickException(f"installed, but {len(broken)} new plugin(s) are broken (see above); fix "
                                   f"or uninstall: peftkit plugins uninstall {broken[0]['distribution']}")


def resolve_distribution(name: str) -> tuple[str, str, list[str]]:
    """(distribution, version, its plugin names) for a plugin or distribution name."""
    plugins_of: dict[str, tuple[str, list[str]]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None:
            plugins_of.setdefault(ep.dist.name, (ep.dist.version, []))[1].append(ep.name)
    wanted = normalize_distribution(name)
    for dist, (version, eps) in plugins_of.items():
        if name in eps or normalize_distribution(dist) == wanted:
            if normalize_distribution(dist) == BUILTIN_DISTRIBUTION:
                raise click.ClickException(
                    f"{name!r} is part of peftkit itself, not a separate plugin; it cannot be uninstalled "
                    f"on its own (pip uninstall peftkit removes everything)")
            return dist, version, sorted(eps)
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        installed = ", ".join(sorted(d for d in plugins_of if normalize_distribution(d) != BUILTIN_DISTRIBUTION))
        raise click.ClickException(f"no installed plugin or distribution named {name!r}; installed plugin "
                                   f"distributions: {installed or 'none'}") from None
    raise click.ClickException(f"{name!r} is installed but is not a peftkit plugin (it declares no "
                               f"{ENTRY_POINT_GROUP!r} entry point); remove it with pip uninstall {name}")


@click.command("uninstall")
@click.argument("names", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def uninstall_command(names: tuple[str, ...], yes: bool) -> None:
    """Uninstall plugin distributions with pip. NAMES are plugin or distribution names."""
    targets = []
    for name in names:
        dist, version, eps = resolve_distribution(name)
        if dist not in [t[0] for t in targets]:
            targets.append((dist, version, eps))
    for dist, version, eps in targets:
        click.echo(f"{dist} {version} (plugins: {', '.join(eps)})")
    if not yes:
        click.confirm(f"Uninstall {'these' if len(targets) > 1 else 'it'}?", abort=True)
    code = _pip("uninstall", "--yes", *[t[0] for t in targets])
    if code != 0:
        raise click.ClickException(f"pip uninstall failed (exit code {code})")
    click.echo(f"uninstalled {', '.join(f'{d} {v}' for d, v, _ in targets)}")


#: Subcommands attached to the ``peftkit plugins`` group by peftkit.cli.
PLUGINS_SUBCOMMANDS = [inspect_command, install_command, uninstall_command]


# -- plugin-provided commands -------------------------------------------------------------


def add_plugin_commands(cli: click.Group, registry: Registry | None = None) -> None:
    """Run every ``peftkit_register_commands`` hook on ``cli``, each isolated.

    A plugin that raises, or that would replace a command it does not own,
    is recorded as broken; the CLI keeps its own commands either way. Commands
    a plugin adds are tagged with its name, so running the hooks again (a
    second ``run()`` in one process) lets each plugin replace its own.
    """
    registry = registry or get_registry()
    for impl in registry.pm.hook.peftkit_register_commands.get_hookimpls():
        plugin = impl.plugin_name
        record = registry.records.get(plugin)
        before = dict(cli.commands)
        try:
            impl.function(**({"cli": cli} if "cli" in impl.argnames else {}))
        except Exception as exc:  # a broken plugin must not break the CLI
            cli.commands.clear()
            cli.commands.update(before)
            _note(record, f"plugin {plugin!r} raised in peftkit_register_commands: {type(exc).__name__}: {exc}",
                  traceback.format_exc())
            click.echo(f"warning: plugin {plugin!r} could not add its commands: {exc} (see `peftkit plugins`)",
                       err=True)
            continue
        for name, command in list(cli.commands.items()):
            old = before.get(name)
            if old is command:
                continue
            if old is not None and getattr(old, "peftkit_plugin", None) != plugin:
                cli.commands[name] = old
                _note(record, f"plugin {plugin!r} tried to replace the command {name!r}, which it does not "
                              f"own; the original is kept. Give its command another name")
                continue
            command.peftkit_plugin = plugin  # type: ignore[attr-defined]
            if record is not None and name not in record.commands:
                record.commands.append(name)


def _note(record: PluginRecord | None, error: str, tb: str | None = None) -> None:
    """Record a problem once, however often the command hooks run in this process."""
    if record is not None and error not in record.errors:
        record.errors.append(error)
        if tb:
            record.tracebacks.append(tb)
