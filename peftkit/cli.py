"""The ``peftkit`` command line. Imports no torch until a command needs it.

Exit codes: 0 success, 1 a peftkit error (bad input, missing adapter, ...),
2 a usage error (click's own). A command given ``--json`` that fails prints,
besides the message on stderr, the error as JSON on stdout
(:func:`peftkit.cli_output.error_report`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from peftkit.cli_output import (ABORTED, echo_json, error_report, format_table, hold_stdout, json_option_given,
                                terminal_safe)
from peftkit.core.errors import PeftkitError


class PeftkitGroup(click.Group):
    """Turns peftkit errors into a clean message and the error's exit code, 1 unless it says otherwise
    (:func:`run` escapes its control characters)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PeftkitError as exc:
            error = click.ClickException(str(exc))
            error.exit_code = exc.exit_code
            raise error from None


@click.group(cls=PeftkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftkit", prog_name="peftkit")
def main() -> None:
    """peftkit: parameter-efficient fine-tuning with plugins and an adapter hub."""


@main.command("methods")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def methods_command(name: str | None, as_json: bool) -> None:
    """List the installed tuning methods; with NAME, one method's options.

    Each option is shown with its type, default and help, e.g. `peftkit methods lora`.
    """
    from peftkit.api import describe_method, list_methods

    if name is not None:
        _show_method(describe_method(name), as_json)
        return
    methods = list_methods()
    if as_json:
        echo_json(methods)
        return
    rows = [[m["name"], m["distribution"] or "-", "yes" if m["can_merge"] else "no",
             "yes" if m["peft_format"] else "no", m["description"]] for m in methods]
    click.echo(format_table(rows, ["METHOD", "PLUGIN", "MERGE", "PEFT", "DESCRIPTION"]))


def _show_method(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(info)
        return
    click.echo(f"{info['name']}: {info['description']}")
    click.echo(f"plugin: {info['distribution'] or '-'} {info['version'] or ''}".rstrip()
               + f"; merges: {'yes' if info['can_merge'] else 'no'}; PEFT format: "
               + ("yes" if info["peft_format"] else "no"))
    click.echo(f"blocks: {', '.join(info['blocks']) or 'none (the adapter runs alone)'}")
    if info["distribution"] == "peftkit":  # a built-in method has a page in the docs that ship with peftkit
        from peftkit.method_docs import docs_reference

        click.echo(f"docs: `peftkit docs {docs_reference(info['name'])}`")
    if info["aliases"]:
        click.echo("aliases: " + ", ".join(f"{k} = {v}" for k, v in info["aliases"].items()))
    rows = [[o["name"], o["type"], json.dumps(o["default"]), o.get("help", "")] for o in info["options"]]
    click.echo("\n" + format_table(rows, ["OPTION", "TYPE", "DEFAULT", "HELP"]))


@main.group("plugins", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks of broken plugins.")
@click.pass_context
def plugins_command(ctx: click.Context, as_json: bool, verbose: bool) -> None:
    """List installed plugins (name, version, hooks, methods; broken ones with their error).

    Subcommands inspect, install and uninstall one (see `peftkit plugins COMMAND --help`).
    """
    if ctx.invoked_subcommand is not None:
        return
    from peftkit.cli_plugins import show_plugins

    show_plugins(as_json, verbose)


def _add_plugins_subcommands() -> None:
    from peftkit.cli_plugins import PLUGINS_SUBCOMMANDS

    for command in PLUGINS_SUBCOMMANDS:
        plugins_command.add_command(command)


_add_plugins_subcommands()


@main.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(path: str, as_json: bool) -> None:
    """Describe a saved adapter folder (method, base model, targets, parameters, size; a training run's
    checkpoints are counted apart), or a composition folder (its composition, member adapters and fusions)."""
    from pathlib import Path

    from peftkit.core.inspect_folder import describe_composition, describe_folder

    if (Path(path) / "composition.json").is_file() and not (Path(path) / "adapter_config.json").is_file():
        _show_composition(describe_composition(path), as_json)
        return
    info = describe_folder(path)
    if as_json:
        echo_json(info)
        return
    def _targets(targets: Any) -> str:
        return ", ".join(targets) if isinstance(targets, list) else targets or "-"

    rows = [("path", info["path"]), ("method", info["method"]), ("format", info["format"]),
            ("base model", info["base_model"] or "-"), ("model type", info["base_model_type"] or "-")]
    if info["parts"]:
        rows += [("parts", " | ".join(p["method"] + (f" ({_targets(p['target_modules'])})" if p["target_modules"]
                                                       else "") for p in info["parts"]))]
    else:
        rows += [("targets", _targets(info["target_modules"]))]
    if info["labels"]:
        rows += [("labels", ", ".join(f"{i}: {name}" for i, name in enumerate(info["labels"])))]
    for key, value in [*rows,
                       ("plugin", f"{info['plugin'] or '-'} {info['plugin_version'] or ''}".strip()),
                       ("parameters", f"{info['parameters']:,}"
                        + (f" (and {info['fixed_numbers']:,} fixed numbers: saved, not trained)"
                           if info["fixed_numbers"] else "")),
                       ("tensors", info["tensors"]),
                       ("size on disk", _human_bytes(info["size_bytes"]))]:
        click.echo(f"{key:>13}: {value}")
    if info["base_embeddings"]:
        shapes = ", ".join(f"{name} {' x '.join(map(str, shape))}" for name, shape in info["base_embeddings"].items())
        rows = max(shape[0] for shape in info["base_embeddings"].values())
        click.echo(f"{'embeddings':>13}: {shapes} (the base model's, saved with the adapter as PEFT does when it "
                   f"adapts or resizes them; loading replaces the model's: it needs {rows} tokens, "
                   f"model.resize_token_embeddings({rows}))")
    if info["tokenizer_files"]:
        click.echo(f"{'tokenizer':>13}: {info['tokenizer_files']} files ({_human_bytes(info['tokenizer_size_bytes'])}; "
                   f"saved with the adapter, not part of it)")
    if info["checkpoints"]:
        click.echo(f"{'checkpoints':>13}: {info['checkpoints']} ({_human_bytes(info['checkpoints_size_bytes'])}; "
                   f"a training run's, not part of the adapter)")


def _show_composition(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(info)
        return
    members = ", ".join(f"{name} ({a['method']}, {a['parameters']:,} parameters)" for name, a in info["adapters"].items())
    for key, value in [("path", info["path"]), ("kind", "composition"), ("composition", info["composition"] or "-"),
                       ("base model", info["base_model"] or "-"), ("model type", info["base_model_type"] or "-"),
                       ("adapters", members or "-"), ("fusions", ", ".join(info["fusions"]) or "-"),
                       ("parameters", f"{info['parameters']:,}"), ("size on disk", _human_bytes(info["size_bytes"]))]:
        click.echo(f"{key:>13}: {value}")


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


#: Modules that add command groups to ``main`` (each defines ``commands``: a
#: list of click commands). They must not import torch at module level.
COMMAND_MODULES: list[str] = ["peftkit.registry.cli", "peftkit.cli_train", "peftkit.cli_hub", "peftkit.cli_merge",
                               "peftkit.cli_read_docs"]


def add_builtin_commands() -> None:
    import importlib

    for module_name in COMMAND_MODULES:
        for command in importlib.import_module(module_name).commands:
            main.add_command(command)


def _add_plugin_commands() -> None:
    """Let plugins add commands; a failing plugin is reported, never fatal."""
    from peftkit.cli_plugins import add_plugin_commands

    add_plugin_commands(main)


#: The failures :func:`run` reports (a message on stderr, with ``--json`` the error as JSON on stdout); any
#: other exception is a bug and keeps its traceback.
REPORTED_FAILURES: tuple[type[BaseException], ...] = (click.ClickException, click.exceptions.Abort)


def run(argv: list[str] | None = None) -> int:
    add_builtin_commands()
    _add_plugin_commands()
    args = sys.argv[1:] if argv is None else list(argv)
    as_json = json_option_given(main, args)
    try:
        # Under --json, stdout holds the result or the error's JSON, not a result cut short by the failure.
        with hold_stdout(divert_on=REPORTED_FAILURES) if as_json else contextlib.nullcontext():
            # Without standalone mode, click returns ctx.exit(code)'s code instead of raising: a command that
            # ends with ctx.exit(1) must still exit 1 (no command returns an int for any other reason).
            result = main.main(args=args, prog_name="peftkit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except REPORTED_FAILURES as exc:
        return _report_failure(exc, as_json)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _report_failure(error: click.ClickException | click.exceptions.Abort, as_json: bool) -> int:
    """Print ``error`` on stderr as click does (with ``as_json``, as JSON on stdout too); return its exit code."""
    report = error_report(error)
    if isinstance(error, click.exceptions.Abort):
        click.echo(ABORTED, err=True)
    else:
        error.message = terminal_safe(error.message, multiline=True)  # any command's error may quote a hub
        error.show()
    if as_json:
        echo_json(report)
    return report["error"]["exit_code"]


def entry() -> None:
    sys.exit(run())
