"""``peftkit hub ...`` (push, pull, search, info, delete, login, logout, whoami, storage) and ``peftkit compose``.

Torch-free at import. Every command takes ``--hub`` (else ``PEFTKIT_HUB``,
else the embedded local hub). Errors print one line and exit with code 1;
a token is never printed. What a hub sends (names, card facts, commits,
error messages) is printed through :func:`peftkit.cli_output.terminal_safe`,
so a hostile hub cannot drive the terminal; ``--json`` gives it exactly.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from peftkit.cli_auto_compose import auto_options, check_auto_options, run_auto
from peftkit.cli_options import hub_option, plain_warnings, quiet_option, read_token, token_option
from peftkit.cli_output import echo_json, echo_safe, format_table


def _short_date(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None and hasattr(value, "strftime") else "-"


class _HubGroup(click.Group):
    """Hub errors (and peftkit errors) become one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from peftkit.core.errors import PeftkitError

        try:
            with plain_warnings():
                return super().invoke(ctx)
        except PeftkitError as exc:
            from peftkit.hub_client.auth import redact

            raise click.ClickException(redact(str(exc))) from None  # run() escapes control characters


@click.group("hub", cls=_HubGroup)
def hub_group() -> None:
    """Publish, find and download adapters: the embedded hub, a peftkit registry, or the Hugging Face Hub."""


@hub_group.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@hub_option
@click.option("--revision", "-r", default="main", show_default=True, help="Branch to commit to (created from main).")
@click.option("--private/--public", default=None, help="Visibility (default: public for a new repo, else unchanged).")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--task", default=None, help="Task, e.g. text-classification (the card's pipeline_tag).")
@click.option("--dataset", multiple=True, help="Dataset trained on (repeatable).")
@click.option("--metric", multiple=True, metavar="NAME=VALUE", help="A result, e.g. accuracy=0.91 (repeatable).")
@click.option("--tag", multiple=True, help="Extra card tag (repeatable).")
@click.option("--base-model", default=None, help="Hub id of the base model, when the folder records a local path.")
@click.option("--description", default=None, help="Text for the model card.")
@click.option("--license", "license_", default=None, help="License id, e.g. apache-2.0.")
@click.option("--language", multiple=True, help="Language code (repeatable).")
@click.option("--format", "folder_format", type=click.Choice(["peftkit", "adapters"]), default=None,
              help="Publish the adapter in this folder format: 'adapters' (AdapterHub's) converts a folder saved "
                   "in peftkit's format, loading it on its base model. Default: as saved.")
@token_option
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push_command(folder: str, repo_id: str, hub: str | None, revision: str, private: bool | None,
                 message: str | None, task: str | None, dataset: tuple[str, ...], metric: tuple[str, ...],
                 tag: tuple[str, ...], base_model: str | None, description: str | None, license_: str | None,
                 language: tuple[str, ...], folder_format: str | None, token_file: str | None, quiet: bool,
                 as_json: bool) -> None:
    """Publish the adapter (or composition, or fusion) saved in FOLDER as REPO_ID (namespace/name)."""
    from peftkit.hub_client.api import push

    metrics = {}
    for item in metric:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r}: write NAME=VALUE, e.g. accuracy=0.91", param_hint="--metric")
        try:
            metrics[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: {value!r} is not a number", param_hint="--metric") from None
    result = push(folder, repo_id, hub=hub, private=private, commit_message=message, revision=revision,
                  task=task, dataset=list(dataset) or None, metrics=metrics or None, tags=list(tag),
                  base_model=base_model, description=description, license=license_,
                  language=list(language) or None, token=read_token(token_file), progress=not quiet,
                  format=folder_format)
    if as_json:
        echo_json(result.to_json())
        return
    if not result.changed:
        echo_safe(f"{result.repo_id} is already up to date at {result.revision} on {result.hub} "
                  f"(commit {result.commit}); nothing was committed")
        return
    verb = "Created" if result.created else "Updated"
    echo_safe(f"{verb} {result.repo_id} on {result.hub}: revision {result.revision} is commit {result.commit}")


@hub_group.command("pull")
@click.argument("ref", metavar="REPO_ID[@REVISION]")
@hub_option
@click.option("--revision", "-r", default=None, help="Branch or commit (instead of @REVISION).")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Also copy the files to this folder (replaced whole).")
@token_option
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull_command(ref: str, hub: str | None, revision: str | None, out: str | None, token_file: str | None,
                 quiet: bool, as_json: bool) -> None:
    """Download an adapter into the cache (verified) and print its folder.

    Offline (PEFTKIT_OFFLINE=1 or HF_HUB_OFFLINE=1) it is served from the cache.
    """
    from peftkit.hub_client.resolve import open_hub, parse_ref
    from peftkit.hub_client.snapshot import copy_snapshot, pull_snapshot

    backend = open_hub(hub, token=read_token(token_file))
    try:
        pulled = pull_snapshot(backend, parse_ref(ref, revision), progress=not quiet)
    finally:
        backend.close()
    path = copy_snapshot(pulled.path, out) if out else pulled.path
    if as_json:
        echo_json({"repo_id": pulled.repo_id, "revision": pulled.revision, "commit": pulled.commit,
                   "hub": pulled.hub, "path": str(path), "cache_path": str(pulled.path),
                   "from_cache": pulled.from_cache})
        return
    if not quiet:
        note = " (from the cache)" if pulled.from_cache else ""
        echo_safe(f"{pulled.repo_id}@{pulled.revision} = commit {pulled.commit}{note}", err=True)
    echo_safe(str(path))


@hub_group.command("search")
@click.argument("text", required=False)
@hub_option
@click.option("--base-model", default=None, help="Adapters of this base model (hub id).")
@click.option("--method", default=None, help="Tuning method, e.g. lora, seq_bn.")
@click.option("--task", default=None, help="Task, e.g. text-classification (or a PEFT task type: CAUSAL_LM).")
@click.option("--tag", multiple=True, help="A card tag every hit must have (repeatable).")
@click.option("--author", default=None, help="Namespace (user or organization).")
@click.option("--dataset", default=None, help="Adapters whose card lists this dataset (hub id).")
@click.option("--sort", type=click.Choice(["downloads", "recent"]), default="downloads", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def search_command(text: str | None, hub: str | None, base_model: str | None, method: str | None,
                   task: str | None, tag: tuple[str, ...], author: str | None, dataset: str | None, sort: str,
                   limit: int, token_file: str | None, as_json: bool) -> None:
    """Find adapters by TEXT, base model, method, task, tags, author and dataset."""
    from peftkit.hub_client.api import search

    hits = search(text, hub, base_model=base_model, method=method, task=task, tags=list(tag), author=author,
                  dataset=dataset, sort=sort, limit=limit, token=read_token(token_file))
    if as_json:
        echo_json([h.to_json() for h in hits])
    elif hits:
        rows = [[h.repo_id + (" (private)" if h.private else ""), h.method or "-", h.base_model or "-",
                 h.task or "-", str(h.downloads), _short_date(h.last_modified)] for h in hits]
        click.echo(format_table(rows, ["REPO", "METHOD", "BASE MODEL", "TASK", "DOWNLOADS", "UPDATED"]))
    else:
        click.echo("No adapter matches.", err=True)
    if not hits and method:
        _hint_unknown_method(method)


def _hint_unknown_method(method: str) -> None:
    """After a search with no hits: say so on stderr when no installed plugin has ``method`` (a typo?).

    Only a hint: a hub may hold adapters of methods installed elsewhere, so
    the search itself ran and is not an error.
    """
    from peftkit.core.plugins import get_registry, unknown_method_message
    from peftkit.core.suggestions import method_by_any_case

    registry = get_registry()
    if method_by_any_case(method, registry.methods):
        return
    click.echo(f"Hint: {unknown_method_message(method, registry)}", err=True)


@hub_group.command("info")
@click.argument("ref", metavar="REPO_ID[@REVISION]")
@hub_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(ref: str, hub: str | None, token_file: str | None, as_json: bool) -> None:
    """Describe a repo: method, base model, task, files, branches."""
    from peftkit.hub_client.api import info

    data = info(ref, hub, token=read_token(token_file))
    if as_json:
        echo_json(data.to_json())
        return
    fields = [("repo", data.repo_id), ("hub", data.hub), ("commit", data.sha or "-"),
              ("visibility", "private" if data.private else "public"), ("method", data.method or "-"),
              ("base model", data.base_model or "-"), ("task", data.task or "-"),
              ("library", data.library_name or "-"), ("datasets", ", ".join(data.datasets) or "-"),
              ("tags", ", ".join(data.tags) or "-"), ("downloads", str(data.downloads)),
              ("updated", _short_date(data.last_modified))]
    for key, value in fields:
        echo_safe(f"{key:>11}: {value}")
    if data.branches:
        click.echo("   branches:")
        for name, sha in sorted(data.branches.items()):
            echo_safe(f"             {name} -> {sha}")
    if data.files:
        click.echo("      files:")
        for f in data.files:
            echo_safe(f"             {f.path} ({f.size:,} bytes)")


@hub_group.command("delete")
@click.argument("repo_id")
@hub_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--missing-ok", is_flag=True,
              help="Succeed when the repo does not exist (saying that nothing was deleted).")
@token_option
def delete_command(repo_id: str, hub: str | None, yes: bool, missing_ok: bool, token_file: str | None) -> None:
    """Delete a repo with its whole history (no undo)."""
    from peftkit.hub_client.api import delete
    from peftkit.hub_client.resolve import hub_address

    if not yes:
        click.confirm(f"Delete {repo_id} and its whole history from {hub_address(hub)}?", abort=True)
    if delete(repo_id, hub, token=read_token(token_file), missing_ok=missing_ok):
        echo_safe(f"Deleted {repo_id}.")
    else:
        echo_safe(f"{repo_id} does not exist; nothing was deleted.")


@hub_group.command("login")
@hub_option
@click.option("--token-stdin", is_flag=True, help="Read the token from standard input instead of a prompt.")
@click.option("--no-verify", is_flag=True, help="Store the token without asking the hub whether it is valid.")
def login_command(hub: str | None, token_stdin: bool, no_verify: bool) -> None:
    """Store a token for a hub in $PEFTKIT_HOME/hub_tokens.json (readable by you only)."""
    from peftkit.hub_client.api import login
    from peftkit.hub_client.auth import token_file
    from peftkit.hub_client.resolve import hub_address

    address = hub_address(hub)
    from peftkit.hub_client.resolve import open_hub

    with open_hub(hub) as backend:  # before asking for a token: the local hub takes none
        if not backend.remote:
            raise click.ClickException(f"the hub {backend.address} is on this machine and needs no token; log in to "
                                       f"a registry (--hub http://host:port) or the Hugging Face Hub (--hub hf)")
    if token_stdin:
        token = sys.stdin.readline().strip()
    else:
        token = click.prompt(f"Token for {address}", hide_input=True, err=True).strip()
    user = login(token, hub, verify=not no_verify)
    who = f" as {user}" if user else ""
    echo_safe(f"Logged in to {address}{who}; the token is saved in {token_file()} (mode 0600).")


@hub_group.command("logout")
@hub_option
def logout_command(hub: str | None) -> None:
    """Forget the token stored for a hub."""
    from peftkit.hub_client.api import logout
    from peftkit.hub_client.resolve import hub_address

    if logout(hub):
        click.echo(f"Logged out of {hub_address(hub)}.")
    else:
        click.echo(f"No token was stored for {hub_address(hub)}.")


@hub_group.command("whoami")
@hub_option
@token_option
def whoami_command(hub: str | None, token_file: str | None) -> None:
    """Show which user the hub knows your token as."""
    from peftkit.hub_client.api import whoami

    user = whoami(hub, token=read_token(token_file))
    echo_safe(user or "(the local hub has no users)")


@hub_group.command("storage")
@click.argument("namespace", required=False)
@hub_option
@token_option
@click.option("--json", "as_json", is_flag=True,
              help="Print {namespace, used_bytes, quota_bytes (null: no limit), source} as JSON.")
def storage_command(namespace: str | None, hub: str | None, token_file: str | None, as_json: bool) -> None:
    """How much NAMESPACE (default: your user) stores on the hub, and its limit.

    A registry shows you your own namespace and your organizations'; the embedded hub needs a NAMESPACE.
    Exit status: 0 on success, 1 when the namespace is not found or not yours, or you are not logged in,
    2 on a usage error.
    """
    from peftkit.hub_client.api import storage
    from peftkit.hub_client.resolve import open_hub
    from peftkit.hub_rules.names import name_problem
    from peftkit.hub_rules.storage import storage_summary

    if namespace is not None and (problem := name_problem(namespace, "namespace")):
        raise click.BadParameter(problem, param_hint="NAMESPACE")
    with open_hub(hub, token=read_token(token_file)) as backend:
        if namespace is None and not backend.remote:
            raise click.UsageError(f"the embedded hub ({backend.address}) has no users: give the NAMESPACE whose "
                                   "storage to show")
        usage = storage(namespace, backend)
    if as_json:
        echo_json(usage.to_json())
        return
    summary = storage_summary(usage)
    echo_safe(f"{usage.namespace}: {summary.text}")
    if summary.full:
        where = f" --hub {backend.address}" if hub else ""
        echo_safe(f"{usage.namespace} is full: new commits, branches, tags and repos are refused; free space by "
                  f"deleting repos (`peftkit hub delete {usage.namespace}/REPO{where}`), or ask the registry's "
                  f"administrator to raise the limit", err=True)


@click.command("compose")
@click.argument("base")
@click.argument("spec", required=False)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder to write: a composition folder (with --auto: the learned combination, a LoRA "
                   "adapter for --strategy weights, else a composition folder), or with --merge a merged model.")
@hub_option
@click.option("--merge", is_flag=True,
              help="Merge the adapters into the base weights and save a plain transformers model "
                   "(every member must be mergeable and the composition a stack, where an average() of LoRA "
                   "adapters is folded into one first; with --auto: --strategy weights or mixture).")
@click.option("--adapter", "adapter_names", multiple=True, metavar="NAME=REPO",
              help="Load REPO under NAME (repeatable); SPEC may then use NAME.")
@click.option("--overwrite", is_flag=True, help="Replace OUT when it exists.")
@token_option
@quiet_option
@auto_options
def compose_command(base: str, spec: str | None, out: str, hub: str | None, merge: bool,
                    adapter_names: tuple[str, ...], overwrite: bool, token_file: str | None, quiet: bool,
                    auto: bool, **auto_settings: Any) -> None:
    """Load hub adapters onto BASE composed as SPEC and save the result.

    BASE is a model folder or hub id transformers can load. SPEC is a hub id
    or a composition such as 'stack(alice/lang-de, alice/ner@v2)'. With
    --auto, learn the combination instead from --examples: the weights of a
    linear merge of the --candidates (or a hub --search's hits), mixing
    weights over their outputs, or a fusion (--strategy), and save it.
    """
    from pathlib import Path

    from peftkit.hub_client.compose import compose_to_folder

    check_auto_options(auto, spec, auto_settings)
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise click.ClickException(f"{out} exists and is not empty; pass --overwrite to replace it")
    if auto:
        if adapter_names:
            raise click.UsageError("--adapter names members of SPEC; with --auto use --candidates")
        with plain_warnings():
            run_auto(base, out, hub=hub, merge=merge, token=read_token(token_file), quiet=quiet, options=auto_settings)
        return
    mapping = {}
    for item in adapter_names:
        name, sep, ref = item.partition("=")
        if not sep or not name.strip() or not ref.strip():
            raise click.BadParameter(f"{item!r}: write NAME=namespace/repo[@revision]", param_hint="--adapter")
        mapping[name.strip()] = ref.strip()
    with plain_warnings():
        report = compose_to_folder(base, spec, out, hub=hub, merge=merge, adapters=mapping or None,
                                   token=read_token(token_file), progress=not quiet and not auto_settings["as_json"])
    if auto_settings["as_json"]:
        echo_json(report.to_json())
    else:
        echo_safe(report.summary(), multiline=True)


commands = [hub_group, compose_command]
